"""TOVA (Token Omission Via Attention): keep the entries the current query attends to most.

Oren et al., EMNLP 2024, "Transformers are Multi-State RNNs" (arXiv 2401.06104).

* ``tova`` (encode scorer): the attention of the last prompt query (``AttentionStat(1)``), averaged over heads;
* ``tova`` (decode scorer): at every drop, the attention of the current query (the token just generated) — the
  lowest-scored entry goes;
* preset ``tova`` (ratio 0.5).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import STEP_ATTENTION, build, check_attention, heads, protect_text
from kvpolicy.core.policy import AttentionStat, LayerView

PAPER = 'Oren et al., EMNLP 2024, "Transformers are Multi-State RNNs"'


class TovaParams(BaseModel):
    """Parameters of the ``tova`` encode and decode scorers."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=False,
        description="rank per kv head; false (the paper's choice): one ranking from the attention averaged over heads",
    )
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image (and generated) ones"
    )


def _tova_scores(view: LayerView, prm: TovaParams) -> torch.Tensor:
    att = heads(check_attention(view, 1, "tova"), prm.per_head)
    return protect_text(view, att, prm.protect_text)


class TovaScorer:
    """TOVA at prefill (``tova`` encode scorer).

    Oren et al., EMNLP 2024, "Transformers are Multi-State RNNs": a cache of fixed size is kept by dropping, at
    every step, the entry with the lowest attention from the current query, averaged over heads (the paper found the
    head average better than per-head decisions). At prefill the "current query" is the last prompt token: entries
    are ranked by its attention and the best ``budget`` kept.

    Deviation: the prompt is compressed once, from the last prompt query's attention (as kvpress's TOVAPress does);
    applying the one-drop-per-query rule to every prompt query in turn could rank differently. With GQA the head mean
    is over all query heads (kv-head means of equal groups)."""

    def __init__(self, params: TovaParams | None = None, **kwargs: Any):
        self.params = build(TovaScorer, TovaParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION})

    def score(self, view: LayerView) -> torch.Tensor:
        return _tova_scores(view, self.params)


class TovaDecode:
    """TOVA while decoding (``tova`` decode scorer).

    Oren et al., EMNLP 2024, "Transformers are Multi-State RNNs": the new token attends to the cache (itself
    included), then the entry with the lowest attention from it, averaged over heads, is dropped. The step's attention
    is needed, so the drop happens after the step's attention, as in the paper."""

    #: every row is scored from its own slots and the view alone: the engine may score several layers at once
    stack_layers = True

    def __init__(self, params: TovaParams | None = None, **kwargs: Any):
        self.params = build(TovaDecode, TovaParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION})

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return _tova_scores(view, self.params)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="tova",
            kind="encode",
            params=TovaParams,
            factory=TovaScorer,
            summary="TOVA: attention of the last prompt query, averaged over heads",
        ),
        PartSpec(
            name="tova",
            kind="decode",
            params=TovaParams,
            factory=TovaDecode,
            summary="TOVA: drop the entry the current query attends to least (heads averaged)",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="tova",
            summary="TOVA: keep what the current query attends to, at prefill and while decoding, half removed",
            policy={"encode": {"name": "tova"}, "decode": {"name": "tova"}, "reducer": {"name": "evict"}, "ratio": 0.5},
        ),
    ]
