"""``kvpolicy bench``: what a policy really saves — cache bytes held, prefill time, decode step time, peak memory.

Every figure is measured side by side with the plain ``DynamicCache`` ("full") in one process run, on the same model,
the same prompt and the same device:

* **cache bytes** actually held after prefill and after N decode steps, per layer: :meth:`PolicyCache.nbytes` (the
  allocated key/value buffers, unused slack included) and, for the full cache, the sum of its key/value tensors; next
  to the full cache and to the *budget the policy promises* (entries the budget rule allows, times the bytes of one
  entry, per layer and per kv head);
* **prefill wall time** (median of repeats; the repeats of the full cache and of every policy are interleaved, so slow
  drift of a shared machine hits all of them alike);
* **decode step time** at steady state (median of the per-step times, first steps skipped) and its **growth with the
  generated length** in a long run with a fixed budget (per-step times recorded; flat once the budget is reached);
* the **full-cache decode step at context B** (B = the budget): the physical limit a policy holding B entries can
  reach; measured on a ``DynamicCache`` filled with B random entries per layer (same shapes, same kernels);
* **peak memory** of each configuration: on CPU the process's resident-set high-water mark, reset before the
  configuration through ``/proc/self/clear_refs`` (and glibc told to give freed blocks back, so the delta is the
  configuration's own); on GPU ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* **decode tokens/s** (batch / median step time).

Output: a rich table with ratios to the full cache, a JSON file (written atomically), PNG plots, and the targets
(met / missed). Results record the full spec, the resolved policy documents, package versions and the device.
External results in the same schema (``benchmarks/kvpress_bench.py``) can be merged with ``compare=``.

The package, one job a module: :mod:`.shapes` (built-in model shapes), :mod:`.spec` (the spec and the result
schema), :mod:`.machine` (machine, packages, model), :mod:`.policies` (registered presets / policy files),
:mod:`.memory` (bytes held, peak), :mod:`.measure` (timing one configuration), :mod:`.plan` (calibration and the
time-budget planner), :mod:`.run` (orchestration: :func:`run_bench`), :mod:`.targets`, :mod:`.tables` (rich /
Markdown tables: :func:`render`), :mod:`.plots`, :mod:`.output` (bench.json, tables.md), :mod:`.external` (kvpress
side by side) and :mod:`.command` (:func:`bench_cli` for ``kvpolicy bench``, :func:`main` for
``python -m kvpolicy.bench``).

This module imports nothing heavy: the names below are loaded from their module on first use, so ``kvpolicy --help``
can register the command without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "bench_cli": "command",
    "main": "command",
    "BUILTIN_CONFIGS": "shapes",
    "DEFAULT_CONFIG": "shapes",
    "QUICK_CONFIG": "shapes",
    "SCHEMA": "spec",
    "DEFAULT_POLICIES": "spec",
    "BenchSpec": "spec",
    "BenchResult": "spec",
    "RunResult": "spec",
    "CacheBytes": "spec",
    "LayerBytes": "spec",
    "Target": "spec",
    "budget_tokens": "spec",
    "build_model": "machine",
    "resolve_policy": "policies",
    "default_policies": "policies",
    "policy_doc": "policies",
    "MemoryMeter": "memory",
    "cache_bytes": "memory",
    "run_bench": "run",
    "evaluate_targets": "targets",
    "render": "tables",
    "plot": "plots",
    "load_result": "output",
    "result_json": "output",
    "write_json_atomic": "output",  # kvpolicy.io.write_json_atomic, re-exported by output
    "write_outputs": "output",
    "write_markdown": "output",
    "merge_external": "external",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
