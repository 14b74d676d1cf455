"""``kvpolicy sweep``, ``ablate`` and ``report``: Optuna studies over policy parameters and single-part ablations.

Thin: each command validates its file through :mod:`kvpolicy.sweep`, runs it, prints, and maps what the library
raises or reports to the exit code - 0 the study holds its trials (or the timeout stopped the loop), 1 trials failed /
nothing could be evaluated / a storage or model problem, 2 the file or options are invalid (or the study was created
by a different sweep), 130 interrupted (Ctrl-C / SIGTERM; the running trial is re-queued for the next run)."""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.text import Text

from .common import (
    NO_SHARE_PREFILL,
    PREFILL_CACHE_GB,
    PREFILL_SPILL,
    PREFILL_SPILL_DIR,
    PluginCommand,
    app,
    fail,
    prefill_settings,
    stderr_console,
    stdout_console,
)

#: exit code of each way a sweep run can stop (:attr:`kvpolicy.sweep.SweepOutcome.stopped`)
SWEEP_EXIT_CODES = {"complete": 0, "timeout": 0, "failures": 1, "interrupted": 130}


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
    no_share_prefill: bool = NO_SHARE_PREFILL,
    prefill_cache_gb: float = PREFILL_CACHE_GB,
    prefill_spill: bool = PREFILL_SPILL,
    prefill_spill_dir: str = PREFILL_SPILL_DIR,
) -> None:
    """Run (or resume) an Optuna study over policy parameters from a YAML file; log trials to W&B."""
    from ..config import PolicyConfigError
    from ..sweep import StudyMismatchError, SweepConfigError, load_sweep, print_summary, run_sweep
    from ..sweep.stopping import arm_stop_deadline

    overrides = {"n_trials": n_trials, "samples": samples, "output": output or None, "storage": storage,
                 "timeout": timeout, "wandb_project": wandb_project, "no_wandb": no_wandb,
                 **prefill_settings(no_share_prefill, prefill_cache_gb, prefill_spill, prefill_spill_dir)}
    try:
        spec = load_sweep(file, overrides)
        outcome = run_sweep(spec, quiet=quiet)
    except (StudyMismatchError, SweepConfigError, PolicyConfigError) as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, model not installed...: one line, exit 1
        if os.environ.get("KVPOLICY_DEBUG"):
            raise
        exit_ = fail(f"{type(exc).__name__}: {exc}", 1)
        stderr_console().print("(finished trials are kept in the study; set KVPOLICY_DEBUG=1 for the traceback)")
        raise exit_ from None
    if outcome.summary is not None and not quiet:
        print_summary(stdout_console(), spec, outcome.summary, outcome.output)
    code = SWEEP_EXIT_CODES.get(outcome.stopped, 1)
    if not quiet or code:
        stderr_console().print(Text(_sweep_message(spec.name, outcome), style="red" if code else ""))
    if outcome.stopped == "interrupted":
        arm_stop_deadline()  # the process is ending: W&B's exit hook must not hold it (kvpolicy.sweep.stopping)
    if code:
        raise typer.Exit(code)


def _sweep_message(name: str, outcome: Any) -> str:
    done = f"{outcome.finished}/{outcome.target}"
    return {
        "complete": f"study {name}: {done} trials finished",
        "timeout": f"study {name}: stopped by the timeout at {done} trials; run the same command again to continue",
        "failures": f"study {name}: stopped after repeated trial failures ({done} finished); see the errors above and "
                    "trials.csv",
        "interrupted": f"study {name}: interrupted at {done} trials; run the same command again to resume",
    }[outcome.stopped]


@app.command(cls=PluginCommand)
def ablate(
    file: str = typer.Argument(..., help="ablation YAML file (e.g. sweeps/ablations.yaml)"),
    samples: int = typer.Option(None, "--samples", help="override the file's samples"),
    output: str = typer.Option(None, "--output", help="override the results folder"),
    wandb_project: str = typer.Option(None, "--wandb-project", help="W&B project (offline unless configured)"),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="do not log to W&B"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    no_share_prefill: bool = NO_SHARE_PREFILL,
    prefill_cache_gb: float = PREFILL_CACHE_GB,
    prefill_spill: bool = PREFILL_SPILL,
    prefill_spill_dir: str = PREFILL_SPILL_DIR,
) -> None:
    """Evaluate single-part swaps against a base policy on the same samples; paired-bootstrap delta table."""
    from ..config import PolicyConfigError
    from ..sweep import SweepConfigError, load_ablation, run_ablation
    from ..sweep.ablate import print_table

    overrides = {"samples": samples, "output": output or None, "wandb_project": wandb_project, "no_wandb": no_wandb,
                 **prefill_settings(no_share_prefill, prefill_cache_gb, prefill_spill, prefill_spill_dir)}
    try:
        spec = load_ablation(file, overrides)
        result = run_ablation(spec, quiet=quiet)
    except (SweepConfigError, PolicyConfigError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        stderr_console().print("interrupted; finished evaluations are kept under runs/ and skipped when the command "
                               "is re-run")
        raise typer.Exit(130) from None
    print_table(stdout_console(), spec, result.rows)
    if not quiet:
        stderr_console().print(f"results in {result.output}: " + ", ".join(f.name for f in result.files))


@app.command()
def report(
    studies: list[str] = typer.Argument(..., help="results folders, sweep files or study names"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (for a study name)"),
    output: str = typer.Option(None, "--output", help="folder for the report files"),
    no_plots: bool = typer.Option(False, "--no-plots", help="tables only"),
) -> None:
    """Show a finished (or running) study: best trials, Pareto front, parameter importances, plots."""
    from ..sweep import StudyMismatchError, SweepConfigError, report_study

    try:
        report_study(list(studies), storage=storage, output=output, console=stdout_console(), plots=not no_plots)
    except (SweepConfigError, StudyMismatchError) as exc:
        raise fail(str(exc)) from None
