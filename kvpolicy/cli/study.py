"""``kvpolicy sweep``, ``ablate`` and ``report``: Optuna studies over policy parameters and single-part ablations."""

from __future__ import annotations

import typer

from .common import PluginCommand, app


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
    from ..sweep import sweep_cli

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
    from ..ablate import ablate_cli

    ablate_cli(file, samples=samples, output=output, wandb_project=wandb_project, no_wandb=no_wandb, quiet=quiet)


@app.command()
def report(
    studies: list[str] = typer.Argument(..., help="results folders, sweep files or study names"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (for a study name)"),
    output: str = typer.Option(None, "--output", help="folder for the report files"),
    no_plots: bool = typer.Option(False, "--no-plots", help="tables only"),
) -> None:
    """Show a finished (or running) study: best trials, Pareto front, parameter importances, plots."""
    from ..sweep import report_cli

    report_cli(studies, storage=storage, output=output, no_plots=no_plots)
