"""How results read to people: number formats, the ``run`` table, the ``compare`` tables (rich and markdown), one
plot per task and metric, and the lines the commands print about a run or a cell.

Only formatting: :mod:`kvpolicy.cli.evaluate` decides what is printed where, :mod:`.compare` computes the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import save_figure
from .compare import CellDone
from .metrics import DEFAULT_METRICS, TASK_METRICS, metrics_for
from .spec import EvalResult, SideMetrics


def fmt(value: float | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("kl",):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    if key in ("rouge_l", "top1", "exact_match", "exact_match_macro", "ratio_prefill", "ratio_end"):
        return f"{value:.3f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None, key: str = "") -> str:
    if ci is None or value is None:
        return fmt(value, key)
    return f"{fmt(value, key)} [{fmt(ci[0], key)}, {fmt(ci[1], key)}]"


def metric(m: SideMetrics, key: str) -> tuple[float | None, tuple[float, float] | None]:
    return getattr(m, key, None), getattr(m, f"{key}_ci", None)


def mode_label(query_aware: bool | None) -> str:
    """How prompts were compressed: the task's ``query_aware`` option, or one prompt for a task without a question."""
    if query_aware is None:
        return "one prompt"
    return "query-aware" if query_aware else "query-agnostic"


def run_table(result: EvalResult) -> Any:
    """A rich table metric / full / policy / delta for one result."""
    from rich.table import Table

    title = (
        f"{result.policy_name} ({budget_label(result.policy)}) vs full cache · "
        f"{result.task['name']} ({mode_label(result.task.get('query_aware'))}) · {len(result.samples)} samples · "
        f"{result.model.get('name')} ({result.model['dtype']})"
    )
    caption = None
    if result.reference.get("hits"):
        caption = "full-cache timings are those of its cached reference computation (possibly another run)"
    t = Table(title=title, caption=caption)
    for col in ("metric", "full", "policy", "delta (policy - full)"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    keys = [k for k, _, _ in metrics_for(result.task["name"])]
    keys += [k for k, _, _ in DEFAULT_METRICS if k not in keys]
    labels = {k: lab for k, lab, _ in TASK_METRICS.get(result.task["name"], []) + DEFAULT_METRICS}
    # string match is shown for any task whose samples have answers (a jsonl file), once
    for key in keys + ([] if "exact_match" in keys else ["exact_match"]):
        fv, fci = metric(result.full, key)
        pv, pci = metric(result.policy_metrics, key)
        if fv is None and pv is None:
            continue
        d = result.delta.get(key)
        t.add_row(
            labels.get(key, key),
            fmt_ci(fv, fci, key) if key not in ("kl", "top1") else fmt(fv, key),
            fmt_ci(pv, pci, key),
            fmt_ci(d.value, d.ci, key) if d is not None else "-",
        )
    f, p = result.full, result.policy_metrics
    if p.exact_match_by_kind and result.task["name"] == "ruler":
        for kind, pv in p.exact_match_by_kind.items():  # one RULER score per task
            fv = (f.exact_match_by_kind or {}).get(kind)
            diff = pv - fv if fv is not None else None
            t.add_row(f"  {kind}", fmt(fv, "exact_match"), fmt(pv, "exact_match"), fmt(diff, "exact_match"))
    t.add_row("PPL, mean of per-sample", fmt(f.ppl_per_sample_mean), fmt(p.ppl_per_sample_mean), "")
    t.add_row("tokens kept / layer (prefill)", fmt(f.kept_tokens_prefill), fmt(p.kept_tokens_prefill), "")
    t.add_row("tokens kept / layer (end)", fmt(f.kept_tokens_end), fmt(p.kept_tokens_end), "")
    # multimodal prompts: where the kept budget went. The full cache holds the whole prompt, so its column is the
    # prompt's own image/text positions and the last column says how much of each survived the prefill compression
    prompt_split, kept_split = p.prompt_tokens_by_type, p.kept_by_type_prefill
    if prompt_split is not None and kept_split is not None and prompt_split["image"] > 0:
        for kind in ("image", "text"):
            whole, kept = prompt_split[kind], kept_split[kind]
            share = f"{kept / whole:.1%} of the prompt's {kind}" if whole > 0 else ""
            t.add_row(f"{kind} positions kept / layer (prefill)", fmt(whole), fmt(kept), share)
    t.add_row(
        "ratio achieved (prefill / end)",
        f"{f.ratio_prefill:.3f} / {f.ratio_end:.3f}",
        f"{p.ratio_prefill:.3f} / {p.ratio_end:.3f}",
        "",
    )
    t.add_row("cache bytes held / sample (end)", f"{f.bytes_end:,.0f}", f"{p.bytes_end:,.0f}", "")
    t.add_row(
        "prefill s / sample",
        fmt(f.prefill_s / max(1, len(result.samples))),
        fmt(p.prefill_s / max(1, len(result.samples))),
        "",
    )
    t.add_row("decode tokens / s", fmt(f.decode_tokens_per_s), fmt(p.decode_tokens_per_s), "")
    return t


def budget_label(policy_doc: dict[str, Any]) -> str:
    """``ratio 0.574`` or ``128 tokens``: the budget a policy actually ran with (its resolved document)."""
    if policy_doc.get("ratio") is not None:
        return f"ratio {policy_doc['ratio']:g}"
    if policy_doc.get("tokens") is not None:
        return f"{policy_doc['tokens']} tokens"
    return "budget unknown"



def honesty_line(result: EvalResult) -> str:
    """What the ratio-0 check said (rich markup)."""
    h = result.honesty
    if h.get("checked"):
        return f"ratio-0 check passed on sample {h['sample']} (bit-identical logits, PPL {h['ppl_full']:.4f})"
    return f"[yellow]ratio-0 check not run: {h.get('reason')}[/]"


def run_footer(result: EvalResult, out: str | Path | None) -> str:
    """Wall time, where the references came from, how the policy's prefills were obtained, and the file written."""
    return (
        f"{result.wall_s:.1f} s wall; references: {result.reference['hits']} cached, "
        f"{result.reference['computed']} computed; "
        f"{prefill_word(result.prefill.model_dump() if result.prefill else None)}" + (f"; wrote {out}" if out else "")
    )


def cell_line(done: CellDone) -> str:
    """One line per computed ``compare`` cell: its headline numbers against the full cache, how its prefill was
    obtained, and its time."""
    m, result = done.result.policy_metrics, done.result
    return (
        f"{done.task:12s} {done.label:8s} {done.ratio:.2f}: ppl {m.ppl:.3f} (full {result.full.ppl:.3f}) "
        f"rouge {fmt(m.rouge_l)} match {fmt(m.exact_match)} kl {fmt(m.kl, 'kl')} "
        f"kept {m.kept_tokens_prefill:.1f}/{m.prompt_tokens:.1f} "
        f"{prefill_word(result.prefill.model_dump() if result.prefill else None)} "
        f"{done.seconds:.1f}s"
    )


def prefill_word(sharing: dict[str, Any] | None) -> str:
    """How a cell's prefills were obtained, in a few words: ``prefill replayed``, ``prefill recorded 1 + replayed``,
    ``prefill direct (reason)`` or, mixed, ``prefill replayed 6/8 (reason)``."""
    if not sharing:
        return "prefill ?"
    rows = sharing["replayed"] + sharing["direct"]
    reasons = "; ".join(sharing.get("reasons") or {})
    if sharing["replayed"] == rows and rows:
        made = (sharing.get("store") or {}).get("misses", 0)
        return f"prefill recorded {made} + replayed" if made else "prefill replayed"
    if sharing["replayed"] == 0:
        return f"prefill direct ({reasons})" if reasons else "prefill direct"
    return f"prefill replayed {sharing['replayed']}/{rows} ({reasons})"


def prefill_summary(summary: dict[str, Any]) -> str:
    """One line per grid: how many cells replayed every row, how many recordings were made and which cells ran
    directly and why (``compare``'s footer; the numbers per cell are in ``compare.json``'s ``meta``)."""
    cells = [(f"{task} {key}", p) for task, meta in summary.get("meta", {}).items()
             for key, p in (meta.get("prefill") or {}).items()]
    if not cells:
        return "prefill: no cells"
    known = [(name, p) for name, p in cells if p]
    shared = sum(1 for _, p in known if p["replayed"] and not p["direct"])
    made = sum((p.get("store") or {}).get("misses", 0) for _, p in known)
    direct = [f"{name} ({'; '.join(p.get('reasons') or {}) or 'direct'})" for name, p in known if p["direct"]]
    text = f"prefill: {shared} of {len(cells)} cells replayed shared recordings ({made} recorded)"
    if direct:
        text += "; own prefill: " + ", ".join(direct)
    if len(known) < len(cells):
        text += f"; {len(cells) - len(known)} cells from files without this record"
    return text


def _grid(summary: dict[str, Any], metrics: Sequence[str] | None) -> Any:
    """``(task, cells, ratios, (key, label, higher), mode)`` for each table of a grid: one per task and metric shown."""
    for task, entry in summary["cells"].items():
        ratios = sorted({r for pol, by in entry.items() if pol != "full" for r in by}, key=float)
        mode = mode_label(summary.get("meta", {}).get(task, {}).get("query_aware"))
        for metric in metrics_for(task):
            if metrics is None or metric[0] in metrics:
                yield task, entry, ratios, metric, mode


def compare_tables(summary: dict[str, Any], metrics: Sequence[str] | None = None) -> list[Any]:
    """Rich tables: one per task and metric, rows = policies, columns = ratios, cells = value [95% CI]."""
    from rich.table import Table

    tables = []
    for task, entry, ratios, (key, label, higher), mode in _grid(summary, metrics):
        t = Table(title=f"{task} ({mode}): {label} ({'higher' if higher else 'lower'} is better), 95% bootstrap CI")
        t.add_column("policy")
        for r in ratios:
            t.add_column(f"ratio {r}", justify="right")
        full = entry.get("full", {}).get("0", {})
        t.add_row("full", *[fmt_ci(full.get(key), full.get(f"{key}_ci"), key)] * len(ratios))
        for pol, by in entry.items():
            if pol == "full":
                continue
            t.add_row(
                pol, *[fmt_ci(by[r].get(key), by[r].get(f"{key}_ci"), key) if r in by else "" for r in ratios]
            )
        tables.append(t)
    return tables


def markdown_tables(summary: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """The same tables as GitHub markdown (for docs/results.md)."""
    lines: list[str] = []
    for task, entry, ratios, (key, label, higher), mode in _grid(summary, metrics):
        lines.append(f"**{task} ({mode}) — {label}** ({'higher' if higher else 'lower'} is better; value [95% CI])\n")
        lines.append("| policy | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in ratios) + " |")
        full = entry.get("full", {}).get("0", {})
        lines.append(
            "| full | " + " | ".join(fmt_ci(full.get(key), full.get(f"{key}_ci"), key) for _ in ratios) + " |"
        )
        for pol, by in entry.items():
            if pol == "full":
                continue
            cells = []
            for r in ratios:
                c = by.get(r)
                cells.append(fmt_ci(c.get(key), c.get(f"{key}_ci"), key) if c else "not run")
            lines.append(f"| {pol} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One PNG per task and metric: the metric against the ratio removed, one curve per policy with its 95%
    bootstrap interval as error bars, the full cache as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, entry in summary["cells"].items():
        for key, label, higher in metrics_for(task):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            full = entry.get("full", {}).get("0", {})
            if full.get(key) is not None:
                ax.axhline(full[key], color="black", lw=1, ls="--", label="full")
                ci = full.get(f"{key}_ci")
                if ci:
                    ax.axhspan(ci[0], ci[1], color="black", alpha=0.08)
            drawn = False
            for i, (pol, by) in enumerate(sorted((p, b) for p, b in entry.items() if p != "full")):
                rs = sorted(by, key=float)
                xs = [float(r) for r in rs]
                ys = [by[r].get(key) for r in rs]
                if all(y is None for y in ys):
                    continue
                lo = [y - (by[r].get(f"{key}_ci") or (y, y))[0] if y is not None else 0 for r, y in zip(rs, ys)]
                hi = [(by[r].get(f"{key}_ci") or (y, y))[1] - y if y is not None else 0 for r, y in zip(rs, ys)]
                off = (i - 2) * 0.004  # small horizontal jitter so the error bars do not hide each other
                ax.errorbar([x + off for x in xs], ys, yerr=[lo, hi], marker="o", capsize=3, label=pol)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xlabel("ratio (fraction of the cache removed)")
            ax.set_ylabel(label)
            if key == "ppl" or key == "kl":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {label} vs budget ({'higher' if higher else 'lower'} is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            paths.append(save_figure(fig, out / f"{task}_{key}.png", dpi=110, bbox_inches=None))
    return paths



__all__ = [
    "budget_label",
    "cell_line",
    "compare_tables",
    "fmt",
    "fmt_ci",
    "honesty_line",
    "markdown_tables",
    "metric",
    "plot_summary",
    "prefill_summary",
    "prefill_word",
    "run_footer",
    "run_table",
]
