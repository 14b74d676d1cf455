"""The ``continuation`` task's windows: the short ones unchanged, the long ones (``windows=long``) 10k+ tokens, and a
``context_tokens`` the data cannot fill an error naming the maximum (issue 16).

References are independent of the task's code: the committed gzip read directly, the seeded draw and the tokenization
redone here, the maximum recomputed from every window of the pool.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
from importlib import resources

import pytest

from kvpolicy.eval.tasks import TaskError, get_task

#: SHA-256 of the committed short windows (results and cached references depend on these 199 rows: never rebuild it)
SHORT_SHA256 = "3f7715a787966acaf2de6235ab8254a7d6cf7149872948463f8e17e842044569"


def _rows(name: str) -> list[dict]:
    raw = (resources.files("kvpolicy.data") / f"{name}.jsonl.gz").read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []


def _load(tok, samples: int, seed: int = 0, **options):
    t = get_task("continuation")
    return t.load(tok, samples, seed, t.options(options))


def test_the_short_windows_are_the_committed_ones():
    raw = (resources.files("kvpolicy.data") / "continuation.jsonl.gz").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SHORT_SHA256
    rows = _rows("continuation")
    assert len(rows) == 199 and [r["id"] for r in rows] == [f"cont-{i:04d}" for i in range(199)]


@pytest.mark.parametrize(("kind", "seed"), [("all", 0), ("code", 1), ("prose", 3)])
def test_default_samples_and_ids_are_unchanged(tok, kind, seed):
    """The default (``windows=short``) draws exactly what the task drew before the long windows: the seeded
    permutation of the kind's rows, the last ``context_tokens`` tokens of each context, the first target tokens."""
    rows = [r for r in _rows("continuation") if kind in ("all", r["kind"])]
    order = list(range(len(rows)))
    random.Random(f"continuation-{kind}-{seed}").shuffle(order)
    got = _load(tok, 20, seed, kind=kind)
    bos = _bos(tok)
    for s, i in zip(got, order[:20]):
        assert s.id == rows[i]["id"]
        assert s.prompt_ids == bos + _ids(tok, rows[i]["context"])[-(256 - len(bos)) :]
        assert s.target_ids == _ids(tok, rows[i]["continuation"])[:32]


def test_long_windows_hold_ten_thousand_tokens(tok):
    rows = _rows("continuation_long")
    assert len(rows) == 32 and sorted({r["kind"] for r in rows}) == ["code", "prose"]
    assert not {r["id"] for r in rows} & {r["id"] for r in _rows("continuation")}  # ids never collide
    assert min(len(_ids(tok, r["context"])) for r in rows) >= 10_000
    assert min(len(_ids(tok, r["continuation"])) for r in rows) >= 64


def test_long_contexts_nest_across_lengths(tok):
    """With ``windows=long`` every length draws the same windows: a shorter prompt is the end of a longer one, and
    the scored continuation is the same."""
    at_8k, at_2k = _load(tok, 6, windows="long", context_tokens=8192), _load(tok, 6, windows="long", context_tokens=2048)
    bos = _bos(tok)
    rows = {r["id"]: r for r in _rows("continuation_long")}
    for a, b in zip(at_8k, at_2k):
        assert a.id == b.id and a.target_ids == b.target_ids and len(a.prompt_ids) == 8192
        assert a.prompt_ids[-(2048 - len(bos)) :] == b.prompt_ids[len(bos) :]
        assert a.prompt_ids[len(bos) :] == _ids(tok, rows[a.id]["context"])[-(8192 - len(bos)) :]


@pytest.mark.parametrize(("windows", "kind"), [("short", "all"), ("short", "code"), ("long", "prose"), ("long", "all")])
def test_a_length_the_data_cannot_fill_is_an_error_naming_the_maximum(tok, windows, kind):
    name = "continuation" if windows == "short" else "continuation_long"
    pool = [r for r in _rows(name) if kind in ("all", r["kind"])]
    most = min(len(_ids(tok, r["context"])) for r in pool) + len(_bos(tok))
    samples = _load(tok, len(pool), windows=windows, kind=kind, context_tokens=most)  # the maximum itself: every window
    assert all(len(s.prompt_ids) == most for s in samples)
    with pytest.raises(TaskError, match=rf"context_tokens={most + 1} .*at most {most} with this tokenizer"):
        _load(tok, 1, windows=windows, kind=kind, context_tokens=most + 1)


def test_the_long_windows_are_what_the_builder_builds():
    """On the CPython the data was built from, the builder rebuilds the committed file (elsewhere: deterministic)."""
    from kvpolicy.eval.build_data import build_long

    first = build_long()
    if sys.version.split()[0] == json.loads((resources.files("kvpolicy.data") / "build_info.json").read_text())["python"]:
        assert [json.loads(json.dumps(r, sort_keys=True)) for r in first] == _rows("continuation_long")
    else:  # another CPython's stdlib differs: the same shape, not the same text, and deterministic
        assert [r["kind"] for r in first] == [r["kind"] for r in _rows("continuation_long")] and build_long() == first
