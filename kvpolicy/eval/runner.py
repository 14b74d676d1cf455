"""Orchestration of one evaluation: one policy against the full cache, sample by sample, in left-padded batches.

:func:`evaluate` checks the spec (:mod:`.preflight`), loads the model and the samples, gets the full-cache
reference of every sample (:func:`ensure_references`: from the store, else computed), runs the honesty check
(:mod:`.honesty`), runs the policy batch by batch (:mod:`.protocol`), scores every sample (:mod:`.scoring`) and
aggregates (:mod:`.aggregate`) into an :class:`~.spec.EvalResult`.

The full-cache side of every sample is a :class:`~.references.Reference`, computed with a plain ``DynamicCache`` in
the same batches and cached on disk. Before reporting, the harness runs the policy at ratio 0 on one sample and
requires every logit and the generation to equal the full cache's bit for bit; non-finite logits are an error naming
the sample.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import provenance
from ..core.policy import CachePolicy
from .aggregate import deltas, running_estimates, side_metrics
from .context import Context, load_eval_model, make_context, policy_document, validated_document
from .honesty import ratio0_check
from .prefill_store import PrefillStore, StoreStats, store_for
from .protocol import RowRun, batches, run_policy, run_reference
from .references import Reference, ReferenceStore, model_fingerprint
from .scoring import sample_result
from .spec import BatchUpdate, EvalResult, EvalSpec, PrefillSharing, SampleResult
from .tasks import Sample


# ================================================================================================== references
def reference_from_row(s: Sample, row: RowRun, batch_ids: list[str]) -> Reference:
    """The full cache's row of one sample as the :class:`~.references.Reference` the store keeps."""
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
        rows = run_reference(ctx, group, label="full cache")
        for i, s, row in zip(batch, group, rows):
            ref = reference_from_row(s, row, [g.id for g in group])
            store.put(keys[i], ref)
            refs[i] = ref
        if progress is not None:
            progress(len(missing))
    return refs  # type: ignore[return-value]


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
    prefill_store: PrefillStore | None = None,
) -> EvalResult:
    """Evaluate one policy against the full cache on ``spec.samples`` samples of ``spec.task``.

    ``model``/``tokenizer``, ``samples`` and ``policy``/``policy_ratio0`` may be given directly (tests, custom
    parts); otherwise they come from ``spec``. ``callback`` is called after every batch with a
    :class:`BatchUpdate`; returning ``True`` stops early (``complete=False``), raising aborts.

    ``prefill_store``: recorded prefills shared with other evaluations of the same samples (see
    :func:`evaluate_many`); without one, and with ``spec.share_prefill``, the evaluation makes its own for this call.
    ``spec.share_prefill=False`` runs every prefill directly whatever the store."""
    threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    own = prefill_store is None and spec.share_prefill
    store = (store_for(spec) if own else prefill_store) if spec.share_prefill else None
    try:
        return _evaluate(spec, callback, model, tokenizer, samples, policy, policy_ratio0, store)
    finally:
        torch.set_num_threads(threads)
        if own and store is not None:
            store.close()


def evaluate_many(
    specs: Sequence[EvalSpec],
    *,
    prefill_store: PrefillStore | None = None,
    on_result: Callable[[int, EvalResult], None] | None = None,
) -> list[EvalResult]:
    """Several evaluations in one process, paying what they have in common once: the model loads once (memoised
    per process), the full-cache references are computed once (cached), and each batch's prefill is recorded once
    and replayed for every policy that can share it (one :class:`~.prefill_store.PrefillStore` for all of them,
    made from the first spec's ``prefill_cache_gb`` / spill settings unless given).

    Typically one spec per policy and ratio on the same model, task and samples::

        base = EvalSpec(model="smollm2-135m", task="needle", samples=8)
        grid = [base.model_copy(update={"policy": p, "ratio": r}) for p in ("h2o", "snapkv") for r in (0.5, 0.9)]
        results = evaluate_many(grid)

    Every spec is checked (:func:`~.preflight.prepare`) before the first one runs. ``on_result(i, result)`` is
    called as each finishes. A spec with ``share_prefill=False`` runs directly (the numbers agree: bit for bit where
    the replay computes with the direct path's kernel, within float rounding elsewhere — docs/evaluation.md)."""
    from .preflight import prepare

    specs = list(specs)
    for spec in specs:
        prepare(spec)
    store = prefill_store
    own = store is None and any(s.share_prefill for s in specs)
    if own:
        store = store_for(next(s for s in specs if s.share_prefill))
    results: list[EvalResult] = []
    try:
        for i, spec in enumerate(specs):
            results.append(evaluate(spec, prefill_store=store))
            if on_result is not None:
                on_result(i, results[-1])
    finally:
        if own and store is not None:
            store.close()
    return results


@dataclass
class Setup:
    """What an evaluation runs on, once the spec is checked and the model and samples are loaded."""

    spec: EvalSpec
    ctx: Context
    samples: list[Sample]
    policy: CachePolicy
    policy_ratio0: CachePolicy | None
    task_info: dict[str, Any]
    fingerprint: str
    settings: dict[str, Any]  #: what a reference depends on besides the sample (its store key)
    store: ReferenceStore
    reference_dir: str | None  #: as given (or the default under the cache root); None: in memory only
    prefill_store: PrefillStore | None = None  #: recorded prefills shared across evaluations (None: direct path)
    #: why rows of this evaluation ran their own prefill, with counts (filled as the batches run)
    direct_reasons: Counter[str] = field(default_factory=Counter)
    replayed: int = 0  #: rows whose cache was replayed from a recording
    allocation: Counter[str] = field(default_factory=Counter)  #: rows per allocation mode (per-layer, whole-model)


def setup(spec: EvalSpec, model: Any, tokenizer: Any, samples: Sequence[Sample] | None,
          policy: CachePolicy | None, policy_ratio0: CachePolicy | None,
          prefill_store: PrefillStore | None = None) -> Setup:
    """Check the spec before anything loads, then load the model (unless given), attach kvpolicy to it, load the
    samples (unless given) and open the reference store."""
    from ..core.engine import attach
    from ..models import cache_root

    from .preflight import prepare

    ready = prepare(
        spec, check_model=model is None, need_task=samples is None, policy=policy, policy_ratio0=policy_ratio0
    )
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
    # the protocol (docs/evaluation.md): the task's query_aware option (None: the task has none), and how many samples
    # were prefilled as context + appended question; 0 says every prompt ran as one chunk (today's path)
    task_info["query_aware"] = task_info["options"].get("query_aware")
    task_info["question_chunks"] = sum(1 for s in samples if s.question_tokens)
    ctx = make_context(model, tokenizer, spec.kl_topk)
    ctx.prefill_store = prefill_store  # None: every batch prefills directly (share_prefill off)
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
    return Setup(spec, ctx, list(samples), ready.policy, ready.policy_ratio0, task_info, fingerprint, settings,
                 ReferenceStore(directory, settings), directory, prefill_store)


def honesty(run: Setup) -> dict[str, Any]:
    """The ratio-0 check on the first sample, memoised per process under what it depends on (:mod:`.honesty`): once
    per policy for a grid's ratios; every time for a hand-built policy (no document to key it by)."""
    if not run.spec.check_ratio0:
        return {"checked": False, "reason": "disabled (check_ratio0=False)"}
    assert run.policy_ratio0 is not None
    # the full cache's side: the same for every policy of a grid
    where = [run.fingerprint, run.samples[0].content_hash(), run.settings, torch.get_num_threads(), str(run.ctx.device)]
    document = validated_document(run.policy_ratio0)
    memo = None if document is None else json.dumps([document, *where], default=str)
    full = json.dumps(where, default=str)
    return ratio0_check(run.ctx, run.samples[0], run.policy_ratio0, memo_key=memo, full_key=full)


def run_policy_batches(
    run: Setup,
    refs: list[Reference],
    callback: Callable[[BatchUpdate], bool | None] | None,
    advance: Callable[[int], None],
) -> tuple[list[SampleResult], bool, int]:
    """The policy over every batch: per-sample results, whether it ran to the end (a callback may stop it) and how
    many references came from another batch composition."""
    samples, name = run.samples, run.policy.name
    results: list[SampleResult | None] = [None] * len(samples)
    done = mismatched = 0
    for batch in batches(samples, run.spec.batch_size):
        group = [samples[i] for i in batch]
        group_refs = [refs[i] for i in batch]
        mismatched += sum(r.batch != [s.id for s in group] for r in group_refs)
        rows = run_policy(run.ctx, group, run.policy, group_refs, label=f"policy {name}")
        count_sharing(run, rows)
        for i, s, row, ref in zip(batch, group, rows, group_refs):
            results[i] = sample_result(run.ctx, s, row, ref, run.spec)
        done += len(batch)
        advance(len(batch))
        if callback is not None:
            so_far = [r for r in results if r is not None]
            if callback(BatchUpdate(done, len(samples), so_far, running_estimates(so_far))):
                return so_far, False, mismatched
    return [r for r in results if r is not None], True, mismatched


def count_sharing(run: Setup, rows: Sequence[RowRun]) -> None:
    """Tally how each row of a batch got its policy cache: replayed from a recording, or its own prefill (and why)."""
    for row in rows:
        if row.prefill_shared:
            run.replayed += 1
        elif run.prefill_store is None:
            run.direct_reasons["share_prefill is off"] += 1
        else:
            run.direct_reasons[row.prefill_reason or "not shared"] += 1
        if row.allocation is not None:
            run.allocation[row.allocation] += 1


def sharing_report(run: Setup, before: StoreStats | None) -> PrefillSharing:
    """The result's account of the prefills: rows replayed and direct (with reasons), the store's counters."""
    store = run.prefill_store
    return PrefillSharing(
        enabled=run.spec.share_prefill,
        replayed=run.replayed,
        direct=sum(run.direct_reasons.values()),
        reasons=dict(run.direct_reasons),
        allocation=dict(run.allocation),
        store=store.stats().since(before).as_dict() if store is not None and before is not None else None,
    )


def _evaluate(spec, callback, model, tokenizer, samples, policy, policy_ratio0, prefill_store) -> EvalResult:
    t_start = time.perf_counter()
    from ..hardware import dtype_name
    from ..provenance import model_info

    run = setup(spec, model, tokenizer, samples, policy, policy_ratio0, prefill_store)
    before = prefill_store.stats() if prefill_store is not None else None
    with _progress(spec.quiet) as bar:
        ref_task = bar.add_task(f"full cache · {spec.task}", total=len(run.samples))
        refs = ensure_references(
            run.ctx, run.samples, run.store, spec.batch_size, progress=lambda k: bar.advance(ref_task, k)
        )
        bar.remove_task(ref_task)
        checked = honesty(run)
        pol_task = bar.add_task(f"{run.policy.name} · {spec.task}", total=len(run.samples))
        final, complete, mismatched = run_policy_batches(run, refs, callback, lambda k: bar.advance(pol_task, k))
    model = run.ctx.model
    seed = spec.seed
    return EvalResult(
        spec=spec,
        policy_name=run.policy.name,
        policy=policy_document(run.policy),
        task=run.task_info,
        model={**model_info(model), "name": spec.model, "fingerprint": run.fingerprint, "dtype": str(model.dtype)},
        environment=provenance.environment(spec.device),
        full=side_metrics(final, "full", spec.bootstrap, seed),
        policy_metrics=side_metrics(final, "policy", spec.bootstrap, seed),
        delta=deltas(final, spec.bootstrap, seed),
        samples=final,
        honesty=checked,
        reference={
            "directory": run.reference_dir,
            "hits": run.store.hits,
            "computed": run.store.misses,
            # references computed in another batch composition (e.g. a run with fewer samples): bit-exactness with a
            # ratio-0 policy is only guaranteed for the same composition; the difference is rounding noise
            "other_batch": mismatched,
        },
        complete=complete,
        prefill=sharing_report(run, before),
        dtype=dtype_name(model.dtype),
        wall_s=time.perf_counter() - t_start,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


__all__ = [
    "Setup",
    "count_sharing",
    "ensure_references",
    "evaluate",
    "evaluate_many",
    "load_eval_model",
    "reference_from_row",
    "setup",
    "sharing_report",
]
