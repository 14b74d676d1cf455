"""``kvpolicy demo``, ``run`` and ``compare``: a policy against the full cache, on a built or a real model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .common import (
    NO_SHARE_PREFILL,
    PREFILL_CACHE_GB,
    PREFILL_SPILL,
    PREFILL_SPILL_DIR,
    PluginCommand,
    app,
    fail,
    given,
    prefill_settings,
    stdout_console,
    validation_lines,
)


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

    from ..config import PolicyConfigError, load_policy
    from ..demo import run_demo

    for flag, value in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if value < 1:
            raise fail(f"{flag}: {value} is out of range; allowed: >= 1")
    try:
        built = load_policy(policy, overrides={"ratio": ratio} if ratio is not None else None)
    except PolicyConfigError as exc:
        raise fail(str(exc)) from exc
    result = run_demo(built, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    if as_json:
        typer.echo(json.dumps(asdict(result), indent=2))
        return
    out = stdout_console()
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


@contextlib.contextmanager
def evaluation_errors():
    """One clear line per problem instead of a traceback: a bad option or policy exits 2 naming the field, an
    evaluation that cannot report honestly (ratio-0 check failed, NaN) or a plugin part that returned something
    malformed exits 1 with the message (which names the part and its package)."""
    from pydantic import ValidationError

    from ..config import ConfigError
    from ..eval.spec import EvalError
    from ..eval.tasks import TaskError
    from ..core.partcheck import PartError

    try:
        yield
    except ValidationError as exc:
        validation_lines(exc)
        raise typer.Exit(2) from exc
    except (ConfigError, TaskError) as exc:  # a task that cannot give the samples asked for: a bad input too
        raise fail(str(exc)) from exc
    except (EvalError, PartError) as exc:
        raise fail(str(exc), 1) from exc


#: the options ``run`` and ``compare`` share, stated once so the two commands cannot drift apart
_MODEL = typer.Option("smollm2-135m", help="model alias, local path or hub id")
_SEED = typer.Option(0, help="sampling seed")
_THREADS = typer.Option(None, "--threads", min=1, help="torch threads (1 is steadier on a shared machine)")
_TASK_OPTION = typer.Option(
    None,
    "--task-option",
    help="task option key=value (value read as YAML; repeatable; every task of the command gets it)",
)
_DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ...")
_DTYPE = typer.Option(
    "auto",
    "--dtype",
    help="auto (bfloat16 where the device computes it natively, else float32), bfloat16, float16 or float32",
)


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["context_tokens=512", "variants=[single]"]`` -> ``{"context_tokens": 512, "variants": ["single"]}``
    (values parsed as YAML), for ``--task-option`` style CLI flags."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def split_list(text: str | Sequence[Any], cast: Callable[[str], Any]) -> list[Any]:
    """A comma-separated flag (``"0.5,0.8"``) or a sequence as a list of ``cast`` values."""
    if isinstance(text, str):
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    return [cast(str(x)) for x in text]


def task_options(items: list[str] | None) -> dict:
    """``--task-option key=value`` items as the task's options dict, or exit 2 naming the malformed item."""
    try:
        return parse_options(items)
    except ValueError as exc:
        raise fail(f"--task-option: {exc}") from exc


@app.command(cls=PluginCommand)
def run(
    ctx: typer.Context,
    policy: str = typer.Option("elastic", help="preset name or policy YAML file"),
    ratio: float = typer.Option(None, help="fraction of the cache removed, in [0, 1) (default: the policy's own)"),
    model: str = _MODEL,
    task: str = typer.Option("continuation", help="continuation, instruct, needle, jsonl, mmvet or llava_detail"),
    samples: int = typer.Option(50, help="number of samples (deterministic for a seed)"),
    seed: int = _SEED,
    batch_size: int = typer.Option(16, "--batch-size", help="samples per batch (left-padded)"),
    output: str = typer.Option("results.json", "--output", help="result file (written atomically)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    threads: int = _THREADS,
    task_option: list[str] = _TASK_OPTION,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    no_share_prefill: bool = NO_SHARE_PREFILL,
    prefill_cache_gb: float = PREFILL_CACHE_GB,
    prefill_spill: bool = PREFILL_SPILL,
    prefill_spill_dir: str = PREFILL_SPILL_DIR,
) -> None:
    """Evaluate one policy and the full cache side by side (PPL, ROUGE-L, KL, top-1 agreement, bytes, time).

    A policy file's own ratio is kept unless --ratio is given; a file with an `evaluation:` section (a sweep's
    best_policy.yaml) is measured as it says (model, task, samples, seed, batch size, dtype, ...) unless a flag is
    given on the command line."""
    from ..eval.preflight import policy_evaluation
    from ..eval.spec import EvalSpec

    with evaluation_errors():
        flags = dict(model=model, task=task, samples=samples, seed=seed, batch_size=batch_size, threads=threads,
                     task_options=task_options(task_option), device=device, dtype=dtype)
        typed, measured = given(ctx), policy_evaluation(policy)
        settings = {**flags, **{k: v for k, v in measured.items() if k not in typed}}
        if "task" in typed:  # the file's options belong to the file's task
            settings["task_options"] = flags["task_options"]
        elif task_option:
            settings["task_options"] = {**measured.get("task_options", {}), **flags["task_options"]}
        settings.update(prefill_settings(no_share_prefill, prefill_cache_gb, prefill_spill, prefill_spill_dir))
        spec = EvalSpec(policy=policy, ratio=ratio, quiet=quiet or as_json, **settings)
        show_run(spec, output, as_json)


@app.command(cls=PluginCommand)
def compare(
    policies: str = typer.Option("full,local,h2o,elastic", help="comma-separated presets"),
    ratios: str = typer.Option(None, help="comma-separated ratios (default: each policy at its own ratio)"),
    model: str = _MODEL,
    task: str = typer.Option("continuation", help="comma-separated tasks"),
    samples: int = typer.Option(50, help="samples per cell"),
    seed: int = _SEED,
    output: str = typer.Option("compare", "--output", help="folder for cells, compare.json and plots"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    threads: int = _THREADS,
    task_option: list[str] = _TASK_OPTION,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    no_share_prefill: bool = NO_SHARE_PREFILL,
    prefill_cache_gb: float = PREFILL_CACHE_GB,
    prefill_spill: bool = PREFILL_SPILL,
    prefill_spill_dir: str = PREFILL_SPILL_DIR,
) -> None:
    """Quality vs budget: every policy at every ratio, with bootstrap confidence intervals and one plot per metric."""
    from ..config import ConfigError, ConfigIssue

    with evaluation_errors():
        options = task_options(task_option)
        try:
            grid_ratios = None if ratios is None else split_list(ratios, float)
        except ValueError as exc:
            issue = ConfigIssue("ratios", f"expected comma-separated numbers in [0, 1), got {ratios!r}")
            raise ConfigError(issue) from exc
        base = {"model": model, "samples": samples, "seed": seed, "quiet": quiet or as_json, "threads": threads,
                "task_options": options, "device": device, "dtype": dtype,
                **prefill_settings(no_share_prefill, prefill_cache_gb, prefill_spill, prefill_spill_dir)}
        show_compare(split_list(policies, str), grid_ratios, split_list(task, str), output, base, as_json, quiet)


def show_run(spec: Any, output: str | Path | None, as_json: bool, console: Any = None) -> Any:
    """``kvpolicy run`` once its flags are a spec: evaluate, write the result file (atomically) and print the table
    with the ratio-0 check's outcome (or the result as JSON). Returns the :class:`~kvpolicy.eval.EvalResult`."""
    from rich.console import Console

    from ..eval import runner
    from ..eval.report import honesty_line, run_footer, run_table
    from ..eval.spec import result_json
    from ..io import write_json_atomic

    result = runner.evaluate(spec)
    doc = result_json(result)
    if output:
        write_json_atomic(output, doc)
    if as_json:
        print(json.dumps(doc, default=str))
        return result
    console = console or Console()
    console.print(run_table(result))
    console.print(honesty_line(result))
    console.print(run_footer(result, output))
    return result


def show_compare(
    policies: list[str],
    ratios: list[float] | None,
    tasks: list[str],
    output: str | Path,
    base: dict[str, Any],
    as_json: bool,
    quiet: bool,
    console: Any = None,
) -> dict[str, Any]:
    """``kvpolicy compare`` once its flags are lists: run the grid (a line per computed cell), draw one plot per task
    and metric, and print one table per task and metric (or the summary as JSON). Returns the summary."""
    from rich.console import Console

    from ..eval.compare import compare
    from ..eval.report import cell_line, compare_tables, plot_summary, prefill_summary
    from ..io import write_json_atomic

    console = console or Console(stderr=as_json)
    on_cell = None if (quiet or as_json) else (lambda done: console.print(cell_line(done)))
    summary = compare(policies, ratios, tasks, output, base=base, on_cell=on_cell)
    summary["plots"] = [str(p) for p in plot_summary(summary, output)]
    write_json_atomic(Path(output) / "compare.json", summary)
    if as_json:
        print(json.dumps(summary, default=str))
        return summary
    for table in compare_tables(summary):
        console.print(table)
    console.print(prefill_summary(summary))
    console.print("plots: " + ", ".join(summary["plots"]))
    return summary
