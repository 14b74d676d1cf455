"""Ablations: file validation, the paired bootstrap, the delta table and its files (synthetic evaluator: no model)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvpolicy.sweep import Evaluation, SweepConfigError, load_ablation, paired_bootstrap, run_ablation

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "abl",
    "evaluator": "synthetic",
    # the synthetic evaluator names no policy: the test says what each reducer costs (eviction 4% perplexity)
    "task": {"noise": 0.05, "part_costs": {"reducer.anchor_merge": 1.0, "reducer.evict": 1.04}},
    "samples": 12,
    "base": {"preset": "elastic"},
    "ratios": [0.5, 0.8],
    "variants": [
        {"name": "evict instead of merge", "set": {"reducer": "evict"}},
        {"name": "accumulated attention", "set": {"encode": {"name": "h2o", "recent": 0}}},
        {"name": "compressed positions", "set": {"reference_quirks.compressed_positions": True}},
    ],
    "metrics": ["ppl", "top1"],
    "bootstrap": {"resamples": 500, "seed": 0},
}


def doc(**changes):
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


# ------------------------------------------------------------------------------------------------- validation
def test_valid_ablation_file():
    spec = load_ablation(doc())
    assert [b for b in spec.budgets] == [{"ratio": 0.5}, {"ratio": 0.8}]


def test_bad_variant_path_names_the_variant():
    d = doc()
    d["variants"][1]["set"] = {"encode.recnt": 4}
    with pytest.raises(SweepConfigError) as info:
        load_ablation(d)
    assert info.value.paths == ["variants[1].set"], str(info.value)
    assert "encode.recnt" in str(info.value) and "accumulated attention" in str(info.value)


def test_unknown_metric_and_duplicate_variant():
    with pytest.raises(SweepConfigError) as info:
        load_ablation(doc(metrics=["ppl", "rouge-x"]))
    assert info.value.paths == ["metrics"]
    d = doc()
    d["variants"].append(copy.deepcopy(d["variants"][0]))
    with pytest.raises(SweepConfigError) as info:
        load_ablation(d)
    assert info.value.paths == ["variants"] and "unique" in str(info.value)


def test_bad_budget_field():
    with pytest.raises(SweepConfigError) as info:
        d = doc(budgets=[{"ratio": 0.5}, {"ratoi": 0.7}])
        del d["ratios"]
        load_ablation(d)
    assert info.value.paths == ["budgets[1]"]


def test_shipped_ablation_file_validates():
    spec = load_ablation(REPO / "sweeps" / "ablations.yaml", deep=False)  # every variant resolves at every budget
    assert len(spec.variants) >= 4
    names = " ".join(v.name for v in spec.variants)
    for swap in ("merge -> evict", "frequency -> accumulated attention", "offset", "compressed positions"):
        assert swap in names


def test_kvzip_merge_ablation_validates_and_keeps_kvzips_selection_where_it_says_so():
    """The issue-19 study resolves at every budget; its 'heads shared' variants spend the counts per head of the
    base's own reducer (anchor_merge heads: shared, head_floor 0 = adakv alpha 0), so only merging differs."""
    spec = load_ablation(REPO / "sweeps" / "kvzip_merge.yaml", deep=False)
    shared = [v for v in spec.variants if "heads shared" in v.name]
    assert len(shared) >= 3
    for v in shared:
        reducer = v.set["reducer"]
        assert reducer["name"] == "anchor_merge" and reducer["heads"] == "shared" and reducer["head_floor"] == 0


@pytest.mark.parametrize("name", ["kvzip_merge_mass", "kvzip_window_aware", "kvzip_candidate_agnostic",
                                  "kvzip_candidate_aware", "kvzip_candidate_agnostic_2k", "kvzip_candidate_aware_2k"])
def test_merge_search_studies_validate_and_change_what_they_say(name):
    """Studies 2 and 3 of docs/merge-search.md resolve at every budget; study 2's variants keep KVzip's selection
    (anchor_merge, heads shared, head_floor 0) and all but its control keep the mass; study 3 is query-aware."""
    spec = load_ablation(REPO / "sweeps" / f"{name}.yaml", deep=False)
    if name == "kvzip_merge_mass":
        reducers = [v.set["reducer"] for v in spec.variants]
        assert all(r["heads"] == "shared" and r["head_floor"] == 0 for r in reducers)
        assert [bool(r.get("keep_mass")) for r in reducers] == [False] + [True] * (len(reducers) - 1)
    else:
        assert spec.task["query_aware"] is ("agnostic" not in name)
        assert any(v.set.get("encode.window") for v in spec.variants)


# ------------------------------------------------------------------------------------------------- statistics
def _ev(nll_sum, tokens, top1=None):
    per = {"nll_sum": list(map(float, nll_sum)), "tokens": list(map(float, tokens))}
    if top1 is not None:
        per["top1"] = list(map(float, top1))
    ev = Evaluation(metrics={}, per_sample=per)
    ev.metrics = {"ppl": float(ev.aggregate("ppl"))}
    if top1 is not None:
        ev.metrics["top1"] = float(ev.aggregate("top1"))
    return ev


def test_pooled_perplexity_of_a_subset():
    ev = _ev([10.0, 40.0], [10, 20])
    assert ev.aggregate("ppl") == pytest.approx(np.exp(50 / 30))
    assert ev.aggregate("ppl", np.array([[1, 1]]))[0] == pytest.approx(np.exp(2.0))


def test_paired_bootstrap_identical_and_shifted():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 40, 30)
    nll = rng.normal(2.5, 0.4, 30) * tokens
    base = _ev(nll, tokens)
    same = paired_bootstrap(base, _ev(nll, tokens), "ppl", 500)
    assert same == (0.0, 0.0, 0.0)
    # a small shift of every sample is far below the spread between samples, but pairing sees it
    worse = _ev(nll + 0.05 * tokens, tokens)
    delta, lo, hi = paired_bootstrap(base, worse, "ppl", 1000)
    assert 0 < lo <= delta <= hi
    unpaired_spread = np.std(np.exp(nll / tokens))
    assert hi - lo < unpaired_spread


def test_paired_bootstrap_needs_the_same_samples():
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(_ev([1, 2, 3], [1, 1, 1]), _ev([1, 2], [1, 1]), "ppl")


# ------------------------------------------------------------------------------------------------- running
class CountingSynthetic:
    needs_model = False

    def __init__(self):
        from kvpolicy.sweep import SyntheticEvaluator

        self.inner = SyntheticEvaluator(task=BASE["task"], samples=12)
        self.calls = 0

    def setup(self):
        pass

    def evaluate(self, policy, on_batch=None):
        self.calls += 1
        return self.inner.evaluate(policy, on_batch)

    def close(self):
        pass


def test_ablation_table_files_and_cache(tmp_path):
    spec = load_ablation(doc(output=str(tmp_path / "out")))
    ev = CountingSynthetic()
    result = run_ablation(spec, quiet=True, evaluator=ev)
    assert ev.calls == 2 * (1 + 3)
    rows = result.rows
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        if r["effect"] != "n.s.":
            assert r["ci_low"] <= r["delta"] <= r["ci_high"]
    merge = next(r for r in rows if r["variant"] == "evict instead of merge" and r["metric"] == "ppl"
                 and r["budget"] == "ratio 0.5")
    assert merge["delta"] > 0 and merge["effect"] == "worse"  # synthetic: eviction costs 4% perplexity
    pos = next(r for r in rows if r["variant"] == "compressed positions" and r["metric"] == "ppl")
    assert pos["delta"] == 0 and pos["effect"] == "n.s."
    out = tmp_path / "out"
    md = (out / "ablation.md").read_text()
    assert "## ratio 0.5" in md and "evict instead of merge" in md and "95% CI" in md
    assert (out / "ablation.csv").read_text().count("\n") == len(rows) + 1
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "ablation.json").read_text())
    assert len(saved["runs"]) == 8 and len(saved["runs"][0]["per_sample"]["nll_sum"]) == 12
    # re-running evaluates nothing: every policy's evaluation is cached under runs/
    again = CountingSynthetic()
    result2 = run_ablation(spec, quiet=True, evaluator=again)
    assert again.calls == 0 and result2.rows == rows


def test_ablate_cli_prints_the_delta_table(tmp_path):
    from typer.testing import CliRunner

    from kvpolicy import cli

    f = tmp_path / "a.yaml"
    f.write_text(yaml.safe_dump(doc(output=str(tmp_path / "out"))))
    result = CliRunner().invoke(cli.app, ["ablate", str(f), "--quiet"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "variant − base" in text and "evict instead of merge" in text and "worse" in text
