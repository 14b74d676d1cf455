"""DuoAttention (``plugins/duo_attention.py``): the ratio -> streamed-heads plan, the kept entries per head, and the
preset end to end, each against a naive reference written with Python loops.

* the plan: a greedy reference that streams the lowest-scored head one at a time until the budget holds;
* the reducer on random views (GQA, left padding, shuffled slots): per row and kv head, a streamed head keeps its
  row's first ``sinks`` and last entries, every other head all of them;
* a tiny GQA Llama with a left-padded batch: the kept positions of every layer and head equal that rule, the
  memory is the bucketed layout's, and ratio 0 is the plain cache.

The calibration and the score files are checked in ``tests/test_head_scores.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpolicy
from kvpolicy.config import PolicyConfigError, load_policy
from kvpolicy.core.buckets import BucketedStorage
from kvpolicy.heads.table import HeadScoresError, write_scores
from kvpolicy.testing import make_batch, make_view, tiny_text_config
from kvpolicy_plugins.duo_attention import DuoReducer, DuoScorer, plan_streaming


# =========================================================================================== the plan (naive)


def naive_plan(scores: torch.Tensor, n: int, keep: int, window: int, exact: bool) -> dict:
    """Stream the lowest-scored unit (ties: lower layer, then head) one at a time while the model holds more than its
    budget; with ``exact`` the last one streamed gives back what was removed beyond the budget."""
    units = [(layer, h) for layer in range(scores.shape[0]) for h in range(scores.shape[1])
             if not math.isnan(float(scores[layer, h]))]
    budget, held, c = len(units) * keep, len(units) * n, min(n, window)
    plan: dict = {}
    if c >= n:
        return plan
    left = list(units)
    last = None
    while held > budget and left:
        best = left[0]
        for u in left:
            if (float(scores[u]), u) < (float(scores[best]), best):
                best = u
        left.remove(best)
        plan[best] = c
        held -= n - c
        last = best
    if exact and last is not None and held < budget:
        plan[last] += budget - held
    return plan


def random_table(layers: int, heads: int, seed: int, nan_rows: tuple[int, ...] = (), ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(layers, heads, generator=g, dtype=torch.float64)
    if ties:
        t = (t * 3).floor()
    for r in nan_rows:
        t[r] = float("nan")
    return t


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_plan_equals_the_greedy_reference(seed, exact):
    rng = random.Random(seed)
    table = random_table(5, 3, seed, nan_rows=(1, 3) if seed % 2 else (), ties=seed % 3 == 0)
    for _ in range(40):
        n = rng.randint(1, 300)
        keep = rng.randint(1, n)
        window = rng.randint(0, 80)
        assert plan_streaming(table, n, keep, window, exact) == naive_plan(table, n, keep, window, exact)


def test_ratio_to_streaming_share():
    """What the docs state: whole heads remove at least the ratio and by less than one head's entries more; exact
    meets the budget; a budget below the window cannot be met (every head streams); Gemma 3 270M's three
    full-attention layers (one kv head each) stream whole layers."""
    table = random_table(30, 3, 7)  # SmolLM2-135M: 30 layers x 3 kv heads
    n, window = 4096, 64 + 256
    for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
        keep = math.ceil(n * (1 - ratio))
        plan = plan_streaming(table, n, keep, window)
        removed = sum(n - c for c in plan.values()) / (90 * n)
        assert 1 - keep / n <= removed < 1 - keep / n + (n - window) / (90 * n)
        exact = plan_streaming(table, n, keep, window, exact=True)
        assert sum(exact.get((i, h), n) for i in range(30) for h in range(3)) == 90 * keep
    assert len(plan_streaming(table, n, 100, window)) == 90  # keep < window: all stream, each keeps the window
    gemma = torch.full((18, 1), float("nan"), dtype=torch.float64)
    gemma[[5, 11, 17], 0] = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    plan = plan_streaming(gemma, n, math.ceil(n * 0.5), window)
    assert plan == {(11, 0): window, (17, 0): window}  # 2 of 3 layers: 61.5% removed for a ratio of 0.5
    assert plan_streaming(gemma, n, n, window) == {} and plan_streaming(gemma, 300, 100, window) == {}


# =========================================================================================== the reducer (views)


def kept_positions(view, red, b: int, h: int) -> list[int]:
    idx = red.index[b, h][red.valid[b, h]]
    return sorted(view.positions[b, h, idx].tolist())


def expected_kept(view, b: int, h: int, count: int | None, sinks: int) -> list[int]:
    """The row's real positions; a streamed head (``count`` given) keeps the first ``sinks`` and the newest rest."""
    real = sorted(view.positions[b, h][view.valid[b, h]].tolist())
    if count is None or count >= len(real):
        return real
    s = min(sinks, count)
    return real[:s] + real[len(real) - (count - s):] if count > s else real[:s]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_reducer_matches_the_naive_rule_on_random_views(tmp_path, seed, exact):
    import dataclasses

    sinks, recent, layers = 2, 3, 3
    view = make_view(B=3, H=4, P=24, pads=(0, 4, 9), shuffle=True, windows=(), layer_idx=seed % layers,
                     num_layers=layers, seed=seed)
    view = dataclasses.replace(view, sinks=sinks)
    table = random_table(layers, 4, seed + 10)
    path = tmp_path / "scores.tsv"
    write_scores(path, table)
    reducer = DuoReducer(sinks=sinks, recent=recent, head_scores=str(path), exact=exact)
    keep = torch.tensor([math.ceil(int(n) * 0.45) for n in view.n_tokens])
    red = reducer.reduce(view, DuoScorer().score(view), keep)
    for b in range(3):
        n = int(view.n_tokens[b])
        plan = naive_plan(table, n, int(keep[b]), sinks + recent, exact)
        for h in range(4):
            want = expected_kept(view, b, h, plan.get((view.layer_idx, h)), sinks)
            assert kept_positions(view, red, b, h) == want, (b, h)


# =========================================================================================== end to end


def tiny_llama(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_text_config(layers=layers)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.eval()
    return kvpolicy.attach(model)


def duo_policy(path, ratio: float, sinks: int = 2, recent: int = 5, exact: bool = False):
    return load_policy({"preset": "duo_attention", "sinks": sinks, "ratio": ratio,
                        "reducer": {"recent": recent, "head_scores": str(path), "exact": exact}})


@pytest.mark.parametrize("exact", [False, True])
def test_preset_keeps_the_planned_entries_in_a_left_padded_batch(tmp_path, exact):
    model = tiny_llama()
    table = random_table(3, 2, 5)
    write_scores(tmp_path / "s.tsv", table)
    policy = duo_policy(tmp_path / "s.tsv", ratio=0.45, exact=exact)
    batch = make_batch(3, 40, pads=[0, 6, 13], seed=4)
    cache = kvpolicy.make_cache(model, policy)
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
    total = 0
    for b, pad in enumerate([0, 6, 13]):
        n = 40 - pad
        keep = math.ceil(n * 0.55)
        plan = naive_plan(table, n, keep, 2 + 5, exact)
        assert plan, "the ratio must stream some head"
        real = list(range(pad, 40))
        for layer in cache.policy_layers:
            for h in range(2):
                count = plan.get((layer.layer_idx, h))
                want = real if count is None else real[:2] + real[len(real) - (count - 2):]
                assert layer.kept_positions(b, h) == want, (b, layer.layer_idx, h)
                total += len(want)
        if exact:
            assert sum(plan.get((i, h), n) for i in range(3) for h in range(2)) == 6 * keep
    uneven = [layer for layer in cache.policy_layers if len(set(layer.held().flatten().tolist())) > 1]
    assert uneven and all(isinstance(layer.storage, BucketedStorage) for layer in uneven)
    assert int(sum(layer.held().sum() for layer in cache.policy_layers)) == total


def test_ratio_zero_is_the_plain_cache(tmp_path):
    model = tiny_llama()
    write_scores(tmp_path / "s.tsv", random_table(3, 2, 1))
    batch = make_batch(2, 24, pads=[0, 5], seed=2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**batch, past_key_values=DynamicCache(config=model.config), **kw)
        cache = kvpolicy.make_cache(model, duo_policy(tmp_path / "s.tsv", ratio=0.0))
        ours = model.generate(**batch, past_key_values=cache, **kw)
    assert torch.equal(plain, ours)
    for layer in cache.policy_layers:
        assert layer.held().tolist() == [[29, 29], [24, 24]]  # 24 prompt + 5 fed tokens (the last one is not)


def test_bad_score_files_fail_naming_the_field_or_the_shape(tmp_path):
    (tmp_path / "ragged.tsv").write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(PolicyConfigError, match=r"reducer\.head_scores.*line 2 has 1 values"):
        duo_policy(tmp_path / "ragged.tsv", 0.5)
    with pytest.raises(PolicyConfigError, match=r"reducer\.head_scores.*no such head-score file"):
        duo_policy(tmp_path / "missing.tsv", 0.5)
    write_scores(tmp_path / "wide.tsv", random_table(3, 4, 0))  # 4 kv heads; the model has 2
    policy = duo_policy(tmp_path / "wide.tsv", 0.5)
    with pytest.raises(HeadScoresError, match="3 layers x 4 kv heads; the model has 3 layers x 2 kv heads"):
        kvpolicy.make_cache(tiny_llama(), policy)


def test_evaluation_runs_per_head_budgets_and_counts_them_per_head(tmp_path):
    """``kvpolicy run``'s path (``evaluate``) on the bucketed layout that per-head budgets produce (duo_attention,
    adakv): the run completes, and the entries it reports by token type equal the kept positions counted head by
    head (the cache after a prefill, all TEXT)."""
    from kvpolicy.eval import evaluate, kept_by_type

    from test_eval import CharTokenizer, synthetic_samples, tiny_spec

    model = tiny_llama(layers=2)
    write_scores(tmp_path / "s.tsv", random_table(2, 2, 3))
    doc = {"preset": "duo_attention", "sinks": 2, "reducer": {"recent": 4, "head_scores": str(tmp_path / "s.tsv")}}
    for policy in (doc, "adakv"):
        result = evaluate(tiny_spec(policy=policy, ratio=0.5), model=model, tokenizer=CharTokenizer(),
                          samples=synthetic_samples())
        assert 0.3 < result.policy_metrics.ratio_prefill < 0.7, policy
    cache = kvpolicy.make_cache(model, duo_policy(tmp_path / "s.tsv", ratio=0.5, recent=4))
    with torch.no_grad():
        model(**make_batch(2, 30, pads=[0, 7], seed=5), past_key_values=cache, use_cache=True)
    assert any(isinstance(layer.storage, BucketedStorage) for layer in cache.policy_layers)
    counts = kept_by_type(cache)  # [layers, B, (text, image, generated)]
    for i, layer in enumerate(cache.policy_layers):
        for b in range(2):
            per_head = [len(layer.kept_positions(b, h)) for h in range(2)]
            assert counts[i, b].tolist() == [sum(per_head) / 2, 0.0, 0.0]
