"""The harness side of shared prefills: the settings (EvalSpec, sweep/ablation files, CLI flags), one store per grid,
study or ablation, what results record, and resuming.

Equality of the numbers with and without sharing is checked against the direct path (``share_prefill: false``) on a
tiny GQA model with left-padded batches; the store's counters are checked against the number of batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_checkpoint
from pydantic import BaseModel

import kvpolicy
from kvpolicy.eval import EvalSpec, runner
from kvpolicy.eval.compare import compare, is_done, spec_signature
from kvpolicy.eval.prefill_store import PrefillStore, store_for
from kvpolicy.eval.tasks import Sample, Task, TaskError, get_task, register_task
from kvpolicy.eval.tasks.base import bos_prefix, encode, read_data
from kvpolicy.testing import VOCAB, CharTokenizer, build_model

KVPOLICY = Path(sys.executable).with_name("kvpolicy")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def small_spec(model: Path, tmp: Path, **kw) -> EvalSpec:
    base = dict(model=str(model), task="continuation", task_options={"context_tokens": 40, "target_tokens": 5},
                samples=5, batch_size=2, dtype="float32", bootstrap=0, quiet=True, reference_dir=str(tmp / "refs"))
    return EvalSpec(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ settings
def test_spec_fields_and_the_store_they_ask_for(tmp_path):
    assert EvalSpec().share_prefill is True and EvalSpec().prefill_cache_gb is None
    assert store_for(EvalSpec(share_prefill=False)) is None
    store = store_for(EvalSpec(prefill_cache_gb=0.5))
    assert isinstance(store, PrefillStore) and store.max_bytes == 1 << 29 and not store.persistent
    kept = store_for(EvalSpec(prefill_cache_gb=0, prefill_spill_dir=str(tmp_path / "s")))
    assert kept is not None and kept.persistent and kept.max_bytes == 0
    with pytest.raises(ValueError, match="prefill_cache_gb"):
        EvalSpec(prefill_cache_gb=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        EvalSpec(prefill_spill_dir=str(tmp_path / "file"))


def test_prefill_settings_do_not_change_what_a_cell_or_study_computes():
    a = EvalSpec(policy="h2o", ratio=0.5)
    b = a.model_copy(update={"share_prefill": False, "prefill_cache_gb": 2.0, "prefill_spill": True,
                             "prefill_spill_dir": "/tmp/x"})
    assert spec_signature(a) == spec_signature(b)
    assert spec_signature(a) != spec_signature(a.model_copy(update={"ratio": 0.6}))  # a real difference still counts

    from kvpolicy.sweep import load_sweep
    from kvpolicy.sweep.ablate import _run_key  # noqa: PLC2701 - the cache key is what this test is about
    from kvpolicy.sweep.spec import AblationSpec

    doc = {"name": "s", "evaluator": "harness", "policy": "elastic", "objectives": ["ppl"], "wandb": False,
           "space": {"ratio": {"type": "float", "low": 0.1, "high": 0.5}}, "task": {"name": "continuation"}}
    plain = load_sweep(doc, deep=False)
    shared = load_sweep(doc, {"share_prefill": False, "prefill_cache_gb": 1.5}, deep=False)
    assert shared.task == {"name": "continuation", "share_prefill": False, "prefill_cache_gb": 1.5}
    assert plain.fingerprint() == shared.fingerprint()
    abl = {"name": "a", "evaluator": "synthetic", "base": "elastic", "variants": [{"name": "v", "set": {"ratio": .3}}]}
    one, two = AblationSpec(**abl), AblationSpec(**{**abl, "task": {"share_prefill": False, "prefill_spill": True}})
    assert _run_key(one, {"p": 1}) == _run_key(two, {"p": 1}) != _run_key(one, {"p": 2})


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "KVPOLICY_CACHE": str(cwd / "cache"),
           "COLUMNS": "80"}
    return subprocess.run([str(KVPOLICY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


SWEEP = ("name: s\nmodel: {model}\ntask: {{name: continuation, context_tokens: {ctx}, target_tokens: 4}}\nsamples: 2\n"
         "policy: elastic\nspace: {{ratio: {{type: float, low: 0.1, high: 0.5}}}}\nobjectives: [ppl]\nwandb: false\n")


@pytest.mark.parametrize("args, expected", [
    (["run", "--prefill-cache-gb", "-1"], "error: prefill_cache_gb: -1.0 is out of range; allowed range: >= 0"),
    (["compare", "--prefill-cache-gb", "-2"], "error: prefill_cache_gb: -2.0 is out of range; allowed range: >= 0"),
    (["run", "--prefill-spill-dir", "a_file"], "error: prefill_spill_dir: 'a_file' is a file; allowed: a directory"),
    (["sweep", "ok.yaml", "--prefill-cache-gb", "-1"], "task.prefill_cache_gb: Input should be greater than or equal"),
    (["run", "--task", "continuation", "--task-option", "context_tokens=5000"], "error: continuation: "
     "context_tokens=5000 is more than the short windows"),
    (["compare", "--task", "continuation", "--task-option", "context_tokens=5000"], "context_tokens=5000 is more"),
    (["sweep", "long.yaml"], "task: continuation: context_tokens=5000 is more than the short windows"),
])
def test_bad_values_are_one_line_exit_2_before_the_model_loads(tiny_dir, tmp_path, args, expected):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ok.yaml").write_text(SWEEP.format(model=tiny_dir, ctx=32))
    (tmp_path / "long.yaml").write_text(SWEEP.format(model=tiny_dir, ctx=5000))
    before = set(tmp_path.iterdir())
    model = [] if args[0] == "sweep" else ["--model", str(tiny_dir), "--samples", "2"]
    done = cli([*args, *model, "--output", "out"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and expected in done.stderr, done.stderr
    assert "Loading" not in done.stderr + done.stdout  # refused before any weights loaded
    assert set(tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------------ continuation
def test_continuation_refuses_a_length_its_windows_cannot_fill_and_names_the_maximum(tiny_dir):
    """The maximum is the shortest window of the pool in the tokenizer's tokens (BOS included), computed here directly
    from the data; ``check`` (run before any model loads) and ``load`` refuse one token more, naming it; at that length
    every prompt holds exactly context_tokens tokens (nothing silently shorter)."""
    from kvpolicy.eval.preflight import local_tokenizer

    tok = local_tokenizer(str(tiny_dir))
    assert tok is not None
    task, samples, seed = get_task("continuation"), 6, 3
    pool = [r for r in read_data("continuation") if r["kind"] == "prose"]
    most = min(len(bos_prefix(tok)) + len(encode(tok, r["context"])) for r in pool)
    assert most < max(len(r["context"]) for r in pool)  # the data, not a constant, decides
    options = task.options({"context_tokens": most + 1, "kind": "prose"})
    with pytest.raises(TaskError, match=rf"context_tokens={most + 1} is more .* at most {most} with this tokenizer"):
        task.load(tok, samples, seed, options)
    with pytest.raises(TaskError, match=rf"at most {most} with this tokenizer"):
        task.check(tok, samples, seed, options)
    loaded = task.load(tok, samples, seed, task.options({"context_tokens": most, "kind": "prose"}))
    assert [len(s.prompt_ids) for s in loaded] == [most] * samples


# ------------------------------------------------------------------------------------------------ one store, one model
def test_compare_loads_the_model_once_and_shares_one_store(tiny_dir, tmp_path, monkeypatch):
    import kvpolicy.models as models
    from kvpolicy.eval import context

    loads: list[str] = []
    real = models.load_model

    def counting(name=None, **kw):
        loads.append(name)
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", counting)
    monkeypatch.setattr(context, "_MODELS", {})
    stores: list[object] = []
    real_evaluate = runner.evaluate

    def spy(spec, *args, prefill_store=None, **kw):
        stores.append(prefill_store)
        return real_evaluate(spec, *args, prefill_store=prefill_store, **kw)

    monkeypatch.setattr(runner, "evaluate", spy)
    base = small_spec(tiny_dir, tmp_path).model_dump(exclude={"policy", "ratio", "task"})
    compare(["local", "h2o"], [0.5, 0.8], ["continuation"], tmp_path / "grid", base=base)
    assert loads == [str(tiny_dir)]  # one load for the four cells
    assert len(stores) == 4 and stores[0] is not None and all(s is stores[0] for s in stores)
    summary = json.loads((tmp_path / "grid" / "compare.json").read_text())
    prefill = summary["meta"]["continuation"]["prefill"]
    assert set(prefill) == {"local@0.5", "local@0.8", "h2o@0.5", "h2o@0.8"}
    assert all(p["enabled"] and p["replayed"] + p["direct"] == 5 for p in prefill.values())


def test_no_share_prefill_runs_directly_and_says_so(tiny_dir, tmp_path):
    res = runner.evaluate(small_spec(tiny_dir, tmp_path, policy="h2o", ratio=0.5, share_prefill=False))
    assert res.prefill is not None and not res.prefill.enabled
    assert res.prefill.replayed == 0 and res.prefill.direct == 5
    assert res.prefill.reasons == {"share_prefill is off": 5} and res.prefill.store is None
    assert all(s.prefill_shared is False for s in res.samples)


def test_a_direct_cell_is_done_for_a_shared_grid(tiny_dir, tmp_path):
    """Resuming: a cell computed with share_prefill off is the same computation as one with it on."""
    base = small_spec(tiny_dir, tmp_path).model_dump(exclude={"policy", "ratio", "task"})
    compare(["local"], [0.5], ["continuation"], tmp_path / "g", base={**base, "share_prefill": False})
    cell = tmp_path / "g" / "cells" / "continuation__local__0.5.json"
    stamp = cell.stat().st_mtime_ns
    spec = EvalSpec(**{**base, "task": "continuation", "policy": "local", "ratio": 0.5})
    assert is_done(cell, spec)
    compare(["local"], [0.5], ["continuation"], tmp_path / "g", base=base)
    assert cell.stat().st_mtime_ns == stamp


def test_evaluate_many_checks_every_spec_first_and_shares_one_store(tiny_dir, tmp_path, monkeypatch):
    from kvpolicy.config import ConfigError

    base = small_spec(tiny_dir, tmp_path)
    bad = [base.model_copy(update={"policy": "h2o", "ratio": 0.5}), base.model_copy(update={"policy": "nosuch"})]
    calls: list[object] = []
    monkeypatch.setattr(runner, "evaluate", lambda spec, **kw: calls.append(kw) or pytest.fail("ran"))
    with pytest.raises(ConfigError, match="nosuch"):
        runner.evaluate_many(bad)
    assert calls == []
    monkeypatch.undo()
    seen: list[int] = []
    specs = [base.model_copy(update={"policy": p, "ratio": 0.5}) for p in ("local", "h2o")]
    results = runner.evaluate_many(specs, on_result=lambda i, r: seen.append(i))
    assert seen == [0, 1] and [r.policy_name for r in results] == ["local", "h2o"]
    assert all(r.prefill is not None and r.prefill.enabled for r in results)


def test_the_sweep_evaluator_keeps_one_store_for_its_trials(tiny_dir, tmp_path):
    from kvpolicy.sweep.harness import HarnessEvaluator

    task = {"name": "continuation", "context_tokens": 40, "target_tokens": 5, "dtype": "float32",
            "reference_dir": str(tmp_path / "refs"), "prefill_cache_gb": 0.25}
    ev = HarnessEvaluator(model=str(tiny_dir), task=task, samples=4, batch_size=2)
    ev.setup()
    store = ev.prefill_store
    assert isinstance(store, PrefillStore) and store.max_bytes == 1 << 28
    first = ev.evaluate({"preset": "h2o", "ratio": 0.5})
    second = ev.evaluate({"preset": "h2o", "ratio": 0.8})
    assert ev.prefill_store is store
    assert first.details["prefill"]["enabled"] and second.details["prefill"]["enabled"]
    ev.close()
    off = HarnessEvaluator(model=str(tiny_dir), task={**task, "share_prefill": False}, samples=4, batch_size=2)
    off.setup()
    assert off.prefill_store is None
    assert off.evaluate({"preset": "h2o", "ratio": 0.5}).details["prefill"]["reasons"] == {"share_prefill is off": 4}


# ------------------------------------------------------------------------------------------------ end to end
class _CharTok(CharTokenizer):
    """Decodes ids for ROUGE-L; encodes KVzip's repeat prompt (:class:`~kvpolicy.testing.CharTokenizer`)."""

    eos_token_id, pad_token_id, bos_token_id, chat_template = 2, 0, None, None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) for i in ids if i > 2)


class _Opts(BaseModel):
    pass


@register_task
class _Varied(Task):
    """Prompts of 34-60 tokens (left padding in every batch, longer than snapkv's 32-token window), gold targets
    for teacher forcing and greedy generations."""

    name = "pstore-varied"
    Options = _Opts

    def load(self, tokenizer, samples, seed, options):
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(samples):
            n = int(torch.randint(34, 61, (1,), generator=g))
            ids = torch.randint(3, VOCAB - 3, (n + 5,), generator=g).tolist()
            out.append(Sample(id=f"v{i}", prompt_ids=ids[:n], target_ids=ids[n:], generate=True, max_new_tokens=4))
        return out


#: the kernel each preset's direct prefill computes with (tests/test_replay.py's KERNEL table): "same" -> bit-identical
#: results. Every one is "same" on CPU with SDPA: a layer compressed with whole-prompt statistics (h2o, elastic) runs
#: transformers' own SDPA call through the flash kernel and takes its statistics from the lse, which the recording
#: stores; "one-pass" (equal only up to float32 rounding, NLL/KL within TOL) would be eager attention or another device.
#: kvzip / kvzip_global: their probe runs after the prefill on each replayed cache's whole prompt (once per recording)
GRID_KERNEL = {"local": "same", "snapkv": "same", "tova": "same", "h2o": "same", "elastic": "same", "kvzip": "same",
               "kvzip_global": "same"}
TOL = 1e-4


def test_a_shared_grid_equals_the_direct_grid_with_one_recording_per_batch(tmp_path, monkeypatch):
    model = kvpolicy.attach(build_model("llama"))  # GQA: 4 query heads per kv head
    monkeypatch.setattr(runner, "load_eval_model", lambda name, dtype="auto", device="cpu": (model, _CharTok()))
    base = dict(model="test/tiny", samples=7, batch_size=3, dtype="float32", bootstrap=0, quiet=True, kl_topk=0,
                use_reference_cache=False)
    policies, ratios = list(GRID_KERNEL), [0.5, 0.9]
    shared = compare(policies, ratios, ["pstore-varied"], tmp_path / "shared", base=base)
    direct = compare(policies, ratios, ["pstore-varied"], tmp_path / "direct", base={**base, "share_prefill": False})
    assert set(shared["cells"]["pstore-varied"]) == set(direct["cells"]["pstore-varied"]) == {"full", *policies}
    batches = 3  # 7 samples in batches of 3
    made = 0
    for name in policies:
        for ratio in ratios:
            cell = f"pstore-varied__{name}__{ratio:g}.json"
            a = json.loads((tmp_path / "shared" / "cells" / cell).read_text())
            b = json.loads((tmp_path / "direct" / "cells" / cell).read_text())
            assert a["prefill"]["replayed"] == 7 and a["prefill"]["direct"] == 0, (cell, a["prefill"])
            assert b["prefill"]["replayed"] == 0 and b["prefill"]["reasons"] == {"share_prefill is off": 7}
            made += a["prefill"]["store"]["misses"]
            for sa, sb in zip(a["samples"], b["samples"], strict=True):
                pa, pb = sa["policy"], sb["policy"]
                assert pa["kept_per_layer_prefill"] == pb["kept_per_layer_prefill"]  # the same positions kept
                assert pa["bytes_end"] == pb["bytes_end"] and pa["steps"] == pb["steps"]
                assert sa["full"]["nll_sum"] == sb["full"]["nll_sum"]  # the reference from the recording
                if GRID_KERNEL[name] == "same":
                    for key in ("nll_sum", "kl_sum", "top1_hits", "generation"):
                        assert pa[key] == pb[key], (cell, key)
                else:
                    assert pa["nll_sum"] == pytest.approx(pb["nll_sum"], rel=TOL, abs=TOL)
                    assert pa["kl_sum"] == pytest.approx(pb["kl_sum"], abs=TOL)
    assert made == batches  # one recording per batch for the whole grid (the first cell's references make them)


def _spied_checks(monkeypatch) -> list[object]:
    """Empty the ratio-0 check's memos; the list filled with the policy of each side the check runs directly (``None``:
    the full cache's side)."""
    from kvpolicy.eval import honesty

    runs: list[object] = []
    real = honesty.run_exact

    def spy(ctx, group, policy, targets, label=""):
        runs.append(policy)
        return real(ctx, group, policy, targets, label)

    monkeypatch.setattr(honesty, "run_exact", spy)
    monkeypatch.setattr(honesty, "CHECKED", {})
    monkeypatch.setattr(honesty, "FULL_RUN", {})
    return runs


def test_the_ratio0_check_runs_the_full_cache_once_per_grid_and_still_refuses_a_bad_policy(monkeypatch):
    """The check's full-cache side (a direct run of one sample) is shared by the policies of a grid; each policy's
    side still runs directly, and a policy that differs at ratio 0 is still refused after a shared full side."""
    from kvpolicy import Budget
    from kvpolicy.eval import HonestyCheckError, evaluate
    from kvpolicy.testing import first_last_policy

    model = kvpolicy.attach(build_model("qwen2"))
    samples = _Varied().load(None, 4, 0, _Opts())
    spec = EvalSpec(model="test/tiny", samples=4, batch_size=2, dtype="float32", bootstrap=0, quiet=True,
                    use_reference_cache=False, kl_topk=0)
    runs = _spied_checks(monkeypatch)
    kw = dict(model=model, tokenizer=_CharTok(), samples=samples)
    for name in ("local", "snapkv", "tova"):
        res = evaluate(spec.model_copy(update={"policy": name, "ratio": 0.5}), **kw)
        assert res.honesty["passed"] and not res.honesty.get("memoised")
    assert [p is None for p in runs] == [True, False, False, False]  # full side once, each policy's side directly
    bad = first_last_policy(Budget(tokens=12))
    with pytest.raises(HonestyCheckError, match="ratio 0"):
        evaluate(spec.model_copy(update={"policy": "local", "ratio": 0.5}), policy=bad, policy_ratio0=bad, **kw)
    assert runs[-1] is bad and sum(p is None for p in runs) == 1


def _corrupting_policy():
    """A hand-built policy named and budgeted like ``first_last_policy(Budget(ratio=0.0))`` whose decode scorer halves
    the stored keys after the prefill: at ratio 0 it changes the logits, so the ratio-0 check must refuse it."""
    from kvpolicy import Budget
    from kvpolicy.testing import FirstLast, first_last_policy

    class Corrupt(FirstLast):
        def after_prefill(self, view):
            view.keys.mul_(0.5)

    policy = first_last_policy(Budget(ratio=0.0))
    policy.decode = Corrupt()
    return policy


def test_the_ratio0_check_runs_once_per_policy_of_a_grid_and_is_keyed_by_what_it_depends_on(tmp_path, monkeypatch):
    """A grid's ratios of one policy build the same ratio-0 policy: its check (each side run directly) runs once and
    the later cells reuse the verdict. A change of thread count runs it again; a hand-built policy (no document) is
    checked every time, so one named and budgeted like a passed one cannot borrow its verdict."""
    from kvpolicy import Budget
    from kvpolicy.eval import HonestyCheckError, evaluate
    from kvpolicy.testing import first_last_policy

    model = kvpolicy.attach(build_model("llama"))
    monkeypatch.setattr(runner, "load_eval_model", lambda name, dtype="auto", device="cpu": (model, _CharTok()))
    runs = _spied_checks(monkeypatch)
    base = dict(model="test/tiny", samples=5, batch_size=2, dtype="float32", bootstrap=0, quiet=True, kl_topk=0,
                use_reference_cache=False, threads=1)
    compare(["local", "h2o"], [0.5, 0.75, 0.9], ["pstore-varied"], tmp_path / "grid", base=base)
    assert [p is None for p in runs] == [True, False, False]  # full side once, each policy's side once
    cells = {p.name: json.loads(p.read_text()) for p in (tmp_path / "grid" / "cells").glob("*.json")}
    for name in ("local", "h2o"):
        first, *later = (cells[f"pstore-varied__{name}__{r}.json"]["honesty"] for r in ("0.5", "0.75", "0.9"))
        assert first["passed"] and not first.get("memoised") and first["seconds"] > 0
        assert all(h["passed"] and h["memoised"] and h["seconds"] == 0 for h in later)
        assert all({k: v for k, v in h.items() if k not in ("memoised", "seconds")}
                   == {k: v for k, v in first.items() if k != "seconds"} for h in later)

    samples = _Varied().load(None, 5, 0, _Opts())
    spec = EvalSpec(**{**base, "policy": "local", "ratio": 0.5})
    kw = dict(model=model, tokenizer=_CharTok(), samples=samples)
    assert evaluate(spec.model_copy(update={"threads": 2}), **kw).honesty.get("memoised") is None
    assert [p is None for p in runs[3:]] == [True, False]  # another thread count: both sides again

    good = first_last_policy(Budget(ratio=0.0))
    for _ in range(2):
        res = evaluate(spec, policy=good, policy_ratio0=good, **kw)
        assert res.honesty["passed"] and not res.honesty.get("memoised")
    assert [p for p in runs[5:] if p is not None] == [good, good]  # a hand-built policy is checked every time
    bad = _corrupting_policy()
    assert (bad.name, bad.budget) == (good.name, good.budget)
    with pytest.raises(HonestyCheckError, match="ratio 0"):
        evaluate(spec, policy=bad, policy_ratio0=bad, **kw)
