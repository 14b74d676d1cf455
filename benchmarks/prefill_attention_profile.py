"""Where a whole-prompt statistics prefill spends its time, one attention layer at a time.

For one decoder layer of a given shape (default: SmolLM2-135M's, 9 query / 3 kv heads, head_dim 64, hidden 576, MLP
1536; ``--shape llama-125m`` for the bench's default model) and each prompt length, this prints the median CPU time
of the thread (``time.thread_time``: steadier than wall time on a shared machine) of:

* ``sdpa``  -- what a full-cache prefill runs for the layer's outputs (causal, GQA);
* ``lse``   -- :func:`kvpolicy.core.lse.received_from_lse`: the statistics from the flash kernel's log-sum-exp, what
               a compressing layer runs *on top of* ``sdpa`` (the kernel call that returns the lse is SDPA's own);
* ``fused`` -- :func:`kvpolicy.core.kernels.attention_with_received`: outputs and statistics in one pass, what a
               compressing layer runs *instead of* ``sdpa`` where there is no lse (eager attention, not a CPU);
* ``stats`` -- :func:`kvpolicy.core.kernels.attention_received` (softmax of its own, causal-prefix path);
* ``layer`` -- one whole decoder layer of the full cache (attention + MLP + norms).

The prefill overhead of a compressing layer is ``lse / layer`` (exact route) or ``(fused - sdpa) / layer``; the
whole prefill's ratio to the full cache is about one plus that. Rounds are interleaved (sdpa, lse, fused, stats,
layer, sdpa, ...) so that drift on a shared machine hits every column alike.

Usage: ``python benchmarks/prefill_attention_profile.py --contexts 1024,4096,16384 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from kvpolicy.core.kernels import attention_received, attention_with_received
from kvpolicy.core.lse import received_from_lse

SHAPES = {  # query heads, kv heads, head_dim, hidden, MLP
    "smollm2-135m": (9, 3, 64, 576, 1536),
    "llama-125m": (12, 4, 64, 768, 2048),
}


def thread_seconds(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def profile(n: int, shape: str, dtype: torch.dtype, repeats: int, skip_stats: bool) -> dict[str, float]:
    hq, h, d, hidden, mlp = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=hq, num_key_value_heads=h,
                      head_dim=d, num_hidden_layers=1, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).eval().to(dtype)
    torch.manual_seed(0)
    q = torch.randn(1, hq, n, d, dtype=dtype)
    k, v = torch.randn(1, h, n, d, dtype=dtype), torch.randn(1, h, n, d, dtype=dtype)
    valid, qvalid = torch.ones(1, h, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)
    pos, cols, s = torch.arange(n).expand(1, h, n), torch.arange(n), d**-0.5
    x = torch.randn(1, n, hidden, dtype=dtype)
    emb = tuple(e.to(dtype) for e in LlamaRotaryEmbedding(cfg)(x, torch.arange(n)[None]))
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=s)
    columns = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s,
                                                                         enable_gqa=True),
        "lse": lambda: received_from_lse(q, k, lse, valid, qvalid, s, None, 0, 0),
        "fused": lambda: attention_with_received(q, k, v, valid, qvalid, s, 0, 0),
        "stats": lambda: attention_received(q, k, valid, pos, cols, qvalid, s, None, first_slot_col=0),
        "layer": lambda: layer(x, position_embeddings=emb, attention_mask=None),
    }
    if skip_stats:
        del columns["stats"]
    times: dict[str, list[float]] = {name: [] for name in columns}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in columns.items():
                times[name].append(thread_seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-stats", action="store_true", help="leave out the softmax statistics (slow at 16k)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.shape} {args.dtype}, threads {torch.get_num_threads()}, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}; thread CPU seconds, medians of {args.repeats}")
    print(f"{'n':>6} {'sdpa':>7} {'lse':>7} {'fused':>7} {'stats':>7} {'layer':>7} {'lse/layer':>9} "
          f"{'(fused-sdpa)/layer':>18}")
    for n in (int(x) for x in args.contexts.split(",")):
        t = profile(n, args.shape, dtype, args.repeats, args.skip_stats)
        stats = f"{t['stats']:7.3f}" if "stats" in t else f"{'-':>7}"
        print(f"{n:>6} {t['sdpa']:7.3f} {t['lse']:7.3f} {t['fused']:7.3f} {stats} {t['layer']:7.3f} "
              f"{t['lse'] / t['layer']:9.2f} {(t['fused'] - t['sdpa']) / t['layer']:18.2f}", flush=True)
    print(f"load at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
