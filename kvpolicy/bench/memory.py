"""Memory of one configuration: the key/value bytes a cache holds (next to what its budget promises) and the peak
memory of the process or the GPU while the configuration ran."""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .spec import CacheBytes, LayerBytes


# ========================================================================================================== memory
class MemoryMeter:
    """Peak memory of one configuration.

    CPU: the RSS high-water mark never decreases within a process, so before each configuration the meter (1) runs
    the garbage collector and ``malloc_trim(0)``, which hands every free heap page of every glibc arena back to the
    system (otherwise memory freed by the previous configuration stays resident and the next one reuses it without
    raising RSS), (2) *resets* the high-water mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and
    (3) reads the RSS it starts from; the peak is ``VmHWM`` afterwards. glibc's allocation thresholds are left alone:
    forcing ``mmap`` for blocks >= 64 KiB (``mallopt``) made every decode step ~100x slower on this VM. Where the
    reset is impossible, peaks are not reported (never a stale high-water mark). GPU: ``torch.cuda`` peak statistics.
    """

    def __init__(self, device: str, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.kind = "cuda_max_allocated" if device == "cuda" else "rss_hwm"
        self._trim: Callable[[], Any] | None = None
        self.available = enabled and (device == "cuda" or self._setup_cpu())
        self._start = 0

    def _setup_cpu(self) -> bool:
        try:
            libc = ctypes.CDLL("libc.so.6")
            self._trim = lambda: libc.malloc_trim(0)
        except (OSError, AttributeError):
            self._trim = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return
        if self._trim is not None:
            self._trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._start = (_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> tuple[int | None, int | None]:
        """(peak, peak - start) in bytes since :meth:`start`."""
        if not self.available:
            return None, None
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        return peak, peak - self._start


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None



def _promised(layer: Any, generated: int) -> torch.Tensor:
    """Entries per row and kv head that the policy's budget rule lets this layer hold after ``generated`` decode
    steps (int64 [B, H]): the prefill keep grown by one entry per step, less what the budget's own
    :meth:`~kvpolicy.core.budget.Budget.decode_excess` would drop from that holding."""
    held = layer.held()
    keep = layer.prefill_keep
    if keep is None:  # not prefilled
        return held
    keep = keep[:, None].expand_as(held) if keep.dim() == 1 else keep
    grown = keep + generated
    tokens, appended = layer.uncompressed()  # what the budget is a fraction of (a sliding layer: its window)
    if layer.window_size is not None:  # a sliding layer never holds more than the real tokens of its window
        grown = torch.minimum(grown, tokens[:, None])
    if generated == 0 or layer.policy.decode is None:  # no decode scorer: nothing is dropped while decoding
        return grown
    return grown - layer.policy.budget.decode_excess(grown, tokens, layer.prefill_keep, appended)


def _empty(i: int) -> LayerBytes:
    return LayerBytes(layer=i, alloc_bytes=0, used_bytes=0, slots=0, capacity=0)


def _policy_layer_bytes(i: int, layer: Any, generated: int, promised: bool) -> LayerBytes:
    """A :class:`~kvpolicy.core.layer.PolicyLayer`: allocated and used bytes, entries held, and (``promised``) the
    entries and bytes its budget rule allows."""
    if not layer.is_initialized:
        return _empty(i)
    per_slot = layer.slot_nbytes()
    lb = LayerBytes(
        layer=i,
        alloc_bytes=layer.nbytes(),
        used_bytes=layer.length * per_slot,
        slots=layer.length,
        capacity=layer.capacity,
        meta_bytes=layer.meta_nbytes(),
        held=layer.held().tolist(),
    )
    if promised:
        prom = _promised(layer, generated)
        lb.promised = prom.tolist()
        lb.budget_bytes = int(prom.max()) * per_slot if prom.numel() else 0
    return lb


def _plain_layer_bytes(i: int, layer: Any) -> LayerBytes:
    """A transformers cache layer (``DynamicLayer``): its key and value tensors, every slot in use."""
    keys = getattr(layer, "keys", None)
    if not getattr(layer, "is_initialized", False) or keys is None or keys.numel() == 0:
        return _empty(i)
    nb = layer.keys.nbytes + layer.values.nbytes
    n = layer.keys.shape[2]
    return LayerBytes(layer=i, alloc_bytes=nb, used_bytes=nb, slots=n, capacity=n)


def cache_bytes(cache: Any, generated: int = 0, promised: bool = True) -> CacheBytes:
    """Key/value bytes a cache holds, per layer; for a :class:`PolicyCache` also held vs promised entries
    (``generated``: decode steps run since the prefill)."""
    from ..core.layer import PolicyLayer

    layers = [
        _policy_layer_bytes(i, layer, generated, promised)
        if isinstance(layer, PolicyLayer)
        else _plain_layer_bytes(i, layer)
        for i, layer in enumerate(cache.layers)
    ]
    budget = None
    if layers and all(lb.budget_bytes is not None for lb in layers):
        budget = sum(lb.budget_bytes or 0 for lb in layers)
    return CacheBytes(
        total_alloc=sum(lb.alloc_bytes for lb in layers),
        total_used=sum(lb.used_bytes for lb in layers),
        total_meta=sum(lb.meta_bytes for lb in layers),
        budget=budget,
        layers=layers,
    )
