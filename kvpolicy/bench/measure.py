"""Measuring: the primitives on one model and device (:class:`Runner`: prompts, caches, timed prefill and decode)
and the measurement of each kind of configuration (one context's interleaved repeats, the full cache at context
B, the cache-bytes sweep, the long fixed-budget decode)."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .memory import MemoryMeter, cache_bytes
from .policies import policy_doc, resolve_policy
from .spec import BenchSpec, RunResult, budget_tokens


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def steady(times: Sequence[float]) -> list[float]:
    """Per-step times without the first steps (allocator and kernel warm-up)."""
    skip = min(2, len(times) // 4)
    return list(times[skip:])


class Runner:
    """Measurement primitives on one model and one device.

    Policy caches run through kvpolicy's attention (:func:`kvpolicy.core.engine.attach`); the full cache runs through
    transformers' plain ``sdpa``, as a user without kvpolicy would run it. The runner switches between the two and
    remembers which one is set."""

    def __init__(self, spec: BenchSpec, model: Any, log: Callable[[str], None]):
        from ..core import engine

        self.spec = spec
        self.model = model
        self.log = log
        self.device = torch.device(spec.device)
        self.meter = MemoryMeter(spec.device, spec.measure_memory)
        text = model.config.get_text_config(decoder=True)
        self.vocab = text.vocab_size
        self.kv_heads = getattr(text, "num_key_value_heads", text.num_attention_heads)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.layers = text.num_hidden_layers
        self.q_heads = text.num_attention_heads
        self.dtype = next(model.parameters()).dtype  # what build_model resolved spec.dtype to
        engine.attach(model)  # registers kvpolicy's attention; full-cache runs switch back to plain sdpa
        self.policy_attention = True

    # -------------------------------------------------------------- helpers
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def prompt(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.spec.seed + n)
        return torch.randint(3, self.vocab, (self.spec.batch, n), generator=g).to(self.device)

    def use(self, policy: Any | None) -> None:
        """kvpolicy's attention for a policy cache, transformers' ``sdpa`` for the full cache."""
        from ..core import engine

        want = policy is not None
        if want == self.policy_attention:
            return
        if want:
            engine.attach(self.model)
        elif "text_config" in getattr(self.model.config, "sub_configs", {}):
            self.model.set_attn_implementation({"text_config": "sdpa"})
        else:
            self.model.set_attn_implementation("sdpa")
        self.policy_attention = want

    def new_cache(self, policy: Any | None):
        from transformers import DynamicCache

        from ..core.engine import make_cache

        self.use(policy)
        if policy is None:
            return DynamicCache(config=self.model.config)
        return make_cache(self.model, policy)

    def prefill(self, ids: torch.Tensor, cache: Any) -> tuple[float, torch.Tensor]:
        self.sync()
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        self.sync()
        return time.perf_counter() - t0, tok

    def decode(self, cache: Any, tok: torch.Tensor, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    def random_full_cache(self, length: int):
        """A ``DynamicCache`` holding ``length`` random entries per layer: the full cache at context B."""
        from transformers import DynamicCache

        self.use(None)
        cache = DynamicCache(config=self.model.config)
        g = torch.Generator().manual_seed(self.spec.seed)
        for i in range(self.layers):
            shape = (self.spec.batch, self.kv_heads, length, self.head_dim)
            k = torch.randn(shape, generator=g).to(self.device, self.dtype)
            v = torch.randn(shape, generator=g).to(self.device, self.dtype)
            cache.update(k, v, i)
        return cache


def _set_decode(res: RunResult, times: list[float], batch: int) -> None:
    """Per-step times, their steady median and tokens/s into ``res``."""
    res.decode_step_s = times
    res.decode_steps = len(times)
    res.decode_median_s = median(steady(times))
    res.decode_tokens_per_s = batch / res.decode_median_s if res.decode_median_s else None


def _policy_run(name: str, kind: str, ratio: float, n: int, stats: dict[str, bool], **fields: Any) -> RunResult:
    """A result for policy ``name`` at ``ratio`` after an ``n``-token prompt (B = its budget at ``n``)."""
    return RunResult(
        policy=name,
        kind=kind,
        ratio=ratio,
        context=n,
        budget_tokens=budget_tokens(n, ratio),
        attention_stats=stats.get(name, False),
        **fields,
    )


def _measure_once(runner: Runner, res: RunResult, ids: torch.Tensor, rep: int, reps: int) -> None:
    """Repeat ``rep`` of one configuration: a timed prefill; on the last repeat also the bytes, the decode steps and
    the peak memory (measured from just before the cache is made)."""
    last = rep == reps - 1
    name, ratio, n = res.policy, res.ratio, res.context
    policy = None if name == "full" else resolve_policy(name, ratio)
    gc.collect()
    if last:
        runner.meter.start()
    cache = runner.new_cache(policy)
    dt, tok = runner.prefill(ids, cache)
    res.prefill_s.append(dt)
    runner.log(
        f"context {n:>6} {name:>14} ratio {ratio if ratio is not None else '-':>4} "
        f"prefill {dt:8.3f} s (repeat {rep + 1}/{reps})"
    )
    if not last:
        return
    res.bytes_prefill = cache_bytes(cache, promised=policy is not None)
    times = runner.decode(cache, tok, runner.spec.steps or 0)
    res.bytes_decode = cache_bytes(cache, len(times), promised=policy is not None)
    res.peak_bytes, res.peak_delta_bytes = runner.meter.stop()
    _set_decode(res, times, runner.spec.batch)
    if res.decode_median_s:
        runner.log(f"context {n:>6} {name:>14} decode {1e3 * res.decode_median_s:8.2f} ms/step")


def measure_context(
    runner: Runner,
    n: int,
    policies: list[str],
    reps: int,
    stats: dict[str, bool],
    docs: dict[str, dict[str, Any]],
) -> list[RunResult]:
    """The full cache and every policy x ratio at context ``n``; the repeats are interleaved (full, p1, p2, ...,
    full, p1, ...) so that drift of a shared machine hits all of them alike."""
    spec = runner.spec
    ids = runner.prompt(n)
    configs: list[tuple[str, float | None]] = [("full", None)] + [(p, r) for p in policies for r in spec.ratios]
    results = [
        RunResult(
            policy=name,
            ratio=ratio,
            context=n,
            budget_tokens=n if ratio is None else budget_tokens(n, ratio),
            attention_stats=stats.get(name, False),
            policy_doc=docs.get(name),
        )
        for name, ratio in configs
    ]
    for rep in range(reps):
        for res in results:
            _measure_once(runner, res, ids, rep, reps)
    for res in results:
        res.prefill_median_s = median(res.prefill_s)
    return results


def measure_baseline(runner: Runner, n: int, ratio: float) -> RunResult:
    """The physical limit of a policy keeping B entries at context ``n``: the full cache holding B random entries."""
    spec = runner.spec
    b = budget_tokens(n, ratio)
    gc.collect()
    cache = runner.random_full_cache(b)
    times = runner.decode(cache, runner.prompt(1), spec.steps or 0)
    res = RunResult(
        policy="full",
        kind="baseline-at-budget",
        ratio=ratio,
        context=b,
        budget_tokens=b,
        notes=[f"DynamicCache filled with {b} random entries per layer (the budget at context {n})"],
    )
    _set_decode(res, times, spec.batch)
    if res.decode_median_s:
        runner.log(f"full cache at context B={b:>6}: decode {1e3 * res.decode_median_s:8.2f} ms/step")
    return res


def measure_sweep(runner: Runner, nb: int, policies: list[str], stats: dict[str, bool]) -> list[RunResult]:
    """Cache bytes vs ratio at prompt ``nb``: after prefill and after ``spec.bytes_steps`` decode steps."""
    spec = runner.spec
    ids = runner.prompt(nb)
    runs = []
    for name in policies:
        for ratio in spec.bytes_ratios or []:
            cache = runner.new_cache(resolve_policy(name, ratio))
            _, tok = runner.prefill(ids, cache)
            res = _policy_run(name, "bytes-sweep", ratio, nb, stats, bytes_prefill=cache_bytes(cache))
            if spec.bytes_steps:
                runner.decode(cache, tok, spec.bytes_steps)
                res.decode_steps = spec.bytes_steps
                res.bytes_decode = cache_bytes(cache, spec.bytes_steps)
            runs.append(res)
            del cache
    runner.log(f"cache-bytes sweep done ({len(policies)} policies x {len(spec.bytes_ratios or [])} ratios at {nb})")
    return runs


def measure_long(runner: Runner, name: str, n: int, long_steps: int, stats: dict[str, bool]) -> RunResult:
    """Decode step time vs generated length with a fixed budget (``decode_budget: fixed``): flat once it is full."""
    spec = runner.spec
    ratio = spec.ratios[0]
    policy = resolve_policy(name, ratio, decode_budget="fixed")
    cache = runner.new_cache(policy)
    _, tok = runner.prefill(runner.prompt(n), cache)
    t0 = time.perf_counter()
    times = runner.decode(cache, tok, long_steps)
    res = _policy_run(
        name,
        "long-decode",
        ratio,
        n,
        stats,
        policy_doc=policy_doc(policy),
        bytes_decode=cache_bytes(cache, len(times)),
        notes=["decode_budget: fixed"],
    )
    _set_decode(res, times, spec.batch)
    if long_steps < (spec.long_steps or 0):
        res.notes.append(f"shortened from {spec.long_steps} steps to fit the time budget")
    runner.log(f"long run {name}: {len(times)} steps in {time.perf_counter() - t0:.1f} s")
    return res
