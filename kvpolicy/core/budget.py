"""How much of the cache survives: the budget rule and the optional allocator part.

A :class:`Budget` is data (validated from a policy document) with the two rules the engine applies: the entries a row
keeps after prefill and the entries it drops at each decode step. A :class:`BudgetAllocator` part may re-distribute
the prefill budget across layers. Separate from :mod:`kvpolicy.core.policy` (the part contract) because a budget is
the user's choice, not a part's: it has no tensors of its own and no plugin implements it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Budget", "BudgetAllocator"]

@runtime_checkable
class BudgetAllocator(Protocol):
    """Optional part: re-distributes the per-row budget across layers (e.g. PyramidKV).

    ``layer_keep`` is the per-layer rule, called for each layer right after its own prefill attention.

    Optional hook, looked up with ``getattr``: ``model_keep(model: ModelView) -> Tensor | None``, a whole-model
    allocation that sees every layer's prefill (views and statistics, :class:`~kvpolicy.core.policy.ModelView`) before
    any layer is compressed, and returns int64 ``[L, B]`` entries kept per policy layer (in ``model.layers`` order)
    and row, or ``None`` to keep the per-layer rule. Only a replayed prefill can call it (the direct path has compressed
    layer ``l`` before layer ``l + 1`` runs); there ``layer_keep`` applies and the result says which rule ran.

    Optional hook ``rebalance(scores, valid, keep) -> keep``: one budget for the whole cache, divided from the
    scores. ``scores``/``valid`` are each compressing layer's encode scores and slot validity (``[B, H or 1, P]``,
    ``[B, H, P]``), ``keep`` their budgets after ``layer_keep`` (int64 ``[B]`` entries per head); it returns the new
    ``keep`` per layer, whose sum over layers per row must stay the same. An allocator with this hook makes the engine
    compress at the end of the prefill forward, when every layer's scores exist (``CachePolicy.defers_prefill``), on
    the direct path and the replay alike."""

    def layer_keep(self, layer_idx: int, num_layers: int, keep: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        ...


class Budget(BaseModel):
    """How much of the cache survives.

    Exactly one of ``ratio`` (fraction *removed*, as in the Elastic Cache paper) or ``tokens`` (entries kept) is set.
    ``decode`` says what happens while generating: ``"fraction"`` keeps the cache at ``(1 - ratio)`` of all tokens
    seen (the paper's rule: drop one whenever ``int(held - n * (1 - ratio)) >= 1``), ``"fixed"`` keeps it at the
    prefill budget (drop one per new token once full), ``"off"`` lets it grow.
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="fraction of the cache removed, in [0, 1)")
    tokens: int | None = Field(default=None, ge=1, description="entries kept per layer and kv head")
    decode: Literal["fraction", "fixed", "off"] | None = Field(
        default=None, description="decode-stage rule; default: fraction for a ratio, fixed for a token budget"
    )

    @model_validator(mode="after")
    def _one_of(self) -> Budget:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("set exactly one of 'ratio' (fraction removed, 0 <= ratio < 1) or 'tokens' (>= 1)")
        if self.decode is None:
            self.decode = "fraction" if self.ratio is not None else "fixed"
        if self.decode == "fraction" and self.ratio is None:
            raise ValueError("decode: 'fraction' needs a 'ratio'")
        return self

    def prefill_keep(self, n_tokens: torch.Tensor) -> torch.Tensor:
        """Entries to keep per row after prefill: ``ceil(n * (1 - ratio))`` or ``min(n, tokens)``."""
        if self.ratio is not None:
            keep = [math.ceil(int(n) * (1.0 - self.ratio)) for n in n_tokens.tolist()]
            return torch.tensor(keep, dtype=torch.long, device=n_tokens.device).clamp(min=1)
        return n_tokens.clamp(max=self.tokens)

    def decode_excess(
        self,
        held: torch.Tensor,
        n_tokens: torch.Tensor,
        prefill_keep: torch.Tensor,
        appended: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Entries to drop now, per row and head, given ``held`` entries (new token included) and ``n`` tokens seen.

        ``appended`` (int ``[B]``): tokens stored uncompressed after the prefill (a question appended to a compressed
        context). They count as held in full, so the rule applies to the tokens generated after them as if they were
        part of the prefill budget: ``fraction`` keeps ``(1 - ratio)`` of the other tokens plus all appended ones,
        ``fixed`` holds the cache at its size after the chunk. Without this, the first generated token would evict
        about ``ratio x`` the chunk's length."""
        extra = torch.zeros_like(n_tokens) if appended is None else appended.to(n_tokens.device)
        if self.decode == "off":
            return torch.zeros_like(held)
        if self.decode == "fixed":
            cap = prefill_keep if self.tokens is None else torch.full_like(prefill_keep, self.tokens)
            cap = cap[:, None] if cap.dim() == 1 else cap
            return (held - cap - extra[:, None]).clamp(min=0)
        # float64 reproduces Python's int(P - n * (1 - ratio)) exactly
        target = (n_tokens - extra).to(torch.float64)[:, None] * (1.0 - float(self.ratio)) + extra[:, None]
        return torch.trunc(held.to(torch.float64) - target).clamp(min=0).to(torch.long)

    def decode_excess_rows(
        self, held: int, n_tokens: Sequence[int], prefill_keep: Sequence[int], appended: Sequence[int]
    ) -> list[int]:
        """:meth:`decode_excess` of a layer where every row and head holds ``held`` entries (new token included), in
        Python numbers: one value per row, the same for every head. The same arithmetic (``fraction`` in float64, as
        Python computes it), so the two agree exactly; a decode step with a full layout decides with it without a
        tensor operation, which is most of what a step costs when nothing is dropped."""
        if self.decode == "off":
            return [0] * len(n_tokens)
        if self.decode == "fixed":
            caps = prefill_keep if self.tokens is None else [self.tokens] * len(n_tokens)
            return [max(0, held - cap - extra) for cap, extra in zip(caps, appended)]
        share = 1.0 - float(self.ratio)  # type: ignore[arg-type]
        return [max(0, math.trunc(float(held) - (float(n - e) * share + float(e)))) for n, e in zip(n_tokens, appended)]
