"""Paired difference of two runs of ``kvpolicy ablate`` outputs, possibly from two different studies.

Why: an ablation's table compares each variant with its base only. Two studies run on the same samples (same model,
task, split, seed and sample count; the script checks the per-sample lists have the same length) also pair across
studies, e.g. "the same merge with and without ``keep_mass``" when the merge without it was study 1's variant. The
interval is the same paired bootstrap ``kvpolicy ablate`` reports (:func:`kvpolicy.sweep.paired_bootstrap`:
samples resampled with the same indices for both runs; corpus PPL recomputed from the resampled NLL sums).

    .venv/bin/python scripts/paired_runs.py \\
        "docs/merge-search/kvzip-merge-shared/ablation.json:evict -> anchor merge, heads shared" \\
        "docs/merge-search/kvzip-merge-mass/ablation.json:keys and values, nearest position, mass kept"

prints, per budget both files ran and per metric, ``B - A`` with its 95% interval. A run is ``FILE:VARIANT`` (the
variant's name in the study; ``base`` for the base policy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvpolicy.sweep import Evaluation, paired_bootstrap


def runs_of(arg: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``FILE:VARIANT`` -> (variant, {budget label: run}) from an ``ablation.json``."""
    path, _, variant = arg.partition(":")
    if not variant:
        raise SystemExit(f"{arg!r}: expected FILE:VARIANT (the variant's name, or base)")
    doc = json.loads(Path(path).read_text())
    found = {json.dumps(r["budget"]) if not isinstance(r["budget"], str) else r["budget"]: r
             for r in doc["runs"] if r["variant"] == variant}
    if not found:
        names = sorted({r["variant"] for r in doc["runs"]})
        raise SystemExit(f"{path}: no run of variant {variant!r}; the study has: {', '.join(names)}")
    return variant, found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="FILE:VARIANT, the reference run")
    p.add_argument("b", help="FILE:VARIANT, the run compared with it (B - A)")
    p.add_argument("--metrics", nargs="+", default=["exact_match", "ppl"])
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args(argv)
    (name_a, runs_a), (name_b, runs_b) = runs_of(args.a), runs_of(args.b)
    for budget in sorted(set(runs_a) & set(runs_b)):
        ra, rb = runs_a[budget], runs_b[budget]
        for metric in args.metrics:
            n_a, n_b = (len(next(iter(r["per_sample"].values()))) for r in (ra, rb))
            if n_a != n_b:
                raise SystemExit(f"{budget}: {n_a} samples against {n_b}: the runs do not pair")
            delta, low, high = paired_bootstrap(
                Evaluation(metrics={}, per_sample=ra["per_sample"]),
                Evaluation(metrics={}, per_sample=rb["per_sample"]),
                metric,
                resamples=args.resamples,
            )
            print(f"{budget}  {metric}: ({name_b}) - ({name_a}) = {delta:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
