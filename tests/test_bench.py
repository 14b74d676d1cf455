"""``kvpolicy bench --quick``: the JSON schema, bytes figures that match the cache tensors, the table, the planner."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import DynamicCache

import kvpolicy
from kvpolicy.cli.bench import bench as bench_cli
from kvpolicy.bench.external import merge_external
from kvpolicy.bench.memory import cache_bytes
from kvpolicy.bench.output import load_result, write_json_atomic
from kvpolicy.bench.plan import make_plan, plan_lookup
from kvpolicy.bench.shapes import BUILTIN_CONFIGS
from kvpolicy.bench.spec import SCHEMA, BenchResult, BenchSpec
from kvpolicy.bench.tables import render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run through the CLI entry (JSON to stdout), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        bench_cli(quick=True, output=out, as_json=True, long_steps=40)
    return out, json.loads(buf.getvalue())


def test_quick_json_schema_and_files(quick):
    out, printed = quick
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["schema"] == SCHEMA
    result = BenchResult.model_validate(on_disk)  # the schema: every field typed
    assert printed["runs"] == on_disk["runs"]
    # no temporary file left behind by the atomic write
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for name in (
        "decode_vs_context.png",
        "bytes_vs_ratio.png",
        "decode_vs_generated.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # provenance: spec, versions, device, model shape
    assert result.spec["quick"] is True and result.spec["policies"]
    assert result.environment["packages"]["torch"] == torch.__version__.split("+")[
        0
    ] or result.environment["packages"]["torch"].startswith(
        torch.__version__.split("+")[0]
    )
    assert result.environment["device"] == "cpu"
    assert result.model["kv_heads"] == 2 and result.model["q_heads"] == 4
    kinds = {r.kind for r in result.runs}
    assert {
        "prefill+decode",
        "baseline-at-budget",
        "bytes-sweep",
        "long-decode",
    } <= kinds
    contexts = result.spec["contexts"]
    for n in contexts:
        full = result.find("full", n)
        assert (
            full is not None and full.prefill_median_s > 0 and full.decode_median_s > 0
        )
        for name in result.spec["policies"]:
            r = result.find(name, n)
            assert r is not None and len(r.decode_step_s) == result.spec["steps"]
            assert (
                r.prefill_median_s == sorted(r.prefill_s)[len(r.prefill_s) // 2]
                or len(r.prefill_s) % 2 == 0
            )
            assert r.budget_tokens == math.ceil(n * (1 - r.ratio))
    names = {t.name for t in result.targets}
    assert any("KV bytes" in n for n in names) and any("flat" in n for n in names)
    assert all(t.met in (True, False, None) for t in result.targets)


def _per_slot(model: dict, batch: int = 1) -> int:
    """Bytes of one slot: keys + values in the dtype the run resolved (``auto`` is bf16 on AMX CPUs)."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[model["dtype"]]
    return batch * model["kv_heads"] * model["head_dim"] * 2 * itemsize


def test_bytes_are_consistent_with_cache_shapes(quick):
    _, doc = quick
    result = BenchResult.model_validate(doc)
    per_slot = _per_slot(result.model)
    layers = result.model["layers"]
    for r in result.runs:
        for cb in (r.bytes_prefill, r.bytes_decode):
            if cb is None:
                continue
            assert len(cb.layers) == layers
            assert cb.total_alloc == sum(lb.alloc_bytes for lb in cb.layers)
            assert cb.total_used == sum(lb.used_bytes for lb in cb.layers)
            for lb in cb.layers:
                assert lb.alloc_bytes == lb.capacity * per_slot
                assert lb.used_bytes == lb.slots * per_slot <= lb.alloc_bytes
                if lb.held is not None:
                    assert max(max(row) for row in lb.held) <= lb.slots
                if lb.promised is not None:
                    assert (
                        lb.budget_bytes
                        == max(max(row) for row in lb.promised) * per_slot
                    )
        if r.policy == "full" and r.kind == "prefill+decode":
            # the plain cache: exactly context (+ steps) entries per layer
            assert r.bytes_prefill.total_alloc == layers * r.context * per_slot
            assert (
                r.bytes_decode.total_alloc
                == layers * (r.context + r.decode_steps) * per_slot
            )
        if r.policy != "full" and r.kind == "prefill+decode":
            # right after prefill every uniform policy holds exactly its budget B per layer and head
            for lb in r.bytes_prefill.layers:
                assert lb.held == [[r.budget_tokens] * result.model["kv_heads"]]
                assert lb.promised == lb.held
            assert r.bytes_prefill.budget == layers * r.budget_tokens * per_slot


def test_cache_bytes_matches_live_tensors():
    from conftest import build_model, first_last_policy

    model = build_model("llama")
    kvpolicy.attach(model)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = kvpolicy.make_cache(model, first_last_policy(kvpolicy.Budget(tokens=8)))
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids, past_key_values=full, use_cache=True)
    got = cache_bytes(cache)
    # right after the prefill reduction the buffers are exactly the used slots, which transformers sees as keys/values
    assert all(layer.capacity == layer.length for layer in cache.policy_layers)
    assert (
        got.total_alloc
        == cache.nbytes()
        == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.policy_layers)
    )
    assert [lb.held for lb in got.layers] == [
        layer.held().tolist() for layer in cache.policy_layers
    ]
    assert all(lb.promised == [[8, 8], [8, 8]] for lb in got.layers)
    f = cache_bytes(full, promised=False)
    assert f.total_alloc == sum(
        layer.keys.nbytes + layer.values.nbytes for layer in full.layers
    )
    assert (
        f.total_alloc == 2 * 2 * 2 * 20 * 16 * 4 * 2
    )  # layers x (k, v) x batch x kv heads x n x head_dim x fp32


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.75])
def test_promised_entries_follow_the_fraction_rule_while_decoding(ratio):
    """Promised entries after k decode steps under the paper's fraction rule, against the rule written out here:
    the most a layer may hold after n tokens is the largest h with int(h - n (1 - ratio)) < 1."""
    from conftest import build_model, first_last_policy

    model = build_model("llama")
    kvpolicy.attach(model)
    n0, steps = 20, 7
    ids = torch.randint(3, 100, (1, n0), generator=torch.Generator().manual_seed(0))
    cache = kvpolicy.make_cache(model, first_last_policy(kvpolicy.Budget(ratio=ratio)))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    n = n0 + steps
    target = n * (1 - ratio)
    expected = math.floor(target) if float(target).is_integer() else math.floor(target) + 1
    got = cache_bytes(cache, generated=steps)
    for lb in got.layers:
        assert lb.promised == [[expected, expected]]
        assert all(h <= p for row_h, row_p in zip(lb.held, lb.promised) for h, p in zip(row_h, row_p))
        assert lb.used_bytes == lb.slots * 2 * 16 * 4 * 2  # kv heads x head_dim x fp32 x (k, v)


def test_package_and_command_import_no_torch():
    """``kvpolicy.bench`` and the ``bench`` command's module load with torch and transformers unavailable
    (kvpolicy's own ``__init__`` is bypassed here: it is another module's job to be torch-free), and the command keeps
    its signature."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType("kvpolicy")
        pkg.__path__ = [{str(ROOT / "kvpolicy")!r}]
        sys.modules["kvpolicy"] = pkg
        import kvpolicy.bench
        from kvpolicy.cli.bench import bench as bench_cli
        import inspect
        assert "quick" in inspect.signature(bench_cli).parameters
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "pydantic"))
        print("heavy:", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "heavy: []"


def test_table_prints(quick):
    _, doc = quick
    result = BenchResult.model_validate(doc)
    buf = io.StringIO()
    render(result, Console(file=buf, width=160, color_system=None))
    text = buf.getvalue()
    for n in result.spec["contexts"]:
        assert f"context {n} tokens" in text
    assert (
        "targets" in text and "long decode" in text and "cache bytes vs ratio" in text
    )
    for name in result.spec["policies"]:
        assert name in text


def test_report_writes_the_tables_as_markdown(quick, tmp_path):
    out, doc = quick
    bench_cli(report=out / "bench.json", output=tmp_path, markdown=True)
    text = (tmp_path / "tables.md").read_text()
    result = BenchResult.model_validate(doc)
    header = [line for line in text.splitlines() if line.startswith("| policy")]
    assert len(header) >= len(result.spec["contexts"])  # one table per context, more for the long run and sweep
    rows = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    for r in result.runs:
        if r.kind == "prefill+decode" and r.policy != "full":
            assert any(line.split("|")[1].strip().startswith(r.policy) for line in rows), r.policy
    assert not list(tmp_path.glob("*.tmp"))


def test_report_merges_an_external_result(quick, tmp_path):
    out, _doc = quick
    ext = {
        "schema": SCHEMA,
        "framework": "kvpress",
        "environment": {"packages": {"kvpress": "0.5.5"}},
        "model": {"name": "llama-tiny"},
        "runs": [
            {
                "framework": "kvpress",
                "policy": "full",
                "context": 64,
                "prefill_s": [0.1],
                "prefill_median_s": 0.1,
                "decode_median_s": 0.001,
            },
            {
                "framework": "kvpress",
                "policy": "local",
                "ratio": 0.75,
                "context": 64,
                "budget_tokens": 16,
                "prefill_s": [0.1],
                "prefill_median_s": 0.1,
                "decode_median_s": 0.001,
            },
        ],
    }
    (tmp_path / "kvpress.json").write_text(json.dumps(ext))
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        bench_cli(
            report=out / "bench.json",
            compare=[tmp_path / "kvpress.json"],
            output=tmp_path,
            as_json=True,
        )
    merged = json.loads(buf.getvalue())
    assert {r["framework"] for r in merged["runs"]} == {"kvpolicy", "kvpress"}
    assert merged["external"][0]["framework"] == "kvpress"
    # merging the same framework again replaces its runs
    again = load_result(tmp_path / "bench.json")
    merge_external(again, tmp_path / "kvpress.json")
    assert sum(r.framework == "kvpress" for r in again.runs) == 2


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


class _FakeCost:
    def prefill(self, n, needs=frozenset()):
        return n / 1000 * (2 if needs else 1)

    def step(self, cache_len):
        return 0.01


def test_planner_keeps_priorities_within_the_budget():
    from kvpolicy.core.policy import AttentionStat

    needs = {
        "local": frozenset(),
        "snapkv": frozenset({AttentionStat(32)}),
        "h2o": frozenset({AttentionStat(None)}),
    }
    spec = BenchSpec(
        contexts=[1000, 4000, 16000],
        policies=list(needs),
        steps=10,
        long_steps=2000,
        repeats=3,
        time_budget_s=90,
    )
    plan = make_plan(spec, list(needs), needs, _FakeCost(), spent_s=0)
    included = [p for p in plan if p.included]
    assert (
        included[0].item == "context"
        and included[0].context == 1000
        and included[0].policies == list(needs)
    )
    assert sum(p.estimate_s for p in included) * 1.25 <= 90 - 10 + 1e-9
    assert any(not p.included for p in plan)  # 16000 with everything cannot fit
    larger = [p for p in included if p.context == 4000]
    assert larger and larger[0].policies == [
        "h2o"
    ]  # the whole-prompt attention scorer first
    lookup = plan_lookup(plan)
    assert lookup["policies"][1000] == list(needs)
    # no budget: everything
    spec.time_budget_s = None
    plan = make_plan(spec, list(needs), needs, _FakeCost(), spent_s=0)
    assert all(p.included for p in plan)
    assert plan_lookup(plan)["reps"] == {1000: 3, 4000: 3, 16000: 3}


def test_spec_defaults_and_validation():
    assert (
        BenchSpec().contexts == [1024, 4096, 16384] and BenchSpec().time_budget_s == 540
    )
    q = BenchSpec(quick=True)
    assert (
        q.config == "llama-tiny" and max(q.contexts) <= 256 and q.time_budget_s is None
    )
    assert BenchSpec(contexts=[512]).time_budget_s is None
    with pytest.raises(ValueError):
        BenchSpec(ratios=[1.0])


def test_kvpress_script_uses_the_same_shapes():
    spec = importlib.util.spec_from_file_location(
        "kvpress_bench", ROOT / "benchmarks" / "kvpress_bench.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, shape in mod.BUILTIN_CONFIGS.items():
        assert BUILTIN_CONFIGS[name] == shape
    assert mod.SCHEMA == SCHEMA
