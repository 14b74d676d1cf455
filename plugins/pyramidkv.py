"""PyramidKV: SnapKV scores with per-layer budgets that shrink linearly with depth.

Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv 2406.02069; authors' code github.com/Zefan-Cai/KVCache-Factory, ``pyramidkv_utils.py: PyramidKVCluster``).

* ``pyramidkv`` (allocator): layer ``l`` of ``L`` keeps ``window + max - l * (max - min) / (L - 1)`` entries, with
  ``min = (keep - window) / beta`` and ``max = 2 (keep - window) - min`` (so the mean over layers is exactly the
  uniform budget), ``max`` capped at the prompt length (``min`` raised to match), rounded so that the layers of each
  row sum to exactly ``L * keep``;
* preset ``pyramidkv``: ``snapkv`` scores + this allocator (prefill only, ratio 0.5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, consumer_spec

PAPER = 'Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"'


class PyramidKVParams(BaseModel):
    """Parameters of the ``pyramidkv`` allocator."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        default=20.0,
        ge=1.0,
        le=1e6,
        description="steepness: the top layer gets (budget - window) / beta above the "
        "window (authors' default 20; 1 = uniform budgets)",
    )
    window: int = Field(
        default=32,
        ge=1,
        le=1 << 16,
        description="entries every layer keeps beyond the pyramid: set it to the "
        "SnapKV observation window (default 32, like snapkv's)",
    )


def pyramid_budgets(keep: int, n_tokens: int, num_layers: int, beta: float, window: int) -> list[int]:
    """Budgets of every layer for one row: integers in ``[min(window, keep), n_tokens]``, non-increasing with depth,
    summing to exactly ``num_layers * keep``."""
    L, k = num_layers, int(keep)
    if L <= 1 or k <= 0:
        return [k] * max(L, 1)
    n = max(int(n_tokens), k)
    w = min(window, k)
    a = float(k - w)  # the part distributed as a pyramid (mean over layers)
    lo = a / beta
    hi = 2.0 * a - lo
    if hi > n - w:  # the bottom layer cannot keep more than the prompt
        hi = float(n - w)
        lo = 2.0 * a - hi
    step = (hi - lo) / (L - 1)
    real = [w + hi - layer * step for layer in range(L)]
    base = [math.floor(x) for x in real]
    rest = L * k - sum(base)
    # largest remainder; ties to the lower (earlier) layer so that budgets stay non-increasing with depth
    by_frac = sorted(range(L), key=lambda i: (-(real[i] - base[i]), i))
    for i in by_frac[:rest]:
        base[i] += 1
    return base


class PyramidKVAllocator:
    """PyramidKV budgets (``pyramidkv`` allocator).

    Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling": attention
    is spread widely in the lower layers and concentrates on a few tokens in the upper ones, so lower layers get
    larger caches and upper layers smaller, in an arithmetic progression whose mean is the uniform budget; entries are
    chosen by SnapKV's rule (use with the ``snapkv`` encode scorer).

    With ``a = keep - window``: ``min = a / beta``, ``max = 2a - min``; if ``max`` exceeds the prompt
    (``n - window``) it is capped there and ``min = 2a - max``; layer ``l`` keeps ``window + max - l (max - min) /
    (L - 1)``. Budgets are computed per row (each row's own ``keep`` and length) and rounded by largest remainder so
    that each row's layers sum to exactly ``L * keep`` — the same total memory as uniform SnapKV.

    Deviations from the authors' code: they use integer arithmetic (``min = a // beta``, ``steps = (max - min) //
    (L - 1)``), so their layers sum to slightly less or more than the uniform total; and for prompts shorter than
    ``2 * (budget - window)`` they fall back to uniform budgets, where kvpolicy keeps the (capped) pyramid."""

    def __init__(self, params: PyramidKVParams | None = None, **kwargs: Any):
        self.params = build(PyramidKVAllocator, PyramidKVParams, params, kwargs)

    def layer_keep(self, layer_idx: int, num_layers: int, keep: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        prm = self.params
        out = [
            pyramid_budgets(int(k), int(n), num_layers, prm.beta, prm.window)[layer_idx]
            for k, n in zip(keep.tolist(), n_tokens.tolist())
        ]
        return torch.tensor(out, dtype=torch.long, device=keep.device)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        consumer_spec(
            name="pyramidkv",
            kind="allocator",
            params=PyramidKVParams,
            factory=PyramidKVAllocator,
            summary="PyramidKV: per-layer budgets decreasing linearly with depth, same total as uniform",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="pyramidkv",
            summary="PyramidKV: SnapKV scores, pyramidal per-layer budgets (beta 20), prefill only, half removed",
            policy={
                "encode": {"name": "snapkv"},
                "allocator": {"name": "pyramidkv"},
                "reducer": {"name": "evict"},
                "ratio": 0.5,
            },
        ),
    ]
