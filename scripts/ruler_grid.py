"""RULER policy grid: every policy x ratio x query mode at one context length, one committed file per cell.

Why a script and not one ``kvpolicy compare`` call: the grid runs for hours on a CPU, so the order of the cells
matters (the ratio everyone reports first, the kvpress protocol's query-agnostic mode first, so that a stopped run
leaves the most useful cells), each finished cell is committed at once, and the page's tables are rebuilt from the
cell files alone. Each (mode, ratio) slice is one :func:`kvpolicy.eval.compare.compare` call, i.e. the harness the
CLI runs: references computed once and cached, each batch's prefill recorded once and replayed for every policy
(the recordings are kept in ``--recordings`` so the next slice and a resumed run read them back instead of
prefilling again), and a cell whose file holds a complete result of the same computation is skipped.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ruler_grid.py run --length 2048 --commit
    .venv/bin/python scripts/ruler_grid.py render      # tables and plots into docs/long-context.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRID_DIR = ROOT / "docs" / "long-context" / "grid"
PAGE = ROOT / "docs" / "long-context.md"
MODES = {"agnostic": False, "aware": True}  #: directory suffix -> the task's ``query_aware`` option
POLICIES = ["snapkv", "elastic", "h2o", "tova", "local"]
#: the frontier baselines, run as their own slices (``--policies``) once the classic grid is under way
NEWER = ["kvzip", "expected_attention", "keydiff", "duo_attention"]
RATIOS = [0.75, 0.5, 0.9]
#: the policy every other one is compared with, pairwise on the same samples
FLAGSHIP = "elastic"


def grid_dir(model: str, length: int, mode: str) -> Path:
    return GRID_DIR / f"{model}-{length}-{mode}"


# ================================================================================================== run
def commit(paths: list[Path], message: str, tries: int = 20) -> None:
    """``git add`` + ``commit`` of ``paths`` only; retried while another worker of the grid holds the index lock."""
    import time

    for attempt in range(tries):
        add = subprocess.run(["git", "add", *map(str, paths)], cwd=ROOT, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=ROOT, capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(1 + attempt)
    print(f"could not commit {[p.name for p in paths]} (the file is written; commit it by hand)", file=sys.stderr)


def run_grid(args: argparse.Namespace) -> None:
    from kvpolicy.eval.compare import CellDone, cell_name, compare

    for ratio in args.ratios:
        for mode in args.modes:
            out = grid_dir(args.model, args.length, mode)
            base = {"model": args.model, "samples": args.samples, "seed": args.seed, "batch_size": args.batch_size,
                    "threads": 1, "dtype": "auto", "quiet": True, "prefill_cache_gb": args.prefill_cache_gb,
                    "prefill_spill_dir": str(Path(args.recordings) / f"{args.model}-{args.length}-{mode}")}
            options = {"ruler": {"context_tokens": args.length, "query_aware": MODES[mode]}}

            def on_cell(done: CellDone, out: Path = out, mode: str = mode) -> None:
                path = out / "cells" / f"{cell_name(done.task, done.label, done.ratio)}.json"
                m = done.result.policy_metrics
                print(f"{mode} {done.label}@{done.ratio:g}: RULER average {m.exact_match_macro:.3f} "
                      f"({done.seconds:.0f} s)", file=sys.stderr, flush=True)
                if args.commit:
                    commit([path], f"RULER grid: {args.model} {args.length} tokens, {mode}, {done.label} at ratio "
                                   f"{done.ratio:g} (average {m.exact_match_macro:.3f}, {len(done.result.samples)} "
                                   f"samples, {done.seconds / 60:.0f} min)")

            compare(args.policies, [ratio], ["ruler"], out, base=base, on_cell=on_cell, task_options=options)


# ================================================================================================== tables
def load_cells(model: str, length: int, mode: str) -> dict[tuple[str, float], dict[str, Any]]:
    cells = {}
    for path in sorted((grid_dir(model, length, mode) / "cells").glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("complete"):
            ratio = doc["spec"]["ratio"]
            cells[(doc.get("label") or doc["policy_name"], float(ratio))] = doc
    return cells


def present_policies(model: str, length: int, modes: list[str]) -> list[str]:
    """The classic grid's policies, then each newer baseline that has at least one finished cell."""
    found = {label for mode in modes for label, _ in load_cells(model, length, mode)}
    return POLICIES + [p for p in NEWER if p in found]


def fmt(value: float | None, ci: Any = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    s = f"{value:+.2f}" if signed else f"{value:.2f}"
    if ci and all(c is not None and np.isfinite(c) for c in ci):
        s += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if signed else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def paired_macro(doc_a: dict[str, Any], doc_b: dict[str, Any], n_boot: int = 2000, seed: int = 0):
    """RULER average of A minus B on the samples both hold (same ids: same prompts), with a paired bootstrap 95%
    interval: per-sample differences, per-task means of the resampled differences, averaged over tasks."""
    from kvpolicy.eval import metrics as M
    from kvpolicy.eval.aggregate import macro_mean

    a = {s["id"]: s for s in doc_a["samples"]}
    b = {s["id"]: s for s in doc_b["samples"]}
    ids = [i for i in a if i in b]
    diff = np.array([a[i]["policy"]["exact_match"] - b[i]["policy"]["exact_match"] for i in ids], dtype=np.float64)
    kinds = np.array([a[i]["kind"] for i in ids])
    value = macro_mean(diff, kinds, np.arange(len(ids)))
    ci = M.bootstrap(lambda idx: macro_mean(diff, kinds, idx), len(ids), n_boot, seed)
    return value, ci, len(ids)


def full_metrics(cells: dict[tuple[str, float], dict[str, Any]]) -> dict[str, Any] | None:
    return next(iter(cells.values()))["full"] if cells else None


def average_table(model: str, length: int, modes: list[str], policies: list[str], ratios: list[float]) -> str:
    head = "| policy | " + " | ".join(f"{mode} {r:g}" for mode in modes for r in ratios) + " |"
    lines = [head, "| --- |" + " --- |" * (len(modes) * len(ratios))]
    per_mode = {mode: load_cells(model, length, mode) for mode in modes}
    full = [fmt(*(lambda f: (f["exact_match_macro"], f["exact_match_macro_ci"]) if f else (None,))(
        full_metrics(per_mode[mode]))) for mode in modes for _ in ratios]
    lines.append("| full cache | " + " | ".join(full) + " |")
    for p in policies:
        row = []
        for mode in modes:
            for r in ratios:
                doc = per_mode[mode].get((p, r))
                row.append(fmt(doc["policy_metrics"]["exact_match_macro"], doc["policy_metrics"]["exact_match_macro_ci"])
                           if doc else "-")
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def task_table(model: str, length: int, mode: str, policies: list[str], ratio: float) -> str:
    from kvpolicy.eval.tasks.ruler_text import RULER_TASKS

    cells = load_cells(model, length, mode)
    present = [p for p in policies if (p, ratio) in cells]
    if not present:
        return f"(no {mode} cell at ratio {ratio:g} yet)\n"
    full = full_metrics(cells)
    lines = ["| task | full | " + " | ".join(present) + " |", "| --- |" + " --- |" * (len(present) + 1)]
    for task in RULER_TASKS:
        row = [fmt(full["exact_match_by_kind"].get(task))]
        row += [fmt(cells[(p, ratio)]["policy_metrics"]["exact_match_by_kind"].get(task)) for p in present]
        lines.append(f"| `{task}` | " + " | ".join(row) + " |")
    row = [fmt(full["exact_match_macro"])] + [fmt(cells[(p, ratio)]["policy_metrics"]["exact_match_macro"])
                                              for p in present]
    lines.append("| **average** | " + " | ".join(f"**{x}**" for x in row) + " |")
    return "\n".join(lines) + "\n"


def paired_table(model: str, length: int, modes: list[str], policies: list[str], ratios: list[float]) -> str:
    others = [p for p in policies if p != FLAGSHIP]
    lines = [f"| {FLAGSHIP} minus | " + " | ".join(f"{mode} {r:g}" for mode in modes for r in ratios) + " |",
             "| --- |" + " --- |" * (len(modes) * len(ratios))]
    per_mode = {mode: load_cells(model, length, mode) for mode in modes}
    for p in ["full", *others]:
        row = []
        for mode in modes:
            for r in ratios:
                mine = per_mode[mode].get((FLAGSHIP, r))
                if mine is None:
                    row.append("-")
                    continue
                if p == "full":  # the flagship's own delta from the full cache, already paired in the cell
                    d = mine["delta"].get("exact_match_macro")
                    row.append(fmt(d["value"], d["ci"], signed=True) if d else "-")
                    continue
                other = per_mode[mode].get((p, r))
                if other is None:
                    row.append("-")
                    continue
                value, ci, _ = paired_macro(mine, other)
                row.append(fmt(value, ci, signed=True))
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(model: str, length: int, modes: list[str], policies: list[str], ratios: list[float]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.8), sharey=True, squeeze=False)
    drawn = False
    for ax, mode in zip(axes[0], modes):
        cells = load_cells(model, length, mode)
        full = full_metrics(cells)
        if full:
            ax.axhline(full["exact_match_macro"], color="black", lw=1, ls="--", label="full cache")
        for p in policies:
            pts = sorted((r, cells[(p, r)]["policy_metrics"]) for r in ratios if (p, r) in cells)
            if not pts:
                continue
            xs = [r for r, _ in pts]
            ys = [m["exact_match_macro"] for _, m in pts]
            lo = [m["exact_match_macro"] - m["exact_match_macro_ci"][0] for _, m in pts]
            hi = [m["exact_match_macro_ci"][1] - m["exact_match_macro"] for _, m in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=p)
            drawn = True
        ax.set_title(f"{model}, {length} tokens, query-{mode}")
        ax.set_xlabel("ratio (fraction of the KV cache removed)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("RULER average (95% CI)")
    axes[0][-1].legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    path = GRID_DIR / f"{model}-{length}-ruler.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cell_counts(model: str, length: int, modes: list[str], policies: list[str], ratios: list[float]) -> str:
    parts = []
    for mode in modes:
        cells = load_cells(model, length, mode)
        done = sum((p, r) in cells for p in policies for r in ratios)
        samples = sorted({len(d["samples"]) for d in cells.values()})
        wall = sum(d["wall_s"] for d in cells.values())
        parts.append(f"{mode}: {done}/{len(policies) * len(ratios)} cells ({'/'.join(map(str, samples)) or 0} "
                     f"samples each, {wall / 3600:.1f} h of cell wall time)")
    env = next((d["environment"] for m in modes for d in load_cells(model, length, m).values()), None)
    where = f"; CPU {env['cpu']} ({env['cpu_count']} cores), {env['torch_threads']} torch thread" if env else ""
    return "; ".join(parts) + where + "."


def render(args: argparse.Namespace) -> None:
    from ruler_calibration import replace_section  # this script's folder is on sys.path when it runs

    m, n = args.model, args.length
    picture = plot(m, n, args.modes, args.policies, args.ratios)
    body = [f"Cells done: {cell_counts(m, n, args.modes, args.policies, args.ratios)}", "",
            "RULER average (mean of the 11 per-task scores) with its 95% bootstrap interval, per query mode and ratio:",
            "", average_table(m, n, args.modes, args.policies, args.ratios)]
    if picture:
        body += [f"![RULER average vs ratio]({picture.relative_to(PAGE.parent).as_posix()})", ""]
    body += [f"Paired differences, {FLAGSHIP} minus each policy (same prompts; 95% paired bootstrap interval of the "
             "RULER average's difference); the `full` row is "
             f"{FLAGSHIP} minus the full cache:", "", paired_table(m, n, args.modes, args.policies, args.ratios)]
    for mode in args.modes:
        body += [f"Per task, query-{mode}, ratio 0.75:", "", task_table(m, n, mode, args.policies, 0.75)]
    table = "\n".join(body)
    replace_section(f"<!-- ruler-grid:{m}-{n}:start -->", f"<!-- ruler-grid:{m}-{n}:end -->", table)
    print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "render"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--policies", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated presets (run: default {','.join(POLICIES)}; render: every policy of "
                        f"{','.join(POLICIES + NEWER)} with a finished cell)")
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    p.add_argument("--samples", type=int, default=110, help="in total, spread over the 11 tasks")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recordings", default=str(Path.home() / ".cache" / "kvpolicy" / "recordings"),
                   help="where recorded prefills are kept between slices and runs (large: ~60 KB per token)")
    p.add_argument("--prefill-cache-gb", type=float, default=1.0,
                   help="recordings kept in memory (GiB); the rest are read back from --recordings (a 2k batch of "
                        "16 is ~1.9 GB, and two workers on a 24 GB machine must not hold a quarter of it each)")
    p.add_argument("--commit", action="store_true", help="git add + commit each finished cell's file")
    args = p.parse_args(argv)
    if args.policies is None:
        args.policies = POLICIES if args.command == "run" else present_policies(args.model, args.length, args.modes)
    run_grid(args) if args.command == "run" else render(args)


if __name__ == "__main__":
    main()
