"""StreamingLLM / local window: keep the attention sinks and the most recent entries.

Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453).

* ``local`` (encode scorer): ``+inf`` for the first ``start_size`` real tokens of each row (sinks), otherwise the
  positional rank, so the reducer keeps the sinks and the newest ``budget - start_size`` entries;
* ``local`` (decode scorer): the same rule over the cache at every drop, so the window slides: the oldest entry after
  the sinks goes first;
* preset ``local`` (ratio 0.5).

The Elastic Cache authors' ``LocalCache`` baseline is this rule with ``start_size=1`` (their scripts' value):
``k[:start] + k[forget + start:]``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import INF, PROMPT_ATTENTION, STEP_ATTENTION, AttentionAccumulator, Tokens, build
from kvpolicy.core.policy import AttentionStat, LayerView

PAPER = 'Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks"'


class LocalParams(BaseModel):
    """Parameters of the ``local`` encode scorer."""

    model_config = ConfigDict(extra="forbid")

    start_size: Tokens = Field(default=4, description="attention sinks: the first real tokens of each row, always kept")


class LocalDecodeParams(LocalParams):
    """Parameters of the ``local`` decode scorer."""

    track_attention: bool = Field(
        default=False,
        description="also keep the cumulative attention each entry receives (slot state 'attention_sum'), for a "
        "reducer that reads it (cam); costs attention statistics at every step and moves drops after attention",
    )


def _local_scores(view: LayerView, start_size: int) -> torch.Tensor:
    """Positional rank (newer = higher), ``+inf`` for the sinks: ``[B, H, P]`` (``protect`` and ``sinks`` written out:
    the float rank is already a fresh full-shape tensor, and this runs at every decode drop)."""
    rank = view.rank()
    return rank.to(torch.float32).masked_fill_(view.valid & (rank < start_size), INF)


class LocalScorer:
    """StreamingLLM at prefill (``local`` encode scorer).

    Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks": keep the first ``start_size``
    tokens (attention sinks, default 4 as in the paper) and a window of the most recent tokens. Here the window is
    whatever the budget leaves after the sinks. Sinks are counted per row among real tokens (left padding excluded).

    Deviation: the paper re-assigns positions inside the cache (rolling RoPE positions); kvpolicy keeps every token's
    logical position (keys are cached after RoPE), as the Elastic Cache authors' ``LocalCache`` baseline does."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: LocalParams | None = None, **kwargs: Any):
        self.params = build(LocalScorer, LocalParams, params, kwargs)

    def score(self, view: LayerView) -> torch.Tensor:
        return _local_scores(view, self.params.start_size)


class LocalDecode(AttentionAccumulator):
    """StreamingLLM while decoding (``local`` decode scorer): the window slides.

    Whenever the budget rule asks for a drop, the oldest entry after the ``start_size`` sinks goes. No attention is
    needed, so the drop happens inside the cache update and the step already attends to the reduced cache.

    ``track_attention=True`` additionally keeps the cumulative attention received by every entry (as H2O does) in
    ``view.slot_state['attention_sum']`` for a reducer that needs it (``cam``'s merge probabilities, as in the CaM
    authors' StreamingLLM-based code); the step's attention must then be computed first, so drops move after the
    step's attention (the step attends to ``budget + 1`` entries, the drop applies from the next step)."""

    #: every row is scored from its own slots and the view alone: the engine may score several layers at once
    stack_layers = True

    def __init__(self, params: LocalDecodeParams | None = None, **kwargs: Any):
        self.params = build(LocalDecode, LocalDecodeParams, params, kwargs)
        tracking = self.params.track_attention
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION}) if tracking else frozenset()
        self.prefill_needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION}) if tracking else frozenset()
        self.accumulate_per_head = True

    def init_state(self, view: LayerView) -> dict[str, torch.Tensor]:
        return super().init_state(view) if self.params.track_attention else {}

    def observe(self, view: LayerView) -> None:
        if self.params.track_attention:
            super().observe(view)

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return _local_scores(view, self.params.start_size)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="local",
            kind="encode",
            params=LocalParams,
            factory=LocalScorer,
            summary="StreamingLLM: keep the first start_size tokens (sinks) and the most recent ones",
        ),
        PartSpec(
            name="local",
            kind="decode",
            params=LocalDecodeParams,
            factory=LocalDecode,
            summary="StreamingLLM: drop the oldest entry after the sinks (sliding window)",
            provides=frozenset({"scores", "cumulative_attention"}),  # cumulative_attention with track_attention=true
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="local",
            summary="StreamingLLM: 4 sink tokens + sliding window of the most recent tokens, half the cache removed",
            policy={
                "encode": {"name": "local"},
                "decode": {"name": "local"},
                "reducer": {"name": "evict"},
                "ratio": 0.5,
            },
        ),
    ]
