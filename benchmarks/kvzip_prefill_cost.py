"""What KVzip's prefill costs against the full cache's: the same prompt, one process, runs alternated.

KVzip scores the prompt by running it a second time (the repeat prompt + the context, in chunks) through the cache,
so its prefill costs the prompt's forward plus the probe's. This script times, on one model and one prompt, the
prefill forward of the plain ``DynamicCache`` ("full") and of a policy with a probe (default the ``kvzip`` preset),
alternated ``full, policy, full, policy, ...`` so that drift of a shared machine hits both alike, and splits the
policy's time into its prefill forward and what runs after it (the probe pass and the compression,
``PolicyCache.finish_prefill``). It prints one line per run, then medians and the per-pair ratio::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kvzip_prefill_cost.py --tokens 4096 --pairs 3

The prompt is ``--tokens`` random ids of the model's vocabulary (seed 0; the cost does not depend on the text).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core.cache import PolicyCache


def prefill(model, ids: torch.Tensor, cache) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="kvzip", help="preset name (a policy with a probe)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kvpolicy.load_model(args.model)
    kvpolicy.attach(model)
    policy = load_policy({"preset": args.policy, "ratio": args.ratio})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.tokens), generator=g)
    split: list[float] = []
    original = PolicyCache.finish_prefill

    def timed(self, m):  # the probe pass and the deferred compression, timed inside the policy's prefill
        t0 = time.perf_counter()
        original(self, m)
        split.append(time.perf_counter() - t0)

    PolicyCache.finish_prefill = timed
    full, pol = [], []
    print(f"{args.model}, {args.tokens} tokens, {args.policy} ratio {args.ratio}, {args.threads} thread(s), "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for i in range(args.pairs):
        full.append(prefill(model, ids, DynamicCache(config=model.config)))
        pol.append(prefill(model, ids, kvpolicy.make_cache(model, policy, tokenizer=tokenizer)))
        print(f"pair {i + 1}: full {full[-1]:.1f} s, {args.policy} {pol[-1]:.1f} s (of which probe + compression "
              f"{split[-1]:.1f} s), ratio {pol[-1] / full[-1]:.2f}", flush=True)
    ratios = [p / f for p, f in zip(pol, full)]
    print(f"median: full {statistics.median(full):.1f} s, {args.policy} {statistics.median(pol):.1f} s (probe + "
          f"compression {statistics.median(split):.1f} s); ratio per pair {', '.join(f'{r:.2f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.2f}; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
