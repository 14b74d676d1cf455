"""The ``kvpolicy`` application object and what every command shares: lazy loading, consoles, one-line errors.

The command modules of this package (``plugins``, ``evaluate``, ``study``, ``bench``) register themselves on
:data:`app`; this package is the only place where an error becomes an exit code (2 for a bad input, 1 for a run that
cannot report honestly or a misbehaving plugin part).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

# Startup: nothing here imports torch, transformers or the plugins, so ``kvpolicy --help`` and ``kvpolicy <command>
# --help`` answer in well under a second; each command imports what it needs when it runs (see docs/performance.md).

#: commands whose module is imported only when the command is run or asked for its own ``--help``:
#: name -> (module, attribute holding the typer-signature function, one-line summary shown by ``kvpolicy --help``)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": (
        "kvpolicy.cli.bench",
        "bench",
        "Measure what policies really save: cache bytes, prefill and decode time, peak memory vs the full cache.",
    ),
}


class PluginCommand(TyperCommand):
    """A command that uses parts from plugins: the registry loads (and failed plugins are reported) when the command
    runs, after its arguments are parsed, so ``<command> --help`` never imports the plugins (they import torch)."""

    def invoke(self, ctx: click.Context) -> Any:
        warn_plugin_problems()
        return super().invoke(ctx)


class _LazyCommand(click.Command):
    """Stands in for a :data:`LAZY_COMMANDS` entry in the command listing until the command is resolved."""


class LazyGroup(TyperGroup):
    """The top-level group: lists :data:`LAZY_COMMANDS` from their summary and imports one only when it is the
    command being run (``resolve_command``), never to draw ``kvpolicy --help``."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, (_module, _attr, summary) in LAZY_COMMANDS.items():
            self.commands.setdefault(name, _LazyCommand(name, help=summary, short_help=summary))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(cmd, _LazyCommand):
            cmd = self.commands[name] = load_lazy_command(name)
        return name, cmd, rest


def load_lazy_command(name: str) -> click.Command:
    """The real click command of a :data:`LAZY_COMMANDS` entry (imports its module)."""
    module, attr, _summary = LAZY_COMMANDS[name]
    func = getattr(importlib.import_module(module), attr)
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name, help=func.__doc__, cls=PluginCommand)(func)
    command = typer.main.get_command(single)
    command.name = name
    return command


app = typer.Typer(
    name="kvpolicy",
    help="KV-cache compression policies (Elastic Cache and baselines) as plugins, run inside Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)

#: the registry whose problems were last reported (a fresh registry - reloaded plugins - is reported again)
_warned_about: object | None = None


def stdout_console() -> Console:
    # built per call so that typer's CliRunner (which swaps sys.stdout) captures the output
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # piped: do not squeeze tables into 80 columns
        console = Console(width=160)
    return console


def stderr_console() -> Console:
    return Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr without wrapping it at the terminal width (one problem, one line) and return
    the exit to raise."""
    stderr_console().print(Text(f"error: {message}", style="red"), soft_wrap=True)
    return typer.Exit(code)


def given(ctx: typer.Context) -> set[str]:
    """The parameters the user typed on the command line (not left at their defaults)."""
    unset = (None, "DEFAULT", "DEFAULT_MAP")  # by name: typer may ship its own copy of click's ParameterSource
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) not in unset}



#: the prefill-sharing options ``run``, ``compare``, ``sweep`` and ``ablate`` share (EvalSpec's fields of the same
#: names; see kvpolicy.eval.prefill_store)
NO_SHARE_PREFILL = typer.Option(
    False, "--no-share-prefill", help="every policy runs its own prefill (the direct path, for checking); by default "
    "each batch's prefill is recorded once and replayed for every policy",
)
PREFILL_CACHE_GB = typer.Option(
    None, "--prefill-cache-gb", help="memory for recorded prefills in GiB (default: a quarter of the available memory)"
)
PREFILL_SPILL = typer.Option(
    False, "--prefill-spill", help="write recordings evicted from memory to a temporary directory instead of "
    "discarding them",
)
PREFILL_SPILL_DIR = typer.Option(
    None, "--prefill-spill-dir", help="write every recording to this directory and keep it (later runs reuse it)"
)


def prefill_settings(no_share: bool, cache_gb: float | None, spill: bool, spill_dir: str | None) -> dict[str, Any]:
    """The prefill options given on the command line as EvalSpec fields (the ones left at their defaults omitted,
    so a sweep or ablation file's own settings stand)."""
    given_values = {"share_prefill": False if no_share else None, "prefill_cache_gb": cache_gb,
                    "prefill_spill": True if spill else None, "prefill_spill_dir": spill_dir}
    return {k: v for k, v in given_values.items() if v is not None}


def warn_plugin_problems() -> None:
    """Loads the plugins (once per process) and warns, on stderr and only the first time, about any that failed."""
    from ..registry import get_registry

    global _warned_about
    registry = get_registry()
    if registry.problems and registry is not _warned_about:
        _warned_about = registry
        err = stderr_console()
        for problem in registry.problems:
            err.print(Text(f"warning: {problem}", style="yellow"))
        err.print(Text("(run `kvpolicy plugins` for the full listing)", style="yellow"))


def validation_lines(exc: Exception, model: Any = None) -> None:
    """A pydantic ValidationError as one ``error: field: message`` line per problem, through the one translator every
    input error uses (:func:`kvpolicy.errors.issues_from_validation`; with ``model``, the field's range or choices)."""
    from ..errors import issues_from_validation

    for issue in issues_from_validation(exc, model):  # type: ignore[arg-type]
        stderr_console().print(Text(f"error: {issue.path or 'options'}: {issue.message}", style="red"), soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """The ``kvpolicy`` console script (``argv`` for ``python -m`` entry points that prepend a command)."""
    app(args=argv)
