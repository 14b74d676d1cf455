"""RULER calibration: the full cache's score per RULER task at several context lengths, one result file per length.

Why: a task the full cache fails cannot rank KV-cache policies (issue 16, "Calibrate before concluding"), so before a
policy grid runs at some ``context_tokens`` we measure what the uncompressed cache scores there and choose the grid's
length by the rule in :func:`choose_length`.

Only the full cache runs: the harness's own reference side (:func:`kvpolicy.eval.runner.ensure_references`, the
plain ``DynamicCache`` every ``kvpolicy run`` compares a policy with), scored by the harness's
:func:`kvpolicy.eval.scoring.side` and aggregated by :func:`kvpolicy.eval.aggregate.side_metrics` (RULER's
``string_match_all`` per task with a 95% percentile bootstrap interval, and the macro average). ``kvpolicy run
--policy full`` gives the same full-cache numbers but also runs the ratio-0 policy side and the honesty check, about
twice the compute.

Resumable: a length whose file exists under ``docs/long-context/`` is skipped; inside a length, references are
cached per sample on disk by the harness (a batch with any missing sample is recomputed), so an interrupted length
loses at most one batch. ``render`` rebuilds the table in ``docs/long-context.md`` from the files alone.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ruler_calibration.py run --lengths 1024 2048 4096 --commit
    .venv/bin/python scripts/ruler_calibration.py render
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CELL_DIR = ROOT / "docs" / "long-context"
PAGE = ROOT / "docs" / "long-context.md"


def markers(model: str) -> tuple[str, str]:
    """The comments around ``model``'s table in docs/long-context.md (one table per model)."""
    return f"<!-- calibration-table:{model}:start -->", f"<!-- calibration-table:{model}:end -->"


THRESHOLD, MIN_TASKS = 0.5, 4  #: the issue's rule: the full cache scores >= 0.5 on at least four tasks


def cell_path(model: str, length: int, out_dir: Path = CELL_DIR) -> Path:
    return out_dir / f"calibration-{model}-{length}.json"


# ================================================================================================== one cell
def run_cell(model: str, length: int, samples_per_task: int, batch_size: int, seed: int) -> dict[str, Any]:
    """The full cache on ``samples_per_task`` samples of each RULER task at ``context_tokens=length``, as a JSON
    document: the harness's full-side metrics, per-sample scores and generations, and the timing."""
    import torch

    from kvpolicy import provenance
    from kvpolicy.eval import EvalSpec, SampleResult
    from kvpolicy.eval.aggregate import side_metrics
    from kvpolicy.eval.runner import ensure_references, setup
    from kvpolicy.eval.scoring import side
    from kvpolicy.eval.tasks.ruler_text import RULER_TASKS

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    n = samples_per_task * len(RULER_TASKS)
    spec = EvalSpec(model=model, task="ruler", task_options={"context_tokens": length}, policy="full", samples=n,
                    seed=seed, batch_size=batch_size, threads=1, dtype="auto")
    run = setup(spec, None, None, None, None, None)
    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        print(f"  {length}: {done[0]}/{n} samples ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    refs = ensure_references(run.ctx, run.samples, run.store, batch_size, progress=progress)
    results = []
    for s, ref in zip(run.samples, refs):
        full = side(run.ctx, s, None, ref, spec.protocol, True, policy_side=False)
        # no policy ran: SampleResult's policy side is the full cache too, so that the harness's aggregation applies
        results.append(SampleResult(id=s.id, kind=s.kind, prompt_tokens=len(s.prompt_ids),
                                    target_tokens=len(ref.target), target_kind=ref.target_kind,
                                    full=full, policy=full))
    metrics = side_metrics(results, "full", spec.bootstrap, seed)
    return {
        "what": "RULER calibration: the full cache alone (no policy), query-agnostic (the task's default)",
        "spec": spec.model_dump(mode="json"),
        "task": {"name": "ruler", "options": run.task_info["options"], "query_aware": run.task_info["query_aware"]},
        "model": {"name": model, "fingerprint": run.fingerprint, "dtype": str(run.ctx.model.dtype)},
        "environment": provenance.environment("cpu"),
        "full": metrics.model_dump(mode="json"),
        "samples": [
            {"id": r.id, "kind": r.kind, "prompt_tokens": r.prompt_tokens, "exact_match": r.full.exact_match,
             "answers": s.answers, "generation": r.full.generation,
             "prefill_s": r.full.prefill_s, "decode_s": r.full.decode_s, "decode_steps": r.full.decode_steps}
            for s, r in zip(run.samples, results)
        ],
        "reference": {"hits": run.store.hits, "computed": run.store.misses},
        # compute recorded with each reference when it was computed (per row of its batch), valid on a resumed cell
        "compute_s": sum(r.full.prefill_s + r.full.decode_s for r in results),
        "wall_s": time.perf_counter() - t0,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def commit(path: Path, message: str) -> None:
    subprocess.run(["git", "add", str(path)], cwd=ROOT, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], cwd=ROOT, check=True)


def run_all(args: argparse.Namespace) -> None:
    from kvpolicy.io import write_json_atomic

    for length in args.lengths:
        path = cell_path(args.model, length, args.out_dir)
        if path.exists():
            print(f"{path.name}: done, skipped", file=sys.stderr)
            continue
        doc = run_cell(args.model, length, args.samples_per_task, args.batch_size, args.seed)
        write_json_atomic(path, doc)
        full = doc["full"]
        print(f"{path.name}: average {full['exact_match_macro']:.3f}, wall {doc['wall_s']:.0f} s", file=sys.stderr)
        if args.commit:
            commit(path, f"RULER calibration: full-cache score per task, {args.model} at {length} tokens "
                         f"({len(doc['samples'])} samples)")


# ================================================================================================== the table
def load_cells(model: str, out_dir: Path = CELL_DIR) -> dict[int, dict[str, Any]]:
    cells = {}
    for path in out_dir.glob(f"calibration-{model}-*.json"):
        doc = json.loads(path.read_text())
        cells[int(doc["spec"]["task_options"]["context_tokens"])] = doc
    return dict(sorted(cells.items()))


def fmt(value: float | None, ci: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def choose_length(cells: dict[int, dict[str, Any]]) -> tuple[int | None, str]:
    """The issue's rule: the longest length where the full cache scores >= 0.5 on at least four tasks; when none
    qualifies, the length where it scores best (its RULER average)."""
    if not cells:
        return None, "no length measured"
    passing = {n: sum(v >= THRESHOLD for v in d["full"]["exact_match_by_kind"].values()) for n, d in cells.items()}
    ok = [n for n, k in passing.items() if k >= MIN_TASKS]
    counts = ", ".join(f"{n}: {k}" for n, k in passing.items())
    if ok:
        return max(ok), f"tasks at >= {THRESHOLD} per length ({counts}); longest qualifying: {max(ok)}"
    best = max(cells, key=lambda n: cells[n]["full"]["exact_match_macro"])
    return best, (f"no length qualifies (tasks at >= {THRESHOLD} per length: {counts}); best average at {best}")


def render_table(model: str, out_dir: Path = CELL_DIR) -> str:
    """The calibration table in Markdown: tasks x lengths (score [95% CI]), the average, timing and the rule."""
    cells = load_cells(model, out_dir)
    if not cells:
        return "(no calibration cell measured yet)\n"
    from kvpolicy.eval.tasks.ruler_text import RULER_TASKS

    lengths = list(cells)
    lines = ["| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "| --- |" + " --- |" * len(lengths)]
    for task in RULER_TASKS:
        row = [fmt(c["full"]["exact_match_by_kind"].get(task), (c["full"]["exact_match_by_kind_ci"] or {}).get(task))
               for c in cells.values()]
        lines.append(f"| `{task}` | " + " | ".join(row) + " |")
    avg = [fmt(c["full"]["exact_match_macro"], c["full"]["exact_match_macro_ci"]) for c in cells.values()]
    lines.append("| **average** | " + " | ".join(f"**{a}**" for a in avg) + " |")
    passing = [str(sum(v >= THRESHOLD for v in c["full"]["exact_match_by_kind"].values())) for c in cells.values()]
    lines.append(f"| tasks >= {THRESHOLD} | " + " | ".join(passing) + " |")
    lines.append("| samples | " + " | ".join(str(len(c["samples"])) for c in cells.values()) + " |")
    lines.append("| mean prompt tokens | " + " | ".join(f"{c['full']['prompt_tokens']:.0f}" for c in cells.values())
                 + " |")
    lines.append("| compute (prefill + decode) | " + " | ".join(
        f"{c['compute_s'] / 60:.1f} min" for c in cells.values()) + " |")
    lines.append("| wall time of the cell run | " + " | ".join(
        f"{c['wall_s'] / 60:.1f} min" + (" (resumed)" if c["reference"]["computed"] < len(c["samples"]) else "") for c in cells.values())
        + " |")
    # cells of one model may come from different machines of this kind: each names its own CPU
    lines.append("| CPU (cores) | " + " | ".join(
        f"{c['environment']['cpu']} ({c['environment']['cpu_count']})" for c in cells.values()) + " |")
    env = next(iter(cells.values()))["environment"]
    _, rule = choose_length(cells)
    lines += ["", f"Model `{model}`, dtype {next(iter(cells.values()))['model']['dtype'].replace('torch.', '')}, "
                  f"{env['torch_threads']} torch thread. Rule: {rule}."]
    return "\n".join(lines) + "\n"


def replace_section(start: str, end: str, body: str, page: Path = PAGE) -> None:
    """Replace what lies between the ``start`` and ``end`` comments of ``page`` (its prose is written by hand); the
    RULER grid's script renders its tables through this too."""
    from kvpolicy.io import atomic_write_text

    text = page.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no {start} ... {end} pair: add it where the rendered section goes")
    atomic_write_text(page, pattern.sub(lambda _: f"{start}\n{body}{end}", text))


def render_page(model: str) -> None:
    """Replace ``model``'s calibration table in docs/long-context.md."""
    table = render_table(model)
    replace_section(*markers(model), table)
    print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "render"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--samples-per-task", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=11)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=CELL_DIR)
    p.add_argument("--commit", action="store_true", help="git add + commit each finished cell's file")
    args = p.parse_args(argv)
    if args.command == "run":
        run_all(args)
    else:
        render_page(args.model) if PAGE.exists() else print(render_table(args.model, args.out_dir))


if __name__ == "__main__":
    main()
