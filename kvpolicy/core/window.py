"""Sliding-window layers under a policy: what such a layer may hold, and what it would hold uncompressed.

A sliding-window layer (Gemma 2/3 alternate them with global layers, Mistral and Qwen2 can slide every layer) lets the
query at column ``c`` attend to the columns ``(c - W, c]`` only: transformers' own rule (``kv_idx > q_idx - W``), in
columns of the padded sequence. An entry older than that can never be attended again. Under a policy such a layer is
an ordinary :class:`~kvpolicy.core.layer.PolicyLayer` with two rules applied in this order:

1. **window**: entries that left the window are freed whatever the policy's scores say (sinks included): at
   ``update()`` those the step's first query cannot see, and at the end of a multi-token step (a prefill) those its
   last query could not see. Between steps a sliding layer therefore holds at most the last ``W`` columns;
2. **budget**: the policy compresses what is inside the window. "Uncompressed" for a sliding layer means the real
   tokens among the last ``W`` columns — ``min(W, n)`` for a left-padded row of ``n`` real tokens — and the layer keeps
   ``(1 - ratio)`` of that: ``ceil`` of it after prefill, the decode rule (``fraction``/``fixed``) while generating,
   with that count in place of the tokens seen. A token budget caps the window the same way.

:class:`SlidingWindow` keeps the little bookkeeping rule 2 needs beyond the tokens seen: which columns of the window
were padding (a question chunk appended after the context may be padded in the middle of the sequence) and which
real tokens were appended uncompressed (:meth:`~kvpolicy.core.cache.PolicyCache.appending`: they count as held in full
while they are in the window, as they do for a global layer). Only forwards with padding or appended tokens are
recorded, and only while they overlap the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SlidingWindow"]


@dataclass
class _Span:
    """The columns ``[col0, col0 + q)`` of one forward that had padding or was an appended chunk."""

    col0: int
    pad: torch.Tensor  #: bool [B, q]: the column is padding
    appended: torch.Tensor | None  #: bool [B, q]: a real token of an appended chunk (None: not a chunk)

    @property
    def end(self) -> int:
        return self.col0 + self.pad.shape[-1]


class SlidingWindow:
    """One sliding layer's window of ``size`` columns and the bookkeeping of its padding and appended tokens."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {size!r}")
        self.size = size
        self._spans: list[_Span] = []

    def start(self, seen: int) -> int:
        """First column of the window of the last of ``seen`` columns (the query at ``seen - 1``)."""
        return max(0, seen - self.size)

    def record(self, col0: int, new_valid: torch.Tensor, appended: bool) -> None:
        """Note this forward's columns ``col0 ...``: some are padding (``new_valid`` bool ``[B, q]`` False) or they
        were appended uncompressed. The layer calls it only then: an all-real forward of the ordinary kind is what an
        unrecorded column means."""
        self._spans.append(_Span(col0, ~new_valid, new_valid.clone() if appended else None))

    def counts(self, seen: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real, appended)``, int64 ``[B]`` each: real tokens among the window's columns ``[seen - W, seen)`` (what
        the layer would hold uncompressed) and how many of them were appended uncompressed. Columns not recorded yet
        (this step's, before its padding is known) count as real."""
        start = self.start(seen)
        self._spans = [s for s in self._spans if s.end > start]
        real = torch.full((batch,), seen - start, dtype=torch.long, device=device)
        appended = torch.zeros(batch, dtype=torch.long, device=device)
        for span in self._spans:
            lo = max(0, start - span.col0)
            real -= span.pad[:, lo:].sum(-1).to(device)
            if span.appended is not None:
                appended += span.appended[:, lo:].sum(-1).to(device)
        return real, appended

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search, batch selection), as the layer's storage does."""
        for span in self._spans:
            span.pad = span.pad[index.to(span.pad.device)]
            if span.appended is not None:
                span.appended = span.appended[index.to(span.appended.device)]

    def clear(self) -> None:
        self._spans = []
