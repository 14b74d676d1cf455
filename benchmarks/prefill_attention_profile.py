"""Where a whole-prompt statistics prefill spends its time, one attention layer at a time.

For one layer of the bench's default shape (12 query / 4 kv heads, head_dim 64, float32) and each prompt length,
this prints the median wall time of:

* ``sdpa``      -- what a full-cache prefill runs for the layer's outputs (causal, GQA);
* ``stats``     -- :func:`kvpolicy.core.kernels.attention_received` on the uncompressed layer (causal-prefix path):
                   what a layer that keeps everything but still needs statistics pays on top of ``sdpa``;
* ``fused``     -- :func:`kvpolicy.core.kernels.attention_with_received`: outputs and statistics in one pass, what a
                   compressing layer runs *instead of* ``sdpa``;
* ``layer``     -- one whole decoder layer of the full cache (attention + MLP + norms), so the overhead can be read
                   as a fraction of the prefill: ``(fused - sdpa) / layer``.

Usage: ``python benchmarks/prefill_attention_profile.py --contexts 1024,4096,16384 --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from kvpolicy.core.kernels import attention_received, attention_with_received


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hq, h, d = 12, 4, 64
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_attention_heads=hq, num_key_value_heads=h,
                      num_hidden_layers=1, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    print(f"threads {torch.get_num_threads()}, load {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    print(f"{'n':>6} {'sdpa s':>8} {'stats s':>8} {'fused s':>8} {'layer s':>8} {'fused/sdpa':>10} "
          f"{'(fused-sdpa)/layer':>18} {'stats/layer':>11}")
    for n in (int(x) for x in args.contexts.split(",")):
        torch.manual_seed(0)
        q, k, v = torch.randn(1, hq, n, d), torch.randn(1, h, n, d), torch.randn(1, h, n, d)
        valid = torch.ones(1, h, n, dtype=torch.bool)
        qvalid = torch.ones(1, n, dtype=torch.bool)
        pos = torch.arange(n).expand(1, h, n)
        cols = torch.arange(n)
        x = torch.randn(1, n, 768)
        ids = torch.arange(n)[None]
        emb = rope(x, ids)
        with torch.no_grad():
            sdpa = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=True), args.repeats)
            stats = median_time(lambda: attention_received(
                q, k, valid, pos, cols, qvalid, d**-0.5, None, first_slot_col=0), args.repeats)
            fused = median_time(lambda: attention_with_received(
                q, k, v, valid, qvalid, d**-0.5, 0, 0), args.repeats)
            whole = median_time(lambda: layer(x, position_embeddings=emb, attention_mask=None), args.repeats)
        print(f"{n:>6} {sdpa:8.3f} {stats:8.3f} {fused:8.3f} {whole:8.3f} {fused / sdpa:10.2f} "
              f"{(fused - sdpa) / whole:18.2f} {stats / whole:11.2f}")


if __name__ == "__main__":
    main()
