"""The Pareto-front plot of a multi-objective study: every completed trial labelled with its number, one colour per
branch (part choice), the Pareto trials outlined and joined, and the trial written to ``best_policy.yaml`` marked.

Drawn from the trials table's rows (``trials.json``), not from Optuna's plot: the chosen trial and the branches are
kvpolicy's notions, and a figure built from rows can be checked artist by artist."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["LABEL_ALL_UP_TO", "pareto_points", "plot_pareto_front"]

#: label every trial with its number up to this many trials; above, only the Pareto trials and the chosen one
LABEL_ALL_UP_TO = 60


def pareto_points(points: Sequence[tuple[float, float]], x_lower_better: bool, y_lower_better: bool
                  ) -> list[tuple[float, float]]:
    """The non-dominated points of a 2-D set, sorted from the best x to the worst."""
    sx = 1.0 if x_lower_better else -1.0
    sy = 1.0 if y_lower_better else -1.0
    out: list[tuple[float, float]] = []
    best = float("inf")
    for x, y in sorted(points, key=lambda p: (sx * p[0], sy * p[1])):
        if sy * y < best:
            out.append((x, y))
            best = sy * y
    return out


def plot_pareto_front(rows: Sequence[dict[str, Any]], metrics: Sequence[str], directions: Sequence[str],
                      chosen: int | None = None) -> Any:
    """The figure (2 or 3 objectives), or ``None`` when no trial completed. ``chosen``: the trial number in
    ``best_policy.yaml`` (a gold star, named in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("state") == "COMPLETE" and all(r.get(m) is not None for m in metrics)]
    if not done or len(metrics) not in (2, 3):
        return None
    with plt.style.context("default"):  # optuna's plots switch the global style
        fig = plt.figure(figsize=(7.5, 5))
        ax = fig.add_subplot(projection="3d") if len(metrics) == 3 else fig.add_subplot()
        _draw(ax, done, metrics, chosen)
        for setter, m, d in zip((ax.set_xlabel, ax.set_ylabel, getattr(ax, "set_zlabel", None)), metrics, directions):
            if setter is not None:
                setter(f"{m} ({d} is better)")
        ax.set_title("Pareto front (numbers: trials; outlined: Pareto-optimal; star: best_policy.yaml)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def _draw(ax: Any, done: list[dict[str, Any]], metrics: Sequence[str], chosen: int | None) -> None:
    def coords(rs: list[dict[str, Any]]) -> list[list[float]]:
        return [[float(r[m]) for r in rs] for m in metrics]

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        groups.setdefault(r.get("branch") or "trials", []).append(r)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, (key, rs) in zip(colours, groups.items()):
        front = [r for r in rs if r.get("pareto")]
        rest = [r for r in rs if not r.get("pareto")]
        if rest:
            ax.scatter(*coords(rest), color=colour, alpha=0.4, s=22, label=None if front else key)
        if front:
            ax.scatter(*coords(front), color=colour, edgecolors="black", linewidths=1, s=48, label=key)
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: float(r[metrics[0]]))
    if len(metrics) == 2 and len(front) > 1:
        ax.plot(*coords(front), "--", color="gray", lw=1, label="Pareto front")
    shown = done if len(done) <= LABEL_ALL_UP_TO else [r for r in done if r.get("pareto") or r["number"] == chosen]
    for r in shown:
        xyz = [float(r[m]) for m in metrics]
        if len(metrics) == 3:
            ax.text(*xyz, str(r["number"]), fontsize=7)
        else:
            ax.annotate(str(r["number"]), tuple(xyz), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pick = next((r for r in done if r["number"] == chosen), None)
    if pick is not None:
        ax.scatter(*coords([pick]), marker="*", s=280, color="gold", edgecolors="black", zorder=5,
                   label=f"chosen: trial {pick['number']} (best_policy.yaml)")
