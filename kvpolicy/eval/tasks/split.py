"""Development and test splits of a task's samples (the task option ``split: all | dev | test``).

A policy tuned on some samples must be judged on others. Splitting by sampling seed does not do that: two seeds draw
from the same rows (and a generator's seeds can draw the same needle), so a "test" seed shares samples with the "dev"
one. The splits here are a fixed partition of the samples themselves, the same on every machine, for every seed and
sample count:

* **Data files** (``continuation``, ``instruct``, ``jsonl``, ``mmvet``, ``llava_detail``): a row is in ``dev`` when the
  SHA-256 of ``kvpolicy-split/<sample id>`` falls in the first :data:`DEV_FRACTION` (half) of the hash space, else in
  ``test`` (:func:`split_of`); the seeded, nested permutation then draws from that split's rows only.
* **Generators** (``needle``, ``ruler``): the split of a generated sample is the same hash of its *needle key* - the
  text it hides and asks about (the needles, a variable chain, the words to count). Sample ``j`` of a split is the
  first candidate of the generator's stream for position ``j`` (seed label ``L``, then ``L#1``, ``L#2``, ...) whose
  needle key hashes into that split (:func:`draw_in_split`). Two samples with the same needles therefore always fall
  in the same split, whatever their haystack: the two splits cannot produce the same needle/haystack pair.

``split: all`` (the default) is every sample exactly as before splits existed: the same rows, the same candidates
(label ``L``), the same ids. A split's sample ids carry the split's name (``ruler-vt-0-dev-0003``), so ids never
collide between splits either.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from .base import TaskError

__all__ = ["DEV_FRACTION", "MAX_CANDIDATES", "Split", "SplitOption", "draw_in_split", "in_split", "needles_key",
           "split_id", "split_label", "split_of", "split_rows"]

Split = Literal["all", "dev", "test"]
#: the share of the hash space (so, in expectation, of the samples) that is ``dev``; the rest is ``test``
DEV_FRACTION = 0.5
#: candidates a generator may try for one position before giving up (each lands in a split with probability 1/2)
MAX_CANDIDATES = 256

T = TypeVar("T")
R = TypeVar("R")


class SplitOption(BaseModel):
    """The ``split`` option every built-in task has (its options models extend this one)."""

    split: Split = Field(
        default="all",
        description="all: every sample; dev / test: a fixed half of them, by a hash of the sample id (data files) or "
        "of its needles (generated tasks): tune on dev, report on test",
    )


def split_of(key: str) -> Literal["dev", "test"]:
    """The split ``key`` (a sample id or a needle key) belongs to, fixed by a SHA-256 of it."""
    digest = hashlib.sha256(f"kvpolicy-split/{key}".encode()).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < DEV_FRACTION else "test"


def in_split(key: str, split: str) -> bool:
    return split == "all" or split_of(key) == split


def split_rows(rows: Iterable[R], split: str, key: Callable[[R], str]) -> list[R]:
    """The rows of ``split`` (all of them for ``all``), in their order."""
    return [r for r in rows if in_split(key(r), split)]


def split_label(label: str, split: str) -> str:
    """A pool's permutation label for ``split``: unchanged for ``all`` (today's draws), else with the split named."""
    return label if split == "all" else f"{label}-{split}"


def split_id(prefix: str, split: str, index: int) -> str:
    """``<prefix>-NNNN`` for ``all`` (today's ids), ``<prefix>-<split>-NNNN`` for a split."""
    return f"{prefix}-{index:04d}" if split == "all" else f"{prefix}-{split}-{index:04d}"


def draw_in_split(split: str, label: str, draw: Callable[[random.Random], T], needle_key: Callable[[T], str]
                  ) -> tuple[T, random.Random]:
    """``(drawn, rng)``: ``draw`` run on ``random.Random(label)`` for ``all``; for a split, on ``label``, ``label#1``,
    ... until the drawn sample's ``needle_key`` hashes into ``split``. ``rng`` is left where ``draw`` left it, for
    the rest of the sample (haystack position, depths)."""
    for attempt in range(MAX_CANDIDATES):
        rng = random.Random(label if attempt == 0 else f"{label}#{attempt}")
        drawn = draw(rng)
        if in_split(needle_key(drawn), split):
            return drawn, rng
    raise TaskError(f"no sample of split {split!r} in {MAX_CANDIDATES} candidates of {label!r}")


def needles_key(needles: Sequence[str]) -> str:
    """The needle key of a sample made of ``needles``, order ignored."""
    return "\n".join(sorted(needles))

