"""The prefill store: an LRU bounded by bytes with an optional disk spill (kvpolicy.eval.prefill_store).

Checked against a naive LRU written here (a list, most recent last) on random access sequences with random sizes:
same hits, misses, evictions and key order at every step, and never more bytes held than the bound. Spill files
round-trip the tensors exactly; a truncated, foreign or half-written file (a writer killed mid-write) is a miss."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvpolicy.eval import prefill_store as ps
from kvpolicy.eval.prefill_store import PrefillStore


@dataclass
class Fake:
    """A recording of known size: one float32 tensor of ``n`` elements (4 n bytes)."""

    t: torch.Tensor

    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()


def fake(n: int, seed: int = 0) -> Fake:
    return Fake(torch.randn(n, generator=torch.Generator().manual_seed(seed)))


class Counting:
    """``record`` callables that count how often each key was recorded."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes, self.calls = sizes, {}

    def __call__(self, key: str):
        def record() -> Fake:
            self.calls[key] = self.calls.get(key, 0) + 1
            return fake(self.sizes[key], seed=hash(key) % 1000)

        return record


def naive_lru(accesses: list[str], sizes: dict[str, int], bound: int) -> tuple[list[str], int, list[list[str]]]:
    """A list-based LRU: per access 'hit' or 'miss', the evictions, and the keys held (oldest first) after each."""
    held: list[str] = []
    outcome, evictions, orders = [], 0, []
    for key in accesses:
        if key in held:
            held.remove(key)
            held.append(key)
            outcome.append("hit")
        else:
            outcome.append("miss")
            if sizes[key] <= bound:
                while held and sum(sizes[k] for k in held) + sizes[key] > bound:
                    held.pop(0)
                    evictions += 1
                held.append(key)
        orders.append(list(held))
    return outcome, evictions, orders


@pytest.mark.parametrize("seed", range(6))
def test_lru_matches_a_naive_lru_on_random_accesses(seed):
    rng = random.Random(seed)
    keys = [f"batch-{i}" for i in range(8)]
    sizes = {k: rng.randint(1, 50) * 4 for k in keys}  # elements: 4..200 -> 16..800 bytes
    bound = 4 * rng.randint(40, 300)
    accesses = [rng.choice(keys) for _ in range(80)]
    expect, evictions, orders = naive_lru(accesses, {k: 4 * n for k, n in sizes.items()}, bound)
    store: PrefillStore[Fake] = PrefillStore(max_bytes=bound)
    rec = Counting(sizes)
    for key, want, order in zip(accesses, expect, orders):
        before = store.stats()
        value = store.get_or_record(key, rec(key))
        got = "hit" if store.stats().hits > before.hits else "miss"
        assert got == want
        assert value.nbytes() == 4 * sizes[key]
        assert store.keys() == order
        assert store.bytes_held == sum(4 * sizes[k] for k in order) <= bound
    stats = store.stats()
    assert stats.evictions == evictions
    assert stats.misses == expect.count("miss") == sum(rec.calls.values())
    assert stats.hits == expect.count("hit")


def test_lru_order_evicts_least_recently_used_first():
    store: PrefillStore[Fake] = PrefillStore(max_bytes=3 * 400)
    rec = Counting({k: 100 for k in "abcd"})
    for k in "abc":
        store.get_or_record(k, rec(k))
    store.get_or_record("a", rec("a"))  # a becomes the most recent: b is now the oldest
    store.get_or_record("d", rec("d"))
    assert store.keys() == ["c", "a", "d"]
    store.get_or_record("b", rec("b"))  # recorded again (it was discarded: no spill)
    assert rec.calls == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert store.stats().evictions == 2


def test_a_recording_larger_than_the_bound_is_returned_but_not_kept():
    store: PrefillStore[Fake] = PrefillStore(max_bytes=100)
    rec = Counting({"big": 1000, "small": 10})
    store.get_or_record("small", rec("small"))
    assert store.get_or_record("big", rec("big")).nbytes() == 4000
    assert store.keys() == ["small"] and store.stats().too_large == 1
    store.get_or_record("big", rec("big"))
    assert rec.calls["big"] == 2


def test_spill_round_trip_reads_back_the_same_tensors_and_removes_its_directory(tmp_path):
    store: PrefillStore[Fake] = PrefillStore(max_bytes=400, spill=True)
    rec = Counting({"a": 100, "b": 100})
    a = store.get_or_record("a", rec("a"))
    store.get_or_record("b", rec("b"))  # evicts a -> spilled
    spilled = store.path("a")
    assert spilled is not None and spilled.exists() and store.stats().spills == 1
    again = store.get_or_record("a", rec("a"))  # from disk, not recorded again; evicts b -> spilled
    assert rec.calls == {"a": 1, "b": 1}
    assert torch.equal(again.t, a.t) and again.t.dtype == a.t.dtype
    assert store.stats().disk_hits == 1 and store.stats().spills == 2
    store.get_or_record("b", rec("b"))  # a was read from disk: evicting it again writes nothing
    assert store.stats().spills == 2 and rec.calls == {"a": 1, "b": 1}
    directory = spilled.parent
    store.close()
    assert not directory.exists()


def test_a_persistent_directory_is_written_through_and_kept(tmp_path):
    first: PrefillStore[Fake] = PrefillStore(max_bytes=10_000, spill=tmp_path / "spill")
    rec = Counting({"a": 100})
    a = first.get_or_record("a", rec("a"))  # no eviction, but written at once
    first.close()
    assert (tmp_path / "spill").is_dir()
    second: PrefillStore[Fake] = PrefillStore(max_bytes=10_000, spill=tmp_path / "spill")
    b = second.get_or_record("a", rec("a"))
    assert rec.calls == {"a": 1} and torch.equal(a.t, b.t)
    assert second.stats().disk_hits == 1 and second.stats().misses == 0


def test_zero_bytes_keeps_nothing_in_memory_but_the_spill_still_serves(tmp_path):
    store: PrefillStore[Fake] = PrefillStore(max_bytes=0, spill=tmp_path / "s")
    rec = Counting({"a": 10})
    store.get_or_record("a", rec("a"))
    store.get_or_record("a", rec("a"))
    assert store.keys() == [] and rec.calls == {"a": 1} and store.stats().disk_hits == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other key", "empty"])
def test_a_bad_spill_file_is_a_miss_never_an_error(tmp_path, damage):
    spill = tmp_path / "spill"
    store: PrefillStore[Fake] = PrefillStore(max_bytes=10_000, spill=spill)
    rec = Counting({"a": 1000, "b": 1000})
    store.get_or_record("a", rec("a"))
    store.get_or_record("b", rec("b"))
    path_a, path_b = store.path("a"), store.path("b")
    assert path_a is not None and path_b is not None
    data = path_a.read_bytes()
    if damage == "truncated":
        path_a.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path_a.write_bytes(os.urandom(len(data)))
    elif damage == "other key":  # b's file under a's name: loads, but holds another key
        path_a.write_bytes(path_b.read_bytes())
    else:
        path_a.write_bytes(b"")
    fresh: PrefillStore[Fake] = PrefillStore(max_bytes=10_000, spill=spill)
    value = fresh.get_or_record("a", rec("a"))
    assert rec.calls["a"] == 2 and value.nbytes() == 4000
    assert fresh.stats().bad_files == 1 and fresh.stats().misses == 1
    assert fresh.get_or_record("a", rec("a")) is value  # kept in memory now


_CHILD = r"""
import os, sys, time, torch
from dataclasses import dataclass
from kvpolicy.eval.prefill_store import PrefillStore

@dataclass
class Fake:
    t: torch.Tensor
    def nbytes(self):
        return self.t.numel() * 4

where = sys.argv[2]
real_fsync = os.fsync
if where == "before-rename":  # the data is written, the process dies before the file gets its name
    os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))
else:  # dies in the middle of writing the data
    real_save = torch.save
    def save(obj, fh):
        fh.write(b"PK\x03\x04" + os.urandom(4096))
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)
    torch.save = save
store = PrefillStore(max_bytes=10**9, spill=sys.argv[1])
store.get_or_record("a", lambda: Fake(torch.randn(10_000)))
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_a_writer_killed_mid_write_leaves_no_file_that_loads(tmp_path, where):
    spill = tmp_path / "spill"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(spill), where], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        leftovers = list(spill.iterdir())
        assert leftovers and all(p.suffix == ".tmp" for p in leftovers)  # killed while the write is in progress
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    store: PrefillStore[Fake] = PrefillStore(max_bytes=10**6, spill=spill)
    final = store.path("a")
    assert final is not None and not final.exists()
    rec = Counting({"a": 10})
    store.get_or_record("a", rec("a"))
    assert rec.calls == {"a": 1} and store.stats().bad_files == 0 and store.stats().misses == 1


def test_default_bound_is_a_quarter_of_available_memory(monkeypatch):
    class VM:
        available = 12 * (1 << 30)

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM())
    assert ps.default_max_bytes() == 3 * (1 << 30)
    assert PrefillStore().max_bytes == 3 * (1 << 30)
    assert ps.bytes_from_gb(None) == 3 * (1 << 30) and ps.bytes_from_gb(0.5) == 1 << 29


def test_stats_since_counts_one_evaluation():
    store: PrefillStore[Fake] = PrefillStore(max_bytes=10_000)
    rec = Counting({"a": 10, "b": 10})
    store.get_or_record("a", rec("a"))
    before = store.stats()
    store.get_or_record("a", rec("a"))
    store.get_or_record("b", rec("b"))
    assert store.stats().since(before).as_dict() == {**ps.StoreStats().as_dict(), "hits": 1, "misses": 1}


def test_temporary_spill_directory_is_removed_at_exit(tmp_path):
    """A store that spilled to its own temporary directory and was never closed: the directory goes at exit."""
    code = ("import torch\nfrom dataclasses import dataclass\nfrom kvpolicy.eval.prefill_store import PrefillStore\n"
            "@dataclass\nclass F:\n    t: torch.Tensor\n    def nbytes(self): return 40\n"
            "s = PrefillStore(max_bytes=40, spill=True)\ns.get_or_record('a', lambda: F(torch.zeros(10)))\n"
            "s.get_or_record('b', lambda: F(torch.zeros(10)))\np = s.path('a')\nprint(p.parent, p.exists())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    where, existed = done.stdout.split()
    directory = Path(where)
    assert existed == "True"  # a was spilled there while the child ran
    assert directory.name.startswith("kvpolicy-prefill-") and not directory.exists()
