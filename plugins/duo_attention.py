"""DuoAttention: retrieval heads keep the whole context, streaming heads keep the attention sinks and a recent window.

Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"
(arXiv 2410.10819; authors' code github.com/mit-han-lab/duo-attention; kvpress's ``DuoAttentionPress``).

* ``duo_attention`` (encode scorer): the order a streaming head keeps entries in: the policy's sinks first
  (``+inf``), then the newest; no attention statistic;
* ``duo_attention`` (reducer): per-head budgets from a per-layer x per-kv-head score table (kvpolicy's calibration
  for the model, :mod:`kvpolicy.heads`, or a file such as the authors' ``full_attention_heads.tsv``): the
  lowest-scored kv heads of the whole model are streamed and keep ``sinks + recent`` entries, every other head keeps
  all of them. How many heads stream is derived from the policy's ``ratio`` (fraction of entries removed) for each
  prompt, see :func:`plan_streaming`;
* preset ``duo_attention``: ratio 0.5, 64 sinks, a 256-token window (the authors' evaluation settings), prefill only.

Memory: kept counts differ per head (``n`` or ``sinks + recent``), and the engine stores such a layer's heads in
buckets of similar length (``kvpolicy/core/buckets.py``), so a layer does not pay ``H x n`` for one retrieval head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpolicy.core.policy import AttentionStat, LayerView, Reduction
from kvpolicy.core.selection import select_top
from kvpolicy.heads.table import HeadScores, HeadScoresError, read_scores
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.params import POLICY_SINKS
from kvpolicy.parts import Tokens, build, consumer_spec, protect

PAPER = (
    'Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"'
)

#: what a streamed kv head keeps for each streamed unit ``(layer, kv head)`` of a row
Plan = dict[tuple[int, int], int]


class DuoScorerParams(BaseModel):
    """The ``duo_attention`` encode scorer has no parameters (its sinks are the policy's ``sinks``)."""

    model_config = ConfigDict(extra="forbid")


class DuoParams(BaseModel):
    """Parameters of the ``duo_attention`` reducer."""

    model_config = ConfigDict(extra="forbid")

    sinks: Tokens = Field(
        default=64,
        description="the policy's sinks: first real tokens every streaming head keeps (authors' evaluation: 64)",
        json_schema_extra={POLICY_SINKS: True},
    )
    recent: Tokens = Field(default=256, description="newest entries every streaming head keeps (authors: 256)")
    head_scores: str | None = Field(
        default=None,
        description="a per-layer x per-kv-head score file (the authors' full_attention_heads.tsv layout, higher = "
        "retrieval); null: kvpolicy's calibration of the model for this window (kvpolicy calibrate-heads)",
    )
    exact: bool = Field(
        default=False,
        description="meet the budget exactly: the last head streamed keeps the surplus as a longer window (false: "
        "whole heads only, as in the paper, removing at least the ratio)",
    )

    @field_validator("head_scores")
    @classmethod
    def readable_table(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                read_scores(value)
            except HeadScoresError as exc:
                raise ValueError(str(exc)) from None
        return value


def plan_streaming(scores: torch.Tensor, n: int, keep: int, window: int, exact: bool = False) -> Plan:
    """Which kv heads stream for a row of ``n`` real tokens whose budget is ``keep`` entries per head, and what each
    streamed head keeps.

    The units are the ``(layer, kv head)`` cells of ``scores`` (``[L, H]``) that are not NaN, ``U`` of them. Every head
    keeps ``n`` entries unless streamed; a streamed head keeps ``c = min(n, window)``. The budget allows
    ``U * keep`` entries in all, so ``U (n - keep)`` must go, ``n - c`` per streamed head: the ``m = ceil(U (n - keep)
    / (n - c))`` lowest-scored units stream (ties: the lower layer, then the lower head), capped at ``U``. Rounding up
    means whole heads remove *at least* the ratio, by less than one head's ``n - c`` entries; with ``exact`` the last
    unit streamed (the highest-scored of them) keeps the surplus ``m (n - c) - U (n - keep)`` as extra recent
    entries, so the total is exactly ``U * keep``. When even ``m = U`` cannot remove enough (``keep < c``), every unit
    streams and keeps ``c``: the ratio cannot be met. Nothing streams when ``keep >= n`` or ``c >= n``."""
    units = [(float(v), layer, head) for layer, row in enumerate(scores.tolist()) for head, v in enumerate(row)
             if not math.isnan(v)]
    c = min(n, window)
    if keep >= n or c >= n or not units:
        return {}
    deficit, per = len(units) * (n - keep), n - c
    m = min(len(units), -(-deficit // per))
    order = sorted(units)  # ascending score; ties by layer, then head
    plan = {(layer, head): c for _, layer, head in order[:m]}
    surplus = m * per - deficit
    if exact and surplus > 0:
        _, layer, head = order[m - 1]
        plan[(layer, head)] = c + surplus
    return plan


class DuoScorer:
    """The order a streaming head keeps entries in (``duo_attention`` encode scorer): the policy's sinks
    (``view.sinks``, by positional rank among the row's real tokens) score ``+inf``, the rest their positional rank,
    so the best ``sinks + recent`` entries are the sinks and the newest. Retrieval heads keep every entry, so their
    order does not matter."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: DuoScorerParams | None = None, **kwargs: Any):
        self.params = build(DuoScorer, DuoScorerParams, params, kwargs)

    def score(self, view: LayerView) -> torch.Tensor:
        return protect(view, view.rank().to(torch.float32), view.sink_mask())


class DuoReducer:
    """Per-head budgets from head scores (``duo_attention`` reducer); see the module docstring and
    :func:`plan_streaming`.

    Where the scores come from: ``head_scores`` (a file), or, when it is null, kvpolicy's calibration of the model
    the cache is built for with this window (:mod:`kvpolicy.heads`), found through the engine's ``bind_model`` hook
    (``kvpolicy.make_cache`` hands the model to the parts). Every layer computes the same plan for a row from its
    length and budget, so the layers agree on which heads stream without sharing state."""

    def __init__(self, params: DuoParams | None = None, **kwargs: Any):
        self.params = build(DuoReducer, DuoParams, params, kwargs)
        self.table: HeadScores | None = read_scores(self.params.head_scores) if self.params.head_scores else None
        self._plans: dict[tuple[int, int], Plan] = {}

    @property
    def protected_sinks(self) -> int:
        """The sinks every streaming head keeps (its ``sinks``), so the policy's ``sinks`` agrees with it."""
        return self.params.sinks

    @property
    def window(self) -> int:
        return self.params.sinks + self.params.recent

    def bind_model(self, model: Any) -> None:
        """Called by ``kvpolicy.make_cache``: read the model's calibrated scores (no file given) and check the table
        against the model's layers and kv heads."""
        from kvpolicy.heads.store import cached_scores, model_identity, policy_layers, scores_path
        from kvpolicy.heads.settings import HeadCalibration

        if self.params.head_scores is None:
            settings = HeadCalibration(sinks=self.params.sinks, recent=self.params.recent)
            path = scores_path(model_identity(model), settings)
            found = cached_scores(path)
            if found is None:
                name = getattr(model.config, "name_or_path", "") or "MODEL"
                raise HeadScoresError(
                    f"duo_attention: no head scores for this model and window (sinks {self.params.sinks}, recent "
                    f"{self.params.recent}); run `kvpolicy calibrate-heads --model {name} --sinks {self.params.sinks} "
                    f"--recent {self.params.recent}` once, or set reducer.head_scores to a score file"
                )
            self.table = found
            self._plans.clear()
        text = model.config.get_text_config(decoder=True)
        self.check_table(text.num_hidden_layers, text.num_key_value_heads, policy_layers(model.config))

    def check_table(self, num_layers: int, num_heads: int, managed: list[int] | None = None) -> HeadScores:
        """The table, checked against the model's shape (and, when known, the layers a head calibration scores,
        :func:`kvpolicy.heads.store.policy_layers`: exactly those must be scored; a sliding-window layer is not, and
        holds its window)."""
        table = self.table
        if table is None:
            raise RuntimeError(
                "duo_attention: no head scores: give reducer.head_scores, or build the cache with "
                "kvpolicy.make_cache(model, policy) so the model's calibrated scores are found"
            )
        if (table.num_layers, table.num_heads) != (num_layers, num_heads):
            raise HeadScoresError(
                f"duo_attention: {table.source} scores {table.num_layers} layers x {table.num_heads} kv heads; the "
                f"model has {num_layers} layers x {num_heads} kv heads"
            )
        if managed is not None and table.scored_layers() != managed:
            raise HeadScoresError(
                f"duo_attention: {table.source} scores layers {table.scored_layers()}, but the model's heads are "
                f"scored in layers {managed} (its full-attention layers); score exactly those (nan for the others)"
            )
        return table

    def plan(self, n: int, keep: int) -> Plan:
        key = (n, keep)
        if key not in self._plans:
            table = self.table
            assert table is not None
            self._plans[key] = plan_streaming(table.scores, n, keep, self.window, self.params.exact)
        return self._plans[key]

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        self.check_table(view.num_layers, view.num_heads)
        held = view.held()
        counts = held.clone()
        keep = keep if keep.dim() == 1 else keep.amin(-1)
        for b, (n, k) in enumerate(zip(view.n_tokens.tolist(), keep.tolist())):
            plan = self.plan(int(n), int(k))
            for h in range(view.num_heads):
                if (view.layer_idx, h) in plan:
                    counts[b, h] = min(int(held[b, h]), plan[(view.layer_idx, h)])
        return select_top(view, scores, counts)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="duo_attention",
            kind="encode",
            params=DuoScorerParams,
            factory=DuoScorer,
            summary="DuoAttention's streaming order: the policy's sinks, then the newest entries (no attention)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
        consumer_spec(
            name="duo_attention",
            kind="reducer",
            params=DuoParams,
            factory=DuoReducer,
            summary="DuoAttention: the lowest-scored kv heads (from head scores) keep sinks + a recent window, the "
            "others everything; how many is derived from the ratio per prompt",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="duo_attention",
            summary="DuoAttention: retrieval heads keep all, streaming heads 64 sinks + 256 recent; heads chosen by "
            "kvpolicy's calibration of the model, as many as half the entries need; prefill only",
            policy={
                "encode": {"name": "duo_attention"},
                "reducer": {"name": "duo_attention"},
                "ratio": 0.5,
                "sinks": 64,
            },
        ),
    ]
