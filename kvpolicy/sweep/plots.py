"""PNG plots of a study: quality against the cache budget (several studies compared), the Pareto front, the
optimisation history and parameter importances (Optuna's plots)."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_savefig
from .importance import importance_evaluator, importance_target, importance_warning
from .pareto_plot import pareto_points, plot_pareto_front
from .records import complete_trials
from .spec import METRICS, SweepSpec

__all__ = ["BUDGET_METRICS", "plot_importance", "plot_pareto_front", "plot_quality_vs_budget", "quality_and_budget",
           "write_plots"]

#: metrics that measure the budget (memory, time), not the quality
BUDGET_METRICS = ("cache_bytes", "cache_fraction", "seconds_per_sample")


def quality_and_budget(metrics: Sequence[str]) -> tuple[str | None, str | None]:
    quality = next((m for m in metrics if m not in BUDGET_METRICS), None)
    budget = next((m for m in metrics if m in BUDGET_METRICS), None)
    return quality, budget


def write_plots(study: Any, spec: SweepSpec, out: Path, rows: list[dict[str, Any]],
                chosen: int | None = None) -> list[Path]:
    """PNG plots in ``out/plots``: quality vs budget, Pareto front (``chosen``: the trial in ``best_policy.yaml``),
    optimisation history and parameter importance (one per objective). Plots that need more trials than the study
    has are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written: list[Path] = []
    pdir = out / "plots"
    done = complete_trials(study)
    if not done:
        return written
    names = spec.metrics

    def save(fig_or_ax: Any, name: str) -> None:
        fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not hasattr(fig_or_ax, "savefig") else fig_or_ax
        if isinstance(fig_or_ax, np.ndarray):
            fig = fig_or_ax.flat[0].figure
        atomic_savefig(fig, pdir / name)
        plt.close(fig)
        written.append(pdir / name)

    def attempt(draw: Any, name: str) -> None:
        """Optuna's plots raise for studies they cannot draw (too few trials, odd values): skip that one plot."""
        try:
            drawn = draw()
        except Exception:  # noqa: BLE001 - the other plots still get written
            return
        if drawn is not None:
            save(drawn, name)

    def objective(i: int) -> Any:
        return (lambda t: t.values[i]) if len(names) > 1 else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # quality vs budget (ours: every completed trial, one colour and line per part choice, Pareto trials outlined)
        attempt(lambda: plot_quality_vs_budget({spec.name: rows}, names), "quality_vs_budget.png")
        if spec.multi_objective and len(names) <= 3:
            attempt(lambda: plot_pareto_front(rows, names, spec.directions, chosen), "pareto_front.png")
        for i, m in enumerate(names):
            suffix = "" if len(names) == 1 else f"_{m}"
            attempt(lambda i=i, m=m: ovm.plot_optimization_history(study, target=objective(i), target_name=m),
                    f"history{suffix}.png")
            if len(done) >= 3 and any(t.params for t in done):
                attempt(lambda i=i, m=m: plot_importance(study, spec, i), f"importance{suffix}.png")
        if spec.pruning.enabled and not spec.multi_objective:
            attempt(lambda: ovm.plot_intermediate_values(study), "intermediate_values.png")
    return written


def plot_importance(study: Any, spec: SweepSpec, i: int) -> Any:
    """Optuna's importance bars for objective ``i`` (the evaluator and target of :mod:`.importance`), with
    :func:`~.importance.importance_warning` written on the figure when the trials are too few."""
    import optuna.visualization.matplotlib as ovm

    with warnings.catch_warnings():  # experimental API; PED-ANOVA's reminder that lower is better (it is: signed)
        warnings.simplefilter("ignore")
        ax = ovm.plot_param_importances(study, evaluator=importance_evaluator(), target=importance_target(spec, i),
                                        target_name=spec.metrics[i])
    note = importance_warning(study)
    if note:
        fig = ax.figure
        title = ax.get_title(loc="left") or ax.get_title()  # optuna writes its title on the left
        ax.set_title("", loc="center")
        ax.set_title(f"{title} - TOO FEW TRIALS, see the note below", loc="left", color="crimson")
        fig.subplots_adjust(bottom=0.3)
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap("warning: " + note, 110)), color="crimson", fontsize=7,
                 ha="left", va="bottom")
    return ax


def plot_quality_vs_budget(series: Mapping[str, list[dict[str, Any]]], metrics: Sequence[str]) -> Any:
    """Quality metric against the budget (cache fraction, else cache bytes, else the ratio), one colour and one line
    (that group's own front) per part choice (the trial's branch, else its policy name) in each series; the study's
    Pareto trials outlined. Returns the figure or ``None`` (no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # optuna's plots switch the global style
        return _plot_quality_vs_budget(plt, series, metrics)


def _choice_key(label: str, row: dict[str, Any], several: bool) -> str:
    """The legend entry of a trial: its branch (part choices) or policy name, prefixed by the study when several."""
    choice = row.get("branch") or row.get("policy_name") or label
    return f"{label}: {choice}" if several and choice != label else choice


def _plot_quality_vs_budget(plt: Any, series: Mapping[str, list[dict[str, Any]]], metrics: Sequence[str]) -> Any:
    quality, _ = quality_and_budget(metrics)
    if quality is None:
        quality = metrics[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    x_name = None
    for label, rows in series.items():
        done = [r for r in rows if r.get("state") == "COMPLETE" and r.get(quality) is not None]
        if not done:
            continue
        x_name = next((k for k in ("cache_fraction", "cache_bytes", "params.ratio") if all(r.get(k) is not None
                                                                                         for r in done)), None)
        if x_name is None:
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in done:
            groups.setdefault(_choice_key(label, r, len(series) > 1), []).append(r)
        y_low = METRICS[quality].direction == "minimize" if quality in METRICS else True
        for key, rs in groups.items():
            xs = [float(r[x_name]) for r in rs]
            ys = [float(r[quality]) for r in rs]
            sc = ax.scatter(xs, ys, label=key, alpha=0.75)
            # each choice's own front (less cache and better quality), so branches are never joined by one line
            own = pareto_points(list(zip(xs, ys)), x_name != "params.ratio", y_low)
            if len(own) > 1:
                ax.plot([p[0] for p in own], [p[1] for p in own], "-", color=sc.get_facecolor()[0], alpha=0.6)
            outlined = [(float(r[x_name]), float(r[quality])) for r in rs if r.get("pareto")]
            if outlined:
                ax.scatter([p[0] for p in outlined], [p[1] for p in outlined], facecolors="none",
                           edgecolors="black", s=80, linewidths=1)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    # the full cache's value on the same samples, when the evaluator reported it
    full_key = f"full_{quality}"
    fulls = [float(r[full_key]) for rows in series.values() for r in rows if r.get(full_key) is not None]
    if fulls:
        ax.axhline(float(np.median(fulls)), color="gray", ls="--", lw=1, label=f"full cache ({np.median(fulls):.4g})")
    ys_all = [float(r[quality]) for rows in series.values() for r in rows
              if r.get("state") == "COMPLETE" and r.get(quality) is not None]
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 5:
        ax.set_yscale("log")
    ax.set_xlabel({"cache_fraction": "cache held / full cache", "cache_bytes": "cache bytes held",
                   "params.ratio": "ratio (fraction removed)"}.get(x_name or "", x_name or ""))
    ax.set_ylabel(f"{quality} ({METRICS[quality].direction} is better)" if quality in METRICS else quality)
    ax.set_title("quality vs cache budget (a line per part choice: its own front; study's Pareto trials outlined)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

