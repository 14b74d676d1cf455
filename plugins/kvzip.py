"""KVzip: keep the entries the model reads when it is asked to repeat the context (query-agnostic).

Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (arXiv 2505.23416;
authors' code github.com/snu-mllab/KVzip; kvpress's ``KVzipPress``).

* ``kvzip`` (encode scorer): after the prompt's prefill the engine runs a *probe* (:class:`ProbeStat`): the repeat
  prompt ("Repeat the previous context exactly.", the chat template's turn change) followed by the context itself,
  in chunks of ``chunk_size`` context tokens (later chunks ask to repeat "starting with" the previous chunk's last
  ``overlap`` tokens). An entry's score is the largest attention it receives from the reconstruction queries, max over
  the query heads of its kv group, each query's softmax running over the sinks, the chunk being reconstructed and the
  probe itself (the authors' and kvpress's reduction). The policy's sinks are kept (``+inf``). Option ``window``
  (not in the paper): add the mean attention each entry receives from the prompt's last ``window`` queries, times
  ``window_weight`` — SnapKV's observation window, which holds the question when it is part of the prompt.
* presets ``kvzip`` (one ranking across the kv heads of each layer, each layer removing ``ratio``: kvpress's
  ``layerwise=True``) and ``kvzip_global`` (across layers too, with the ``global`` allocator of
  ``plugins/global_budget.py``: kvpress's default), both ratio 0.5, 4 sinks.

Scores are per kv head and comparable across heads and layers (probabilities), which is what the selection across
heads (the ``adakv`` reducer with ``alpha: 0``: no per-head floor, as KVzip) and layers needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.core.policy import AttentionStat, LayerView, ProbeChunk, ProbeStat
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.params import POLICY_SINKS
from kvpolicy.parts import build, protect

PAPER = 'Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"'

#: the authors' repeat prompts (kvpress 0.5.5's wording: no space after "starting with")
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


class KVzipParams(BaseModel):
    """Parameters of the ``kvzip`` encode scorer."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(
        default=2048, ge=1, le=1 << 20, description="context tokens reconstructed per probe forward (kvpress: 2048)"
    )
    overlap: int = Field(
        default=8, ge=0, le=1 << 10, description="previous chunk's last tokens quoted by a later chunk's prompt"
    )
    n_sink: int = Field(
        default=4,
        ge=0,
        le=1 << 20,
        description="the policy's sinks: kept, and inside every chunk's softmax (kvpress: 4)",
        json_schema_extra={POLICY_SINKS: True},
    )
    chat_template: bool = Field(
        default=True,
        description="end the repeat prompt with the chat template's turn change (the tokenizer's; else a newline)",
    )
    window: int = Field(
        default=0,
        ge=0,
        le=1 << 16,
        description="also score each entry by the mean attention it receives from the prompt's last `window` queries "
        "(SnapKV's observation window: the question when it is in the prompt), added with `window_weight`. 0: KVzip "
        "as published (ablation, not in the paper)",
    )
    window_weight: float = Field(
        default=1.0, ge=0.0, le=1e6, description="weight of the window term (a probability, like the probe's score)"
    )
    first_prompt: str = Field(default=FIRST_PROMPT, min_length=1, description="repeat prompt of the first chunk")
    next_prompt: str = Field(default=NEXT_PROMPT, min_length=1, description="repeat prompt of the later chunks")


def encode(tokenizer: Any, text: str) -> list[int]:
    """``text`` as token ids, no special tokens (the repeat prompt continues the prompt)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


def turn_suffix(tokenizer: Any, chat_template: bool) -> str:
    """What follows the repeat prompt: the chat template's end of the user turn and start of the answer (kvpress
    renders a dummy message and cuts it after the user's text), or a newline without a template."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not chat_template or not getattr(tok, "chat_template", None):
        return "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tok.apply_chat_template(
        [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False
    )
    return text.split(separator)[1]


@dataclass(frozen=True)
class KVzipProbe:
    """KVzip's context reconstruction as a :class:`~kvpolicy.core.policy.Probe`: chunk ``i`` of the context is fed
    after its repeat prompt and the turn change, and targets exactly its own entries."""

    chunk_size: int
    overlap: int
    chat_template: bool
    first_prompt: str
    next_prompt: str
    needs_tokenizer = True

    def chunks(self, context: list[int], tokenizer: Any) -> list[ProbeChunk]:
        if tokenizer is None:
            raise ValueError(
                "kvzip: the probe encodes its repeat prompt with the model's tokenizer: pass "
                "kvpolicy.make_cache(model, policy, tokenizer=tokenizer)"
            )
        suffix = encode(tokenizer, turn_suffix(tokenizer, self.chat_template))
        first, later = encode(tokenizer, self.first_prompt), encode(tokenizer, self.next_prompt)
        out = []
        for start in range(0, len(context), self.chunk_size):
            end = min(len(context), start + self.chunk_size)
            quote = context[max(0, start - self.overlap) : start] if start and self.overlap else []
            prompt = first if start == 0 else later + quote
            out.append(ProbeChunk(tuple(prompt + suffix + context[start:end]), start, end))
        return out


class KVzipScorer:
    """KVzip (``kvzip`` encode scorer): see the module docstring. The engine runs the probe (declared in ``needs``)
    and hands its statistic to :meth:`score` as ``view.probe``; the ranking itself is that statistic, sinks first."""

    def __init__(self, params: KVzipParams | None = None, **kwargs: Any):
        self.params = build(KVzipScorer, KVzipParams, params, kwargs)
        p = self.params
        probe = KVzipProbe(p.chunk_size, p.overlap, p.chat_template, p.first_prompt, p.next_prompt)
        self.need = ProbeStat(probe=probe, sinks=p.n_sink)
        self.window_need = AttentionStat(window=p.window) if p.window else None
        self.needs: frozenset[ProbeStat | AttentionStat] = frozenset(
            {self.need} if self.window_need is None else {self.need, self.window_need}
        )

    @property
    def protected_sinks(self) -> int:
        """The sinks this part keeps (its ``n_sink``), so the policy's ``sinks`` agrees with it."""
        return self.params.n_sink

    def score(self, view: LayerView) -> torch.Tensor:
        stat = view.probe.get(self.need)
        if stat is None:
            raise RuntimeError(f"kvzip: the engine gave no probe statistic for layer {view.layer_idx}")
        if self.window_need is not None:
            # attention summed over the window's real queries (group heads averaged) -> the mean probability, so
            # that it adds to the probe's max probability on one scale
            queries = view.n_tokens.clamp(max=self.params.window).clamp(min=1).to(torch.float32)
            window = view.attention[self.window_need.window] / queries[:, None, None]
            stat = stat + self.params.window_weight * window
        return protect(view, stat.masked_fill(~view.valid, 0.0), view.sink_mask())


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="kvzip",
            kind="encode",
            params=KVzipParams,
            factory=KVzipScorer,
            summary="KVzip: max attention each entry receives while the model repeats the context (a probe pass)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
    ]


#: the presets' common document: KVzip's scores ranked across the kv heads of a layer (no per-head floor)
PRESET = {"encode": {"name": "kvzip"}, "reducer": {"name": "adakv", "alpha": 0.0}, "ratio": 0.5, "sinks": 4}


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="kvzip",
            summary="KVzip (context reconstruction, kvpress defaults: chunks of 2048, 4 sinks), one ranking across "
            "the kv heads of each layer, half removed",
            policy=dict(PRESET),
        ),
        PresetSpec(
            name="kvzip_global",
            summary="KVzip with one budget for the whole cache (kvpress's default): the best entries of all layers "
            "and kv heads, half removed",
            policy={**PRESET, "allocator": {"name": "global"}},
        ),
    ]
