"""PNG plots of a result: decode step time vs context length, cache bytes vs ratio, long-run step time vs generated
length (matplotlib, headless)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .spec import MiB, BenchResult, budget_tokens


def _save(fig: Any, ax: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _decode_vs_context(result: BenchResult, outdir: Path) -> str | None:
    import matplotlib.pyplot as plt

    main = [r for r in result.runs if r.kind == "prefill+decode" and r.decode_median_s]
    if not main:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    return _save(fig, ax, outdir / "decode_vs_context.png")


def _bytes_vs_ratio(result: BenchResult, outdir: Path) -> str | None:
    import matplotlib.pyplot as plt

    sweep = [r for r in result.runs if r.kind == "bytes-sweep" and r.bytes_prefill]
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    return _save(fig, ax, outdir / "bytes_vs_ratio.png")


def _decode_vs_generated(result: BenchResult, outdir: Path) -> str | None:
    import matplotlib.pyplot as plt

    longs = [r for r in result.runs if r.kind == "long-decode" and r.decode_step_s]
    if not longs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in longs:
        xs = list(range(1, len(r.decode_step_s) + 1))
        w = max(1, len(xs) // 50)
        sm = [1e3 * statistics.median(r.decode_step_s[max(0, i - w) : i + 1]) for i in range(len(xs))]
        ax.plot(xs, sm, label=f"{r.framework}:{r.policy} B={r.budget_tokens} (rolling median of {w + 1})")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"decode step vs generated length, fixed budget (prompt {longs[0].context})")
    return _save(fig, ax, outdir / "decode_vs_generated.png")


def plot(result: BenchResult, outdir: Path) -> dict[str, str]:
    """PNG plots: decode step time vs context length, cache bytes vs ratio, long-run step time."""
    import matplotlib

    matplotlib.use("Agg")
    files: dict[str, str] = {}
    for name, draw in (
        ("decode_vs_context", _decode_vs_context),
        ("bytes_vs_ratio", _bytes_vs_ratio),
        ("decode_vs_generated", _decode_vs_generated),
    ):
        path = draw(result, outdir)
        if path is not None:
            files[name] = path
    return files
