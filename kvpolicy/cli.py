"""The ``kvpolicy`` command line. Thin by design: parse arguments, call the library, print.

kvpolicy plugins           # every part, preset and plugin problem, as a table
kvpolicy plugins --json    # the same, machine-readable
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

# Startup: nothing here imports torch, transformers or the plugins, so ``kvpolicy --help`` and ``kvpolicy <command>
# --help`` answer in well under a second; each command imports what it needs when it runs (see docs/performance.md).

#: commands whose module is imported only when the command is run or asked for its own ``--help``:
#: name -> (module, a function there that returns the typer-signature command function, one-line summary shown by
#: ``kvpolicy --help``)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": (
        "kvpolicy.cli",
        "bench_command",
        "Measure what policies really save: cache bytes, prefill and decode time, peak memory vs the full cache.",
    ),
}


class PluginCommand(TyperCommand):
    """A command that uses parts from plugins: the registry loads (and failed plugins are reported) when the command
    runs, after its arguments are parsed, so ``<command> --help`` never imports the plugins (they import torch)."""

    def invoke(self, ctx: click.Context) -> Any:
        _warn_plugin_problems()
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
    func = getattr(importlib.import_module(module), attr)()
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

_warned = False


def _stdout() -> Console:
    # built per call so that typer's CliRunner (which swaps sys.stdout) captures the output
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # piped: do not squeeze tables into 80 columns
        console = Console(width=160)
    return console


def _stderr() -> Console:
    return Console(stderr=True)


def _error(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr without wrapping it at the terminal width (one problem, one line) and return
    the exit to raise."""
    _stderr().print(Text(f"error: {message}", style="red"), soft_wrap=True)
    return typer.Exit(code)


def _given(ctx: typer.Context) -> set[str]:
    """The parameters the user typed on the command line (not left at their defaults)."""
    unset = (None, "DEFAULT", "DEFAULT_MAP")  # by name: typer may ship its own copy of click's ParameterSource
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) not in unset}



def _warn_plugin_problems() -> None:
    """Loads the plugins (once per process) and warns, on stderr and only the first time, about any that failed."""
    from .registry import get_registry

    global _warned
    registry = get_registry()
    if registry.problems and not _warned:
        _warned = True
        err = _stderr()
        for problem in registry.problems:
            err.print(Text(f"warning: {problem}", style="yellow"))
        err.print(Text("(run `kvpolicy plugins` for the full listing)", style="yellow"))


@app.command(cls=PluginCommand)
def plugins(
    name: str = typer.Argument(None, help="one part or preset, shown in detail"),
    kind: str = typer.Option(None, "--kind", help="only parts of this kind: encode, decode, reducer or allocator"),
    verbose: bool = typer.Option(False, "--verbose", help="full tables: every parameter, every whole message"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """List every part and preset, one line each (problems first); NAME for one in detail."""
    from . import listing
    from .registry import KINDS, get_registry

    if kind is not None and kind not in KINDS:
        raise _error(f"--kind: {kind!r} is not a kind of part; allowed: {', '.join(KINDS)}")
    data = listing.filter_kind(get_registry().listing(), kind)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    out = _stdout()
    if name is not None:
        if not listing.print_detail(out, data, name):
            raise _error(listing.unknown_name(data, name))
    elif verbose:
        listing.print_verbose(out, data, with_presets=kind is None)
    else:
        listing.print_compact(out, data)


@app.command(cls=PluginCommand)
def demo(
    policy: str = typer.Option("elastic", help="a preset name or a policy YAML file"),
    ratio: float = typer.Option(None, help="fraction of the cache removed, in [0, 1) (default: the policy's own)"),
    prompt_tokens: int = typer.Option(512, help="prompt length"),
    new_tokens: int = typer.Option(32, help="tokens generated after the prompt"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Run a policy on a locally built model (random weights, no download) and show the cache shrinking."""
    from dataclasses import asdict

    from .config import PolicyConfigError, load_policy
    from .demo import run_demo

    for flag, value in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if value < 1:
            raise _error(f"{flag}: {value} is out of range; allowed: >= 1")
    try:
        built = load_policy(policy, overrides={"ratio": ratio} if ratio is not None else None)
    except PolicyConfigError as exc:
        raise _error(str(exc)) from exc
    result = run_demo(built, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    if as_json:
        typer.echo(json.dumps(asdict(result), indent=2))
        return
    out = _stdout()
    budget = f"ratio {built.budget.ratio}" if built.budget.ratio is not None else f"{built.budget.tokens} tokens"
    out.print(
        f"policy [bold]{result.policy}[/] at {budget} on a 4-layer Llama config (8 q / 2 kv heads, random "
        f"weights): {result.prompt_tokens}-token prompt, {result.new_tokens} new tokens"
    )
    table = Table(title="KV cache held (bytes of key/value tensors)")
    for col in ("", "full cache", "policy", "policy / full"):
        table.add_column(col, justify="right")
    for label, full, pol in (
        ("after prefill", result.full_bytes_prefill, result.policy_bytes_prefill),
        ("after decoding", result.full_bytes_end, result.policy_bytes_end),
    ):
        table.add_row(label, f"{full:,}", f"{pol:,}", f"{pol / full:.3f}")
    out.print(table)
    out.print(
        f"entries held per layer: {result.held_per_layer_prefill} after prefill, {result.held_per_layer_end} at the "
        f"end; wall time {result.full_seconds:.2f} s full vs {result.policy_seconds:.2f} s policy"
    )


def bench_command() -> Any:
    """``kvpolicy bench``: :func:`kvpolicy.bench.bench_cli` behind the input checks of :func:`_bench_errors` (built
    when the command is resolved, see :data:`LAZY_COMMANDS`)."""
    import functools

    from .bench import bench_cli

    @functools.wraps(bench_cli)  # typer reads bench_cli's signature and hints through __wrapped__
    def bench(**kwargs: object) -> int:
        with _bench_errors(kwargs):
            return bench_cli(**kwargs)

    return bench


@contextlib.contextmanager
def _bench_errors(kwargs: dict):
    """``kvpolicy bench`` inputs checked before anything is measured or written (model name, policies, --report file),
    and its settings' validation errors, as one line each, exit 2."""
    from pydantic import ValidationError

    from .bench import BUILTIN_CONFIGS, resolve_policy
    from .config import ConfigError
    from .eval.preflight import check_model_name

    try:
        if kwargs.get("model"):
            check_model_name(str(kwargs["model"]))
        config = kwargs.get("config")
        if config and config not in BUILTIN_CONFIGS and not os.path.isfile(config):
            raise _error(f"--config: {config!r} is neither a file nor a built-in shape ({', '.join(BUILTIN_CONFIGS)})")
        for flag, cast in (("contexts", int), ("ratios", float)):
            try:
                [cast(x) for x in str(kwargs.get(flag) or "").split(",") if x.strip()]
            except ValueError as exc:
                raise _error(f"--{flag}: expected comma-separated {cast.__name__}s, got {kwargs[flag]!r}") from exc
        report = kwargs.get("report")
        if report is not None and not os.path.isfile(report):
            raise _error(f"--report: no such file {str(report)!r} (a bench.json written by kvpolicy bench)")
        for name in str(kwargs.get("policies") or "").split(","):
            if name.strip():
                try:
                    resolve_policy(name.strip(), 0.5)
                except ValueError as exc:  # PolicyConfigError included
                    raise _error(f"policies: {exc}") from exc
        yield
    except ValidationError as exc:
        _validation_lines(exc)
        raise typer.Exit(2) from exc
    except ConfigError as exc:
        raise _error(str(exc)) from exc


def _validation_lines(exc: Exception) -> None:
    """A pydantic ValidationError as one ``error: field: message`` line per problem."""
    for err in exc.errors():  # type: ignore[attr-defined]
        field = ".".join(str(x) for x in err["loc"]) or "options"
        msg = err["msg"].removeprefix("Value error, ")
        _stderr().print(Text(f"error: {field}: {msg}", style="red"), soft_wrap=True)



@contextlib.contextmanager
def _evaluation_errors():
    """One clear line per problem instead of a traceback: a bad option or policy exits 2 naming the field, an
    evaluation that cannot report honestly (ratio-0 check failed, NaN) or a plugin part that returned something
    malformed exits 1 with the message (which names the part and its package)."""
    from pydantic import ValidationError

    from .config import ConfigError
    from .eval.runner import EvalError
    from .eval.tasks import TaskError
    from .core.partcheck import PartError

    try:
        yield
    except ValidationError as exc:
        _validation_lines(exc)
        raise typer.Exit(2) from exc
    except (ConfigError, TaskError) as exc:  # a task that cannot give the samples asked for: a bad input too
        raise _error(str(exc)) from exc
    except (EvalError, PartError) as exc:
        raise _error(str(exc), 1) from exc


_DTYPE_HELP = "auto (bfloat16 where the device computes it natively, else float32), bfloat16, float16 or float32"
_TASK_OPTION_HELP = "task option key=value (value read as YAML; repeatable; every task of the command gets it)"


def _task_options(items: list[str] | None) -> dict:
    """``--task-option key=value`` items as the task's options dict, or exit 2 naming the malformed item."""
    from .eval.report import parse_options

    try:
        return parse_options(items)
    except ValueError as exc:
        raise _error(f"--task-option: {exc}") from exc


@app.command(cls=PluginCommand)
def run(
    ctx: typer.Context,
    policy: str = typer.Option("elastic", help="preset name or policy YAML file"),
    ratio: float = typer.Option(None, help="fraction of the cache removed, in [0, 1) (default: the policy's own)"),
    model: str = typer.Option("smollm2-135m", help="model alias, local path or hub id"),
    task: str = typer.Option("continuation", help="continuation, instruct, needle, jsonl, mmvet or llava_detail"),
    samples: int = typer.Option(50, help="number of samples (deterministic for a seed)"),
    seed: int = typer.Option(0, help="sampling seed"),
    batch_size: int = typer.Option(16, "--batch-size", help="samples per batch (left-padded)"),
    output: str = typer.Option("results.json", "--output", help="result file (written atomically)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    threads: int = typer.Option(None, "--threads", min=1, help="torch threads (1 is steadier on a shared machine)"),
    task_option: list[str] = typer.Option(None, "--task-option", help=_TASK_OPTION_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Evaluate one policy and the full cache side by side (PPL, ROUGE-L, KL, top-1 agreement, bytes, time).

    A policy file's own ratio is kept unless --ratio is given; a file with an `evaluation:` section (a sweep's
    best_policy.yaml) is measured as it says (model, task, samples, seed, batch size, dtype, ...) unless a flag is
    given on the command line."""
    from .eval.preflight import policy_evaluation
    from .eval.report import run_cli

    with _evaluation_errors():
        flags = dict(model=model, task=task, samples=samples, seed=seed, batch_size=batch_size, threads=threads,
                     task_options=_task_options(task_option), device=device, dtype=dtype)
        given, measured = _given(ctx), policy_evaluation(policy)
        settings = {**flags, **{k: v for k, v in measured.items() if k not in given}}
        if "task" in given:  # the file's options belong to the file's task
            settings["task_options"] = flags["task_options"]
        elif task_option:
            settings["task_options"] = {**measured.get("task_options", {}), **flags["task_options"]}
        run_cli(policy=policy, ratio=ratio, out=output, as_json=as_json, quiet=quiet, **settings)


@app.command(cls=PluginCommand)
def compare(
    policies: str = typer.Option("full,local,h2o,elastic", help="comma-separated presets"),
    ratios: str = typer.Option(None, help="comma-separated ratios (default: each policy at its own ratio)"),
    model: str = typer.Option("smollm2-135m", help="model alias, local path or hub id"),
    task: str = typer.Option("continuation", help="comma-separated tasks"),
    samples: int = typer.Option(50, help="samples per cell"),
    seed: int = typer.Option(0, help="sampling seed"),
    output: str = typer.Option("compare", "--output", help="folder for cells, compare.json and plots"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    threads: int = typer.Option(None, "--threads", min=1, help="torch threads (1 is steadier on a shared machine)"),
    task_option: list[str] = typer.Option(None, "--task-option", help=_TASK_OPTION_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Quality vs budget: every policy at every ratio, with bootstrap confidence intervals and one plot per metric."""
    from .eval.report import compare_cli

    with _evaluation_errors():
        compare_cli(policies=policies, ratios=ratios, model=model, task=task, samples=samples, seed=seed,
                    out_dir=output, as_json=as_json, quiet=quiet, threads=threads,
                    task_options=_task_options(task_option), device=device, dtype=dtype)


@app.command(cls=PluginCommand)
def sweep(
    file: str = typer.Argument(..., help="sweep YAML file (e.g. sweeps/elastic.yaml)"),
    n_trials: int = typer.Option(None, "--n-trials", help="override the file's number of trials"),
    samples: int = typer.Option(None, "--samples", help="override the file's samples per trial"),
    output: str = typer.Option(None, "--output", help="override the results folder"),
    storage: str = typer.Option(None, "--storage", help="any Optuna storage URL (default: SQLite in the results)"),
    timeout: float = typer.Option(None, "--timeout", help="stop starting trials after this many seconds"),
    wandb_project: str = typer.Option(None, "--wandb-project", help="W&B project (offline unless configured)"),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="do not log to W&B"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run (or resume) an Optuna study over policy parameters from a YAML file; log trials to W&B."""
    from .sweep import sweep_cli

    sweep_cli(file, n_trials=n_trials, samples=samples, output=output, storage=storage, timeout=timeout,
              wandb_project=wandb_project, no_wandb=no_wandb, quiet=quiet)


@app.command(cls=PluginCommand)
def ablate(
    file: str = typer.Argument(..., help="ablation YAML file (e.g. sweeps/ablations.yaml)"),
    samples: int = typer.Option(None, "--samples", help="override the file's samples"),
    output: str = typer.Option(None, "--output", help="override the results folder"),
    wandb_project: str = typer.Option(None, "--wandb-project", help="W&B project (offline unless configured)"),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="do not log to W&B"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Evaluate single-part swaps against a base policy on the same samples; paired-bootstrap delta table."""
    from .ablate import ablate_cli

    ablate_cli(file, samples=samples, output=output, wandb_project=wandb_project, no_wandb=no_wandb, quiet=quiet)


@app.command()
def report(
    studies: list[str] = typer.Argument(..., help="results folders, sweep files or study names"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (for a study name)"),
    output: str = typer.Option(None, "--output", help="folder for the report files"),
    no_plots: bool = typer.Option(False, "--no-plots", help="tables only"),
) -> None:
    """Show a finished (or running) study: best trials, Pareto front, parameter importances, plots."""
    from .sweep import report_cli

    report_cli(studies, storage=storage, output=output, no_plots=no_plots)


# Further commands are added here by their owners, each a thin wrapper around the library:
#   run    — evaluate a policy (PPL / ROUGE-L) on a dataset
#   sweep  — evaluate a grid of policies (parameters addressed by dotted path, e.g. encode.per_head)
#   bench  — latency / memory benchmark


def main() -> None:
    app()


if __name__ == "__main__":
    main()
