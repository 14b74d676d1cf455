"""Random eviction: the floor every scoring rule must beat.

* ``random`` (encode scorer): uniform random scores, so a uniformly random subset of ``budget`` entries is kept;
* ``random`` (decode scorer): a uniformly random entry is dropped whenever the budget rule asks for one;
* preset ``random`` (ratio 0.5).

Reproducible: every call draws from a generator seeded with ``(seed, layer, columns seen)``, so a run is the same
whatever else ran before it in the process, layers and steps draw independent numbers, and the same seed gives the
same cache. (The module is ``random_policy`` so that it does not shadow the standard library's ``random``.)
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, protect_text
from kvpolicy.core.policy import AttentionStat, LayerView

_MASK = (1 << 63) - 1


class RandomParams(BaseModel):
    """Parameters of the ``random`` encode and decode scorers."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, le=(1 << 62), description="seed of the draws (same seed: same cache)")
    per_head: bool = Field(default=False, description="draw per kv head; false: one draw per entry shared by heads")
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image (and generated) ones"
    )


def random_scores(view: LayerView, prm: RandomParams, stage_salt: int) -> torch.Tensor:
    """Uniform [0, 1) scores ``[B, H or 1, P]`` from a generator seeded by (seed, stage, layer, columns seen)."""
    key = (prm.seed * 1_000_003 + stage_salt) * 1_000_033 + view.layer_idx
    key = (key * 1_000_037 + view.seen) & _MASK
    g = torch.Generator(device="cpu").manual_seed(key)
    h = view.num_heads if prm.per_head else 1
    u = torch.rand(view.batch_size, h, view.num_slots, generator=g, dtype=torch.float32)
    return protect_text(view, u.to(view.keys.device), prm.protect_text)


class RandomScorer:
    """Random selection at prefill (``random`` encode scorer): every valid entry equally likely to be kept; a control
    baseline with no paper of its own (cold-compress and kvpress ship the same)."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: RandomParams | None = None, **kwargs: Any):
        self.params = build(RandomScorer, RandomParams, params, kwargs)

    def score(self, view: LayerView) -> torch.Tensor:
        return random_scores(view, self.params, stage_salt=1)


class RandomDecode:
    """Random eviction while decoding (``random`` decode scorer): a uniformly random valid entry is dropped (the
    drop happens inside the cache update, before the new token is written, so the new token is never the victim)."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: RandomParams | None = None, **kwargs: Any):
        self.params = build(RandomDecode, RandomParams, params, kwargs)

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return random_scores(view, self.params, stage_salt=2)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="random",
            kind="encode",
            params=RandomParams,
            factory=RandomScorer,
            summary="random: keep a uniformly random subset (seeded)",
        ),
        PartSpec(
            name="random",
            kind="decode",
            params=RandomParams,
            factory=RandomDecode,
            summary="random: drop a uniformly random entry (seeded)",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="random",
            summary="random eviction at prefill and while decoding (seed 0), half removed",
            policy={
                "encode": {"name": "random"},
                "decode": {"name": "random"},
                "reducer": {"name": "evict"},
                "ratio": 0.5,
            },
        ),
    ]
