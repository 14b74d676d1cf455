"""Built-in model shapes of ``kvpolicy bench`` (random weights, no download).

Standard library only: the command's help text names them without importing torch, and
``benchmarks/kvpress_bench.py`` (run in kvpress's venv, without kvpolicy) reads this file by path."""

from __future__ import annotations

from typing import Any

#: named model shapes with random weights (no download): ``hidden/heads/kv_heads/layers/intermediate/vocab``
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    # the quick path and the tests: 2 layers, GQA 4 q / 2 kv heads
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    },
    # a small GQA Llama (4 layers, 256 wide, 8 q / 2 kv heads, head_dim 32): the kvpress kept-entries comparison
    "llama-small": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    # the default: a 125M-parameter Llama, 12 layers, 768 wide, GQA 12 q / 4 kv heads (head_dim 64)
    "llama-125m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    # a Llama-3.2-1B-like shape (16 layers, 2048 wide, 32 q / 8 kv heads), for GPUs
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
DEFAULT_CONFIG = "llama-125m"
QUICK_CONFIG = "llama-tiny"
