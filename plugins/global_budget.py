"""One budget for the whole cache: each layer keeps its share of the best-scored entries of all layers.

KVzip's default selection (Kim et al., 2025, arXiv 2505.23416; kvpress's ``KVzipPress`` with ``layerwise=False``):
instead of every layer removing the same fraction, the entries kept are the best of *all* layers and kv heads, so a
layer whose entries score low gives its budget to one whose entries score high. It needs scores that are comparable
across layers (KVzip's probabilities are).

* ``global`` (allocator): ``layer_keep`` leaves the uniform budget as it is; ``rebalance`` (called by the engine once
  every layer's scores exist: the prefill stage is deferred to the end of the prefill forward, see
  ``CachePolicy.defers_prefill``) ranks the valid entries of all compressing layers of each row together, counts the
  best ``sum_l H * keep_l`` per layer and turns the counts into per-layer budgets (entries per kv head, rounded by
  largest remainder so that the row's total is unchanged). The layer's reducer then spends ``H * keep_l`` across its
  heads (use ``adakv`` with ``alpha: 0``, which ranks across heads, to keep exactly the layer's share).

Rounding: a layer keeps a multiple of its kv-head count, so up to ``H - 1`` entries per layer move to the layer's next
best instead of another layer's (kvpress's global top-k has no such rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from kvpolicy.hookspecs import PartSpec, hookimpl
from kvpolicy.parts import consumer_spec


class GlobalBudgetParams(BaseModel):
    """The ``global`` allocator has no parameter."""

    model_config = ConfigDict(extra="forbid")


def layer_shares(counts: torch.Tensor, heads: list[int], total: torch.Tensor) -> torch.Tensor:
    """int64 ``[L, B]`` entries per kv head of each layer: ``counts [L, B]`` (the row's best entries falling in each
    layer) divided by the layer's ``heads``, rounded by largest remainder (ties to the lower layer) so that
    ``sum_l keep[l, b] == total[b]``."""
    per_head = counts.to(torch.float64) / torch.tensor(heads, dtype=torch.float64, device=counts.device)[:, None]
    keep = per_head.floor().to(torch.long)
    short = total - keep.sum(0)  # [B]
    rest = per_head - keep  # [L, B]
    order = rest.argsort(dim=0, descending=True, stable=True)  # layers by remainder, lower layer first on ties
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(order.shape[0], device=order.device)[:, None].expand_as(order))
    return keep + (rank < short[None]).to(torch.long)


class GlobalBudget:
    """``global`` allocator: see the module docstring."""

    def __init__(self, params: GlobalBudgetParams | None = None, **kwargs: Any):
        self.params = params if params is not None else GlobalBudgetParams(**kwargs)

    def layer_keep(self, layer_idx: int, num_layers: int, keep: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        return keep

    def rebalance(
        self, scores: list[torch.Tensor], valid: list[torch.Tensor], keep: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        heads = [v.shape[1] for v in valid]
        total = sum(k * h for k, h in zip(keep, heads, strict=True))  # [B] entries of the whole cache per row
        flat = torch.cat(
            [s.to(torch.float32).expand_as(v).masked_fill(~v, float("-inf")).flatten(1) for s, v in zip(scores, valid)],
            dim=1,
        )  # [B, sum_l H_l P_l], layer by layer
        layer_of = torch.cat(
            [torch.full((v[0].numel(),), i, dtype=torch.long, device=flat.device) for i, v in enumerate(valid)]
        )
        order = flat.argsort(dim=1, descending=True, stable=True)
        best = torch.arange(flat.shape[1], device=flat.device)[None] < total[:, None]  # [B, N] the row's best
        counts = torch.stack([((layer_of[order] == i) & best).sum(1) for i in range(len(valid))])  # [L, B]
        shares = layer_shares(counts, heads, sum(keep))
        return [shares[i] for i in range(len(valid))]


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        consumer_spec(
            name="global",
            kind="allocator",
            params=GlobalBudgetParams,
            factory=GlobalBudget,
            summary="one budget for the whole cache: layers keep their share of the best entries of all layers",
        ),
    ]
