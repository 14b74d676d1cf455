"""Elastic Cache's decode rule (plugins/elastic/decode.py) and the policy's sinks: the authors' decode branch copied
line by line, their raw (negative) frozen index behind ``quirk_raw_index``, and end-to-end property tests that paper
mode never evicts a sink. Helpers (views, the tiny LLaVA trace recorder, the budget rule) come from test_elastic.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kvpolicy_plugins import elastic
from kvpolicy_plugins.elastic import AnchorMerge, DistanceOffset, FrequencyScorer
from test_elastic import PAD, VOCAB, decode_view, expected_held, row_slots, run_generate

import kvpolicy
from kvpolicy import Budget, CachePolicy, LayerView

# ============================================================================================== the authors' decode branch


def authors_decode(past_key_values, selected_idx):
    """The decode branch (``forget_num == 1``) of ``ElasticCache.__call__`` of liuzuyan/ElasticCache@3138e03, line by
    line (``k_seq_dim = v_seq_dim = 2``, ``self.k_slice = slice2d``): ``selected_idx`` is the index frozen at prefill,
    ``past_key_values`` the cache *after* the step's forward (the new token included)."""

    def slice2d(x, start, end):
        return x[:, :, start:end, ...]

    seq_len = past_key_values[0][0].size(2)
    return [[torch.cat([slice2d(k, 0, selected_idx), slice2d(k, (selected_idx + 1), seq_len)], dim=2),
             torch.cat([slice2d(v, 0, selected_idx), slice2d(v, (selected_idx + 1), seq_len)], dim=2)]
            for k, v in past_key_values]


def lowest_valid(view: LayerView, scores: torch.Tensor, b: int, h: int) -> int:
    slots = row_slots(view, b, h)
    return min(slots, key=lambda j: (float(scores[b, h if scores.shape[1] > 1 else 0, j]), j))


@pytest.mark.parametrize("incoming", [0, 1], ids=["after_attention", "in_update"])
def test_raw_index_reproduces_the_authors_slicing(incoming):
    """quirk_raw_index against the authors' decode branch on a cache of S entries (new token included), for every
    frozen index from -S-3 to S+2: where their slicing drops one entry, kvpolicy drops the same one (the new token
    already in the view, or about to be written: then their dropping the new token itself is the newest written
    entry here); where it has no defined result (idx = -1 duplicates the cache,
    idx < -S and idx >= S drop nothing and their next call fails) the paper rule applies."""
    kept = [9, 14, 6]
    for extra in (1, 4):
        view = decode_view(kept, extra=extra, seed=extra)
        newest = torch.where(view.valid, view.positions, -1).amax(-1, keepdim=True)
        view.positions = view.positions + (newest.max() - newest)  # rows end at the same column, as in a batch
        view.seen = int(newest.max()) + 1 + incoming  # the new column is counted before it is written
        for raw in range(-max(kept) - extra - 4, max(kept) + extra + 3):
            prefill = torch.full_like(view.prefill_kept, raw - 1 + 25)  # prefill_kept + 1 - 25 == raw
            v = dataclasses.replace(view, prefill_kept=prefill, sinks=1)
            scores = DistanceOffset(offset=-25, quirk_raw_index=True).drop_scores(v)
            paper = DistanceOffset(offset=-25).drop_scores(v)
            for b in range(3):
                slots = row_slots(v, b, 0)
                s = len(slots) + incoming
                cache = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1)  # ranks, the new token last
                (k_out, _), = authors_decode([(cache, cache)], raw)
                got = lowest_valid(v, scores, b, 0)
                if k_out.shape[2] == s - 1:  # their slicing drops exactly one entry
                    gone = sorted(set(range(s)) - set(k_out.flatten().long().tolist()))
                    assert len(gone) == 1, (raw, b)
                    # their victim is the new token itself (raw == S - 1): it is not written yet when kvpolicy drops
                    # in update(), so the newest written entry goes (with drop_after_attention it is the same)
                    assert got == slots[min(gone[0], len(slots) - 1)], (raw, b, s)
                    assert gone[0] < len(slots) or (incoming and raw == s - 1)
                    assert -s <= raw <= -2 or 0 <= raw < s
                else:  # no defined result: duplicated (2S - 1) or nothing dropped (S)
                    assert k_out.shape[2] in (s, 2 * s - 1) and (raw == -1 or raw < -s or raw >= s)
                    assert got == lowest_valid(v, paper, b, 0), (raw, b)


@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_paper_index_never_below_the_sinks(sinks):
    """Paper mode: the frozen index is max(prefill_kept + 1 + offset, sinks) (or the positive offset, floored the
    same way); the lowest score never falls on one of the sinks whatever the offset and prompt length."""
    kept = [3, 8, 30]
    view = decode_view(kept, extra=3)
    view.sinks = sinks
    for offset in (-40, -25, -9, -5, -1, 1, 2, 3, 6, 200):
        scorer = DistanceOffset(offset=offset)
        scorer.after_prefill(view)
        raw = [k + 1 + offset if offset < 0 else offset for k in kept]
        assert view.layer_state[elastic.DROP_INDEX_KEY][:, 0].tolist() == [max(sinks, r) for r in raw]
        scores = scorer.drop_scores(view)
        for b in range(3):
            slots = row_slots(view, b, 0)
            by_score = sorted(slots, key=lambda j: float(scores[b, 0, j]))
            rank = min(max(sinks, raw[b]), len(slots) - 1)
            assert by_score[0] == slots[rank]
            if len(slots) > sinks:
                assert slots.index(by_score[0]) >= sinks


# ============================================================================================== sinks: property tests

_GQA_MODELS: dict[int, torch.nn.Module] = {}


def gqa_llama(group: int):
    """A tiny 2-layer Llama with 2 kv heads and ``group`` query heads per kv head, attached to kvpolicy."""
    if group not in _GQA_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(group)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2 * group,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=PAD,
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.15)
        kvpolicy.attach(model)
        _GQA_MODELS[group] = model
    return _GQA_MODELS[group]


def text_batch(pads: list[int], length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (len(pads), length), generator=g)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for r, p in enumerate(pads):
        ids[r, :p], mask[r, :p] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


def sink_cases(n: int) -> list[dict]:
    """Random cases: offsets (the class default, the issue's -5 and +3, random ones), ratios 0.3-0.9, 1 or 4 sinks,
    1-4 query heads per kv head, 3 left-padded rows whose real prompts are 3-60 tokens long (many short enough for a
    negative frozen index), fraction or fixed decode budgets. Only budgets that hold the sinks and the last token
    (keep > sinks): below that the reducer's edge rule keeps the last token first (docs/elastic.md)."""
    rng = torch.Generator().manual_seed(2024)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    cases = []
    while len(cases) < n:
        sinks = pick([1, 4])
        ratio = round(0.3 + 0.6 * float(torch.rand(1, generator=rng)), 2)
        reals = [int(torch.randint(3, 61, (1,), generator=rng)) for _ in range(3)]
        if any(math.ceil(t * (1 - ratio)) <= sinks for t in reals):
            continue
        offset = pick([-25, -5, 3, int(torch.randint(-40, -1, (1,), generator=rng)), int(torch.randint(1, 9, (1,),
                                                                                                     generator=rng))])
        length = max(reals) + int(torch.randint(0, 3, (1,), generator=rng))
        cases.append(dict(sinks=sinks, ratio=ratio, offset=offset, group=pick([1, 2, 3, 4]), length=length,
                          pads=[length - t for t in reals], fixed=bool(len(cases) % 4 == 3), seed=len(cases)))
    return cases


def check_paper_drops(trace, pads, length, sinks, offset, expected) -> None:
    """Every row of every layer: the first ``sinks`` real tokens are kept at every step, and each drop removes the
    entry at max(frozen index, sinks) (the newest entry if the index is past it)."""
    for layer in range(len(trace[0])):
        for r, p in enumerate(pads):
            held, drops = expected[r]
            raw = held[0] + 1 + offset if offset < 0 else offset
            sink_cols = set(range(p, p + sinks))
            for s in range(len(trace)):
                kept = trace[s][layer][1][r]
                assert all(k == kept[0] for k in kept) and trace[s][layer][0][r] == [held[s]] * len(kept)
                kept = kept[0]
                assert sink_cols <= set(kept), (layer, r, s, "a sink was evicted")
                if s == 0:
                    assert kept[-1] == length - 1
                    continue
                before = trace[s - 1][layer][1][r][0]
                dropped = set(before) - set(kept)
                if drops[s]:
                    assert dropped == {before[min(max(raw, sinks), len(before) - 1)]}, (layer, r, s)
                else:
                    assert not dropped


@pytest.mark.parametrize("case", sink_cases(16), ids=lambda c: f"s{c['sinks']}-r{c['ratio']}-o{c['offset']}-g"
                         f"{c['group']}-{'fixed' if c['fixed'] else 'frac'}")
def test_paper_mode_never_evicts_a_sink(case):
    """Elastic in paper mode, end to end (GQA, a left-padded batch of 3, 24 decode steps): no sink is ever evicted,
    whatever the offset, ratio and prompt length; the policy's sinks come from anchor_merge's start_size."""
    model = gqa_llama(case["group"])
    sinks, ratio, offset, length, pads = case["sinks"], case["ratio"], case["offset"], case["length"], case["pads"]
    keeps = [math.ceil((length - p) * (1 - ratio)) for p in pads]
    budget = Budget(ratio=ratio, decode="fixed" if case["fixed"] else "fraction")
    policy = CachePolicy(reducer=AnchorMerge(start_size=sinks), budget=budget, encode=FrequencyScorer(),
                         decode=DistanceOffset(offset=offset))
    assert policy.sinks == sinks
    _, _, trace = run_generate(model, text_batch(pads, length, case["seed"]), policy, steps=24)
    if case["fixed"]:
        expected = [([k] * 24, [False] + [True] * 23) for k in keeps]
    else:
        expected = [expected_held(length - p, ratio, 24) for p in pads]
    check_paper_drops(trace, pads, length, sinks, offset, expected)


def test_sink_cases_reach_the_index_of_the_issue():
    """The random cases above do exercise a frozen index below the sinks (negative, or a positive offset under 4
    sinks) on many rows, with several GQA groups and both budget modes."""
    cases = sink_cases(16)
    below = [
        (c["group"], c["fixed"])
        for c in cases
        for p in c["pads"]
        if (math.ceil((c["length"] - p) * (1 - c["ratio"])) + 1 + c["offset"] if c["offset"] < 0 else c["offset"])
        < c["sinks"]
    ]
    assert len(below) >= 12 and len({g for g, _ in below}) >= 3 and {f for _, f in below} == {False, True}


def authors_decode_positions(prefill: list[int], length: int, ratio: float, drop_index: int, steps: int):
    """Simulate the authors' cache on positions from the prefill they kept: each step appends the new column and
    calls their decode branch when ``forget_num == 1``. Returns the kept positions per step until their code has no
    defined result (the slicing duplicated the cache or dropped nothing, after which their next call fails), and
    how many negative-index drops happened."""
    cache = torch.tensor(prefill, dtype=torch.float32).view(1, 1, -1, 1)
    out, negative = [list(prefill)], 0
    for s in range(1, steps):
        cache = torch.cat([cache, torch.tensor([[[[float(length + s - 1)]]]])], dim=2)
        held = cache.shape[2]
        forget_num = int(held - (length + s) * (1 - ratio))
        assert forget_num <= 1  # their prefill branch (forget_num > 1) would assert
        if forget_num == 1:
            (cache, _), = authors_decode([(cache, cache)], drop_index)
            if cache.shape[2] != held - 1:
                break
            negative += drop_index < 0
        out.append(cache.flatten().long().tolist())
    return out, negative


REFERENCE_CASES = [(t, r, start, off) for t in (13, 17, 22) for r in (0.2, 0.4) for start in (1, 4) for off in (-25, -12)]


@pytest.mark.parametrize("after_attention", [True, False], ids=["drop_after_attention", "drop_in_update"])
def test_reference_negative_index_end_to_end(after_attention):
    """Every quirk on (the elastic_reference preset; also with the drop inside update(), where the new token is not
    in the view yet), batch 1, prompts short enough for a negative frozen index: the engine's kept positions follow
    the authors' decode branch step by step wherever their code defines a result (checked against the copied code,
    fed with the prefill kvpolicy kept, itself checked against theirs in test_elastic)."""
    config = pytest.importorskip("kvpolicy.config")
    model, negative, compared = gqa_llama(2), 0, 0
    for t, ratio, start, offset in REFERENCE_CASES:
        policy = config.load_policy(
            {"preset": "elastic_reference", "ratio": ratio, "sinks": start, "decode": {"offset": offset},
             "reference_quirks": {"drop_after_attention": after_attention}}
        )
        assert policy.drop_after_attention == after_attention
        assert policy.decode.params.quirk_raw_index and policy.reducer.params.start_size == start
        _, _, trace = run_generate(model, text_batch([0], t, seed=t), policy, steps=30)
        forget_num = int(t - t * (1 - ratio))
        drop_index = t - forget_num + offset  # the authors' self.selected_idx
        for layer in range(len(trace[0])):
            got = [trace[s][layer][1][0][0] for s in range(len(trace))]
            assert len(got[0]) == t - forget_num - 1  # their prefill keeps keep - 1 entries
            expected, neg = authors_decode_positions(got[0], t, ratio, drop_index, len(trace))
            assert got[: len(expected)] == expected, (t, ratio, start, offset, layer)
            negative += neg
            compared += len(expected)
    assert negative >= 100 and compared >= 30 * len(REFERENCE_CASES) * 2 // 2  # 144 and 1032 of 1440 steps
