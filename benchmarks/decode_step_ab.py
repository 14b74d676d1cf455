"""Decode step at budget B vs the full cache holding B entries, interleaved in one process.

``kvpolicy bench`` times each policy's 32 decode steps right after its prefill and the full cache at B once,
afterwards: on a shared machine the two can be minutes and a different load apart. This script keeps every cache
alive (each policy prefilled once at the context, a ``DynamicCache`` of B random entries per distinct B) and runs
``--rounds`` rounds of ``--steps`` decode steps of each in turn (the full caches cropped back to B each round), so
that drift of the machine hits all of them alike; it prints the median per-step wall and CPU time and their ratio
to the full cache at B (``xB``). ``--no-batch`` also runs each policy with its layers' decode bookkeeping one layer
at a time (``PolicyLayer.group`` of one), the engine's behaviour before it ran back to back; ``--control`` a second
full cache at B, whose ratio to the first shows the harness's noise. The order of the configurations is shuffled in
every round.

Usage: ``python benchmarks/decode_step_ab.py --contexts 1024,4096 --ratios 0.8 --policies local,h2o,elastic
--threads 1`` (bench model llama-125m, random weights, float32 unless ``--dtype``, batch 1); ``--model smollm2-135m``
times a real model (its cached weights, ``kvpolicy.load_model``) instead of a random-weight shape.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch

from kvpolicy.bench.machine import build_model
from kvpolicy.bench.measure import Runner
from kvpolicy.bench.policies import resolve_policy
from kvpolicy.bench.spec import BenchSpec, budget_tokens


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step_times(runner: Runner, cache, tok: torch.Tensor, steps: int) -> tuple[list[float], list[float], torch.Tensor]:
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = runner.model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, tok


def run_context(runner: Runner, n: int, ratios: list[float], policies: list[str], args) -> None:
    configs: dict[str, list] = {}
    for ratio in ratios:
        b = budget_tokens(n, ratio)
        if f"full@{b}" not in configs:
            configs[f"full@{b}"] = [runner.random_full_cache(b), runner.prompt(1), None, b]
            if args.control:  # a second, identical full cache: its ratio to the first is the harness's noise
                configs[f"full (control)@{b}"] = [runner.random_full_cache(b), runner.prompt(1), None, b]
        for name in policies:
            variants = [(name, False)] + ([(name + " (no batch)", True)] if args.no_batch else [])
            for label, alone in variants:
                cache = runner.new_cache(resolve_policy(name, ratio))
                _, tok = runner.prefill(runner.prompt(n), cache)
                if alone:
                    for layer in cache.policy_layers:
                        layer.group = [layer]
                configs[f"{label} r={ratio}"] = [cache, tok, ratio, b]
    wall: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    order = list(configs)
    shuffle = random.Random(n)
    for _ in range(args.rounds):
        shuffle.shuffle(order)  # no configuration always runs first, or right after the same one
        for key in order:
            entry = configs[key]
            cache, tok, ratio, b = entry
            runner.use(None if ratio is None else True)
            if ratio is None and cache.get_seq_length() > b:
                cache.crop(b - cache.get_seq_length())
            w, c, entry[1] = step_times(runner, cache, tok, args.steps)
            wall[key].extend(w[1:])  # the first step after switching caches warms up
            cpu[key].extend(c[1:])
    print(f"\ncontext {n}: {args.rounds} rounds x {args.steps} steps, load {os.getloadavg()}")
    print(f"{'':28s} {'wall ms':>9s} {'xB':>6s} {'cpu ms':>9s} {'xB':>6s}")
    for key, (_, _, ratio, b) in configs.items():
        w, c = statistics.median(wall[key]), statistics.median(cpu[key])
        bw, bc = statistics.median(wall[f"full@{b}"]), statistics.median(cpu[f"full@{b}"])
        print(f"{key:28s} {1e3 * w:9.2f} {w / bw:6.3f} {1e3 * c:9.2f} {c / bc:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--ratios", default="0.8")
    ap.add_argument("--policies", default="local,h2o,elastic")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--config", default="llama-125m")
    ap.add_argument("--model", default=None, help="a model alias (e.g. smollm2-135m) in place of --config")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto (as kvpolicy bench)")
    ap.add_argument("--no-batch", action="store_true", help="also run each policy's layers one at a time")
    ap.add_argument("--control", action="store_true", help="also run a second full cache at B (the noise floor)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    spec = BenchSpec(model=args.model, config=None if args.model else args.config, contexts=contexts, ratios=ratios,
                     dtype=args.dtype, steps=args.steps)
    model, _ = build_model(spec)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'model ' + args.model if args.model else 'config ' + args.config}, dtype {next(model.parameters()).dtype}")
    runner = Runner(spec, model, log=lambda msg: None)
    with torch.inference_mode():
        for n in contexts:
            run_context(runner, n, ratios, args.policies.split(","), args)


if __name__ == "__main__":
    main()
