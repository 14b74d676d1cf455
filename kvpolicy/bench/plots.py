"""PNG plots of a result: decode step time vs context length, cache bytes vs ratio, long-run step time vs generated
length (matplotlib, headless)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import save_figure
from .spec import MiB, BenchResult, RunResult, budget_tokens


def _decode_vs_context(ax: Any, result: BenchResult, main: list[RunResult]) -> None:
    keys = sorted({(r.framework, r.policy, r.ratio) for r in main}, key=lambda k: (k[0], k[1] != "full", k[1]))
    for fw, pol, ratio in keys:
        pts = sorted(
            (r.context, 1e3 * r.decode_median_s) for r in main if (r.framework, r.policy, r.ratio) == (fw, pol, ratio)
        )
        label = f"{fw}:{pol}" + ("" if ratio is None else f" r={ratio:g}")
        ax.plot(*zip(*pts), marker="o", label=label, linestyle="-" if pol == "full" else "--")
    base = sorted(
        (r.context, 1e3 * r.decode_median_s)
        for r in result.runs
        if r.kind == "baseline-at-budget" and r.decode_median_s and r.framework == "kvpolicy"
    )
    if base:
        ax.plot(*zip(*base), marker="x", linestyle=":", color="black", label="full cache at context B")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens); baseline: cache length B")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"decode step time vs context ({result.model.get('name')}, {result.environment.get('device')})")


def _bytes_vs_ratio(ax: Any, result: BenchResult, sweep: list[RunResult]) -> None:
    for fw, pol in sorted({(r.framework, r.policy) for r in sweep}):
        rs = sorted((r for r in sweep if (r.framework, r.policy) == (fw, pol)), key=lambda r: r.ratio or 0)
        ratios = [r.ratio for r in rs]
        ax.plot(ratios, [r.bytes_prefill.total_alloc / MiB for r in rs], marker="o", label=f"{fw}:{pol} after prefill")
        if all(r.bytes_decode for r in rs):
            ax.plot(
                ratios,
                [r.bytes_decode.total_alloc / MiB for r in rs],
                marker=".",
                linestyle=":",
                label=f"{fw}:{pol} +{rs[0].decode_steps} steps",
            )
    n = sweep[0].context
    full = next((r for r in sweep if (r.ratio or 0) == 0), None)
    if full and full.bytes_prefill:
        rs = sorted({r.ratio or 0 for r in sweep})
        per_tok = full.bytes_prefill.total_alloc / n
        budget = [budget_tokens(n, r) * per_tok / MiB for r in rs]
        ax.plot(rs, budget, color="black", linestyle="--", label="budget ceil(n(1-r)) entries")
    ax.set_xlabel("ratio (fraction of the cache removed)")
    ax.set_ylabel("key/value bytes held (MiB)")
    ax.set_title(f"cache bytes vs ratio (prompt {n} tokens)")


def _decode_vs_generated(ax: Any, result: BenchResult, longs: list[RunResult]) -> None:
    for r in longs:
        xs = list(range(1, len(r.decode_step_s) + 1))
        w = max(1, len(xs) // 50)
        sm = [1e3 * statistics.median(r.decode_step_s[max(0, i - w) : i + 1]) for i in range(len(xs))]
        ax.plot(xs, sm, label=f"{r.framework}:{r.policy} B={r.budget_tokens} (rolling median of {w + 1})")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"decode step vs generated length, fixed budget (prompt {longs[0].context})")


#: file stem -> which runs it shows (the plot is made only when there are any) and how it draws them
PLOTS: dict[str, tuple[Callable[[RunResult], bool], Callable[[Any, BenchResult, list[RunResult]], None]]] = {
    "decode_vs_context": (lambda r: r.kind == "prefill+decode" and bool(r.decode_median_s), _decode_vs_context),
    "bytes_vs_ratio": (lambda r: r.kind == "bytes-sweep" and r.bytes_prefill is not None, _bytes_vs_ratio),
    "decode_vs_generated": (lambda r: r.kind == "long-decode" and bool(r.decode_step_s), _decode_vs_generated),
}


def plot(result: BenchResult, outdir: Path) -> dict[str, str]:
    """PNG plots: decode step time vs context length, cache bytes vs ratio, long-run step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    for name, (shows, draw) in PLOTS.items():
        runs = [r for r in result.runs if shows(r)]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, result, runs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files[name] = str(save_figure(fig, outdir / f"{name}.png", dpi=110, bbox_inches=None))
    return files
