"""PNG plots of a study: quality against the cache budget (several studies compared), the Pareto front, the
optimisation history and parameter importances (Optuna's plots)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_savefig
from .records import complete_trials
from .spec import METRICS, SweepSpec

__all__ = ["BUDGET_METRICS", "plot_quality_vs_budget", "quality_and_budget", "write_plots"]

#: metrics that measure the budget (memory, time), not the quality
BUDGET_METRICS = ("cache_bytes", "cache_fraction", "seconds_per_sample")


def quality_and_budget(metrics: Sequence[str]) -> tuple[str | None, str | None]:
    quality = next((m for m in metrics if m not in BUDGET_METRICS), None)
    budget = next((m for m in metrics if m in BUDGET_METRICS), None)
    return quality, budget


def write_plots(study: Any, spec: SweepSpec, out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """PNG plots in ``out/plots``: quality vs budget, Pareto front, optimisation history and parameter importance
    (one per objective). Plots that need more trials than the study has are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
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
        # quality vs budget (ours: every completed trial, coloured by policy, Pareto trials outlined)
        fig = plot_quality_vs_budget({spec.name: rows}, names)
        if fig is not None:
            save(fig, "quality_vs_budget.png")
        if spec.multi_objective and len(names) <= 3:
            attempt(lambda: ovm.plot_pareto_front(study, target_names=names), "pareto_front.png")
        for i, m in enumerate(names):
            suffix = "" if len(names) == 1 else f"_{m}"
            attempt(lambda i=i, m=m: ovm.plot_optimization_history(study, target=objective(i), target_name=m),
                    f"history{suffix}.png")
            if len(done) >= 3 and any(t.params for t in done):
                attempt(lambda i=i, m=m: ovm.plot_param_importances(study, target=objective(i), target_name=m),
                        f"importance{suffix}.png")
        if spec.pruning.enabled and not spec.multi_objective:
            attempt(lambda: ovm.plot_intermediate_values(study), "intermediate_values.png")
    del optuna
    return written


def plot_quality_vs_budget(series: Mapping[str, list[dict[str, Any]]], metrics: Sequence[str]) -> Any:
    """Quality metric against the budget (cache fraction, else cache bytes, else the ratio), one colour per policy
    (its name) in each series; Pareto trials outlined. Returns the figure or ``None`` (no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # optuna's plots switch the global style
        return _plot_quality_vs_budget(plt, series, metrics)


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
            key = label if len(series) > 1 else (r.get("policy_name") or label)
            if len(series) > 1 and r.get("policy_name") and r.get("policy_name") != label:
                key = f"{label}: {r['policy_name']}"
            groups.setdefault(key, []).append(r)
        for key, rs in groups.items():
            xs = [float(r[x_name]) for r in rs]
            ys = [float(r[quality]) for r in rs]
            sc = ax.scatter(xs, ys, label=key, alpha=0.75)
            front = sorted((float(r[x_name]), float(r[quality])) for r in rs if r.get("pareto"))
            if front:
                ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=sc.get_facecolor()[0], alpha=0.6)
                ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none",
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
    ax.set_title("quality vs cache budget (Pareto trials outlined)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

