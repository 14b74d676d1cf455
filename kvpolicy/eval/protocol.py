"""One batch through one cache: prefill, teacher forcing of the targets, greedy generation (see ``docs/evaluation.md``).

1. **Prefill** the left-padded prompts once (``logits_to_keep=1``) and measure what the cache holds
   (:mod:`.prefill`). Samples with a question chunk (``Sample.question_tokens``, the query-agnostic protocol) are
   prefilled in two forwards: the contexts (compressed by the policy), then the questions appended uncompressed
   (:meth:`~kvpolicy.core.cache.PolicyCache.appending`); the full cache runs the same two forwards. When the context
   carries a prefill store, the contexts' prefill is recorded once per batch and replayed for each policy; each row
   says whether its prefill was shared (:class:`RowRun`). The ratio-0 check (:func:`run_exact`) never shares.
2. **Teacher forcing**, token by token, of each row's target through the cache, so a policy's decode-stage rule
   applies at every step.
3. **Greedy generation** (samples that ask for it, and samples whose target is the full cache's own answer) from a
   copy of the cache taken right after prefill, so the prefill is paid once.

What a step records depends on what the batch is for, one function each: :func:`run_reference` (the full cache:
top-k log-probs a reference keeps for KL and top-1), :func:`run_policy` (a policy's cache: KL and top-1 against the
references) and :func:`run_exact` (every step's whole log-probability row, for the bit-exact ratio-0 check).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.policy import CachePolicy
from . import metrics as M
from .budget import measure
from .context import Context
from .prefill import BatchInputs, batch_inputs, left_pad, mrope_model, prefill, run_prefill
from .references import Reference
from .spec import NonFiniteError
from .tasks import Sample


@dataclass
class RowRun:
    """What one row of a batch produced: per-step scores of its target, its generation, budget and timing."""

    target: list[int] | None = None
    nll: list[float] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    topk_logp: list[torch.Tensor] = field(default_factory=list)
    logp_steps: list[torch.Tensor] = field(default_factory=list)  # run_exact only
    generation: list[int] | None = None
    prompt_tokens: int = 0
    kept_prefill: list[float] = field(default_factory=list)
    kept_end: list[float] = field(default_factory=list)
    types_prefill: list[float] | None = None
    bytes_prefill: int = 0
    bytes_end: int = 0
    allocated_prefill: float = 0.0
    allocated_end: float = 0.0
    seen_end: int = 0
    #: the row's share of the batch's prefill seconds: the forward(s), or on a shared prefill the replay (and the
    #: question chunk's forward), never the recording, which one policy of the batch pays for all (see ``prefill_shared``)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefill_shared: bool = False  #: the cache was replayed from the batch's recorded prefill
    prefill_reason: str | None = None  #: why the prefill was not shared (None when it was)
    prefill_record_s: float = 0.0  #: the row's share of the recording's seconds, where this run recorded the batch
    #: how the prefill budgets were allocated across layers: ``"per-layer"`` or ``"whole-model"`` (an allocator with
    #: ``model_keep`` on a shared prefill, the only place it can see every layer first); None for the full cache
    allocation: str | None = None


def batches(samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Deterministic batches of sample indices: longest prompts first (less padding); samples with extra inputs
    (images) alone."""
    alone = [i for i, s in enumerate(samples) if s.extra]
    out: list[list[int]] = []
    for split in (False, True):  # one-chunk and two-chunk prompts never share a batch
        rest = sorted(
            (i for i, s in enumerate(samples) if not s.extra and bool(s.question_tokens) == split),
            key=lambda i: (-len(samples[i].prompt_ids), i),
        )
        out += [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return out + [[i] for i in alone]


# ================================================================================================== what a step records
class Recorder:
    """Scores one row at one step: the NLL of the token fed next and the argmax (every use needs both)."""

    def record(self, row: RowRun, logp_row: torch.Tensor, token: int) -> None:
        row.nll.append(float(-logp_row[token]))
        row.argmax.append(int(logp_row.argmax()))

    def compare(self, r: int, row: RowRun, t: int, logp_row: torch.Tensor) -> None:
        """After :meth:`record` at teacher-forced step ``t`` of row ``r``: compare with a reference (policy runs)."""


class ReferenceRecorder(Recorder):
    """The full cache: keeps the top-k log-probs of every step (what KL and top-1 of a policy are measured against)."""

    def __init__(self, kl_topk: int) -> None:
        self.kl_topk = kl_topk

    def record(self, row: RowRun, logp_row: torch.Tensor, token: int) -> None:
        super().record(row, logp_row, token)
        i, v = M.topk_logp(logp_row[None], self.kl_topk)
        row.topk_ids.append(i[0].cpu())
        row.topk_logp.append(v[0].cpu())


class ExactRecorder(Recorder):
    """Keeps every step's whole log-probability row (the ratio-0 check compares them bit for bit)."""

    def record(self, row: RowRun, logp_row: torch.Tensor, token: int) -> None:
        super().record(row, logp_row, token)
        row.logp_steps.append(logp_row.detach().cpu().clone())


class PolicyRecorder(Recorder):
    """A policy's cache: KL(full || policy) and top-1 agreement against each row's reference, step by step."""

    def __init__(self, refs: Sequence[Reference]) -> None:
        self.refs = refs

    def compare(self, r: int, row: RowRun, t: int, logp_row: torch.Tensor) -> None:
        ref = self.refs[r]
        row.kl.append(float(M.kl_from_topk(ref.topk_ids[t][None], ref.topk_logp[t][None], logp_row[None])[0]))
        row.top1.append(int(row.argmax[-1] == ref.argmax[t]))


# ================================================================================================== the batch
def check_finite(logits: torch.Tensor, samples: Sequence[Sample], where: str, label: str) -> None:
    ok = torch.isfinite(logits).all(-1)
    if not bool(ok.all()):
        bad = [samples[i].id for i in (~ok).nonzero().flatten().tolist()]
        raise NonFiniteError(f"non-finite logits ({label}, {where}) for sample(s) {', '.join(bad)}")


class Stepper:
    """One decode step of the batch (one new token per row) through a cache.

    M-RoPE (Qwen2-VL): without position_ids, transformers derives a decode step's 3-axis positions from the whole 2-D
    attention mask (one per mask column instead of one per new token), so they are given: the column the prefill
    numbered the token at, plus the offset the image grid introduced (what generate() does). Built after the prefill,
    which sets that offset."""

    def __init__(self, ctx: Context, inputs: BatchInputs, mrope: Any) -> None:
        self.ctx, self.inputs = ctx, inputs
        self.rope_shift = None
        if mrope is not None:
            found = mrope.rope_deltas
            b = len(inputs.lens)
            shift = found if isinstance(found, torch.Tensor) else torch.zeros(b, 1, device=ctx.device)
            self.rope_shift = shift.to(ctx.device)

    def __call__(self, cache: Any, tokens: torch.Tensor, msk: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx, inputs = self.ctx, self.inputs
        position_ids = pos[:, None].to(ctx.device) if inputs.pass_positions else None
        if self.rope_shift is not None:
            column = (pos - inputs.n_real + inputs.width)[:, None].to(ctx.device)
            position_ids = (column + self.rope_shift).to(torch.long)[None].expand(3, -1, -1)
        with torch.inference_mode():
            o = ctx.model(
                input_ids=tokens[:, None].to(ctx.device),
                attention_mask=msk,
                position_ids=position_ids,
                **{"past_key_values": cache, "use_cache": True},
            )
        return o.logits[:, -1].to(torch.float32)


def _grow(msk: torch.Tensor) -> torch.Tensor:
    return torch.cat([msk, torch.ones(msk.shape[0], 1, dtype=msk.dtype, device=msk.device)], 1)


@dataclass
class Decode:
    """What the decode phases of a batch share: its samples, rows, recorder, stepper and the prefill's output."""

    ctx: Context
    samples: Sequence[Sample]
    rows: list[RowRun]
    recorder: Recorder
    step: Stepper
    logits0: torch.Tensor
    mask: torch.Tensor
    label: str


def teacher_force(d: Decode, cache: Any, targets: Sequence[list[int] | None]) -> int:
    """Feed every row's target through ``cache``, scoring each step; returns the steps taken."""
    b, n_real = len(d.samples), d.step.inputs.n_real
    t_max = max(len(t) for t in targets if t is not None)
    logits, msk, steps = d.logits0, d.mask, 0
    for t in range(t_max):
        logp = M.log_softmax(logits)
        for r in range(b):
            tgt = targets[r]
            if tgt is None or t >= len(tgt):
                continue
            d.recorder.record(d.rows[r], logp[r], tgt[t])
            d.recorder.compare(r, d.rows[r], t, logp[r])
        if t == t_max - 1:
            break
        feed = torch.tensor([tg[t] if (tg is not None and t < len(tg)) else d.ctx.pad for tg in targets])
        msk = _grow(msk)
        logits = d.step(cache, feed, msk, n_real + t)
        steps += 1
        check_finite(logits, d.samples, f"teacher-forced step {t + 1}", d.label)
    for r in range(b):
        d.rows[r].target = list(targets[r]) if targets[r] is not None else None
    return steps


def generate(d: Decode, cache: Any, self_target: Sequence[bool]) -> int:
    """Greedy generation from ``cache`` for the rows that want it; a row whose target is its own answer is scored
    as it goes. Returns the steps taken."""
    samples, ctx, b, n_real = d.samples, d.ctx, len(d.samples), d.step.inputs.n_real
    wants = [s.generate or self_target[r] for r, s in enumerate(samples)]
    max_new = max(s.max_new_tokens for r, s in enumerate(samples) if wants[r])
    gens: list[list[int]] = [[] for _ in range(b)]
    done = [not w for w in wants]
    logits, msk, steps = d.logits0, d.mask, 0
    for s_idx in range(max_new):
        logp = M.log_softmax(logits) if any(self_target) else None
        nxt = logits.argmax(-1).tolist()
        for r in range(b):
            if done[r]:
                continue
            tok = nxt[r]
            if self_target[r] and logp is not None:
                d.recorder.record(d.rows[r], logp[r], tok)
            gens[r].append(tok)
            if tok in ctx.eos or len(gens[r]) >= samples[r].max_new_tokens:
                done[r] = True
        if all(done):
            break
        feed = torch.tensor([ctx.pad if done[r] else gens[r][-1] for r in range(b)])
        msk = _grow(msk)
        logits = d.step(cache, feed, msk, n_real + s_idx)
        steps += 1
        check_finite(logits, samples, f"generation step {s_idx + 1}", d.label)
    for r in range(b):
        if wants[r]:
            d.rows[r].generation = gens[r]
        if self_target[r]:
            d.rows[r].target = gens[r]
    return steps


def _run(
    ctx: Context,
    samples: Sequence[Sample],
    policy: CachePolicy | None,
    targets: Sequence[list[int] | None],
    recorder: Recorder,
    label: str,
    share: bool = True,
) -> list[RowRun]:
    """Prefill, teacher-force ``targets`` and generate where asked, for one batch. ``policy=None``: the full cache
    (transformers' ``DynamicCache``); a target ``None`` is the row's own greedy answer. ``share``: replay the prefill
    from the context's prefill store where the policy can (:func:`~.prefill.run_prefill`)."""
    inputs, b = batch_inputs(ctx, samples), len(samples)
    mrope = mrope_model(ctx.model)
    if mrope is not None:
        mrope.rope_deltas = None  # set again by this prefill when it has images; never a previous sample's
    run = run_prefill(ctx, samples, inputs, policy, share)
    cache, logits0 = run.cache, run.logits
    check_finite(logits0, samples, "prefill", label)
    budget0 = measure(cache, ctx, inputs.n_real)
    rows = [RowRun(prompt_tokens=inputs.lens[r]) for r in range(b)]
    for r in range(b):
        rows[r].kept_prefill = budget0.kept[r].tolist()
        rows[r].bytes_prefill = int(budget0.bytes[r])
        rows[r].allocated_prefill = budget0.allocated / b
        rows[r].types_prefill = budget0.types[r].tolist() if budget0.types is not None else None
        rows[r].prefill_s = run.seconds / b
        rows[r].prefill_shared, rows[r].prefill_reason = run.shared, run.reason
        rows[r].prefill_record_s = run.record_seconds / b
        rows[r].allocation = getattr(cache, "allocation", None)

    self_target = [t is None for t in targets]
    need_tf = any(t is not None for t in targets)
    need_gen = any(s.generate for s in samples) or any(self_target)
    gen_cache = copy.deepcopy(cache) if (need_tf and need_gen) else cache
    d = Decode(ctx, samples, rows, recorder, Stepper(ctx, inputs, mrope), logits0, inputs.mask, label)
    decode_s, steps_tf, steps_gen = 0.0, 0, 0
    end_cache, end_seen = cache, inputs.n_real.clone()
    if need_tf:
        t1 = time.perf_counter()
        steps_tf = teacher_force(d, cache, targets)
        decode_s += time.perf_counter() - t1
        end_seen = inputs.n_real + steps_tf
    if need_gen:
        t1 = time.perf_counter()
        steps_gen = generate(d, gen_cache, self_target)
        decode_s += time.perf_counter() - t1
        if not need_tf:
            end_cache, end_seen = gen_cache, inputs.n_real + steps_gen

    budget1 = measure(end_cache, ctx, end_seen)
    for r in range(b):
        rows[r].kept_end = budget1.kept[r].tolist()
        rows[r].bytes_end = int(budget1.bytes[r])
        rows[r].allocated_end = budget1.allocated / b
        rows[r].seen_end = int(end_seen[r])
        rows[r].decode_s = decode_s / b
        rows[r].decode_steps = steps_tf + steps_gen
    return rows


# ================================================================================================== one function per use
def run_reference(
    ctx: Context,
    samples: Sequence[Sample],
    targets: Sequence[list[int] | None] | None = None,
    label: str = "full cache",
) -> list[RowRun]:
    """The full cache on one batch, keeping the top-k log-probs a :class:`~.references.Reference` needs. ``targets``
    default to the samples' gold targets; where a target is ``None`` the full cache's greedy answer becomes it."""
    targets = [s.target_ids for s in samples] if targets is None else targets
    return _run(ctx, samples, None, targets, ReferenceRecorder(ctx.kl_topk), label)


def run_policy(
    ctx: Context, samples: Sequence[Sample], policy: CachePolicy, refs: Sequence[Reference], label: str = ""
) -> list[RowRun]:
    """``policy``'s cache on one batch, teacher-forcing each reference's target: NLL, KL and top-1 per step."""
    return _run(ctx, samples, policy, [r.target for r in refs], PolicyRecorder(refs), label)


def run_exact(
    ctx: Context,
    samples: Sequence[Sample],
    policy: CachePolicy | None,
    targets: Sequence[list[int] | None],
    label: str = "",
) -> list[RowRun]:
    """One batch keeping every step's whole log-probability row (``policy=None``: the full cache). Always the direct
    path, never a replayed prefill: the ratio-0 check compares what a policy does with what the full cache does, and
    a replay of one recording on both sides would hide a difference in the prefill."""
    return _run(ctx, samples, policy, targets, ExactRecorder(), label, share=False)


__all__ = [
    "BatchInputs",
    "RowRun",
    "Stepper",
    "append_question",
    "batch_inputs",
    "batches",
    "generate",
    "left_pad",
    "prefill",
    "prefill_context",
    "run_exact",
    "run_policy",
    "run_reference",
    "teacher_force",
]
