"""The quick-start job: one policy on a locally built model, cache bytes before and after.

It needs no weights, account or network: the model is a Llama-architecture config with GQA built with random
weights, so the figures are about memory and time, not quality (quality needs a real model: ``kvpolicy run``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .core.engine import attach, make_cache
from .core.policy import CachePolicy


@dataclass
class DemoResult:
    policy: str
    prompt_tokens: int
    new_tokens: int
    full_bytes_prefill: int
    full_bytes_end: int
    policy_bytes_prefill: int
    policy_bytes_end: int
    held_per_layer_prefill: list[int]
    held_per_layer_end: list[int]
    full_seconds: float
    policy_seconds: float


def demo_model(layers: int = 4, hidden: int = 256, heads: int = 8, kv_heads: int = 2, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


def _kv_bytes(cache: Any) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_demo(policy: CachePolicy, prompt_tokens: int = 512, new_tokens: int = 32, seed: int = 0) -> DemoResult:
    model = demo_model(seed=seed)
    ids = torch.randint(3, 1024, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    attach(model)

    def generate(cache: Any) -> tuple[int, int, list[int], float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            prefill_bytes = _kv_bytes(cache)
            prefill_held = [int(layer.held().max()) for layer in getattr(cache, "policy_layers", [])]
            out = model.generate(
                input_ids=torch.cat([ids, ids[:, -1:]], dim=1),
                past_key_values=cache,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        del out
        return prefill_bytes, _kv_bytes(cache), prefill_held, time.perf_counter() - t0

    full_prefill, full_end, _, full_s = generate(DynamicCache(config=model.config))
    cache = make_cache(model, policy)
    pol_prefill, pol_end, held_prefill, pol_s = generate(cache)
    return DemoResult(
        policy=policy.name,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        full_bytes_prefill=full_prefill,
        full_bytes_end=full_end,
        policy_bytes_prefill=pol_prefill,
        policy_bytes_end=pol_end,
        held_per_layer_prefill=held_prefill,
        held_per_layer_end=[int(layer.held().max()) for layer in cache.policy_layers],
        full_seconds=full_s,
        policy_seconds=pol_s,
    )
