"""kvpress's side of the kept-entries comparison: which prompt entries NVIDIA kvpress 0.5.5 keeps, per layer and kv head.

Run it with the separate venv (kvpress 0.5.5 needs transformers < 5.3; kvpolicy needs 5.23), then compare with
kvpolicy's side, which builds the very same model and prompt (this file's :func:`build_model` and :func:`prompt`,
read by path) and computes the Jaccard overlaps::

    bash benchmarks/setup_kvpress_venv.sh
    benchmarks/.kvpress-venv/bin/python benchmarks/kvpress_overlap.py --output runs/overlap/kvpress.json
    .venv/bin/python benchmarks/kvpolicy_overlap.py --kvpress runs/overlap/kvpress.json

Why not ``from_pretrained`` of a saved model: the same tiny Llama is *built* on both sides from a seed. Every weight is
drawn from its own generator seeded by ``(seed, crc32(parameter name))``, so the weights do not depend on the order in
which either transformers version initialises its modules; a checksum of the weights and the full-cache logits of the
prompt are recorded, and kvpolicy's side checks both before comparing anything.

How the kept entries are read: each press's ``compress`` is wrapped; the keys it returns are matched row by row
(exact equality) to the keys it received, so the recorded indices are what kvpress really kept, whatever its
internals. Presses (kvpolicy's names): ``keydiff`` = KeyDiffPress, ``knorm`` = KnormPress, ``local`` =
StreamingLLMPress (4 sinks), ``snapkv`` = SnapKVPress, ``tova`` = TOVAPress, ``h2o`` = ObservedAttentionPress,
``expected_attention`` = ExpectedAttentionPress (its defaults: 512 future positions, 4 sinks, covariance, value norm),
``kvzip`` = KVzipPress with ``layerwise=True`` (each layer removes the ratio, ranked across its kv heads) and
``kvzip_global`` = KVzipPress's default (one ranking across layers and heads). Eager attention (ObservedAttentionPress
needs the attention weights; the others give the same scores from them), except KVzip, which refuses eager and runs
on SDPA.

KVzip reads its kept entries differently: KVzipPress does not shorten the cache but records the evicted
``(row, head, position)`` of each layer in ``module.masked_key_indices`` (masked at attention time), so the kept
entries are the complement. Its repeat prompt is encoded with ``AutoTokenizer.from_pretrained(name_or_path)``; the
tiny model has no tokenizer, so that call is answered with :class:`CharTokenizer` (one id per character, no chat
template), which kvpolicy's side hands to its probe too.

``duo_attention`` = DuoAttentionPress with the head scores of :func:`duo_head_scores` supplied in place of the authors'
downloaded patterns (its ``load_attention_pattern`` is replaced on the instance) and a window of ``DUO_SINKS`` +
``DUO_RECENT`` (the prompt is 384 tokens). kvpress does not remove a streaming head's entries, it hides them from later
queries (``module.masked_key_indices``, read after the prefill), and its ``ratio`` is the share of heads streamed;
the entry ratio it reports (``press.compression_ratio``) is recorded for kvpolicy's side. It refuses eager
attention, so it runs on an SDPA copy of the same model.

This file never imports kvpolicy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import runpy
import zlib
from pathlib import Path

import torch

#: the random-init Llama both sides build: ``kvpolicy bench``'s ``llama-small`` shape (GQA, 8 query / 2 kv heads, head
#: size 32), read from kvpolicy's file by path (standard library only: this script never imports kvpolicy)
CONFIG = {
    **runpy.run_path(str(Path(__file__).resolve().parents[1] / "kvpolicy" / "bench" / "shapes.py"))[
        "BUILTIN_CONFIGS"]["llama-small"],
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
SEED = 0
LENGTH = 384
RATIOS = (0.5, 0.8)
METHODS = ("keydiff", "knorm", "local", "snapkv", "tova", "h2o", "expected_attention", "kvzip", "kvzip_global",
           "duo_attention")
SINKS = 4  # StreamingLLM's n_sink (kvpress's default) = kvpolicy's local start_size
WINDOW, KERNEL = 32, 5  # SnapKV's observation window and pooling kernel, set alike on both sides
WEIGHT_STD = 0.08
DUO_SINKS, DUO_RECENT = 16, 64  # DuoAttention's streaming window, scaled to the 384-token prompt


class CharTokenizer:
    """Text to ids for KVzip's repeat prompt on the tiny model: one id per character, no special token, no chat
    template (both sides use this class: kvpolicy's reads it from this file by path)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None):
        ids = [3 + ord(c) % (CONFIG["vocab_size"] - 5) for c in text]
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids


def build_model(seed: int = SEED, attn: str = "eager") -> torch.nn.Module:
    """The tiny Llama, every weight drawn from a generator seeded by ``(seed, crc32(name))`` (norms: 1 + noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(noise * WEIGHT_STD if p.dim() >= 2 else 1.0 + 0.1 * noise)
    return model.eval()


def prompt(seed: int = SEED, length: int = LENGTH) -> torch.Tensor:
    """int64 ``[1, length]`` random token ids (no pad, no special token)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(3, CONFIG["vocab_size"], (1, length), generator=g)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum over parameters (sorted by name) of ``sum(p * (i + 1))``: any difference in any weight changes it."""
    total = 0.0
    for i, (_, p) in enumerate(sorted(model.named_parameters())):
        total += float(p.detach().double().sum()) * (i + 1)
    return total


def n_kept(length: int, ratio: float) -> int:
    """kvpress's count (``compute_n_kept``): ``max(1, int(length * (1 - ratio)))``; kvpolicy's side keeps the same
    number through a ``tokens`` budget (its ``ratio`` rounds up instead)."""
    return max(1, int(length * (1 - ratio)))


def _press(method: str, ratio: float):
    import kvpress

    if method == "keydiff":
        return kvpress.KeyDiffPress(compression_ratio=ratio)
    if method == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if method == "local":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=SINKS)
    if method == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
    if method == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if method == "h2o":
        return kvpress.ObservedAttentionPress(compression_ratio=ratio)
    if method == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if method in ("kvzip", "kvzip_global"):
        return kvpress.KVzipPress(compression_ratio=ratio, layerwise=method == "kvzip")
    raise ValueError(method)


def unmasked(model: torch.nn.Module, n: int) -> list[list[list[int]]]:
    """``[layer][kv head]`` -> the prompt positions (of ``n``) a press left visible, for the presses that hide entries
    instead of removing them: they record the hidden ``(row, head, position)`` in ``module.masked_key_indices``
    (read here for row 0, then removed so that the next press starts clean)."""
    out = []
    for layer in model.model.layers:
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        heads = []
        for h in range(CONFIG["num_key_value_heads"]):
            hidden = set() if masked is None else set(masked[2][(masked[0] == 0) & (masked[1] == h)].tolist())
            heads.append([j for j in range(n) if j not in hidden])
        out.append(heads)
        if masked is not None:
            del layer.self_attn.masked_key_indices
    return out


def kvzip_kept(model: torch.nn.Module, ids: torch.Tensor, method: str, ratio: float) -> list[list[list[int]]]:
    """``[layer][kv head]`` -> sorted prompt positions KVzipPress keeps (the complement of its masked indices)."""
    from kvpress.presses import kvzip_press
    from transformers import DynamicCache

    press = _press(method, ratio)
    original = kvzip_press.AutoTokenizer.from_pretrained
    kvzip_press.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: CharTokenizer())
    try:
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    finally:
        kvzip_press.AutoTokenizer.from_pretrained = original
    return unmasked(model, ids.shape[1])


def duo_head_scores(seed: int = SEED) -> list[list[float]]:
    """Distinct random scores per layer and kv head (no ties: kvpress's unstable argsort and kvpolicy's ordered ties
    would otherwise be compared on an arbitrary choice)."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.rand(CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], generator=g,
                      dtype=torch.float64).tolist()


def duo_kept(model: torch.nn.Module, ids: torch.Tensor, ratio: float) -> tuple[list[list[list[int]]], float]:
    """``[layer][kv head]`` -> prompt positions DuoAttentionPress leaves visible, and the entry ratio it reports."""
    import numpy as np
    from transformers import DynamicCache

    import kvpress

    press = kvpress.DuoAttentionPress(head_compression_ratio=ratio)
    press.load_attention_pattern = lambda _model: (DUO_SINKS, DUO_RECENT, np.array(duo_head_scores()))
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    return unmasked(model, ids.shape[1]), float(press.compression_ratio)


def kept_indices(model: torch.nn.Module, ids: torch.Tensor, method: str, ratio: float) -> list[list[list[int]]]:
    """``[layer][kv head]`` -> sorted prompt positions kvpress keeps."""
    from transformers import DynamicCache

    press = _press(method, ratio)
    original = press.compress
    kept: dict[int, list[list[int]]] = {}

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        k2, v2 = original(module, hidden_states, keys, values, attentions, kwargs)
        heads = []
        for h in range(keys.shape[1]):
            eq = (k2[0, h, :, None, :] == keys[0, h, None, :, :]).all(-1)  # [kept, T]
            if not bool(eq.any(-1).all()):
                raise RuntimeError(f"{method}: layer {module.layer_idx} head {h}: a kept key matches no input key")
            heads.append(sorted(eq.to(torch.int8).argmax(-1).tolist()))
        kept[module.layer_idx] = heads
        return k2, v2

    press.compress = recording  # instance attribute: the press's forward hook calls self.compress
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    return [kept[i] for i in sorted(kept)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model()
    sdpa = build_model(attn="sdpa")  # the same weights: KVzipPress and DuoAttentionPress refuse eager attention
    ids = prompt()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].tolist()
    out = {
        "schema": "kvpolicy.kvpress_overlap/1",
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "kvpress")},
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "config": CONFIG,
        "seed": SEED,
        "length": LENGTH,
        "weights_checksum": weights_checksum(model),
        "last_logits": logits,
        "kept": {},
        "duo": {"sinks": DUO_SINKS, "recent": DUO_RECENT, "head_scores": duo_head_scores(), "entry_ratio": {}},
    }
    for method in args.methods.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            key = f"{method}@{ratio}"
            if method == "duo_attention":
                out["kept"][key], out["duo"]["entry_ratio"][key] = duo_kept(build_model(attn="sdpa"), ids, ratio)
            elif method.startswith("kvzip"):
                out["kept"][key] = kvzip_kept(sdpa, ids, method, ratio)
            else:
                out["kept"][key] = kept_indices(model, ids, method, ratio)
            print(f"kvpress {method} ratio {ratio}: done", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, args.output)  # atomic: a half-written file never looks like a result
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
