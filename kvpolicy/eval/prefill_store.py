"""Where recorded prefills wait between the policies that replay them: an in-memory LRU bounded by bytes, with an
optional spill to disk.

Why a store: a grid (``compare``), a study (``sweep``) or an ablation evaluates many policies on the *same* samples,
and a batch's prefill (keys, values, queries of every layer) does not depend on the policy, so it is recorded once and
replayed per policy. The store keeps those recordings between cells or trials, keyed by what the recording depends on
(the protocol builds the key: model, dtype, backend, the batch's samples, the protocol mode).

Memory: a recording holds every layer's keys, values and queries for the whole batch — about 115 KB per prompt token
for SmolLM2-135M in float32 (30 layers x (2 x 3 kv heads + 9 query heads) x 64 x 4 bytes), so 16 samples of 2,048
tokens are ~3.8 GB (a sliding-window layer keeps its window only: :mod:`kvpolicy.core.recording`). The store
therefore keeps at most ``max_bytes`` (default: :func:`default_max_bytes`) and evicts the least recently used
recording first. Evicted recordings are discarded (recorded again when next needed), or, with a spill directory,
written to disk and read back instead of recomputed.

Why LRU and what it cannot do: a grid visits its batches in the same order for every cell, so when the batches of
one cell do not fit in memory, plain LRU evicts each recording just before it is needed again (every lookup misses).
A spill directory turns those misses into disk reads (seconds, against a prefill of minutes at 2k tokens on a CPU).

Files: one per key (``<sha256 of the key>.pt``, the key stored inside and checked on load), written to a temporary
name and renamed, so a killed writer never leaves a file under the final name; a file that does not load (truncated,
corrupt, another key, another format) is a miss, never an error. A spill directory the store made itself is removed
when the store is closed or the process exits; a directory the caller gave is kept, and every new recording is
written to it when it is made (write-through), so a later run — or another process of the same study — reuses it.
The files are ``torch.save`` pickles: give a directory you trust, as for any pickle cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

#: bumped when the file layout changes; a file of another version is a miss
FILE_FORMAT = 1
#: the share of available memory a store takes when no bound is given (see :func:`default_max_bytes`)
DEFAULT_FRACTION = 0.25
_GB = 1 << 30


class Recording(Protocol):
    """What the store keeps: anything that knows its size and survives ``torch.save``/``torch.load``."""

    def nbytes(self) -> int: ...


R = TypeVar("R", bound=Recording)


@dataclass
class StoreStats:
    """Counters of a store since it was made (or of one evaluation: :meth:`StoreStats.since`)."""

    hits: int = 0  #: lookups answered from memory
    disk_hits: int = 0  #: lookups answered from the spill directory
    misses: int = 0  #: lookups that ran the recording (one prefill each)
    evictions: int = 0  #: recordings dropped from memory to stay under the bound
    spills: int = 0  #: recordings written to the spill directory
    bad_files: int = 0  #: spill files that did not load (treated as misses)
    too_large: int = 0  #: recordings bigger than the whole bound (never kept in memory)

    def since(self, before: StoreStats) -> StoreStats:
        """The counts between ``before`` (a :meth:`PrefillStore.stats` snapshot) and these."""
        return StoreStats(**{k: v - getattr(before, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def available_bytes(device: str = "cpu") -> int:
    """Memory free for new allocations where recordings live: the host's available RAM (``MemAvailable``, which
    counts reclaimable page cache), or a CUDA device's free memory."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def default_max_bytes(device: str = "cpu") -> int:
    """A quarter of :func:`available_bytes` when the store is made.

    Why a quarter: the process also holds the model, the batch's activations during a prefill (of the order of the
    recording itself), the policy's cache and its deep copy for generation, and the references; a sweep may run two
    or three worker processes on one machine, each making its own store from what is left. Half would leave too
    little for those; far less would not hold one 2k-token batch of a small model."""
    return int(available_bytes(device) * DEFAULT_FRACTION)


def bytes_from_gb(gb: float | None, device: str = "cpu") -> int:
    """``prefill_cache_gb`` as bytes (``None``: :func:`default_max_bytes`)."""
    return default_max_bytes(device) if gb is None else int(gb * _GB)


class PrefillStore(Generic[R]):
    """Recordings by key: memory first (LRU, at most ``max_bytes``), then the spill directory, else recorded.

    ``spill``: ``False`` discards evicted recordings; ``True`` spills them to a temporary directory removed when the
    store is closed (or the process exits); a path spills to that directory and keeps it (write-through, see the
    module docstring). Safe to share between threads (the bookkeeping is locked; two threads missing the same key
    both record it, and the second one's recording is the one kept)."""

    def __init__(self, max_bytes: int | None = None, spill: bool | str | Path = False, device: str = "cpu") -> None:
        self.max_bytes = default_max_bytes(device) if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._memory: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = StoreStats()
        self.persistent = isinstance(spill, (str, Path)) and not isinstance(spill, bool)
        self._spill_wanted = bool(spill)
        self._dir: Path | None = Path(spill).expanduser() if self.persistent else None  # type: ignore[arg-type]
        self._cleanup: weakref.finalize | None = None
        self._on_disk: set[str] = set()  #: keys with a spill file (written or read by this store)

    # ------------------------------------------------------------------------------------------- the one entry point
    def get_or_record(self, key: str, record: Callable[[], R]) -> R:
        """The recording of ``key``: from memory, else from the spill directory, else ``record()`` (then kept)."""
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self._stats.hits += 1
                return found[0]
        value = self._load(key)
        if value is not None:
            with self._lock:
                self._stats.disk_hits += 1
            self._keep(key, value, on_disk=True)
            return value
        value = record()
        with self._lock:
            self._stats.misses += 1
        if self.persistent:
            self._write(key, value)
        self._keep(key, value, on_disk=self.persistent)
        return value

    # ------------------------------------------------------------------------------------------- bookkeeping
    def _keep(self, key: str, value: R, on_disk: bool) -> None:
        """Put ``value`` in memory (most recent), evicting least recently used recordings to stay under the bound."""
        size = int(value.nbytes())
        evicted: list[tuple[str, Any]] = []
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                self._stats.too_large += 1
                evicted.append((key, value))
            else:
                while self._memory and self._bytes + size > self.max_bytes:
                    k, (v, n) = self._memory.popitem(last=False)
                    self._bytes -= n
                    self._stats.evictions += 1
                    evicted.append((k, v))
                self._memory[key] = (value, size)
                self._bytes += size
        if on_disk:
            self._on_disk.add(key)
        if self._spill_wanted:  # a recording goes to disk once, when first evicted (or made, in a persistent dir)
            for k, v in evicted:
                if k not in self._on_disk:
                    self._write(k, v)

    @property
    def bytes_held(self) -> int:
        """Bytes of the recordings in memory now."""
        return self._bytes

    def keys(self) -> list[str]:
        """Keys in memory, least recently used first."""
        with self._lock:
            return list(self._memory)

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._lock:
            return StoreStats(**asdict(self._stats))

    def describe(self) -> dict[str, Any]:
        """The store's settings and counters, as a result records them."""
        return {"max_bytes": self.max_bytes, "spill": str(self._dir) if self._dir is not None else self._spill_wanted,
                "persistent": self.persistent, "bytes_held": self._bytes, **self.stats().as_dict()}

    def clear(self) -> None:
        """Drop every recording from memory (the spill directory is left as it is)."""
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    def close(self) -> None:
        """Drop the recordings and remove a spill directory the store made itself."""
        self.clear()
        if self._cleanup is not None:
            self._cleanup()

    # ------------------------------------------------------------------------------------------- files
    def path(self, key: str) -> Path | None:
        """The file ``key`` is (or would be) spilled to; ``None`` without a spill directory yet."""
        if self._dir is None:
            return None
        return self._dir / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.pt"

    def _directory(self) -> Path:
        """The spill directory, made on first use (a temporary one is registered for removal at exit)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="kvpolicy-prefill-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def _write(self, key: str, value: Any) -> None:
        """``value`` under ``key``'s file, atomically: a temporary file in the same directory, fsynced, renamed."""
        import torch

        directory = self._directory()
        final = self.path(key)
        assert final is not None
        fd, tmp = tempfile.mkstemp(prefix=final.stem + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"format": FILE_FORMAT, "key": key, "value": value}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            self._on_disk.add(key)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._lock:
            self._stats.spills += 1

    def _load(self, key: str) -> Any | None:
        """The recording spilled under ``key``, or ``None`` (no directory, no file, or a file that does not load)."""
        import torch

        path = self.path(key) if self._spill_wanted else None
        if path is None or not path.exists():
            return None
        try:
            doc = torch.load(path, map_location=None, weights_only=False)
            ok = isinstance(doc, dict) and doc.get("format") == FILE_FORMAT and doc.get("key") == key
        except Exception:  # noqa: BLE001 - truncated, corrupt or unreadable: a miss, never an error
            ok, doc = False, None
        if not ok:
            self._on_disk.discard(key)
            with self._lock:
                self._stats.bad_files += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return doc["value"]


def store_for(spec: Any) -> PrefillStore | None:
    """The store an :class:`~kvpolicy.eval.EvalSpec` asks for (``None`` when ``share_prefill`` is off): its
    ``prefill_cache_gb`` bound and spill settings (a ``prefill_spill_dir`` is kept, ``prefill_spill`` alone uses a
    temporary directory)."""
    if not spec.share_prefill:
        return None
    spill: bool | str = spec.prefill_spill_dir or bool(spec.prefill_spill)
    return PrefillStore(bytes_from_gb(spec.prefill_cache_gb, spec.device), spill=spill, device=spec.device)


__all__ = [
    "DEFAULT_FRACTION",
    "FILE_FORMAT",
    "PrefillStore",
    "Recording",
    "StoreStats",
    "available_bytes",
    "bytes_from_gb",
    "default_max_bytes",
    "store_for",
]

