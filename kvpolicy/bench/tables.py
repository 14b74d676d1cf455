"""The report as tables (rich, on the terminal, or Markdown for the docs): one table per context with every value's
ratio to the full cache (``x``) and to the budget (``xB``), the long runs, the bytes sweep and the targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .spec import MiB, BenchResult, RunResult
from .targets import (
    TARGET_BYTES,
    TARGET_DECODE_AT_BUDGET,
    TARGET_FLAT,
    TARGET_PREFILL,
    baseline_at_budget,
    late_early,
)

CONTEXT_COLUMNS = (
    "policy",
    "ratio",
    "B",
    "KV MiB prefill",
    "KV MiB +{steps}",
    "prefill s",
    "decode ms/step",
    "tok/s",
    "peak MiB",
)


def _x(v: float | None, ok: bool | None = None, suffix: str = "") -> str:
    """A ratio as ``0.25x``, green/red when it is checked against a target."""
    if v is None:
        return ""
    s = f"{v:.2f}x{suffix}"
    if ok is None:
        return s
    return f"[green]{s}[/]" if ok else f"[red]{s}[/]"


def _cell(value: str, *ratios: str) -> str:
    return " ".join([value] + [r for r in ratios if r])


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    """``a / b`` where both are known and ``b`` is not zero."""
    return a / b if a is not None and b else None


def _name(r: RunResult) -> str:
    return r.policy if r.framework == "kvpolicy" else f"{r.framework}:{r.policy}"


def _table(
    title: str,
    columns: tuple[str, ...],
    markdown: bool,
    right: Callable[[str], bool] | None = None,
    compact: bool = False,
) -> Any:
    """A table in the report's box. ``right``: which columns are right-aligned (default: all but the first);
    ``compact``: no padding at the edges and the first column never wrapped (the wide per-context tables)."""
    from rich import box
    from rich.table import Table

    style = box.MARKDOWN if markdown else box.SIMPLE_HEAD
    t = Table(title=title, title_justify="left", box=style, pad_edge=not compact)
    for i, col in enumerate(columns):
        align_right = right(col) if right is not None else i > 0
        t.add_column(col, justify="right" if align_right else "left", no_wrap=compact and i == 0)
    return t


def _kv_cells(r: RunResult, full: RunResult | None) -> tuple[str, str]:
    """KV MiB after prefill (x full, xB budget) and after the decode steps (xB budget)."""
    bp, bd = r.bytes_prefill, r.bytes_decode
    fbp = full.bytes_prefill.total_alloc if full and full.bytes_prefill else None
    q_full = None if r.policy == "full" or not bp else _ratio(bp.total_alloc, fbp)
    qp = _ratio(bp.total_alloc, bp.budget) if bp else None
    qd = _ratio(bd.total_alloc, bd.budget) if bd else None
    kv_p = _cell(
        f"{bp.total_alloc / MiB:.1f}" if bp else "-",
        _x(q_full),
        _x(qp, qp is not None and qp <= TARGET_BYTES, "B"),
    )
    kv_d = _cell(f"{bd.total_alloc / MiB:.1f}" if bd else "-", _x(qd, qd is not None and qd <= TARGET_BYTES, "B"))
    return kv_p, kv_d


def _time_cells(r: RunResult, full: RunResult | None, base: RunResult | None) -> tuple[str, str]:
    """Prefill s (x full; checked for attention-statistics scorers) and decode ms/step (x full, xB at context B)."""
    policy = r.policy != "full"
    q_pre = _ratio(r.prefill_median_s, full.prefill_median_s) if policy and full and r.prefill_median_s else None
    q_dec = _ratio(r.decode_median_s, full.decode_median_s) if policy and full and r.decode_median_s else None
    q_b = _ratio(r.decode_median_s, base.decode_median_s) if policy and base and r.decode_median_s else None
    pre = _cell(
        f"{r.prefill_median_s:.3f}" if r.prefill_median_s else "-",
        _x(q_pre, q_pre <= TARGET_PREFILL if q_pre is not None and r.attention_stats else None),
    )
    dec = _cell(
        f"{1e3 * r.decode_median_s:.2f}" if r.decode_median_s else "-",
        _x(q_dec),
        _x(q_b, q_b is not None and q_b <= TARGET_DECODE_AT_BUDGET, "B"),
    )
    return pre, dec


def _peak_cell(r: RunResult, full: RunResult | None) -> str:
    if r.peak_delta_bytes is None:
        return _cell("-")
    if r.policy == "full" or not full or not full.peak_delta_bytes:
        return _cell(f"{r.peak_delta_bytes / MiB:.0f}")
    q = r.peak_delta_bytes / full.peak_delta_bytes
    return _cell(f"{r.peak_delta_bytes / MiB:.0f}", _x(q, r.peak_delta_bytes <= full.peak_delta_bytes))


def _context_row(result: BenchResult, r: RunResult) -> list[str]:
    full = result.find("full", r.context, framework=r.framework) or result.find("full", r.context)
    base = baseline_at_budget(result, r.budget_tokens, r.framework)
    kv_p, kv_d = _kv_cells(r, full)
    pre, dec = _time_cells(r, full, base)
    return [
        _name(r) + ("*" if r.attention_stats else ""),
        "-" if r.ratio is None else f"{r.ratio:g}",
        str(r.budget_tokens or "-"),
        kv_p,
        kv_d,
        pre,
        dec,
        f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-",
        _peak_cell(r, full),
    ]


def _context_tables(result: BenchResult, console: Any, markdown: bool) -> None:
    main = [r for r in result.runs if r.kind == "prefill+decode"]
    for n in sorted({r.context for r in main}):
        steps = max((r.decode_steps for r in main if r.context == n), default=0)
        t = _table(
            f"context {n} tokens (ratio = fraction removed, B = entries kept per layer and kv head)",
            tuple(c.format(steps=steps) for c in CONTEXT_COLUMNS),
            markdown,
            compact=True,
        )
        rows = sorted(
            (r for r in main if r.context == n),
            key=lambda r: (r.framework != "kvpolicy", r.framework, r.policy != "full", r.policy, r.ratio or 0),
        )
        for r in rows:
            t.add_row(*_context_row(result, r))
        console.print(t)
    console.print(
        "[dim]x: ratio to the full cache of the same framework; xB: to the promised budget (KV) or to the "
        "full cache holding B entries (decode); *: the prefill computes attention statistics; peak: "
        "memory above the configuration's start[/]"
    )
    base = [r for r in result.runs if r.kind == "baseline-at-budget" and r.decode_median_s]
    if base:
        console.print(
            "full cache at context B (the physical limit): "
            + ", ".join(
                f"{'' if r.framework == 'kvpolicy' else r.framework + ' '}B={r.context}: "
                f"{1e3 * (r.decode_median_s or 0):.2f} ms"
                for r in base
            )
        )


def _long_table(result: BenchResult, console: Any, markdown: bool) -> None:
    longs = [r for r in result.runs if r.kind == "long-decode"]
    if not longs:
        return
    columns = ("policy", "ratio", "prompt", "B", "steps", "early ms", "late ms", "late/early", "KV MiB")
    t = _table("long decode with a fixed budget", columns, markdown)
    for r in longs:
        le = late_early(r.decode_step_s)
        t.add_row(
            _name(r),
            f"{r.ratio:g}",
            str(r.context),
            str(r.budget_tokens),
            str(r.decode_steps),
            f"{1e3 * le[0]:.2f}" if le else "-",
            f"{1e3 * le[1]:.2f}" if le else "-",
            _x(le[1] / le[0], le[1] / le[0] <= TARGET_FLAT) if le else "-",
            f"{r.bytes_decode.total_alloc / MiB:.2f}" if r.bytes_decode else "-",
        )
    console.print(t)


def _sweep_cell(r: RunResult | None) -> str:
    """MiB after prefill (xB) / after the sweep's decode steps (xB)."""
    if r is None or r.bytes_prefill is None:
        return "-"
    p, d = r.bytes_prefill, r.bytes_decode
    cell = _cell(f"{p.total_alloc / MiB:.2f}", _x(p.total_alloc / p.budget, None, "B") if p.budget else "")
    if d is not None:
        cell += " / " + _cell(f"{d.total_alloc / MiB:.2f}", _x(d.total_alloc / d.budget, None, "B") if d.budget else "")
    return cell


def _sweep_table(result: BenchResult, console: Any, markdown: bool) -> None:
    sweep = [r for r in result.runs if r.kind == "bytes-sweep"]
    if not sweep:
        return
    ratios = sorted({r.ratio or 0.0 for r in sweep})
    columns = ("policy", *(f"r={ratio:g} MiB" for ratio in ratios))
    t = _table(f"cache bytes vs ratio (prompt {sweep[0].context} tokens)", columns, markdown)
    for fw, pol in dict.fromkeys((r.framework, r.policy) for r in sweep):
        mine = [x for x in sweep if (x.framework, x.policy) == (fw, pol)]
        cells = [_sweep_cell(next((x for x in mine if (x.ratio or 0.0) == ratio), None)) for ratio in ratios]
        t.add_row(pol if fw == "kvpolicy" else f"{fw}:{pol}", *cells)
    console.print(t)
    console.print(f"[dim]each cell: after prefill / after {sweep[0].decode_steps} decode steps[/]")


def _targets_table(result: BenchResult, console: Any, markdown: bool) -> None:
    if not result.targets:
        return
    columns = ("target", "policy", "ratio", "context", "value", "limit", "result", "detail")
    t = _table("targets", columns, markdown, right=lambda col: col in ("ratio", "context", "value", "limit"))
    for tg in result.targets:
        mark = "[dim]n/a[/]" if tg.met is None else ("[green]met[/]" if tg.met else "[red]missed[/]")
        t.add_row(
            tg.name,
            tg.policy,
            "-" if tg.ratio is None else f"{tg.ratio:g}",
            str(tg.context or "-"),
            "-" if tg.value is None else f"{tg.value:.3f}",
            f"{tg.threshold:g}",
            mark,
            tg.detail,
        )
    console.print(t)


def _header(result: BenchResult, console: Any) -> None:
    m, env = result.model, result.environment
    console.print(
        f"[bold]kvpolicy bench[/] {m.get('name')} ({m.get('parameters', 0) / 1e6:.1f}M params, {m.get('layers')} "
        f"layers, {m.get('q_heads')} q / {m.get('kv_heads')} kv heads, {m.get('dtype')}) on {env.get('device')} "
        f"[dim]({env.get('gpu') or env.get('cpu')}, {env.get('torch_threads')} threads, load "
        f"{' '.join(f'{x:.1f}' for x in env.get('loadavg_start') or [])})[/]"
    )
    if env.get("warning"):
        console.print(f"[yellow]warning: {env['warning']}[/]")


def _footer(result: BenchResult, console: Any) -> None:
    dropped = [p for p in result.plan if not p.get("included", True)]
    if dropped:
        console.print(
            "[yellow]not run (time budget):[/] "
            + "; ".join(
                f"{p['item']} {p.get('context') or ''} {','.join(p.get('policies', []))} ~{p['estimate_s']:.0f}s"
                for p in dropped
            )
        )
    console.print(
        f"[dim]wall time {result.wall_s:.0f} s; timings on a shared machine are noisy (medians of "
        f"repeats / steps)[/]"
    )
    if result.files:
        console.print("files: " + ", ".join(result.files.values()))


def render(result: BenchResult, console: Any | None = None, markdown: bool = False) -> None:
    """Print the tables: one per context (values with their ratio to the full cache; ``xB``: to the promised budget
    or to the full cache at context B), the long runs, the bytes sweep and the targets. ``markdown``: the same tables
    as Markdown (for docs/performance.md, so the documented tables come from the JSON, not from hand copying)."""
    from rich.console import Console

    console = console or Console()
    _header(result, console)
    _context_tables(result, console, markdown)
    _long_table(result, console, markdown)
    _sweep_table(result, console, markdown)
    _targets_table(result, console, markdown)
    _footer(result, console)
