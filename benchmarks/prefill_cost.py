"""What a policy's prefill costs against the full cache's: the same prompt, one process, runs interleaved.

Some policies add work to the prefill: KVzip runs the prompt a second time (a repeat prompt and the context, in
chunks) through the cache; Expected Attention keeps statistics of the queries; H2O and Elastic Cache sum the attention
each key receives. This script times, on one model and one prompt, the prefill forward of the plain ``DynamicCache``
("full") and of each listed preset, interleaved ``full, p1, p2, ..., full, p1, p2, ...`` so that the drift of a shared
machine hits every configuration alike. For each run it records the wall time and the **CPU time of the process**
(one torch thread: waiting for a core on a loaded machine does not inflate it), and for a policy whose compression
waits for the end of the forward (a probe or a budget across layers: ``PolicyCache.finish_prefill``) the part spent
there. It prints one line per run, then per policy the medians and the median of the per-round ratios to the full
cache (CPU time; wall in brackets)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prefill_cost.py --policies kvzip,expected_attention,keydiff \
        --tokens 4096 --rounds 3

The prompt is ``--tokens`` random ids of the model's vocabulary (seed 0; the cost does not depend on the text).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core.cache import PolicyCache


def prefill(model, ids: torch.Tensor, cache) -> tuple[float, float]:
    """(wall s, process CPU s) of one prefill forward."""
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - w0, time.process_time() - c0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policies", default="kvzip", help="comma-separated preset names")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="model dtype (default: kvpolicy.load_model's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kvpolicy.load_model(args.model, **({"dtype": args.dtype} if args.dtype else {}))
    kvpolicy.attach(model)
    names = args.policies.split(",")
    policies = {name: load_policy({"preset": name, "ratio": args.ratio}) for name in names}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.tokens), generator=g)
    deferred: list[float] = []
    original = PolicyCache.finish_prefill

    def timed(self, m):  # a probe pass and the deferred compression, timed inside the policy's prefill
        t0 = time.process_time()
        original(self, m)
        deferred.append(time.process_time() - t0)

    PolicyCache.finish_prefill = timed
    runs: dict[str, list[tuple[float, float, float]]] = {"full": [], **{n: [] for n in names}}
    print(f"{args.model} ({next(model.parameters()).dtype}), {args.tokens} tokens, ratio {args.ratio}, "
          f"{args.threads} thread(s), {cpu_name()}, load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.rounds):
        for name in ["full", *names]:
            deferred.clear()
            cache = (DynamicCache(config=model.config) if name == "full"
                     else kvpolicy.make_cache(model, policies[name], tokenizer=tokenizer))
            wall, cpu = prefill(model, ids, cache)
            runs[name].append((wall, cpu, sum(deferred)))
            extra = f", of which after the forward {sum(deferred):.1f} s CPU" if deferred else ""
            print(f"round {r + 1} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU{extra}", flush=True)
            del cache
    full = runs["full"]
    print(f"medians over {args.rounds} rounds (ratio = median of per-round ratios to the full cache), "
          f"load average at end {os.getloadavg()[0]:.1f}:")
    print(f"  full: {statistics.median(c for _, c, _ in full):.2f} s CPU "
          f"({statistics.median(w for w, _, _ in full):.2f} s wall)")
    for name in names:
        mine = runs[name]
        cpu_ratio = statistics.median(c / f[1] for (_, c, _), f in zip(mine, full))
        wall_ratio = statistics.median(w / f[0] for (w, _, _), f in zip(mine, full))
        after = statistics.median(d for _, _, d in mine)
        print(f"  {name}: {statistics.median(c for _, c, _ in mine):.2f} s CPU "
              f"({statistics.median(w for w, _, _ in mine):.2f} s wall), after the forward {after:.2f} s CPU; "
              f"x full: {cpu_ratio:.2f} CPU ({wall_ratio:.2f} wall)")


if __name__ == "__main__":
    main()
