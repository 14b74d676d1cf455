"""The honesty check: before reporting, the policy at ratio 0 must reproduce the full cache bit for bit.

A policy that removes nothing must leave every logit, the generation and the perplexity exactly as the full cache
has them; if it does not, whatever the evaluation reports mixes the policy's effect with a bug (in a part, in the
cache, in the attention function), so the run stops with :class:`~.spec.HonestyCheckError` instead.

Both sides run directly, never from a replayed prefill (a replay of one recording on both sides would hide a
difference in the prefill). In one process a check is run once per *key* and its verdict reused: the key holds
everything the check's numbers depend on — the ratio-0 policy's validated document (every part and parameter), the
sample, the model's weights, dtype, backend and device, the thread count (float rounding) and the protocol's settings.
The cell's ratio is not in it because the check never sees it: every cell of one policy builds the same ratio-0
policy (``build_policy(policy, 0.0, overrides)``), so a grid's second and third ratios would rerun the identical
computation and get the identical bits. A hand-built policy has no document (:func:`~.context.validated_document`):
two of them could not be told apart, so it is checked every time. The full cache's side is keyed without the policy
and shared by every policy of a grid.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..core.policy import CachePolicy
from . import metrics as M
from .context import Context
from .protocol import RowRun, run_exact
from .spec import HonestyCheckError
from .tasks import Sample

#: passed checks per process (a sweep evaluates the same ratio-0 policy on the same sample many times)
CHECKED: dict[str, dict[str, Any]] = {}
#: the last full-cache side of a check, by ``full_key``: a grid checks several policies against the same full cache
#: on the same sample, and that direct run (a whole prefill of the sample) need not be repeated for each
FULL_RUN: dict[str, RowRun] = {}


def full_side(ctx: Context, sample: Sample, full_key: str | None) -> RowRun:
    """The full cache's exact run of ``sample`` (direct path, batch of one), reused while ``full_key`` is the same."""
    if full_key is not None and full_key in FULL_RUN:
        return FULL_RUN[full_key]
    full = run_exact(ctx, [sample], None, [sample.target_ids], label="ratio-0 check, full cache")[0]
    FULL_RUN.clear()  # one kept: its log-prob rows are vocabulary-sized
    if full_key is not None:
        FULL_RUN[full_key] = full
    return full


def ratio0_check(ctx: Context, sample: Sample, policy0: CachePolicy, memo_key: str | None = None,
                 full_key: str | None = None) -> dict[str, Any]:
    """Run the full cache and the policy at ratio 0 on one sample (batch of one) and require bit-identical logits at
    every teacher-forced and generated step, identical generations (so ROUGE-L 1.0), equal PPL and KL exactly 0.
    Both sides run directly (never a replayed prefill). ``memo_key``: what the whole check depends on (the module
    docstring; ``None``: always run); a passed check under the same key is reused. ``full_key``: what the full-cache
    side depends on; the same key reuses the previous check's full-cache run."""
    if memo_key is not None and memo_key in CHECKED:
        return {**CHECKED[memo_key], "memoised": True, "seconds": 0.0}
    t0 = time.perf_counter()
    full = full_side(ctx, sample, full_key)
    target = [full.target]
    pol = run_exact(ctx, [sample], policy0, target, label="ratio-0 check, policy")[0]
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
        "seconds": time.perf_counter() - t0,  #: what this evaluation spent on the check (0 when memoised)
    }
    if problems:
        raise HonestyCheckError(
            f"the policy at ratio 0 does not reproduce the full cache on sample {sample.id}: " + "; ".join(problems)
        )
    if memo_key is not None:
        CHECKED[memo_key] = out
    return out


__all__ = ["CHECKED", "FULL_RUN", "full_side", "ratio0_check"]
