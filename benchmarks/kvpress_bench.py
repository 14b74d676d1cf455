"""NVIDIA kvpress on the same model shape, prompts and ratios as ``kvpolicy bench``, in kvpolicy's result schema.

Run it with the separate venv (kvpress 0.5.5 needs transformers < 5.3; kvpolicy needs 5.23)::

    bash benchmarks/setup_kvpress_venv.sh
    benchmarks/.kvpress-venv/bin/python benchmarks/kvpress_bench.py --from-bench runs/bench-X/bench.json \\
        --output runs/bench-X/kvpress.json
    kvpolicy bench ... --compare runs/bench-X/kvpress.json        # or: python -m kvpolicy.bench --compare ...

``--from-bench`` takes the model config, contexts, ratios, decode steps, repeats, seed and policy parameters (SnapKV
window and kernel, StreamingLLM sinks) from a kvpolicy result, so both sides measure the same thing. Without it,
``--config llama-125m|llama-tiny|llama-1b|PATH --contexts ... --ratios ...`` name them directly.

Presses both frameworks have, under kvpolicy's names: ``local`` = StreamingLLMPress, ``snapkv`` = SnapKVPress,
``knorm`` = KnormPress, ``tova`` = TOVAPress, ``h2o`` = ObservedAttentionPress (H2O's accumulated attention at
prefill; needs eager attention with the ``[heads, n, n]`` weights materialised, skipped where that does not fit in
memory). kvpress compresses at prefill only: during decoding its cache is a plain ``DynamicCache`` that grows by one
entry per token (``torch.cat`` of each layer per step), so its figures after decode are prefill budget + steps.

Measured exactly as ``kvpolicy/bench/`` does (this file does not import kvpolicy, whose transformers pin differs):
prefill repeats interleaved with the full cache, median; decode steps after the last repeat, median without the first
steps; cache bytes = sum of each layer's key/value tensor sizes; peak memory = RSS high-water mark reset per
configuration (``malloc_trim`` + ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import re
import runpy
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SCHEMA = "kvpolicy.bench/1"
#: the shapes of ``kvpolicy bench``, read from kvpolicy's own file by path (standard library only, run, not imported
#: as ``kvpolicy``: this venv does not have kvpolicy installed), so both benchmarks always build the same models
BUILTIN_CONFIGS: dict = runpy.run_path(str(Path(__file__).resolve().parents[1] / "kvpolicy" / "bench" / "shapes.py"))[
    "BUILTIN_CONFIGS"
]
PRESSES = {
    "local": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "h2o": "ObservedAttentionPress",
}
MiB = float(1 << 20)


# ------------------------------------------------------------------------------------------------------ memory
def _status_kib(key: str) -> int | None:
    m = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else None


class Meter:
    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            self.trim = lambda: libc.malloc_trim(0)
        except OSError:
            self.trim = lambda: None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = True
        except OSError:
            self.ok = False
        self.start_rss = 0

    def start(self) -> None:
        if not self.ok:
            return
        gc.collect()
        self.trim()
        Path("/proc/self/clear_refs").write_text("5")
        self.start_rss = (_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> tuple[int | None, int | None]:
        if not self.ok:
            return None, None
        peak = (_status_kib("VmHWM") or 0) * 1024
        return peak, peak - self.start_rss


# ------------------------------------------------------------------------------------------------------- helpers
def cache_bytes(cache, budget_entries: int | None = None) -> dict:
    layers = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        nb = k.nbytes + v.nbytes
        n = k.shape[2]
        per_slot = (
            k.shape[0]
            * k.shape[1]
            * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
        )
        lb = {
            "layer": i,
            "alloc_bytes": nb,
            "used_bytes": nb,
            "slots": n,
            "capacity": n,
            "meta_bytes": 0,
            "held": [[n] * k.shape[1]] * k.shape[0],
        }
        if budget_entries is not None:
            lb["promised"] = [[budget_entries] * k.shape[1]] * k.shape[0]
            lb["budget_bytes"] = budget_entries * per_slot
        layers.append(lb)
    total = sum(lb["alloc_bytes"] for lb in layers)
    budget = (
        sum(lb["budget_bytes"] for lb in layers) if budget_entries is not None else None
    )
    return {
        "total_alloc": total,
        "total_used": total,
        "total_meta": 0,
        "budget": budget,
        "layers": layers,
    }


def steady(times):
    return times[min(2, len(times) // 4) :]


def median(xs):
    return statistics.median(xs) if xs else None


def write_json_atomic(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def version(p: str) -> str | None:
    try:
        return importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------- main
def make_press(name: str, ratio: float, params: dict):
    import kvpress

    cls = getattr(kvpress, PRESSES[name])
    kwargs = {"compression_ratio": ratio}
    if name == "snapkv":
        kwargs["window_size"] = params.get("window", 32)
        kwargs["kernel_size"] = params.get("kernel_size", 5)
    if name == "local":
        kwargs["n_sink"] = params.get("start_size", 4)
    return cls(**kwargs)


def policy_params(bench: dict, name: str) -> dict:
    """A kvpolicy policy's encode-scorer parameters from its result (SnapKV window, sinks)."""
    for r in bench.get("runs", []):
        if r.get("policy") == name and r.get("policy_doc"):
            enc = r["policy_doc"].get("encode") or {}
            return enc if isinstance(enc, dict) else {}
    return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--from-bench", type=Path, help="a kvpolicy bench.json to copy the setup from"
    )
    ap.add_argument("--config", default="llama-125m")
    ap.add_argument(
        "--contexts",
        default=None,
        help="prompt lengths (with --from-bench: a subset of its contexts)",
    )
    ap.add_argument("--ratios", default="0.75")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="skip contexts that would not fit (seconds)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the kvpolicy run's, if given)",
    )
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    bench = json.loads(args.from_bench.read_text()) if args.from_bench else {}
    if bench:
        spec = bench["spec"]
        cfg_doc = {k: v for k, v in bench["model"]["config"].items()}
        config = LlamaConfig(
            **{
                k: v
                for k, v in cfg_doc.items()
                if k not in ("architectures", "transformers_version")
            }
        )
        contexts = sorted(
            {
                r["context"]
                for r in bench["runs"]
                if r["kind"] == "prefill+decode"
                and r.get("framework", "kvpolicy") == "kvpolicy"
            }
        )
        if args.contexts:
            contexts = [
                n for n in contexts if n in {int(x) for x in args.contexts.split(",")}
            ]
        ratios = spec["ratios"]
        steps, repeats, seed = spec["steps"], spec["repeats"], spec["seed"]
        model_name = bench["model"]["name"]
    else:
        if args.config in BUILTIN_CONFIGS:
            config = LlamaConfig(
                **BUILTIN_CONFIGS[args.config], max_position_embeddings=32768
            )
        else:
            config = LlamaConfig(**json.loads(Path(args.config).read_text()))
        contexts = [int(x) for x in (args.contexts or "1024,4096,16384").split(",")]
        ratios = [float(x) for x in args.ratios.split(",")]
        steps, repeats, seed = args.steps, args.repeats, args.seed
        model_name = args.config
    presses = [p for p in args.presses.split(",") if p]
    threads = args.threads or (bench.get("spec", {}).get("threads") if bench else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    head_dim = (
        getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads
    )
    meter = Meter()
    mem_avail = (
        int(
            re.search(
                r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()
            ).group(1)
        )
        * 1024
    )

    def prompt(n):
        g = torch.Generator().manual_seed(seed + n)
        return torch.randint(3, config.vocab_size, (1, n), generator=g)

    def decode(cache, tok, k):
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
        return times

    def prefill(ids, press):
        cache = DynamicCache(config=model.config)
        eager = press is not None and type(press).__name__ == "ObservedAttentionPress"
        model.set_attn_implementation("eager" if eager else "sdpa")
        t0 = time.perf_counter()
        if press is None:
            out = model(
                input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        else:
            with press(model):
                out = model(
                    input_ids=ids,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        dt = time.perf_counter() - t0
        model.set_attn_implementation(
            "sdpa"
        )  # decoding: kvpress leaves the cache alone, sdpa as for the full cache
        return dt, out.logits[:, -1:].argmax(-1), cache

    runs = []
    notes_global = []
    with torch.inference_mode():
        prefill(prompt(min(contexts)), None)  # warm-up
        last_full_s, last_n = None, None
        for n in contexts:
            if args.time_budget and last_full_s:
                est = (
                    last_full_s
                    * (n / last_n) ** 2
                    * (1 + len(presses) * len(ratios))
                    * repeats
                )
                if time.perf_counter() - t_start + est > args.time_budget:
                    notes_global.append(
                        f"context {n} skipped: ~{est:.0f} s would exceed the time budget"
                    )
                    print(notes_global[-1], file=sys.stderr)
                    continue
            ids = prompt(n)
            here, reps_n = presses, repeats
            if bench:  # what kvpolicy measured at this context: the same presses, the same number of repeats
                mine = [
                    r
                    for r in bench["runs"]
                    if r["kind"] == "prefill+decode"
                    and r["context"] == n
                    and r.get("framework", "kvpolicy") == "kvpolicy"
                ]
                here = [p for p in presses if any(r["policy"] == p for r in mine)]
                reps_n = max(
                    (len(r["prefill_s"]) for r in mine if r["policy"] == "full"),
                    default=repeats,
                )
            configs = [("full", None)] + [(p, r) for p in here for r in ratios]
            res = {}
            for c in configs:
                name, ratio = c
                res[c] = {
                    "framework": "kvpress",
                    "policy": name,
                    "kind": "prefill+decode",
                    "ratio": ratio,
                    "context": n,
                    "budget_tokens": n
                    if ratio is None
                    else max(1, int(n * (1 - ratio))),
                    "attention_stats": name in ("snapkv", "tova", "h2o"),
                    "prefill_s": [],
                    "notes": [],
                }
                if name != "full":
                    res[c]["notes"].append(
                        f"kvpress.{PRESSES[name]}, prefill-only compression"
                    )
                    res[c]["policy_doc"] = {
                        "press": PRESSES[name],
                        **{
                            k: v
                            for k, v in vars(
                                make_press(name, ratio, policy_params(bench, name))
                            ).items()
                            if isinstance(v, (int, float, str, bool))
                        },
                    }
            skip = set()
            for c in configs:
                if c[0] == "h2o":
                    need = 2 * config.num_attention_heads * n * n * 4
                    if need > 0.6 * mem_avail:
                        skip.add(c)
                        res[c]["notes"].append(
                            f"not run: eager attention materialises [{config.num_attention_heads}, {n}, {n}] float32 "
                            f"weights (~{need / 2**30:.1f} GiB with the softmax copy) > 60% of free memory"
                        )
            for rep in range(reps_n):
                for c in configs:
                    if c in skip:
                        continue
                    name, ratio = c
                    press = (
                        None
                        if name == "full"
                        else make_press(name, ratio, policy_params(bench, name))
                    )
                    last = rep == reps_n - 1
                    gc.collect()
                    if last:
                        meter.start()
                    dt, tok, cache = prefill(ids, press)
                    r = res[c]
                    r["prefill_s"].append(dt)
                    print(
                        f"kvpress context {n:>6} {name:>8} ratio {ratio} prefill {dt:.3f} s",
                        file=sys.stderr,
                    )
                    if last:
                        b = None if name == "full" else r["budget_tokens"]
                        r["bytes_prefill"] = cache_bytes(cache, b)
                        times = decode(cache, tok, steps)
                        r["decode_step_s"] = times
                        r["decode_steps"] = len(times)
                        r["bytes_decode"] = cache_bytes(
                            cache, None if b is None else b + len(times)
                        )
                        r["peak_bytes"], r["peak_delta_bytes"] = meter.stop()
                        med = median(steady(times))
                        r["decode_median_s"] = med
                        r["decode_tokens_per_s"] = 1.0 / med if med else None
                        if name == "full":
                            last_full_s, last_n = median(r["prefill_s"]), n
                    del cache
            for r in res.values():
                r["prefill_median_s"] = median(r["prefill_s"])
            runs.extend(res.values())
            # the full cache holding B entries, in this process (kvpolicy's baseline-at-budget)
            for ratio in ratios:
                b = max(1, int(n * (1 - ratio)))
                cache = DynamicCache(config=model.config)
                g = torch.Generator().manual_seed(seed)
                for i in range(config.num_hidden_layers):
                    shape = (1, config.num_key_value_heads, b, head_dim)
                    cache.update(
                        torch.randn(shape, generator=g),
                        torch.randn(shape, generator=g),
                        i,
                    )
                times = decode(cache, prompt(1), steps)
                med = median(steady(times))
                runs.append(
                    {
                        "framework": "kvpress",
                        "policy": "full",
                        "kind": "baseline-at-budget",
                        "ratio": ratio,
                        "context": b,
                        "budget_tokens": b,
                        "decode_step_s": times,
                        "decode_steps": len(times),
                        "decode_median_s": med,
                        "decode_tokens_per_s": 1.0 / med if med else None,
                        "notes": [
                            f"DynamicCache filled with {b} random entries per layer"
                        ],
                    }
                )
                del cache

    doc = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "framework": "kvpress",
        "spec": {
            "contexts": contexts,
            "ratios": ratios,
            "steps": steps,
            "repeats": repeats,
            "seed": seed,
            "presses": {p: PRESSES[p] for p in presses},
            "from_bench": str(args.from_bench or ""),
            "notes": notes_global,
        },
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": {p: version(p) for p in ("torch", "transformers", "kvpress")},
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
        },
        "model": {
            "name": model_name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": config.num_hidden_layers,
            "q_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": head_dim,
            "dtype": "float32",
        },
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json_atomic(args.output, doc)
    print(
        f"wrote {args.output} ({len(runs)} runs, {doc['wall_s']:.0f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
