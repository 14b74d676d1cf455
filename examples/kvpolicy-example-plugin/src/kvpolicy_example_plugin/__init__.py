"""An example third-party kvpolicy plugin: one encode scorer, ``key_norm_example``.

The scorer keeps the keys with the *lowest* L2 norm (the "Knorm" observation: low-norm keys tend to receive high
attention), averaged over kv heads so that all heads of a row share one decision. It needs no attention statistics,
so it works with fast (SDPA/flash) attention.

Everything kvpolicy needs is below: a pydantic model of the parameters, the part itself (an object with ``needs``
and ``score``), and a ``@hookimpl`` that returns a :class:`~kvpolicy.hookspecs.PartSpec`. The module is declared in
``pyproject.toml`` under the ``kvpolicy.plugins`` entry-point group.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, hookimpl
from kvpolicy.policy import AttentionStat, LayerView

__all__ = ["KeyNormParams", "KeyNormScorer", "kvpolicy_parts"]


class KeyNormParams(BaseModel):
    """Parameters of ``key_norm_example`` (what ``kvpolicy plugins`` lists and a policy YAML is checked against)."""

    model_config = ConfigDict(extra="forbid")

    sinks: int = Field(default=1, ge=0, description="first prompt tokens always kept (attention sinks)")


class KeyNormScorer:
    """Score = minus the L2 norm of each key, averaged over kv heads: low-norm keys rank first."""

    needs: frozenset[AttentionStat] = frozenset()  # no attention needed

    def __init__(self, params: KeyNormParams):
        self.sinks = params.sinks

    def score(self, view: LayerView) -> torch.Tensor:
        norms = view.keys.float().norm(dim=-1)  # [B, H, P]
        scores = -norms.mean(dim=1, keepdim=True)  # [B, 1, P]: one decision shared by the row's heads
        if self.sinks:
            sink = view.rank()[:, :1] < self.sinks  # the oldest valid slots of each row
            scores = scores.masked_fill(sink, 1.0)  # every other score is <= 0: sinks always rank first
        return scores


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="key_norm_example",
            kind="encode",
            params=KeyNormParams,
            factory=KeyNormScorer,
            summary="keep the keys with the lowest L2 norm (mean over kv heads); example third-party plugin",
            provides=frozenset({"scores"}),
        )
    ]
