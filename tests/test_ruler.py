"""The ``ruler`` task: each generator against properties recomputed from its text (the answer is in the context, the
asked key / the top words are unique, lengths within 2% of ``context_tokens`` in SmolLM2's tokens), determinism per
seed, RULER's scoring against its own definitions, and the score per task and averaged through ``run``."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from kvpolicy.eval import EvalSpec, evaluate
from kvpolicy.eval import metrics as M
from kvpolicy.eval.aggregate import macro_mean
from kvpolicy.eval.tasks import TaskError, get_task
from kvpolicy.eval.tasks.ruler_text import CWE_TEMPLATE, NIAH_TASKS, RULER_TASKS

ALL = list(RULER_TASKS)


@pytest.fixture(scope="module")
def tok():
    """The default model's own tokenizer (SmolLM2-135M-Instruct, from kvpolicy's model cache; converted once)."""
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


def load(tok, samples, context_tokens, seed=0, **opts):
    task = get_task("ruler")
    return task.load(tok, samples, seed, task.options({"context_tokens": context_tokens, **opts}))


@pytest.fixture(scope="module")
def at_1k(tok):
    return load(tok, 22, 1024)


# ------------------------------------------------------------------------------------------ generators
def check_lengths(tok, samples, context_tokens):
    for s in samples:
        assert 0.98 * context_tokens <= len(s.prompt_ids) <= context_tokens, (s.kind, len(s.prompt_ids))
        # the user turn is context + question, in the prompt as they are
        assert s.context + s.question in tok.decode(s.prompt_ids), s.kind
        assert tok.decode(s.prompt_ids).rstrip().endswith(s.meta["answer_prefix"].strip())


def test_spread_and_lengths_at_1k(tok, at_1k):
    assert [s.kind for s in at_1k] == ALL * 2  # 22 samples, 2 per task, dealt round-robin
    check_lengths(tok, at_1k, 1024)
    for s in at_1k:
        assert s.generate and s.answers and s.match == "all"
        gold = tok.decode(s.target_ids)  # the teacher-forced gold answer holds every answer
        assert all(a in gold for a in s.answers)


def asked_keys(question: str) -> list[str]:
    query = re.search(r" for (.+) mentioned in the provided text\?$", question).group(1)
    return [k for k in re.split(r", and |, ", query)]


@pytest.mark.parametrize("task", list(NIAH_TASKS))
def test_niah_answer_in_context_and_unique(at_1k, task):
    cfg = NIAH_TASKS[task]
    for s in [x for x in at_1k if x.kind == task]:
        keys = asked_keys(s.question)
        assert len(keys) == cfg.num_q
        kind = cfg.value
        for key in keys:
            # the asked key is in exactly num_v needles, and no other line names it
            assert s.context.count(f"One of the special magic {kind} for {key} is: ") == cfg.num_v
            assert s.context.count(key) == cfg.num_v
        assert len(s.answers) == cfg.num_q * cfg.num_v
        found = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.context)
        pairs = {(k, v) for k, v in found if k in keys}
        assert {v for _, v in pairs} == set(s.answers)
        for value in s.answers:  # each gold value once, in its own needle
            assert s.context.count(value) == 1
        if cfg.haystack == "needle":
            assert len(found) > 5 and len({k for k, _ in found}) == len(found)  # distractors, all keys distinct
        if cfg.haystack == "noise":
            assert "The grass is green. The sky is blue." in s.context
        if cfg.value == "uuids":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
                       for a in s.answers)
        singular = cfg.num_q * cfg.num_v == 1
        assert s.question.startswith("What is the special" if singular else "What are all the special")


def test_vt_chain(at_1k):
    for s in [x for x in at_1k if x.kind == "vt"]:
        value = re.search(r"assigned the value (\d+) in the text above", s.question).group(1)
        main = s.context.split("Memorize and track")[-1]  # after RULER's solved in-context example
        names = s.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        assert f"VAR {names[0]} = {value}" in main
        lines = main.splitlines()
        where = [next(i for i, line in enumerate(lines) if line.startswith(f"VAR {n} = ")) for n in names]
        assert where == sorted(where)  # the chain in order
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a}" in main
        # following the assignments from the value finds exactly the answer
        assign = dict(re.findall(r"VAR ([A-Z]+) = (?:VAR )?(\w+)", main))
        holds = {v for v in assign if resolve(assign, v) == value}
        assert holds == set(names)
        assert "Answer: According to the chain(s)" in s.context  # the in-context example, solved


def resolve(assign: dict[str, str], name: str) -> str:
    while name in assign:
        name = assign[name]
    return name


def cwe_counts(context: str) -> Counter:
    listed = context.split(CWE_TEMPLATE[0])[-1]
    return Counter(re.findall(r"\d+\. (\S+)", listed))


@pytest.mark.parametrize("context_tokens, freq, ufreq", [(1024, 6, 1), (4096, 30, 3)])
def test_cwe_top_words_unique(tok, at_1k, context_tokens, freq, ufreq):
    samples = [x for x in at_1k if x.kind == "cwe"] if context_tokens == 1024 else load(tok, 1, 4096, tasks="cwe")
    check_lengths(tok, samples, context_tokens)
    for s in samples:
        counts = cwe_counts(s.context)
        assert {w for w, _ in counts.most_common(10)} == set(s.answers) and len(s.answers) == 10
        assert all(counts[w] == freq for w in s.answers)
        assert max(c for w, c in counts.items() if w not in s.answers) == ufreq


def test_fwe_top_words_unique(at_1k):
    for s in [x for x in at_1k if x.kind == "fwe"]:
        coded = s.context.split("coded words. ")[1]
        counts = Counter(w for w in coded.split() if w != "...")
        top = counts.most_common(4)
        assert [w for w, _ in top[:3]] == s.answers and top[2][1] > top[3][1]
        assert Counter(coded.split())["..."] > top[0][1]  # RULER's dots are the most frequent "word"


def test_lengths_at_4k_and_context_apart(tok):
    samples = load(tok, 11, 4096)
    check_lengths(tok, samples, 4096)


def test_deterministic_per_seed_and_nested(tok, at_1k):
    again = load(tok, 11, 1024)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in at_1k[:11]]
    other = load(tok, 11, 1024, seed=1)
    assert sum(a.prompt_ids != b.prompt_ids for a, b in zip(other, at_1k)) == 11
    assert [s.id for s in other] != [s.id for s in at_1k[:11]]


def test_tasks_option_and_errors(tok):
    subset = load(tok, 5, 1024, tasks="vt, cwe")
    assert [s.kind for s in subset] == ["vt", "cwe", "vt", "cwe", "vt"]
    assert [s.kind for s in load(tok, 2, 1024, tasks=["fwe", "niah_single_1"])] == ["fwe", "niah_single_1"]
    task = get_task("ruler")
    with pytest.raises(ValueError, match="tasks"):
        task.options({"tasks": "niah_single_1,qa_1"})
    with pytest.raises(TaskError, match=r"more than the committed data can fill; at most \d+ tokens"):
        load(tok, 1, 60000, tasks="niah_single_2")
    with pytest.raises(TaskError, match="shorter than"):
        load(tok, 1, 256, tasks="vt")


# ------------------------------------------------------------------------------------------ scoring
def ruler_string_match_all(preds, refs):
    """RULER's scripts/eval/synthetic/constants.py, as written there (percent, 2 decimals)."""
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def ruler_string_match_part(preds, refs):
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


CASES = [
    ("The special magic number is 4616605.", ["4616605"]),
    ("they are: ABCDE FGHIJ klmno", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]),
    ("1. apple 2. pear", ["apple", "plum", "cherry"]),
    ("nothing here", ["1234567", "7654321"]),
    ("Answer: 1234567 and 7654321", ["7654321", "1234567"]),
]


def test_string_match_against_ruler_definitions():
    preds, refs = zip(*CASES)
    ours_all = [M.string_match_all(p, r) for p, r in CASES]
    ours_part = [M.string_match_part(p, r) for p, r in CASES]
    assert ours_all == [1.0, 0.75, 1 / 3, 0.0, 1.0] and ours_part == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert round(100 * float(np.mean(ours_all)), 2) == ruler_string_match_all(preds, refs)
    assert round(100 * float(np.mean(ours_part)), 2) == ruler_string_match_part(preds, refs)
    # RULER's average: the mean of the per-task scores, whatever the samples per task
    values = np.array([1.0, 0.0, 0.0, 0.5, 1.0])
    kinds = np.array(["a", "a", "a", "b", "b"])
    assert macro_mean(values, kinds, np.arange(5)) == pytest.approx((1 / 3 + 0.75) / 2)
    assert macro_mean(values, kinds, np.array([3, 4])) == 0.75


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A random-init 2-layer Llama with SmolLM2's vocabulary and tokenizer, saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-ruler")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check_scores(doc: dict):
    assert doc["task"]["name"] == "ruler"
    for side in ("policy_metrics", "full"):
        by = doc[side]["exact_match_by_kind"]
        assert list(by) == ALL
        per = {k: np.mean([s[side.split("_")[0]]["exact_match"] for s in doc["samples"] if s["kind"] == k])
               for k in ALL}
        assert by == pytest.approx(per)
        assert doc[side]["exact_match_macro"] == pytest.approx(np.mean(list(per.values())))
    assert "exact_match_macro" in doc["delta"]


def test_python_api_scores_per_task_and_average(tiny_dir):
    spec = EvalSpec(model=str(tiny_dir), task="ruler", policy="snapkv", ratio=0.5, samples=11, batch_size=4,
                    task_options={"context_tokens": 768, "max_new_tokens": 3}, dtype="float32",
                    use_reference_cache=False, bootstrap=20, quiet=True)
    result = evaluate(spec)
    check_scores(result.model_dump(mode="json"))
    assert all(1 - 0.02 <= s.prompt_tokens / 768 <= 1 for s in result.samples)


def test_cli_run_json_prints_scores(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from kvpolicy import cli

    args = ["run", "--model", str(tiny_dir), "--policy", "snapkv", "--ratio", "0.5", "--task", "ruler",
            "--task-option", "context_tokens=768", "--task-option", "max_new_tokens=3", "--samples", "11",
            "--dtype", "float32", "--output", str(tmp_path / "r.json"), "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    check_scores(doc)


def test_jsonl_answer_is_scored(tiny_dir, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "Say hello.", "answer": "hello"}\n{"prompt": "No answer here."}\n')
    spec = EvalSpec(model=str(tiny_dir), task="jsonl", policy="local", ratio=0.5, samples=2, batch_size=2,
                    task_options={"path": str(path), "shuffle": False, "max_new_tokens": 3}, dtype="float32",
                    use_reference_cache=False, bootstrap=0, quiet=True)
    result = evaluate(spec)
    first, second = result.samples
    generated = first.policy.generation
    assert first.policy.exact_match == float("hello" in generated.lower())
    assert second.policy.exact_match is None
    assert result.policy_metrics.exact_match == first.policy.exact_match


def test_run_table_shows_each_task_and_the_average(tiny_dir):
    from rich.console import Console

    from kvpolicy.cli.evaluate import show_run

    console = Console(record=True, width=160)
    spec = EvalSpec(model=str(tiny_dir), task="ruler", policy="local", ratio=0.5, samples=3, batch_size=4,
                    task_options={"context_tokens": 768, "max_new_tokens": 2, "tasks": "fwe,cwe,vt"},
                    dtype="float32", use_reference_cache=False, bootstrap=10)
    show_run(spec, None, as_json=False, console=console)
    lines = console.export_text().splitlines()
    for label in ("RULER score (mean of the per-task matches)", "match (mean over samples)", "  fwe", "  cwe", "  vt"):
        assert sum(line.lstrip("│ ").startswith(label.strip()) for line in lines) == 1, label
