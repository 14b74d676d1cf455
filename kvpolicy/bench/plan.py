"""Planning a run into a time budget: a cost model calibrated on this machine now, and the planner that keeps, in
priority order, what fits (dropped items are listed in the result's plan)."""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from pydantic import BaseModel, Field

from .measure import Runner, median, steady
from .spec import BenchSpec, budget_tokens

#: estimates are multiplied by this before they are fitted into the budget
SAFETY = 1.25


class PlanItem(BaseModel):
    """One unit of work the planner considered: included or dropped (and why), with its estimated seconds."""

    item: str
    context: int | None = None
    policies: list[str] = Field(default_factory=list)
    estimate_s: float = 0.0
    included: bool = True
    reason: str = ""


class Cost(Protocol):
    """Seconds of one prefill and of one decode step (:class:`CostModel`; tests pass a fake)."""

    def prefill(self, n: int, needs: frozenset = frozenset()) -> float: ...

    def step(self, cache_len: int) -> float: ...


class CostModel:
    """Seconds per prefill / decode step, scaled from calibration measurements of this machine, now.

    Prefill: FLOPs ``2 * params * n`` (matmuls) plus ``2 * Hq * d * n^2`` per layer (causal attention), at the rate
    the calibration prefill of the full cache achieved; plus the policy's attention statistics, ``Hq * q * n``
    elements per layer (``q`` = the window, or every prompt query), at the rate the engine's own
    :func:`~kvpolicy.core.kernels.attention_received` achieved on a calibration block (so the plan follows the engine's
    speed). Decode: bytes read per step, weights plus twice the cache (DynamicCache copies it)."""

    def __init__(self, runner: Runner, n0: int, prefill_s: float, step_s: float, stats_rate: float):
        m = runner.model
        self.params = sum(p.numel() for n, p in m.named_parameters() if "embed" not in n)
        self.wbytes = sum(p.numel() * p.element_size() for p in m.parameters())
        self.L, self.hq, self.d = runner.layers, runner.q_heads, runner.head_dim
        bits = torch.finfo(runner.dtype).bits
        self.kv_per_tok = runner.layers * 2 * runner.kv_heads * runner.head_dim * bits // 8 * runner.spec.batch
        self.n0 = n0
        self.rate = self._flops(n0) / max(prefill_s, 1e-6)
        self.stats_rate = stats_rate
        self.step0 = step_s
        self.bytes0 = self.wbytes + 2 * self.kv_per_tok * n0

    def _flops(self, n: int) -> float:
        return 2.0 * self.params * n + self.L * 2.0 * self.hq * self.d * n * n

    def prefill(self, n: int, needs: frozenset = frozenset()) -> float:
        t = self._flops(n) / self.rate
        for need in needs:
            q = n if need.window is None else min(n, need.window)
            t += self.L * self.hq * q * n / self.stats_rate
        return t

    def step(self, cache_len: int) -> float:
        return self.step0 * (self.wbytes + 2 * self.kv_per_tok * cache_len) / self.bytes0


def stats_rate(runner: Runner) -> float:
    """(query, key, head) elements per second of the engine's attention statistics on this machine."""
    from ..core.kernels import attention_received

    q, p = 1024, 2048
    b, hq, h, d = runner.spec.batch, runner.q_heads, runner.kv_heads, runner.head_dim
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, hq, q, d, generator=g).to(runner.device, runner.dtype)
    key = torch.randn(b, h, p, d, generator=g).to(runner.device, runner.dtype)
    valid = torch.ones(b, h, p, dtype=torch.bool, device=runner.device)
    pos = torch.arange(p, device=runner.device).expand(b, h, p)
    cols = torch.arange(p - q, p, device=runner.device)
    qvalid = torch.ones(b, q, dtype=torch.bool, device=runner.device)
    best = float("inf")
    for _ in range(2):
        runner.sync()
        t0 = time.perf_counter()
        attention_received(query, key, valid, pos, cols, qvalid, d**-0.5, None)
        runner.sync()
        best = min(best, time.perf_counter() - t0)
    return b * hq * q * p / max(best, 1e-6)


def calibrate(runner: Runner, first_policy: Any | None) -> tuple[CostModel, dict[str, float]]:
    """Warm up (kernels, thread pools, allocator: a full and a ``first_policy`` prefill), then time one prefill and
    a few decode steps of the full cache at the smallest context and the engine's statistics kernel. Returns the
    cost model and the calibration figures recorded in the result's environment."""
    spec = runner.spec
    n0 = min(spec.contexts or [1])
    ids = runner.prompt(n0)
    runner.prefill(ids, runner.new_cache(None))
    if first_policy is not None:
        runner.prefill(ids, runner.new_cache(first_policy))
    cache = runner.new_cache(None)
    cal_prefill, tok = runner.prefill(ids, cache)
    cal_steps = steady(runner.decode(cache, tok, 6))
    del cache
    cost = CostModel(runner, n0, cal_prefill, median(cal_steps) or 1e-3, stats_rate(runner))
    calibration = {
        "context": n0,
        "full_prefill_s": cal_prefill,
        "full_decode_step_s": cost.step0,
        "stats_elements_per_s": cost.stats_rate,
    }
    return cost, calibration


def priority(policies: list[str], needs: dict[str, frozenset]) -> list[str]:
    """Order for contexts where not every policy fits: a whole-prompt attention-statistics scorer (the prefill
    target), an attention-free policy, a windowed scorer, then the rest in the order given."""
    heavy = [p for p in policies if any(s.window is None for s in needs[p])]
    free = [p for p in policies if not needs[p]]
    windowed = [p for p in policies if needs[p] and p not in heavy]
    order = heavy[:1] + free[:1] + windowed[:1]
    return order + [p for p in policies if p not in order]


def bytes_context(spec: BenchSpec) -> int:
    """Prompt of the cache-bytes sweep: ``spec.bytes_context``, else 256 or the smallest context if shorter."""
    return spec.bytes_context or min(256, min(spec.contexts or [256]))


class _Planner:
    """Fills the time budget item by item (see :func:`make_plan` for the priorities); ``used`` counts estimated
    seconds with the safety factor."""

    def __init__(self, spec: BenchSpec, policies: list[str], needs: dict[str, frozenset], cost: Cost, spent_s: float):
        self.spec, self.policies, self.needs, self.cost = spec, policies, needs, cost
        self.steps = spec.steps or 0
        self.contexts = list(spec.contexts or [])
        self.budget = None if spec.time_budget_s is None else spec.time_budget_s - spent_s - 10.0
        self.used = 0.0
        self.items: list[PlanItem] = []
        self.order = priority(policies, needs)
        self.firsts: dict[int, str] = {}  # larger context -> the policy that runs there with the full cache

    def fits(self, est: float) -> bool:
        return self.budget is None or self.used + est * SAFETY <= self.budget

    def take(self, item: PlanItem) -> bool:
        if self.fits(item.estimate_s):
            self.used += item.estimate_s * SAFETY
            self.items.append(item)
            return True
        item.included = False
        item.reason = item.reason or "time budget"
        self.items.append(item)
        return False

    def config_s(self, n: int, name: str | None) -> float:
        """One configuration at context ``n``: the full cache (``None``) or a policy at every ratio."""
        if name is None:
            return self.cost.prefill(n) + self.steps * self.cost.step(n)
        return sum(
            self.cost.prefill(n, self.needs[name]) + self.steps * self.cost.step(budget_tokens(n, r))
            for r in self.spec.ratios
        )

    def context_s(self, n: int, name: str | None) -> float:
        """The full cache, ``name`` and the full cache at context B, at context ``n``."""
        baseline = sum(self.steps * self.cost.step(budget_tokens(n, r)) for r in self.spec.ratios)
        return self.config_s(n, None) + (self.config_s(n, name) if name is not None else 0.0) + baseline

    def smallest_context(self) -> None:
        """1. The smallest context: the full cache and every policy, one repeat."""
        n0 = self.contexts[0]
        est = self.context_s(n0, None) + sum(self.config_s(n0, p) for p in self.policies)
        self.take(PlanItem(item="context", context=n0, policies=list(self.policies), estimate_s=est))

    def larger_contexts(self) -> None:
        """2. Each larger context: the full cache with the first policy (in priority order) that fits beside it."""
        for n in self.contexts[1:]:
            first = next((p for p in self.order if self.fits(self.context_s(n, p))), None)
            if first is None:
                est = self.context_s(n, self.order[0]) if self.order else 0.0
                self.take(PlanItem(item="context", context=n, policies=self.order[:1], estimate_s=est))
                continue
            self.firsts[n] = first
            self.take(PlanItem(item="context", context=n, policies=[first], estimate_s=self.context_s(n, first)))

    def long_run(self) -> None:
        """3. The long fixed-budget decode run, shortened (down to 200 steps) if that is what fits."""
        spec, cost = self.spec, self.cost
        if not spec.long_steps or not self.policies:
            return
        n = spec.long_context or self.contexts[0]
        long_pols = spec.long_policies
        if long_pols is None:
            free = [p for p in self.policies if not self.needs[p]]
            long_pols = (free or self.policies)[:1]
        for name in long_pols:
            per_step = cost.step(budget_tokens(n, spec.ratios[0]))
            want = spec.long_steps
            est = cost.prefill(n, self.needs.get(name, frozenset())) + want * per_step
            if not self.fits(est) and self.budget is not None:
                room = (self.budget - self.used) / SAFETY - cost.prefill(n)
                want = int(min(want, room / per_step)) if per_step > 0 else 0
                est = cost.prefill(n) + max(want, 0) * per_step
                if want < 200:
                    want = spec.long_steps
                    est = cost.prefill(n) + want * per_step
            item = PlanItem(item=f"long-decode:{want}", context=n, policies=[name], estimate_s=est)
            if want < spec.long_steps:
                item.reason = f"shortened from {spec.long_steps} steps (time budget)"
            self.take(item)

    def bytes_sweep(self) -> None:
        """4. The cache-bytes sweep: every policy at every sweep ratio."""
        spec = self.spec
        if not spec.bytes_ratios or not self.policies:
            return
        nb = bytes_context(spec)
        one = self.cost.prefill(nb) + spec.bytes_steps * self.cost.step(nb)
        est = len(self.policies) * len(spec.bytes_ratios) * one
        self.take(PlanItem(item="bytes-sweep", context=nb, policies=list(self.policies), estimate_s=est))

    def other_policies(self) -> None:
        """5. The other policies at the larger contexts, in priority order (those ranked before the one that fitted
        did not fit: dropped without trying)."""
        for n, first in self.firsts.items():
            for name in self.order:
                if name == first:
                    continue
                item = PlanItem(item="policy", context=n, policies=[name], estimate_s=self.config_s(n, name))
                if self.order.index(name) < self.order.index(first):
                    item.included, item.reason = False, "time budget"
                    self.items.append(item)
                    continue
                self.take(item)

    def repeats(self) -> None:
        """6. More repeats, smallest context first, of what is included at each context."""
        for rep in range(2, self.spec.repeats + 1):
            for n in self.contexts:
                here = [it for it in self.items if it.included and it.context == n]
                if not any(it.item == "context" for it in here):
                    continue
                pols = [p for it in here if it.item in ("context", "policy") for p in it.policies]
                est = self.cost.prefill(n) + sum(
                    self.cost.prefill(n, self.needs[p]) * len(self.spec.ratios) for p in pols
                )
                self.take(PlanItem(item=f"repeat:{rep}", context=n, policies=pols, estimate_s=est))


def make_plan(
    spec: BenchSpec, policies: list[str], needs: dict[str, frozenset], cost: Cost, spent_s: float
) -> list[PlanItem]:
    """What to run, in priority order, within ``spec.time_budget_s`` (everything when there is no budget).

    Priorities: (1) the full cache and every policy at the smallest context (one repeat); (2) each larger context
    with the full cache and the first policy in :func:`priority` order that fits; (3) the long fixed-budget decode
    run (shortened, down to 200 steps, if that is what fits); (4) the cache-bytes sweep; (5) the other policies at
    the larger contexts; (6) more repeats. Estimates carry a 1.25 safety factor.
    """
    planner = _Planner(spec, policies, needs, cost, spent_s)
    planner.smallest_context()
    planner.larger_contexts()
    planner.long_run()
    planner.bytes_sweep()
    planner.other_policies()
    planner.repeats()
    return planner.items


def plan_lookup(plan: list[PlanItem]) -> dict[str, Any]:
    """The included items by kind: ``policies`` and ``reps`` per context, the ``long`` runs ``(policy, context,
    steps)`` and whether the ``sweep`` runs."""
    pols: dict[int, list[str]] = {}
    reps: dict[int, int] = {}
    long: list[tuple[str, int, int]] = []
    sweep = False
    for it in plan:
        if not it.included:
            continue
        if it.item == "context" and it.context is not None:
            pols[it.context] = list(it.policies)
            reps[it.context] = 1
        elif it.item == "policy" and it.context is not None:
            pols.setdefault(it.context, []).extend(it.policies)
        elif it.item.startswith("repeat:") and it.context is not None:
            reps[it.context] = max(reps.get(it.context, 1), int(it.item.split(":")[1]))
        elif it.item == "bytes-sweep":
            sweep = True
        elif it.item.startswith("long-decode:") and it.context is not None:
            long.extend((p, it.context, int(it.item.split(":")[1])) for p in it.policies)
    return {"policies": pols, "reps": reps, "long": long, "sweep": sweep}
