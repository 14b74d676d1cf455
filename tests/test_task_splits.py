"""Dev/test splits of the tasks (``split: all | dev | test``): a fixed partition by sample id (data files) or by the
needles a generator draws (needle, ruler), never by seed.

Checked against a naive recomputation of the rule (SHA-256 of the id / the needles), on many samples and several
seeds: the splits share no id and no needle (so no needle/haystack pair), together they are the whole pool, ``all`` is
the pool drawn as before, and a split's sample equals the ``all`` sample of its position when that one's needles fall
in the split. Generators are also run with a content space shrunk to a handful of needles, where a split by seed would
certainly repeat needles across the two splits.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from kvpolicy.eval.tasks import TaskError, get_task
from kvpolicy.eval.tasks import ruler_gen
from kvpolicy.eval.tasks.base import read_data
from kvpolicy.eval.tasks.ruler import needle_key
from kvpolicy.eval.tasks.split import DEV_FRACTION
from kvpolicy.eval.tasks.text import Needle


@pytest.fixture(scope="module")
def tok():
    """The default model's own tokenizer (SmolLM2-135M-Instruct, from kvpolicy's model cache)."""
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


def naive_split(key: str) -> str:
    """The documented rule, written out again: dev when the first 8 bytes of SHA-256 fall in the first half."""
    h = int(hashlib.sha256(("kvpolicy-split/" + key).encode()).hexdigest()[:16], 16)
    return "dev" if h < DEV_FRACTION * 16**16 else "test"


def load(tok, name, samples, seed=0, **opts):
    task = get_task(name)
    return task.load(tok, samples, seed, task.options(opts))


# ====================================================================================================== data files
@pytest.mark.parametrize("name, kind", [("continuation", "all"), ("continuation", "prose"), ("instruct", "code")])
def test_data_tasks_split_by_a_hash_of_the_id(tok, name, kind):
    rows = [r for r in read_data(name) if kind in ("all", r["kind"])]
    expected = {s: {r["id"] for r in rows if naive_split(r["id"]) == s} for s in ("dev", "test")}
    assert expected["dev"] and expected["test"]
    got = {}
    for split in ("dev", "test"):
        ids = [x.id for x in load(tok, name, len(expected[split]), seed=0, kind=kind, split=split)]
        assert len(set(ids)) == len(ids)
        got[split] = set(ids)
        with pytest.raises(TaskError, match="asked for"):  # the split holds exactly its rows, no more
            load(tok, name, len(expected[split]) + 1, kind=kind, split=split)
        # another seed draws other rows of the same split, never one of the other split
        other = {x.id for x in load(tok, name, 10, seed=7, kind=kind, split=split)}
        assert other <= expected[split]
    assert got == expected
    assert got["dev"] | got["test"] == {r["id"] for r in rows}


def test_split_all_is_the_seeded_permutation_of_every_row(tok):
    """``all``: the first n of the pool shuffled by ``random.Random('<data>-<kind>-<seed>')`` (the draw documented in
    kvpolicy.eval.tasks), as before splits existed; a split's draw is nested too."""
    rows = read_data("continuation")
    order = list(range(len(rows)))
    random.Random("continuation-all-3").shuffle(order)
    assert [s.id for s in load(tok, "continuation", 12, seed=3)] == [rows[i]["id"] for i in order[:12]]
    small = [s.id for s in load(tok, "continuation", 5, seed=3, split="dev")]
    assert [s.id for s in load(tok, "continuation", 12, seed=3, split="dev")][:5] == small


def test_jsonl_splits_its_rows_by_id(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}", "answer": f"a{i}", "id": f"q{i}"}) + "\n"
                            for i in range(60)))
    expected = {s: {f"q{i}" for i in range(60) if naive_split(f"q{i}") == s} for s in ("dev", "test")}
    for split in ("dev", "test"):
        ids = {x.id for x in load(tok, "jsonl", len(expected[split]), path=str(path), split=split)}
        assert ids == expected[split]
        in_order = [x.id for x in load(tok, "jsonl", 4, path=str(path), split=split, shuffle=False)]
        assert in_order == [f"q{i}" for i in range(60) if naive_split(f"q{i}") == split][:4]


# ====================================================================================================== generators
def decode_needles(tok, samples, needles_of):
    out = []
    for s in samples:
        text = tok.decode(s.prompt_ids)
        needles = needles_of(text)
        assert needles, text[:200]
        hay = text
        for n in needles:
            hay = hay.replace(n, "")
        out.append((s.id, frozenset(needles), hay))
    return out


def magic_needles(text: str) -> list[str]:
    return sorted(set(re.findall(r"One of the special magic numbers for \S+ is: \d+\.", text)))


def vt_needles(text: str) -> list[str]:
    return sorted(set(re.findall(r"VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\.", text)))


def check_disjoint(dev, test, n):
    assert len(dev) == len(test) == n
    for what, i in (("id", 0), ("needles", 1)):
        shared = {x[i] for x in dev} & {x[i] for x in test}
        assert not shared, f"shared {what}: {sorted(shared)[:3]}"
    assert not {(x[1], x[2]) for x in dev} & {(x[1], x[2]) for x in test}


@pytest.mark.parametrize("variants, needles_of", [(["single", "multikey"], magic_needles), (["vt"], vt_needles)])
def test_needle_splits_never_share_a_needle(tok, variants, needles_of):
    opts = {"variants": variants, "keys": 3}
    n = 150
    dev = decode_needles(tok, load(tok, "needle", n, split="dev", **opts), needles_of)
    test = decode_needles(tok, load(tok, "needle", n, split="test", **opts), needles_of)
    check_disjoint(dev, test, n)
    for split, drawn in (("dev", dev), ("test", test)):
        assert all(naive_split("\n".join(sorted(x[1]))) == split for x in drawn)


def test_a_tiny_needle_space_still_splits_cleanly(tok, monkeypatch):
    """Five keys and two values: ten possible needles. 150 samples per split draw all of their split's needles (a
    split by seed would share most of them); the hash sends each needle to one split only."""
    def tiny_single(self, rng, options):
        key, value = rng.choice(["k1", "k2", "k3", "k4", "k5"]), rng.choice(["1111111", "2222222"])
        return ([f"One of the special magic numbers for {key} is: {value}."], f"What is the number for {key}?",
                f"The number for {key} is", [value])

    monkeypatch.setattr(Needle, "_single", tiny_single)
    dev = decode_needles(tok, load(tok, "needle", 150, variants=["single"], split="dev"), magic_needles)
    test = decode_needles(tok, load(tok, "needle", 150, variants=["single"], split="test"), magic_needles)
    check_disjoint(dev, test, 150)
    assert {x[1] for x in dev} | {x[1] for x in test} == {
        frozenset([f"One of the special magic numbers for k{k} is: {v}."]) for k in range(1, 6)
        for v in ("1111111", "2222222")}


def test_a_split_sample_is_the_all_sample_when_its_needles_fall_in_the_split(tok):
    every = load(tok, "needle", 30)
    dev = load(tok, "needle", 30, split="dev")
    test = load(tok, "needle", 30, split="test")
    magic = [magic_needles(tok.decode(s.prompt_ids)) or vt_needles(tok.decode(s.prompt_ids)) for s in every]
    for i, s in enumerate(every):
        assert s.id == f"needle-{['single', 'multikey', 'vt'][i % 3]}-0-{i:04d}"  # today's ids
        same = dev[i] if naive_split("\n".join(magic[i])) == "dev" else test[i]
        assert same.prompt_ids == s.prompt_ids and same.answers == s.answers and same.id != s.id


@pytest.fixture
def tiny_ruler_space(monkeypatch):
    """Ruler's word keys and number values shrunk to 4 x 2: eight possible niah needles."""
    monkeypatch.setattr(ruler_gen, "key_words", lambda: ("alpha-key", "beta-key", "gamma-key", "delta-key"))
    monkeypatch.setattr(ruler_gen, "random_number", lambda rng: rng.choice(["3333333", "4444444"]))


def test_ruler_splits_never_share_a_needle(tok, tiny_ruler_space):
    def needles(text):
        return sorted(set(re.findall(r"One of the special magic numbers for \S+ is: \d+\.", text)))

    opts = {"context_tokens": 256, "tasks": ["niah_single_1"]}
    dev = decode_needles(tok, load(tok, "ruler", 60, split="dev", **opts), needles)
    test = decode_needles(tok, load(tok, "ruler", 60, split="test", **opts), needles)
    check_disjoint(dev, test, 60)
    assert len({x[1] for x in dev} | {x[1] for x in test}) == 8


def test_every_ruler_task_puts_each_sample_in_the_split_of_its_needles(tok):
    """One sample per task and split at 1k tokens: the ids carry the split, the needle key (niah needles, vt chain,
    cwe / fwe answer words) hashes into it, and no key is in both."""
    task = get_task("ruler")
    options = {s: task.options({"context_tokens": 1024, "split": s}) for s in ("dev", "test")}
    keys = {}
    for split, opts in options.items():
        samples = task.load(tok, 11, 0, opts)
        for s in samples:
            assert s.id.startswith(f"ruler-{s.kind}-0-{split}-")
            drawn, _ = ruler_split_draw(task, s.kind, opts)
            key = needle_key(drawn[0])
            assert naive_split(key) == split
            assert all(a in tok.decode(s.target_ids) for a in s.answers)
            keys.setdefault(split, set()).add(key)
    assert not keys["dev"] & keys["test"]


def ruler_split_draw(task, kind, opts):
    from kvpolicy.eval.tasks.split import draw_in_split

    return draw_in_split(opts.split, f"ruler-{kind}-0-0", lambda r: task.draw(kind, r, opts),
                         lambda d: needle_key(d[0]))


# ========================================================================================================= options
def test_a_bad_split_names_the_field_and_the_allowed_values():
    from kvpolicy.sweep import HarnessEvaluator

    issues = HarnessEvaluator.check("smollm2-135m", {"name": "needle", "split": "train"}, 4, ["ppl"])
    assert [i.path for i in issues] == ["task.split"]
    assert "'all', 'dev' or 'test'" in issues[0].message


def test_the_split_is_in_the_options_recorded_and_in_the_sweep_fingerprint():
    from kvpolicy.sweep import load_sweep

    assert get_task("ruler").options({"split": "test"}).model_dump()["split"] == "test"
    assert get_task("continuation").options({}).model_dump()["split"] == "all"

    def fingerprint(task):
        return load_sweep({"name": "f", "task": task, "policy": {"preset": "elastic"},
                           "space": {"ratio": {"type": "float", "low": 0.5, "high": 0.9}}, "objectives": ["ppl"]},
                          deep=False).fingerprint()

    dev = fingerprint({"name": "continuation", "split": "dev"})
    assert dev["task"]["split"] == "dev"
    assert fingerprint({"name": "continuation", "split": "all"}) == fingerprint({"name": "continuation"})
    assert fingerprint({"name": "continuation", "split": "test"}) != dev
