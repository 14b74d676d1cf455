"""Per-sample results: a batch row of the policy and the sample's full-cache reference become one
:class:`~.spec.SampleResult` with both sides scored the same way (PPL under the chosen protocol, ROUGE-L of the
generation against the full cache's, string match against gold answers by the sample's rule, budget and timing).
"""

from __future__ import annotations

import math

import numpy as np

from . import metrics as M
from .budget import TYPE_NAMES
from .context import Context
from .protocol import RowRun
from .references import Reference
from .spec import EvalSpec, SampleResult, SampleSide
from .tasks import Sample


def side(
    ctx: Context,
    s: Sample,
    row: RowRun | None,
    ref: Reference,
    protocol: str,
    keep_text: bool,
    policy_side: bool,
) -> SampleSide:
    """One sample under one cache: the policy's ``row`` (``policy_side``) or the full cache, i.e. the reference
    itself; ``protocol="authors"`` leaves the last target token unscored in PPL."""
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
            em = M.STRING_MATCH[s.match](text, s.answers)
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
        full=side(ctx, s, None, ref, spec.protocol, spec.keep_generations, policy_side=False),
        policy=side(ctx, s, row, ref, spec.protocol, spec.keep_generations, policy_side=True),
        prefill_shared=row.prefill_shared,
    )


__all__ = ["prompt_types", "sample_result", "side"]
