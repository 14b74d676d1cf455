"""Expected Attention: keep the keys that future queries are expected to attend to.

Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution" (arXiv 2510.00636; kvpress's ``ExpectedAttentionPress``).

* ``expected_attention`` (encode scorer): future queries are modelled as Gaussian, with the mean ``mu`` and
  covariance ``Sigma`` of the prompt's pre-RoPE queries (the engine's :class:`~kvpolicy.core.policy.QueryStat`,
  per kv head and query head of its group), rotated by the RoPE matrix ``R`` averaged over the next
  ``n_future_positions`` positions. Under that model the expected un-normalised attention of key ``k`` is
  ``exp(R mu . k / sqrt(d) + k^T R Sigma R^T k / (2 d))``; it is normalised over the row's candidate keys (softmax),
  averaged over the query heads of each kv head and, with ``use_vnorm``, multiplied by ``||v||`` (the paper's
  output-contribution weighting). The policy's sinks (``view.sinks``) are kept (``+inf``) and left out of the
  softmax; with ``skip_sink_queries`` their queries are also left out of the statistics (kvpress's ``n_sink``);
* preset ``expected_attention`` (prefill only, ratio 0.5, 4 sinks), as kvpress runs it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.core.policy import LayerView, QueryStat
from kvpolicy.core.querystats import QueryStats, average_rotation
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.params import POLICY_SINKS
from kvpolicy.parts import build, heads, protect

PAPER = (
    'Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries '
    'Distribution"'
)


class ExpectedAttentionParams(BaseModel):
    """Parameters of the ``expected_attention`` encode scorer."""

    model_config = ConfigDict(extra="forbid")

    n_future_positions: int = Field(
        default=512, ge=1, description="future positions whose RoPE rotations are averaged (kvpress: 512)"
    )
    use_covariance: bool = Field(
        default=True, description="add the query covariance term k^T Sigma k / 2d (false: the mean query only)"
    )
    use_vnorm: bool = Field(default=True, description="multiply the expected attention by the value's L2 norm")
    epsilon: float = Field(default=0.0, ge=0.0, description="added to the expected attention before the value norm")
    query_window: int | None = Field(
        default=None, ge=2, description="statistics over the last this many prompt queries of each row (null: all)"
    )
    n_sink: int = Field(
        default=4,
        ge=0,
        description="the policy's sinks: kept, left out of the softmax and (with skip_sink_queries) of the statistics",
        json_schema_extra={POLICY_SINKS: True},
    )
    skip_sink_queries: bool = Field(
        default=True, description="leave the sinks' queries (outliers) out of the query statistics, as kvpress does"
    )
    per_head: bool = Field(default=True, description="rank per kv head (false: one ranking from the head mean)")


def expected_attention_scores(view: LayerView, stats: QueryStats, prm: ExpectedAttentionParams) -> torch.Tensor:
    """float32 ``[B, H or 1, P]``: the expected attention of each valid slot (see the module docstring), ``+inf`` for
    the policy's sinks. The covariance term is computed one query head of the group at a time, so no
    ``[B, H, G, P, D]`` tensor is built."""
    keys = view.keys.to(torch.float32)  # post-RoPE, as cached
    d = keys.shape[-1]
    rot = average_rotation(stats.rope, stats.next_position, prm.n_future_positions)[:, None, None]  # [B,1,1,D,D]
    mean = (rot @ stats.mean[..., None])[..., 0]  # [B, H, G, D]
    logits = torch.einsum("bhgd,bhpd->bhgp", mean, keys) / d**0.5
    if prm.use_covariance and stats.covariance is not None:
        cov = rot @ stats.covariance @ rot.transpose(-1, -2)  # [B, H, G, D, D]
        for g in range(cov.shape[2]):
            quad = ((keys @ cov[:, :, g]) * keys).sum(-1)  # [B, H, P]
            logits[:, :, g] += quad / (2 * d)
    sinks = view.sink_mask()
    candidate = (view.valid & ~sinks)[:, :, None]
    probs = torch.softmax(logits.masked_fill(~candidate, float("-inf")), dim=-1).nan_to_num(0.0).mean(2)
    if prm.use_vnorm:
        probs = (probs + prm.epsilon) * view.values.to(torch.float32).norm(dim=-1)
    # pads, freed slots and sinks weigh 0 in a head mean (per_head off); the sinks are then kept as +inf
    return protect(view, heads(probs.masked_fill(~candidate[:, :, 0], 0.0), prm.per_head), sinks)


class ExpectedAttentionScorer:
    """Expected Attention at prefill (``expected_attention`` encode scorer).

    Devoto et al., 2025: the attention a key will receive from queries not seen yet is estimated in closed form from
    the distribution of recent queries (Gaussian, before RoPE, rotated to the average future position), so the
    ranking looks ahead to the decoding phase instead of back at the prompt's attention, and needs no attention
    matrix (it works with SDPA as is). The statistics come from the engine (:class:`QueryStat`, declared in
    ``needs``)."""

    def __init__(self, params: ExpectedAttentionParams | None = None, **kwargs: Any):
        self.params = build(ExpectedAttentionScorer, ExpectedAttentionParams, params, kwargs)
        p = self.params
        self.need = QueryStat(
            window=p.query_window, covariance=p.use_covariance, skip_first=p.n_sink if p.skip_sink_queries else 0
        )
        self.needs: frozenset[QueryStat] = frozenset({self.need})

    @property
    def protected_sinks(self) -> int:
        """The sinks this part keeps (its ``n_sink``), so the policy's ``sinks`` agrees with it."""
        return self.params.n_sink

    def score(self, view: LayerView) -> torch.Tensor:
        stats = view.queries.get(self.need)
        if stats is None:
            raise RuntimeError(f"expected_attention: the engine gave no query statistic {self.need} for this view")
        return expected_attention_scores(view, stats, self.params)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="expected_attention",
            kind="encode",
            params=ExpectedAttentionParams,
            factory=ExpectedAttentionScorer,
            summary="Expected Attention: attention expected from future queries (pre-RoPE query mean/covariance)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="expected_attention",
            summary="Expected Attention (kvpress defaults: 512 future positions, covariance, value norm, 4 sinks), "
            "per kv head, at prefill, half removed",
            policy={"encode": {"name": "expected_attention"}, "reducer": {"name": "evict"}, "ratio": 0.5, "sinks": 4},
        ),
    ]
