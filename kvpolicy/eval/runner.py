"""The evaluation protocol: one policy against the full cache, sample by sample, in left-padded batches.

For every batch of samples (see ``docs/evaluation.md``):

1. **Prefill** the prompts once through the policy's cache (``logits_to_keep=1``). Budgets are measured here:
   entries held per layer (``PolicyLayer.held()``), bytes, the ratio achieved, the split by token type.
2. **Teacher forcing**, token by token, of the target (the gold continuation/answer, or the full cache's greedy
   answer) through the *compressed* cache, so the decode-stage rule applies at every step: NLL of each target token,
   KL(full || policy) of the next-token distribution and top-1 agreement with the full cache.
3. **Greedy generation** (tasks that ask for it) from a copy of the cache taken right after prefill, so the prefill is
   paid once: ROUGE-L against the full cache's greedy answer, string match against gold answers.

The full-cache side of every sample is a :class:`~kvpolicy.eval.reference.Reference`, computed with a plain
``DynamicCache`` in the same batches and cached on disk. Before reporting, the harness runs the policy at ratio 0 on
one sample and requires every logit and the generation to equal the full cache's bit for bit; non-finite logits are
an error naming the sample.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import provenance
from ..core.cache import PolicyCache
from ..core.layer import PolicyLayer
from ..core.policy import GENERATED, IMAGE, TEXT, CachePolicy
from . import metrics as M
from .reference import Reference, ReferenceStore, model_fingerprint
from .tasks import Sample, text_tokenizer


# ================================================================================================== errors
class EvalError(RuntimeError):
    """The evaluation cannot produce an honest result."""


class HonestyCheckError(EvalError):
    """The policy at ratio 0 does not reproduce the full cache exactly."""


class NonFiniteError(EvalError):
    """NaN or inf in the logits (names the sample, the step and the run)."""


# ================================================================================================== spec / result
class EvalSpec(BaseModel):
    """Everything that defines one evaluation (it is written, complete, into every result)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description="alias, local path or Hub id (kvpolicy.models)")
    task: str = Field(
        default="continuation", description="continuation | instruct | needle | jsonl | a registered task"
    )
    task_options: dict[str, Any] = Field(default_factory=dict, description="the task's options (context_tokens, ...)")
    policy: str | dict[str, Any] = Field(default="elastic", description="preset name, YAML file or policy document")
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="fraction removed (overrides the policy's)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted policy overrides")
    samples: int = Field(default=50, ge=1)
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)
    protocol: Literal["kvpolicy", "authors"] = Field(
        default="kvpolicy", description="'authors': the last target token is not scored in PPL (their quirk)"
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        default="auto",
        description="auto: bfloat16 where the device computes it natively (CUDA >= 8.0, CPUs with AMX or AVX-512 "
        "BF16), float32 elsewhere (kvpolicy.hardware); the result's ``dtype`` records what it resolved to",
    )
    backend: Literal["sdpa", "eager"] = "sdpa"
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: leave torch's setting)")
    kl_topk: int = Field(default=256, ge=0, description="full-cache log-probs kept per step for KL (0: all)")
    reference_dir: str | None = Field(default=None, description="reference cache (default <cache root>/eval_refs)")
    use_reference_cache: bool = True
    check_ratio0: bool = Field(default=True, description="refuse to report unless ratio 0 reproduces the full cache")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for the confidence intervals")
    keep_generations: bool = Field(default=True, description="store the generated texts in the result")
    quiet: bool = False


class SampleSide(BaseModel):
    """One sample under one cache (the full cache or the policy's)."""

    nll_sum: float
    scored_tokens: int
    ppl: float
    kl_sum: float = 0.0
    top1_hits: int = 0
    steps: int = 0
    rouge_l: float | None = None
    exact_match: float | None = None
    generation: str | None = None
    kept_prefill: float
    kept_end: float
    ratio_prefill: float
    ratio_end: float
    bytes_prefill: int
    bytes_end: int
    allocated_bytes_prefill: float
    allocated_bytes_end: float
    kept_per_layer_prefill: list[float]
    kept_by_type_prefill: dict[str, float] | None = None
    prefill_s: float
    decode_s: float
    decode_steps: int


class SampleResult(BaseModel):
    id: str
    kind: str
    prompt_tokens: int
    #: the prompt's positions by type, ``{"text": n, "image": n}`` (vision-language models only): what the full cache
    #: holds, against which ``kept_by_type_prefill`` tells how much of the image a policy kept
    prompt_tokens_by_type: dict[str, int] | None = None
    target_tokens: int
    target_kind: str
    full: SampleSide
    policy: SampleSide


class SideMetrics(BaseModel):
    ppl: float
    ppl_ci: tuple[float, float] | None = None
    ppl_per_sample_mean: float
    ppl_per_sample_median: float
    scored_tokens: int
    kl: float | None = None
    kl_ci: tuple[float, float] | None = None
    top1: float | None = None
    top1_ci: tuple[float, float] | None = None
    rouge_l: float | None = None
    rouge_l_ci: tuple[float, float] | None = None
    exact_match: float | None = None
    exact_match_ci: tuple[float, float] | None = None
    kept_tokens_prefill: float
    kept_tokens_end: float
    prompt_tokens: float
    ratio_prefill: float
    ratio_end: float
    bytes_prefill: float
    bytes_end: float
    allocated_bytes_prefill: float
    allocated_bytes_end: float
    kept_by_type_prefill: dict[str, float] | None = None
    #: mean prompt positions by type (text / image), vision-language models only
    prompt_tokens_by_type: dict[str, float] | None = None
    #: image entries kept after prefill (mean over layers) summed over samples / image tokens of the prompts
    image_kept_fraction: float | None = None
    prefill_s: float
    decode_s: float
    decode_tokens: int
    decode_tokens_per_s: float | None


class Delta(BaseModel):
    value: float
    ci: tuple[float, float] | None = None


class EvalResult(BaseModel):
    spec: EvalSpec
    policy_name: str
    policy: dict[str, Any]
    task: dict[str, Any]
    model: dict[str, Any]
    environment: dict[str, Any]
    full: SideMetrics
    policy_metrics: SideMetrics
    delta: dict[str, Delta]
    samples: list[SampleResult]
    honesty: dict[str, Any]
    reference: dict[str, Any]
    complete: bool = True
    #: the dtype the evaluation computed in (``spec.dtype`` with ``auto`` resolved on this machine); None in result
    #: files written before it was recorded (their ``model["dtype"]`` says the same as ``torch.<name>``)
    dtype: str | None = None
    wall_s: float
    created: str


@dataclass
class BatchUpdate:
    """What the per-batch callback receives. Return ``True`` from the callback to stop early (the result is then
    marked ``complete=False``); raise (e.g. ``optuna.TrialPruned``) to abort."""

    done: int
    total: int
    samples: list[SampleResult]
    running: dict[str, float]  #: point estimates so far: ppl, full_ppl, kl, top1, rouge_l, exact_match


# ================================================================================================== model handling
_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def load_eval_model(name: str, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """``kvpolicy.models.load_model`` memoised per process (a sweep calls :func:`evaluate` many times); ``dtype``
    ``auto`` is resolved for ``device`` first (:func:`kvpolicy.hardware.resolve_dtype`)."""
    from ..hardware import dtype_name, resolve_dtype

    resolved = resolve_dtype(dtype, device)
    key = (name, dtype_name(resolved), device)
    if key not in _MODELS:
        from ..models import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(name, dtype=resolved, device=device)
    return _MODELS[key]


def build_policy(policy: str | dict[str, Any], ratio: float | None, overrides: dict[str, Any] | None = None):
    from ..config import load_policy

    over = dict(overrides or {})
    if ratio is not None:
        over["ratio"] = ratio
    return load_policy(policy, overrides=over or None)


def policy_document(policy: CachePolicy) -> dict[str, Any]:
    try:
        from ..config import policy_to_dict

        return policy_to_dict(policy)
    except Exception:  # a hand-built policy (tests) has no validated document
        return {"name": policy.name, "budget": policy.budget.model_dump()}


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    e = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    tok = text_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def _pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    tok = text_tokenizer(tokenizer) if tokenizer is not None else None
    for value in (getattr(tok, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return eos[0] if eos else 0


@dataclass
class Context:
    model: Any
    tokenizer: Any
    eos: list[int]
    pad: int
    kl_topk: int
    device: torch.device
    vlm: bool
    full_layers: list[int]
    entry_bytes: list[int]  #: bytes of one token's key+value, all kv heads, per layer
    image_ids: frozenset[int] = frozenset()  #: placeholder ids of image/video positions (vision-language models)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos]
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return text_tokenizer(self.tokenizer).decode(ids, skip_special_tokens=True)


def make_context(model: Any, tokenizer: Any, kl_topk: int = 256) -> Context:
    from ..core.engine import image_token_ids
    from ..models import is_vision_language_config

    text = model.config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)[:n]
    kv = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    elem = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    eos = _eos_ids(model, tokenizer)
    vlm = is_vision_language_config(model.config)
    return Context(
        model=model,
        tokenizer=tokenizer,
        eos=eos,
        pad=_pad_id(model, tokenizer, eos),
        kl_topk=kl_topk,
        device=next(model.parameters()).device,
        vlm=vlm,
        full_layers=[i for i, t in enumerate(types) if t == "full_attention"],
        entry_bytes=[2 * kv * head_dim * elem] * n,
        image_ids=image_token_ids(model.config) if vlm else frozenset(),
    )


# ================================================================================================== budget accounting
def kept_by_type(cache: PolicyCache) -> torch.Tensor:
    """Entries held by token type: float ``[num_policy_layers, B, 3]`` (columns ``TEXT``, ``IMAGE``, ``GENERATED``,
    the codes of :mod:`kvpolicy.policy`), averaged over kv heads. For a multimodal prompt this is how the kept budget
    splits between text and image tokens (and tokens generated since)."""
    out = []
    for layer in cache.policy_layers:
        if not layer.is_initialized:
            continue
        view = layer.view("decode")
        counts = [
            ((view.token_types == code) & view.valid).sum(-1).to(torch.float32).mean(-1)
            for code in (TEXT, IMAGE, GENERATED)
        ]
        out.append(torch.stack(counts, -1))
    if not out:
        return torch.zeros(0, 0, 3)
    return torch.stack(out)


TYPE_NAMES = ("text", "image", "generated")


def _held_rows(cache: Any, ctx: Context, seen: torch.Tensor) -> torch.Tensor:
    """Entries held per row and layer (real tokens, mean over kv heads): float ``[B, num_layers]``."""
    b = seen.shape[0]
    rows = []
    for layer in cache.layers:
        if isinstance(layer, PolicyLayer):
            rows.append(layer.held().to(torch.float32).mean(-1).cpu() if layer.is_initialized else torch.zeros(b))
        else:  # a plain (full or sliding-window) layer keeps the last `physical` columns
            phys = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0
            rows.append(seen.clamp(max=phys).to(torch.float32))
    return torch.stack(rows, -1)


@dataclass
class Budget:
    kept: torch.Tensor  #: [B, L] entries per layer (full-attention layers and sliding ones)
    bytes: torch.Tensor  #: [B] int
    types: torch.Tensor | None  #: [B, 3]
    allocated: int  #: cache.nbytes() / DynamicCache tensor bytes for the whole batch


def measure(cache: Any, ctx: Context, seen: torch.Tensor) -> Budget:
    held = _held_rows(cache, ctx, seen)
    per_entry = torch.tensor(ctx.entry_bytes[: held.shape[1]], dtype=torch.float64)
    nbytes = (held.to(torch.float64) * per_entry).sum(-1).round().to(torch.int64)
    types = None
    if isinstance(cache, PolicyCache):
        t = kept_by_type(cache)
        types = t.mean(0) if t.numel() else None
        allocated = cache.nbytes()
    else:
        allocated = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in cache.layers
            if getattr(layer, "keys", None) is not None
        )
    return Budget(kept=held, bytes=nbytes, types=types, allocated=allocated)


# ================================================================================================== one batch
@dataclass
class RowRun:
    target: list[int] | None = None
    nll: list[float] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    topk_logp: list[torch.Tensor] = field(default_factory=list)
    logp_steps: list[torch.Tensor] = field(default_factory=list)  # exact mode only
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
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


def _mrope_model(model: Any) -> Any:
    """The inner model holding ``rope_deltas`` for M-RoPE models (Qwen2-VL, Qwen2.5-VL), else ``None``."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "rope_deltas") else None


def _check_finite(logits: torch.Tensor, samples: Sequence[Sample], where: str, label: str) -> None:
    ok = torch.isfinite(logits).all(-1)
    if not bool(ok.all()):
        bad = [samples[i].id for i in (~ok).nonzero().flatten().tolist()]
        raise NonFiniteError(f"non-finite logits ({label}, {where}) for sample(s) {', '.join(bad)}")


def run_batch(
    ctx: Context,
    samples: Sequence[Sample],
    policy: CachePolicy | None,
    targets: Sequence[list[int] | None],
    refs: Sequence[Reference | None] | None = None,
    mode: Literal["reference", "policy", "exact"] = "policy",
    label: str = "",
) -> list[RowRun]:
    """Prefill, teacher-force ``targets`` and (where asked) generate, for one batch. ``policy=None``: the full cache
    (transformers' ``DynamicCache``). ``mode='reference'`` records the top-k log-probs a reference needs (and, for a
    sample without a target, takes its own greedy answer as the target); ``'policy'`` computes KL and top-1 against
    ``refs``; ``'exact'`` keeps every step's full log-probabilities (ratio-0 check)."""
    from transformers import DynamicCache

    from ..core.engine import make_cache

    model = ctx.model
    b = len(samples)
    lens = [len(s.prompt_ids) for s in samples]
    width = max(lens)
    ids = torch.full((b, width), ctx.pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, width - lens[r] :] = torch.tensor(s.prompt_ids, dtype=torch.long)
        mask[r, width - lens[r] :] = 1
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    padded = min(lens) != width
    extra: dict[str, Any] = {}
    if any(s.extra for s in samples):
        if b != 1:
            raise EvalError("samples with extra inputs (images) are evaluated one per batch")
        extra = {k: (v.to(ctx.device) if hasattr(v, "to") else v) for k, v in samples[0].extra.items()}
    pass_positions = padded and not ctx.vlm
    n_real = torch.tensor(lens, dtype=torch.long)
    mrope = _mrope_model(model)
    if mrope is not None:
        mrope.rope_deltas = None  # set again by this prefill when it has images; never a previous sample's

    cache = make_cache(model, policy) if policy is not None else DynamicCache(config=model.config)
    kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": True}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0) if pass_positions else None,
            logits_to_keep=1,
            **extra,
            **kwargs,
        )
    logits0 = out.logits[:, -1].to(torch.float32)
    prefill_s = time.perf_counter() - t0
    _check_finite(logits0, samples, "prefill", label)
    budget0 = measure(cache, ctx, n_real)
    del out

    rows = [RowRun(prompt_tokens=lens[r]) for r in range(b)]
    for r in range(b):
        rows[r].kept_prefill = budget0.kept[r].tolist()
        rows[r].bytes_prefill = int(budget0.bytes[r])
        rows[r].allocated_prefill = budget0.allocated / b
        rows[r].types_prefill = budget0.types[r].tolist() if budget0.types is not None else None
        rows[r].prefill_s = prefill_s / b

    self_target = [t is None for t in targets]  # reference mode: the greedy answer is the target
    need_tf = any(t is not None for t in targets)
    need_gen = any(s.generate for s in samples) or any(self_target)
    gen_cache = copy.deepcopy(cache) if (need_tf and need_gen) else cache
    decode_s, steps_tf, steps_gen = 0.0, 0, 0

    # M-RoPE (Qwen2-VL): without position_ids, transformers derives a decode step's 3-axis positions from the whole
    # 2-D attention mask (one per mask column instead of one per new token), so they are given: the column the
    # prefill numbered the token at, plus the offset the image grid introduced (what generate() does)
    rope_shift = None
    if mrope is not None:
        found = mrope.rope_deltas
        rope_shift = found.to(ctx.device) if isinstance(found, torch.Tensor) else torch.zeros(b, 1, device=ctx.device)

    def step(c: Any, tokens: torch.Tensor, msk: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        position_ids = pos[:, None].to(ctx.device) if pass_positions else None
        if rope_shift is not None:
            column = (pos - n_real + width)[:, None].to(ctx.device)
            position_ids = (column + rope_shift).to(torch.long)[None].expand(3, -1, -1)
        with torch.inference_mode():
            o = model(
                input_ids=tokens[:, None].to(ctx.device),
                attention_mask=msk,
                position_ids=position_ids,
                **{"past_key_values": c, "use_cache": True},
            )
        return o.logits[:, -1].to(torch.float32)

    def record(r: int, t: int, logp_row: torch.Tensor, token: int) -> None:
        row = rows[r]
        row.nll.append(float(-logp_row[token]))
        am = int(logp_row.argmax())
        row.argmax.append(am)
        if mode == "reference":
            i, v = M.topk_logp(logp_row[None], ctx.kl_topk)
            row.topk_ids.append(i[0].cpu())
            row.topk_logp.append(v[0].cpu())
        elif mode == "exact":
            row.logp_steps.append(logp_row.detach().cpu().clone())

    # ---- teacher forcing along the targets
    end_cache, end_seen = cache, n_real.clone()
    if need_tf:
        t_max = max(len(t) for t in targets if t is not None)
        logits = logits0
        msk = mask
        t1 = time.perf_counter()
        for t in range(t_max):
            logp = M.log_softmax(logits)
            for r in range(b):
                tgt = targets[r]
                if tgt is None or t >= len(tgt):
                    continue
                record(r, t, logp[r], tgt[t])
                if mode == "policy":
                    ref = refs[r]  # type: ignore[index]
                    rows[r].kl.append(
                        float(M.kl_from_topk(ref.topk_ids[t][None], ref.topk_logp[t][None], logp[r][None])[0])
                    )
                    rows[r].top1.append(int(rows[r].argmax[-1] == ref.argmax[t]))
            if t == t_max - 1:
                break
            feed = torch.tensor([tg[t] if (tg is not None and t < len(tg)) else ctx.pad for tg in targets])
            msk = torch.cat([msk, torch.ones(b, 1, dtype=msk.dtype, device=msk.device)], 1)
            logits = step(cache, feed, msk, n_real + t)
            steps_tf += 1
            _check_finite(logits, samples, f"teacher-forced step {t + 1}", label)
        decode_s += time.perf_counter() - t1
        end_seen = n_real + steps_tf
        for r in range(b):
            rows[r].target = list(targets[r]) if targets[r] is not None else None

    # ---- greedy generation (from the prefill's copy)
    if need_gen:
        wants = [s.generate or self_target[r] for r, s in enumerate(samples)]
        max_new = max(s.max_new_tokens for r, s in enumerate(samples) if wants[r])
        gens: list[list[int]] = [[] for _ in range(b)]
        done = [not w for w in wants]
        logits = logits0
        msk = mask
        t1 = time.perf_counter()
        for s_idx in range(max_new):
            logp = M.log_softmax(logits) if (mode != "policy" and any(self_target)) else None
            nxt = logits.argmax(-1).tolist()
            for r in range(b):
                if done[r]:
                    continue
                tok = nxt[r]
                if self_target[r] and logp is not None:
                    record(r, s_idx, logp[r], tok)
                gens[r].append(tok)
                if tok in ctx.eos or len(gens[r]) >= samples[r].max_new_tokens:
                    done[r] = True
            if all(done):
                break
            feed = torch.tensor([ctx.pad if done[r] else gens[r][-1] for r in range(b)])
            msk = torch.cat([msk, torch.ones(b, 1, dtype=msk.dtype, device=msk.device)], 1)
            logits = step(gen_cache, feed, msk, n_real + s_idx)
            steps_gen += 1
            _check_finite(logits, samples, f"generation step {s_idx + 1}", label)
        decode_s += time.perf_counter() - t1
        for r in range(b):
            if wants[r]:
                rows[r].generation = gens[r]
            if self_target[r]:
                rows[r].target = gens[r]
        if not need_tf:
            end_cache, end_seen = gen_cache, n_real + steps_gen

    budget1 = measure(end_cache, ctx, end_seen)
    for r in range(b):
        rows[r].kept_end = budget1.kept[r].tolist()
        rows[r].bytes_end = int(budget1.bytes[r])
        rows[r].allocated_end = budget1.allocated / b
        rows[r].seen_end = int(end_seen[r])
        rows[r].decode_s = decode_s / b
        rows[r].decode_steps = steps_tf + steps_gen
    return rows


# ================================================================================================== references
def batches(samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Deterministic batches of sample indices: longest prompts first (less padding); samples with extra inputs
    (images) alone."""
    alone = [i for i, s in enumerate(samples) if s.extra]
    rest = sorted((i for i, s in enumerate(samples) if not s.extra), key=lambda i: (-len(samples[i].prompt_ids), i))
    out = [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return out + [[i] for i in alone]


def _reference_from_row(s: Sample, row: RowRun, batch_ids: list[str]) -> Reference:
    assert row.target is not None
    k_ids = torch.stack(row.topk_ids) if row.topk_ids else torch.zeros(0, 0, dtype=torch.int32)
    k_lp = torch.stack(row.topk_logp) if row.topk_logp else torch.zeros(0, 0)
    return Reference(
        id=s.id,
        target=row.target,
        target_kind="gold" if s.target_ids is not None else "reference",
        nll=row.nll[: len(row.target)],
        argmax=row.argmax[: len(row.target)],
        topk_ids=k_ids,
        topk_logp=k_lp,
        generation=row.generation,
        prompt_tokens=row.prompt_tokens,
        kept_per_layer_prefill=row.kept_prefill,
        kept_per_layer_end=row.kept_end,
        bytes_prefill=row.bytes_prefill,
        bytes_end=row.bytes_end,
        allocated_prefill=row.allocated_prefill,
        allocated_end=row.allocated_end,
        seen_end=row.seen_end,
        prefill_s=row.prefill_s,
        decode_s=row.decode_s,
        decode_steps=row.decode_steps,
        batch=batch_ids,
    )


def ensure_references(
    ctx: Context,
    samples: Sequence[Sample],
    store: ReferenceStore,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[Reference]:
    """The full-cache reference of every sample: from the store, else computed (in batches of the missing ones)."""
    keys = [store.key(s.content_hash()) for s in samples]
    refs: list[Reference | None] = [store.get(k) for k in keys]
    cached = sum(r is not None for r in refs)
    if progress is not None and cached:
        progress(cached)
    # a batch with any missing reference is computed whole, so that its references share one batch composition
    # (the one the policy runs use): then a policy at ratio 0 reproduces them bit for bit
    for batch in batches(samples, batch_size):
        missing = [i for i in batch if refs[i] is None]
        if not missing:
            continue
        group = [samples[i] for i in batch]
        rows = run_batch(ctx, group, None, [s.target_ids for s in group], mode="reference", label="full cache")
        for i, s, row in zip(batch, group, rows):
            ref = _reference_from_row(s, row, [g.id for g in group])
            store.put(keys[i], ref)
            refs[i] = ref
        if progress is not None:
            progress(len(missing))
    return refs  # type: ignore[return-value]


# ================================================================================================== ratio-0 check
_CHECKED: dict[str, dict[str, Any]] = {}


def ratio0_check(ctx: Context, sample: Sample, policy0: CachePolicy, memo_key: str | None = None) -> dict[str, Any]:
    """Run the full cache and the policy at ratio 0 on one sample (batch of one) and require bit-identical logits at
    every teacher-forced and generated step, identical generations (so ROUGE-L 1.0), equal PPL and KL exactly 0."""
    if memo_key is not None and memo_key in _CHECKED:
        return {**_CHECKED[memo_key], "memoised": True}
    full = run_batch(ctx, [sample], None, [sample.target_ids], mode="exact", label="ratio-0 check, full cache")[0]
    target = [full.target]
    pol = run_batch(ctx, [sample], policy0, target, mode="exact", label="ratio-0 check, policy")[0]
    problems = []
    fl, pl = full.logp_steps, pol.logp_steps
    if len(fl) != len(pl):
        problems.append(f"{len(pl)} teacher-forced steps vs {len(fl)}")
    for t, (a, c) in enumerate(zip(fl, pl)):
        if not torch.equal(a, c):
            problems.append(
                f"teacher-forced step {t}: log-probs differ (max |diff| {float((a - c).abs().max()):.3g}, "
                f"KL {float(M.kl_exact(a[None], c[None])[0]):.3g})"
            )
            break
    if full.generation is not None and full.generation != pol.generation:
        problems.append("greedy generations differ")
    ppl_full = math.exp(sum(full.nll) / max(1, len(full.nll)))
    ppl_pol = math.exp(sum(pol.nll) / max(1, len(pol.nll)))
    kl = max((float(M.kl_exact(a[None], c[None])[0]) for a, c in zip(fl, pl)), default=0.0)
    if ppl_full != ppl_pol:
        problems.append(f"PPL {ppl_pol!r} vs {ppl_full!r}")
    out = {
        "checked": True,
        "passed": not problems,
        "sample": sample.id,
        "ppl_full": ppl_full,
        "ppl_policy_ratio0": ppl_pol,
        "max_kl": kl,
        "rouge_l": 1.0 if full.generation == pol.generation else None,
        "steps": len(fl),
        "problems": problems,
    }
    if problems:
        raise HonestyCheckError(
            f"the policy at ratio 0 does not reproduce the full cache on sample {sample.id}: " + "; ".join(problems)
        )
    if memo_key is not None:
        _CHECKED[memo_key] = out
    return out


# ================================================================================================== per-sample results
def _side(
    ctx: Context,
    s: Sample,
    row: RowRun | None,
    ref: Reference,
    protocol: str,
    keep_text: bool,
    policy_side: bool,
) -> SampleSide:
    n_t = len(ref.target)
    scored = n_t - 1 if protocol == "authors" else n_t
    scored = max(0, scored)
    if policy_side:
        assert row is not None
        nll = row.nll[:scored]
        kl, top1 = row.kl, row.top1
        gen = row.generation
        kept_p, kept_e = row.kept_prefill, row.kept_end
        bytes_p, bytes_e = row.bytes_prefill, row.bytes_end
        alloc_p, alloc_e = row.allocated_prefill, row.allocated_end
        types = row.types_prefill
        prefill_s, decode_s, steps = row.prefill_s, row.decode_s, row.decode_steps
        seen_end = row.seen_end
    else:
        nll = ref.nll[:scored]
        kl, top1 = [0.0] * n_t, [1] * n_t
        gen = ref.generation
        kept_p, kept_e = ref.kept_per_layer_prefill, ref.kept_per_layer_end
        bytes_p, bytes_e = ref.bytes_prefill, ref.bytes_end
        alloc_p, alloc_e = ref.allocated_prefill, ref.allocated_end
        types = None
        prefill_s, decode_s, steps = ref.prefill_s, ref.decode_s, ref.decode_steps
        seen_end = ref.seen_end
    nll_sum = float(sum(nll))
    rl = em = None
    text = None
    if gen is not None:
        text = ctx.decode(gen)
        if ref.generation is not None:
            rl = M.rouge_l_ids(gen, ref.generation, ctx.decode) if policy_side else 1.0
        if s.answers:
            em = M.string_match_all(text, s.answers)
    kp, ke = float(np.mean(kept_p)), float(np.mean(kept_e))
    return SampleSide(
        nll_sum=nll_sum,
        scored_tokens=len(nll),
        ppl=math.exp(nll_sum / len(nll)) if nll else float("nan"),
        kl_sum=float(sum(kl)),
        top1_hits=int(sum(top1)),
        steps=len(kl),
        rouge_l=rl,
        exact_match=em,
        generation=text if keep_text else None,
        kept_prefill=kp,
        kept_end=ke,
        ratio_prefill=1.0 - kp / ref.prompt_tokens,
        ratio_end=1.0 - ke / seen_end,
        bytes_prefill=int(bytes_p),
        bytes_end=int(bytes_e),
        allocated_bytes_prefill=float(alloc_p),
        allocated_bytes_end=float(alloc_e),
        kept_per_layer_prefill=[round(x, 3) for x in kept_p],
        kept_by_type_prefill=dict(zip(TYPE_NAMES, types)) if types is not None else None,
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_steps=steps,
    )


def prompt_types(ctx: Context, s: Sample) -> dict[str, int] | None:
    """The prompt's text and image positions, counted from its ids with the model's image placeholder ids (the same
    rule the cache types its entries by), for vision-language models."""
    if not ctx.vlm:
        return None
    image = sum(1 for i in s.prompt_ids if i in ctx.image_ids)
    return {"text": len(s.prompt_ids) - image, "image": image}


def sample_result(ctx: Context, s: Sample, row: RowRun, ref: Reference, spec: EvalSpec) -> SampleResult:
    return SampleResult(
        id=s.id,
        kind=s.kind,
        prompt_tokens=len(s.prompt_ids),
        prompt_tokens_by_type=prompt_types(ctx, s),
        target_tokens=len(ref.target),
        target_kind=ref.target_kind,
        full=_side(ctx, s, None, ref, spec.protocol, spec.keep_generations, policy_side=False),
        policy=_side(ctx, s, row, ref, spec.protocol, spec.keep_generations, policy_side=True),
    )


# ================================================================================================== aggregation
def _arr(samples: Sequence[SampleResult], side: str, attr: str) -> np.ndarray:
    return np.array([getattr(getattr(s, side), attr) for s in samples], dtype=np.float64)


def side_metrics(samples: Sequence[SampleResult], side: str, n_boot: int, seed: int) -> SideMetrics:
    nll, n = _arr(samples, side, "nll_sum"), _arr(samples, side, "scored_tokens")
    kl, steps, hits = _arr(samples, side, "kl_sum"), _arr(samples, side, "steps"), _arr(samples, side, "top1_hits")
    per_ppl = _arr(samples, side, "ppl")
    m = len(samples)

    def ci(fn: Callable[[np.ndarray], float]) -> tuple[float, float] | None:
        return M.bootstrap(fn, m, n_boot, seed) if n_boot > 0 else None

    def ratio_of_sums(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda i: float(a[i].sum() / b[i].sum()) if b[i].sum() > 0 else float("nan")

    out: dict[str, Any] = {
        "ppl": M.pooled_ppl(nll, n),
        "ppl_ci": ci(lambda i: M.pooled_ppl(nll[i], n[i])),
        "ppl_per_sample_mean": float(np.nanmean(per_ppl)) if m else float("nan"),
        "ppl_per_sample_median": float(np.nanmedian(per_ppl)) if m else float("nan"),
        "scored_tokens": int(n.sum()),
    }
    if steps.sum() > 0:
        out["kl"] = float(kl.sum() / steps.sum())
        out["kl_ci"] = ci(ratio_of_sums(kl, steps))
        out["top1"] = float(hits.sum() / steps.sum())
        out["top1_ci"] = ci(ratio_of_sums(hits, steps))
    for name in ("rouge_l", "exact_match"):
        vals = [getattr(getattr(s, side), name) for s in samples]
        if any(v is not None for v in vals):
            arr = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
            out[name] = float(np.nanmean(arr))
            out[f"{name}_ci"] = ci(lambda i, arr=arr: float(np.nanmean(arr[i])))
    types = [getattr(s, side).kept_by_type_prefill for s in samples]
    if types and all(t is not None for t in types):
        out["kept_by_type_prefill"] = {k: float(np.mean([t[k] for t in types])) for k in TYPE_NAMES}
    prompt = [s.prompt_tokens_by_type for s in samples]
    if prompt and all(p is not None for p in prompt):
        out["prompt_tokens_by_type"] = {k: float(np.mean([p[k] for p in prompt])) for k in ("text", "image")}
        n_image = sum(p["image"] for p in prompt)
        if n_image > 0 and side == "full":
            out["image_kept_fraction"] = 1.0  # the full cache holds every prompt position
        elif n_image > 0 and "kept_by_type_prefill" in out:
            out["image_kept_fraction"] = float(sum(t["image"] for t in types) / n_image)
    prefill = float(_arr(samples, side, "prefill_s").sum())
    decode = float(_arr(samples, side, "decode_s").sum())
    # decode tokens: every row of a batch advances one token per step
    tokens = int(_arr(samples, side, "decode_steps").sum())
    out.update(
        kept_tokens_prefill=float(_arr(samples, side, "kept_prefill").mean()),
        kept_tokens_end=float(_arr(samples, side, "kept_end").mean()),
        prompt_tokens=float(np.mean([s.prompt_tokens for s in samples])),
        ratio_prefill=float(_arr(samples, side, "ratio_prefill").mean()),
        ratio_end=float(_arr(samples, side, "ratio_end").mean()),
        bytes_prefill=float(_arr(samples, side, "bytes_prefill").mean()),
        bytes_end=float(_arr(samples, side, "bytes_end").mean()),
        allocated_bytes_prefill=float(_arr(samples, side, "allocated_bytes_prefill").mean()),
        allocated_bytes_end=float(_arr(samples, side, "allocated_bytes_end").mean()),
        prefill_s=prefill,
        decode_s=decode,
        decode_tokens=tokens,
        decode_tokens_per_s=tokens / decode if decode > 0 else None,
    )
    return SideMetrics(**out)


def deltas(samples: Sequence[SampleResult], n_boot: int, seed: int) -> dict[str, Delta]:
    """Policy minus full, with paired bootstrap intervals (both sides resampled with the same indices)."""
    m = len(samples)
    out: dict[str, Delta] = {}
    fn, fc = _arr(samples, "full", "nll_sum"), _arr(samples, "full", "scored_tokens")
    pn, pc = _arr(samples, "policy", "nll_sum"), _arr(samples, "policy", "scored_tokens")

    def ci(fn_: Callable[[np.ndarray], float]) -> tuple[float, float] | None:
        return M.bootstrap(fn_, m, n_boot, seed) if n_boot > 0 and m else None

    d_ppl = lambda i: M.pooled_ppl(pn[i], pc[i]) - M.pooled_ppl(fn[i], fc[i])  # noqa: E731
    out["ppl"] = Delta(value=d_ppl(np.arange(m)), ci=ci(d_ppl))
    for name in ("rouge_l", "exact_match"):
        a = [getattr(s.policy, name) for s in samples]
        c = [getattr(s.full, name) for s in samples]
        if all(x is not None for x in a + c) and m:
            diff = np.array(a, dtype=np.float64) - np.array(c, dtype=np.float64)
            out[name] = Delta(value=float(diff.mean()), ci=ci(lambda i, d=diff: float(d[i].mean())))
    return out


def running_estimates(samples: Sequence[SampleResult]) -> dict[str, float]:
    if not samples:
        return {}
    out = {
        "ppl": M.pooled_ppl(_arr(samples, "policy", "nll_sum"), _arr(samples, "policy", "scored_tokens")),
        "full_ppl": M.pooled_ppl(_arr(samples, "full", "nll_sum"), _arr(samples, "full", "scored_tokens")),
    }
    steps = _arr(samples, "policy", "steps").sum()
    if steps:
        out["kl"] = float(_arr(samples, "policy", "kl_sum").sum() / steps)
        out["top1"] = float(_arr(samples, "policy", "top1_hits").sum() / steps)
    for name in ("rouge_l", "exact_match"):
        vals = [getattr(s.policy, name) for s in samples if getattr(s.policy, name) is not None]
        if vals:
            out[name] = float(np.mean(vals))
    return out


# ================================================================================================== evaluate
def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=True,
    )


def evaluate(
    spec: EvalSpec,
    callback: Callable[[BatchUpdate], bool | None] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    samples: Sequence[Sample] | None = None,
    policy: CachePolicy | None = None,
    policy_ratio0: CachePolicy | None = None,
) -> EvalResult:
    """Evaluate one policy against the full cache on ``spec.samples`` samples of ``spec.task``.

    ``model``/``tokenizer``, ``samples`` and ``policy``/``policy_ratio0`` may be given directly (tests, custom
    parts); otherwise they come from ``spec``. ``callback`` is called after every batch with a
    :class:`BatchUpdate`; returning ``True`` stops early (``complete=False``), raising aborts."""
    threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _evaluate(spec, callback, model, tokenizer, samples, policy, policy_ratio0)
    finally:
        torch.set_num_threads(threads)


def _evaluate(spec, callback, model, tokenizer, samples, policy, policy_ratio0) -> EvalResult:
    t_start = time.perf_counter()
    from ..core.engine import attach
    from ..hardware import dtype_name
    from ..models import cache_root, model_info

    from .preflight import prepare

    ready = prepare(
        spec, check_model=model is None, need_task=samples is None, policy=policy, policy_ratio0=policy_ratio0
    )
    policy, policy_ratio0 = ready.policy, ready.policy_ratio0
    if model is None:
        model, tokenizer = load_eval_model(spec.model, spec.dtype, spec.device)
    attach(model, backend=spec.backend)
    task_info: dict[str, Any] = {"name": spec.task}
    if samples is None:
        task_info["options"] = ready.options.model_dump()
        samples = ready.task.load(tokenizer, spec.samples, spec.seed, ready.options)
    else:
        samples = list(samples)[: spec.samples]
        task_info["options"] = dict(spec.task_options)
    ctx = make_context(model, tokenizer, spec.kl_topk)
    fingerprint = model_fingerprint(model, spec.model)
    settings = {
        "model": fingerprint,
        "dtype": str(model.dtype),
        "backend": spec.backend,
        "kl_topk": spec.kl_topk,
        "eos": ctx.eos,
        "pad": ctx.pad,
    }
    directory = None
    if spec.use_reference_cache:
        directory = spec.reference_dir or str(cache_root() / "eval_refs")
    store = ReferenceStore(directory, settings)

    with _progress(spec.quiet) as bar:
        ref_task = bar.add_task(f"full cache · {spec.task}", total=len(samples))
        refs = ensure_references(ctx, samples, store, spec.batch_size, progress=lambda k: bar.advance(ref_task, k))
        bar.remove_task(ref_task)

        honesty: dict[str, Any] = {"checked": False, "reason": "disabled (check_ratio0=False)"}
        if spec.check_ratio0:
            assert policy_ratio0 is not None
            memo = json.dumps(
                [fingerprint, policy_document(policy_ratio0), samples[0].content_hash(), settings], default=str
            )
            honesty = ratio0_check(ctx, samples[0], policy_ratio0, memo_key=memo)

        name = policy.name
        pol_task = bar.add_task(f"{name} · {spec.task}", total=len(samples))
        results: list[SampleResult | None] = [None] * len(samples)
        complete = True
        done = 0
        mismatched = 0
        for batch in batches(samples, spec.batch_size):
            group = [samples[i] for i in batch]
            group_refs = [refs[i] for i in batch]
            ids = [s.id for s in group]
            mismatched += sum(r.batch != ids for r in group_refs)
            rows = run_batch(
                ctx, group, policy, [r.target for r in group_refs], group_refs, mode="policy", label=f"policy {name}"
            )
            for i, s, row, ref in zip(batch, group, rows, group_refs):
                results[i] = sample_result(ctx, s, row, ref, spec)
            done += len(batch)
            bar.advance(pol_task, len(batch))
            if callback is not None:
                so_far = [r for r in results if r is not None]
                if callback(BatchUpdate(done, len(samples), so_far, running_estimates(so_far))):
                    complete = False
                    break
    final = [r for r in results if r is not None]
    seed = spec.seed
    res = EvalResult(
        spec=spec,
        policy_name=name,
        policy=policy_document(policy),
        task=task_info,
        model={**model_info(model), "name": spec.model, "fingerprint": fingerprint, "dtype": str(model.dtype)},
        environment=provenance.environment(spec.device),
        full=side_metrics(final, "full", spec.bootstrap, seed),
        policy_metrics=side_metrics(final, "policy", spec.bootstrap, seed),
        delta=deltas(final, spec.bootstrap, seed),
        samples=final,
        honesty=honesty,
        reference={
            "directory": directory,
            "hits": store.hits,
            "computed": store.misses,
            # references computed in another batch composition (e.g. a run with fewer samples): bit-exactness with a
            # ratio-0 policy is only guaranteed for the same composition; the difference is rounding noise
            "other_batch": mismatched,
        },
        complete=complete,
        dtype=dtype_name(model.dtype),
        wall_s=time.perf_counter() - t_start,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return res


__all__ = [
    "BatchUpdate",
    "Delta",
    "EvalError",
    "EvalResult",
    "EvalSpec",
    "HonestyCheckError",
    "NonFiniteError",
    "SampleResult",
    "SampleSide",
    "SideMetrics",
    "batches",
    "build_policy",
    "ensure_references",
    "evaluate",
    "kept_by_type",
    "load_eval_model",
    "make_context",
    "measure",
    "ratio0_check",
    "run_batch",
]
