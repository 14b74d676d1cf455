"""Orchestration of ``kvpolicy bench``: resolve the policies, build the model, calibrate and plan the run into its
time budget, measure every planned configuration side by side with the full cache (checkpointing the partial
result as it goes), then merge other frameworks' results and evaluate the targets.

Entry point: :func:`run_bench` (library; writes no files: see :func:`~kvpolicy.bench.output.write_outputs`)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from .external import merge_external
from ..provenance import environment
from .machine import build_model, load_warning
from .measure import Runner, measure_baseline, measure_context, measure_long, measure_sweep
from .plan import PlanItem, bytes_context, calibrate, make_plan, plan_lookup
from .policies import default_policies, policy_doc, resolve_policy
from .spec import BenchResult, BenchSpec, RunResult
from .targets import evaluate_targets


class _Run:
    """One run's provenance and what it has measured so far; :meth:`snapshot` makes a (partial) result of it."""

    def __init__(
        self,
        spec: BenchSpec,
        policies: list[str],
        checkpoint: Callable[[BenchResult], None] | None,
        t_start: float,
    ):
        self.t_start = t_start
        self.spec = spec
        self.policies = policies
        self.checkpoint = checkpoint
        self.resolved_spec = spec.model_dump()
        self.resolved_spec["policies"] = policies
        self.env: dict[str, Any] = {}
        self.model_info: dict[str, Any] = {}
        self.runs: list[RunResult] = []
        self.plan: list[PlanItem] = []

    def snapshot(self, partial: bool) -> BenchResult:
        res = BenchResult(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            spec=self.resolved_spec,
            environment=dict(self.env),
            model=self.model_info,
            runs=list(self.runs),
            plan=[it.model_dump() for it in self.plan],
            partial=partial,
        )
        res.targets = evaluate_targets(res)
        res.wall_s = time.perf_counter() - self.t_start
        return res

    def save(self) -> None:
        """Hand the partial result to the checkpoint (``bench_cli`` writes it, so an interrupted run keeps it)."""
        if self.checkpoint is not None:
            self.checkpoint(self.snapshot(partial=True))


def _start(spec: BenchSpec, run: _Run, log: Callable[[str], None]) -> Runner:
    """Threads, the device check, the environment (with a warning when the CPU is already loaded) and the model."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    run.env = environment(spec.device)
    warning = load_warning(run.env)
    if warning:
        run.env["warning"] = warning
        log("warning: " + warning)
    model, run.model_info = build_model(spec)
    runner = Runner(spec, model, log)
    run.env["memory_measure"] = runner.meter.kind if runner.meter.available else "unavailable"
    return runner


def _plan(runner: Runner, run: _Run, needs: dict[str, frozenset], log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate on this machine, plan into the time budget (recorded in the run) and return the plan's lookup."""
    spec = runner.spec
    first = resolve_policy(run.policies[0], spec.ratios[0]) if run.policies else None
    cost, run.env["calibration"] = calibrate(runner, first)
    run.plan.extend(make_plan(spec, run.policies, needs, cost, time.perf_counter() - run.t_start))
    log(
        "plan: "
        + "; ".join(
            f"{'+' if it.included else '-'} {it.item} ~{it.estimate_s:.0f}s" + (f" ({it.reason})" if it.reason else "")
            for it in run.plan
        )
    )
    return plan_lookup(run.plan)


def _measure(runner: Runner, run: _Run, planned: dict[str, Any], stats: dict[str, bool], docs: dict) -> None:
    """Every planned item, in order: the contexts (with the full cache at context B), the bytes sweep, the long
    runs; the partial result is checkpointed after each."""
    spec, log = runner.spec, runner.log
    for n in spec.contexts or []:
        here = planned["policies"].get(n)
        if here is None:
            log(f"context {n}: skipped (time budget)")
            continue
        run.runs.extend(measure_context(runner, n, here, planned["reps"].get(n, 1), stats, docs))
        run.runs.extend(measure_baseline(runner, n, ratio) for ratio in (spec.ratios if here else []))
        run.save()
    if planned["sweep"]:
        run.runs.extend(measure_sweep(runner, bytes_context(spec), run.policies, stats))
        run.save()
    for name, n, long_steps in planned["long"]:
        run.runs.append(measure_long(runner, name, n, long_steps, stats))
        run.save()


def run_bench(
    spec: BenchSpec,
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Measure every configuration of ``spec`` side by side with the full cache; return the result (no files are
    written: see :func:`~kvpolicy.bench.output.write_outputs`). ``checkpoint`` receives the partial result after
    each context, the sweep and each long run (``bench_cli`` writes it to ``bench.json``, so an interrupted run
    keeps what it measured)."""
    t_start = time.perf_counter()
    log = log or (lambda msg: None)
    policies = list(spec.policies) if spec.policies else default_policies(spec.quick)
    docs: dict[str, dict[str, Any]] = {}
    needs: dict[str, frozenset] = {}
    for name in policies:
        p = resolve_policy(name, spec.ratios[0])  # fail early, before the model loads
        needs[name] = frozenset(p.prefill_needs())
        docs[name] = policy_doc(p)
    stats = {name: bool(needs[name]) for name in policies}
    run = _Run(spec, policies, checkpoint, t_start)
    runner = _start(spec, run, log)
    with torch.inference_mode():
        planned = _plan(runner, run, needs, log)
        gc.collect()
        _measure(runner, run, planned, stats, docs)
    try:
        run.env["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    result = run.snapshot(partial=False)
    for path in spec.compare:
        merge_external(result, path)
    result.targets = evaluate_targets(result)
    result.wall_s = time.perf_counter() - run.t_start
    return result
