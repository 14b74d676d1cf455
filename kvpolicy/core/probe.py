"""The probe pass: feed a constructed input through the model after the prefill, score the prompt by its attention.

Some policies rank the prompt's entries by how a *constructed* input attends to them: KVzip asks the model to repeat
the context and keeps the entries the reconstruction reads. A part declares :class:`~kvpolicy.core.policy.ProbeStat`
(its :class:`~kvpolicy.core.policy.Probe` builds the token ids from each row's context); then

1. the prefill runs as usual, but no policy layer compresses right after its attention: each keeps the whole prompt
   (a sliding-window layer too: its window rule is part of the stage that waits) and the statistics it computed;
2. once the prefill forward has returned, the hook :func:`~kvpolicy.core.engine.attach` installs calls
   :func:`run_probe` if some layer will drop entries: for each chunk (all rows at once, left-padded; a row with fewer
   chunks repeats its last one, which the running maximum makes harmless) the model's decoder runs on the chunk with
   the cache. Every policy layer returns the prompt's keys plus the chunk's without storing the chunk, records the
   statistic (:func:`probe_statistic`, a running maximum per entry, :class:`LayerProbe`) and forgets the chunk after
   its attention. A sliding layer's mask (transformers' own) lets each probe token see the window before it, as for
   any token appended to the prompt; its statistic is KVzip's, like every layer's, and only the entries inside the
   window after the prompt's last token are kept or dropped by it;
3. then every waiting layer compresses with the statistic in ``view.probe``
   (:meth:`~kvpolicy.core.cache.PolicyCache.compress_deferred`; a sliding layer applies its window rule first).

Memory: one chunk's keys and values per layer at a time (the concatenation returned to the attention), the
statistic's probabilities in blocks of query rows (:func:`~kvpolicy.core.kernels.probe_max_received`), and one
float32 ``[B, H, P]`` score per layer. The statistic is a function of the uncompressed prompt's cache, the model and
the probe only: :func:`run_probe` computes it on any cache holding the whole prompt, and
:meth:`~kvpolicy.core.cache.PolicyCache.compress_deferred` accepts scores computed earlier (one probe per sample
can serve every ratio of a grid).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import probe_max_received
from .policy import ProbeChunk, ProbeStat

__all__ = [
    "LayerProbe", "ProbeError", "ProbeScope", "ProbeScores", "load_tokenizer", "next_positions", "probe_statistic",
    "run_probe",
]

#: layer index -> the declared probe statistics of that layer (float32 ``[B, H, P]``)
ProbeScores = dict[int, dict[ProbeStat, torch.Tensor]]


class ProbeError(ValueError):
    """A probe cannot run (no tokenizer, no token ids, a malformed chunk); the message names the cause and the fix."""


@dataclass
class ProbeScope:
    """What the policy layers score during one probe forward (one chunk per row)."""

    need: ProbeStat
    index: torch.Tensor  #: int64 [B, K]: slots of the context entries the chunk's softmax covers
    ok: torch.Tensor  #: bool [B, K]: a real selected entry (rows selecting fewer are padded)
    record: torch.Tensor  #: bool [B, K]: the entries this chunk scores (the targeted ones, not the sinks)
    probe_valid: torch.Tensor  #: bool [B, q]: the chunk's real tokens (left padding False)


def probe_statistic(scope: ProbeScope, query: torch.Tensor, key: torch.Tensor, context: int, scaling: float):
    """float32 ``[B, H, K]``: one layer's statistic for one chunk (0 where the chunk does not score). ``key`` is the
    layer's ``[B, H, context + q, D]`` keys (the prompt's slots, then the chunk's)."""
    b, h, _, d = key.shape
    k = scope.index.shape[1]
    selected = key[:, :, :context].gather(2, scope.index[:, None, :, None].expand(b, h, k, d))
    best = probe_max_received(query, selected, scope.ok, key[:, :, context:], scope.probe_valid, scaling)
    return best.masked_fill_(~scope.record[:, None, :], 0.0)


class LayerProbe:
    """One policy layer's side of the probe pass: whether its forwards are probe chunks now, the chunk being scored
    (``scope``, set by :func:`run_probe` before each chunk) and the running maximum of the statistic per entry."""

    def __init__(self) -> None:
        self.active = False
        self.scope: ProbeScope | None = None
        self.scoring = False
        self.scores: dict[ProbeStat, torch.Tensor] = {}

    def start(self, scoring: bool) -> None:
        self.active, self.scoring, self.scores = True, scoring, {}

    def stop(self) -> dict[ProbeStat, torch.Tensor]:
        """End the pass; returns the statistics (empty when the layer was not scoring)."""
        scores = self.scores
        self.active, self.scope, self.scores = False, None, {}
        return scores

    def fold(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """After a chunk's attention: fold its statistic into the running maximum of each scored entry. ``key`` is
        the layer's ``[B, H, P + q, D]`` (its ``P`` slots, ``valid`` bool ``[B, H, P]``, then the chunk's)."""
        scope = self.scope
        if scope is None or not self.scoring:
            return
        stat = probe_statistic(scope, query, key, valid.shape[-1], scaling)  # [B, H, K]
        best = self.scores.get(scope.need)
        if best is None:
            best = self.scores[scope.need] = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        best.scatter_reduce_(2, scope.index[:, None, :].expand_as(stat), stat, reduce="amax")


def next_positions(position_ids: Any, new_valid: torch.Tensor, seen: int) -> torch.Tensor:
    """int64 ``[B]``: the RoPE position after each row's last real token of a forward, from the ``position_ids`` the
    model used (generate() counts a left-padded row from its first real token), else the columns."""
    b, q = new_valid.shape
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        pos = position_ids.to(new_valid.device).expand(b, q)
    else:
        pos = torch.arange(seen - q, seen, device=new_valid.device).expand(b, q)
    return torch.where(new_valid, pos, pos.new_full((), -1)).amax(-1) + 1


def load_tokenizer(config: Any) -> Any:
    """The tokenizer saved next to a local checkpoint (``config.name_or_path``), or ``None``. Never downloads."""
    path = getattr(config, "name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _chunks(need: ProbeStat, contexts: list[list[int]], tokenizer: Any) -> list[list[ProbeChunk]]:
    """Each row's chunks, checked (a probe is plugin code: a bad chunk is named here, not deep inside the model)."""
    who = type(need.probe).__name__
    out = []
    for r, ctx in enumerate(contexts):
        chunks = list(need.probe.chunks(ctx, tokenizer))
        if not chunks:
            raise ProbeError(f"probe {who} built no chunk for row {r} ({len(ctx)} context tokens)")
        for c in chunks:
            if not (0 <= c.start < c.end <= len(ctx)) or not c.ids:
                raise ProbeError(
                    f"probe {who}: row {r} has a chunk targeting [{c.start}, {c.end}) with {len(c.ids)} ids; "
                    f"expected 0 <= start < end <= {len(ctx)} and at least one id"
                )
        out.append(chunks)
    return out


def _scope(need: ProbeStat, chunks: list[ProbeChunk], real_slots: list[torch.Tensor], probe_valid: torch.Tensor):
    """The :class:`ProbeScope` of one chunk per row: the row's first ``sinks`` entries before the target, then the
    target (real-token indices mapped to slots)."""
    device = probe_valid.device
    picks, records = [], []
    for c, slots in zip(chunks, real_slots, strict=True):
        sink = list(range(min(need.sinks, c.start)))
        picks.append(slots[torch.tensor(sink + list(range(c.start, c.end)), dtype=torch.long, device=device)])
        records.append([False] * len(sink) + [True] * (c.end - c.start))
    k = max(len(p) for p in picks)
    b = len(chunks)
    index = torch.zeros(b, k, dtype=torch.long, device=device)
    ok = torch.zeros(b, k, dtype=torch.bool, device=device)
    record = torch.zeros(b, k, dtype=torch.bool, device=device)
    for r, (p, rec) in enumerate(zip(picks, records, strict=True)):
        index[r, : len(p)], ok[r, : len(p)] = p, True
        record[r, : len(p)] = torch.tensor(rec, dtype=torch.bool, device=device)
    return ProbeScope(need, index, ok, record, probe_valid)


def run_probe(model: Any, cache: Any) -> ProbeScores:
    """Run every declared probe through ``model``'s decoder on ``cache`` (holding the whole prompt, uncompressed)
    and return the statistics of every waiting policy layer (all of them: :mod:`kvpolicy.core.prefillstage`). The
    cache's entries are unchanged afterwards."""
    layers = cache.policy_layers
    first = layers[0]
    ids = cache.prompt_ids
    if ids is None or ids.shape[1] != first.seen:
        raise ProbeError(
            "kvpolicy: the probe needs the prompt's input_ids: prefill the cache with input_ids (not inputs_embeds) "
            "in one forward of the model returned by kvpolicy.attach"
        )
    valid = first.valid[:, 0]  # [B, P]; the prompt's slots in column order (the layer is uncompressed)
    device = valid.device
    real_slots = [row.nonzero()[:, 0] for row in valid]
    contexts = [ids[r].to(device)[s].tolist() for r, s in enumerate(real_slots)]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    pad = getattr(model.config.get_text_config(decoder=True), "pad_token_id", None) or 0
    for layer in layers:
        layer.probe.start(layer.waiting)
    try:
        for need in cache.probe_needs:
            rows = _chunks(need, contexts, cache.tokenizer)
            for c in range(max(len(r) for r in rows)):
                chunk = [r[min(c, len(r) - 1)] for r in rows]
                _forward_chunk(decoder, cache, need, chunk, real_slots, valid, first.next_position, pad)
    finally:
        scores = {layer.layer_idx: layer.stop_probe() for layer in layers}
    return scores


def _forward_chunk(decoder, cache, need, chunk, real_slots, valid, next_position, pad) -> None:
    """One probe forward: the chunk of every row, left-padded, after the prompt."""
    device = valid.device
    q = max(len(c.ids) for c in chunk)
    b = len(chunk)
    ids = torch.full((b, q), pad, dtype=torch.long, device=device)
    probe_valid = torch.zeros(b, q, dtype=torch.bool, device=device)
    for r, c in enumerate(chunk):
        ids[r, q - len(c.ids) :] = torch.tensor(c.ids, dtype=torch.long, device=device)
        probe_valid[r, q - len(c.ids) :] = True
    positions = next_position.to(device)[:, None] + (probe_valid.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat((valid, probe_valid), dim=1).to(torch.long)
    scope = _scope(need, chunk, real_slots, probe_valid)
    for layer in cache.policy_layers:
        layer.probe.scope = scope
    with torch.no_grad():
        decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
