"""``kvpolicy report``'s library side: find a study (a results folder, a sweep file, or a name in a storage),
rewrite its outputs from the storage, print its best trials / Pareto front, and compare several studies in one plot."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigIssue
from ..io import atomic_savefig
from .load import load_sweep
from .outputs import write_study_outputs
from .plots import plot_quality_vs_budget
from .records import fmt
from .spec import SweepConfigError, SweepSpec
from .storage import ATTR_PREFIX, open_storage, safe_url

__all__ = ["load_study_spec", "print_summary", "report_study"]


def _console() -> Any:
    """A rich Console on stdout; piped output gets 160 columns so tables are not squeezed into 80."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=160)
    return console


def load_study_spec(target: str, storage: str | None) -> tuple[SweepSpec, str, Path]:
    """A study's sweep spec, storage URL and results folder, from a results folder or a study name."""
    import optuna

    p = Path(target)
    if p.is_dir() and (p / "sweep.json").exists():
        data = json.loads((p / "sweep.json").read_text())
        data["output"] = str(p)
        if storage:
            data["storage"] = storage
        spec = SweepSpec.model_validate(data)
        return spec, spec.storage_url(), p
    if p.suffix in (".yaml", ".yml") and p.is_file():
        spec = load_sweep(p, {"storage": storage} if storage else None, deep=False)
        return spec, spec.storage_url(), spec.output_dir()
    if storage is None:
        default = Path("results") / "sweeps" / target
        if (default / "sweep.json").exists():
            return load_study_spec(str(default), None)
        raise SweepConfigError(ConfigIssue("study", f"{target!r} is not a results folder (with sweep.json) or a sweep "
                                                    "file; for a study name give --storage URL"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summaries = optuna.study.get_all_study_summaries(storage=storage)
    names = [s.study_name for s in summaries]
    if target not in names:
        raise SweepConfigError(ConfigIssue("study", f"no study {target!r} in {safe_url(storage)}; studies there: "
                                                    f"{', '.join(names) or '(none)'}"))
    study = optuna.load_study(study_name=target, storage=storage)
    data = study.user_attrs.get(ATTR_PREFIX + "sweep")
    if not data:
        raise SweepConfigError(ConfigIssue("study", f"study {target!r} was not created by kvpolicy sweep"))
    data = dict(data)
    data["storage"] = storage
    spec = SweepSpec.model_validate(data)
    return spec, storage, spec.output_dir()


def report_study(targets: Sequence[str], storage: str | None = None, output: str | Path | None = None,
                 console: Any = None, plots: bool = True) -> list[dict[str, Any]]:
    """Print and (re)write the results of finished studies. With several, also a quality-vs-budget plot comparing
    them (``output``, default ``results/sweeps/compare``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = console or _console()
    summaries = []
    series: dict[str, list[dict[str, Any]]] = {}
    metrics: list[str] = []
    for target in targets:
        spec, url, out = load_study_spec(target, storage)
        if output is not None and len(targets) == 1:
            out = Path(output)
        st = open_storage(url, spec.heartbeat_s, spec.grace_s, spec.max_retries)
        study = optuna.load_study(study_name=spec.name, storage=st)
        summary = write_study_outputs(study, spec, out, plots=plots)
        summaries.append(summary)
        series[spec.name] = json.loads((out / "trials.json").read_text())
        metrics = metrics or spec.metrics
        print_summary(console, spec, summary, out)
    if len(targets) > 1 and plots:
        fig = plot_quality_vs_budget(series, metrics)
        if fig is not None:
            dest = Path(output) if output else Path("results") / "sweeps" / "compare"
            atomic_savefig(fig, dest / "quality_vs_budget.png")
            console.print(f"comparison plot: {dest / 'quality_vs_budget.png'}")
    return summaries


def print_summary(console: Any, spec: SweepSpec, summary: Mapping[str, Any], out: Path) -> None:
    from rich.table import Table

    counts = summary["trials"]
    console.print(f"[bold]study {spec.name}[/]: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
                  + f" (target {summary['target_trials']})")
    best = summary.get("best_trials") or []
    if best:
        title = "Pareto front" if spec.multi_objective else "best trial"
        table = Table(title=f"{title} — {', '.join(f'{o.metric} ({o.direction})' for o in spec.objectives)}")
        table.add_column("trial", justify="right")
        for m in spec.metrics:
            table.add_column(m, justify="right")
        # every parameter any listed trial has (a conditional parameter is absent from other branches' trials: "-")
        pcols = list(dict.fromkeys(k for r in best for k in r if k.startswith("params.")))
        for c in pcols:
            table.add_column(c[len("params."):], justify="right")
        key = spec.metrics[-1] if spec.multi_objective else spec.metrics[0]
        for r in sorted(best, key=lambda r: (r.get(key) is None, r.get(key))):
            mark = " *" if r["number"] == summary.get("chosen_trial") else ""
            table.add_row(f"{r['number']}{mark}", *[fmt(r.get(m)) for m in spec.metrics],
                          *[fmt(r[c]) if c in r else "-" for c in pcols])
        console.print(table)
        if spec.multi_objective:
            console.print(f"* chosen: {summary.get('chosen_rule')}")
    imp = summary.get("importances") or {}
    for m, vals in imp.items():
        console.print(f"parameter importance for {m}: " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()))
    drawn = any(str(p).startswith("plots/importance") for p in summary.get("plots") or [])
    if summary.get("importance_warning") and (imp or drawn):
        console.print(f"[yellow]warning: {summary['importance_warning']}[/]", soft_wrap=True)
    files = ["trials.csv", "trials.json", "best_policy.yaml", "summary.json"]
    console.print(f"results in {out}: " + ", ".join(f for f in files if (out / f).exists())
                  + (f", plots/ ({len(summary.get('plots', []))} PNG)" if summary.get("plots") else ""))

