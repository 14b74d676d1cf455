"""Whole-model allocation on a replayed prefill (``BudgetAllocator.model_keep``, ``ModelView``) and D2O's per-prompt
layer budgets against a naive per-prompt allocation.

The naive reference runs each prompt alone, unpadded, through the same weights with transformers' eager attention
and ``output_attentions=True``, computes D2O's densities from the full attention maps with ``layer_densities`` (the
authors' statistic) and allocates with ``d2o_budgets``. The replay must arrive at the same per-layer budgets for every
row of a left-padded batch, from its own statistic (the attention each key receives per query head, computed in
chunks from the recorded queries and keys).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpolicy
from kvpolicy.core.budget import Budget
from kvpolicy.core.partcheck import PartError
from kvpolicy.core.policy import CachePolicy
from kvpolicy.core.recording import record
from kvpolicy.core.replay import replay
from kvpolicy.eval.context import build_policy
from kvpolicy.testing import FirstLast, PlainEvict, make_batch, tiny_text_config
from kvpolicy_plugins.d2o import d2o_budgets, layer_densities, prompt_densities

LAYERS, WIDTH, PADS, RATIO = 4, 40, [0, 9], 0.5


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_text_config(LAYERS)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    plain = _model()
    eager = copy.deepcopy(plain)
    eager.set_attn_implementation("eager")
    model = kvpolicy.attach(plain)
    batch = make_batch(2, WIDTH, pads=PADS, seed=4)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def forward(cache):
        with torch.inference_mode():
            return model(**batch, position_ids=positions, past_key_values=cache).logits[:, -1]

    naive = []  # per row: (attention maps of the prompt alone, densities)
    for r, pad in enumerate(PADS):
        with torch.inference_mode():
            out = eager(input_ids=batch["input_ids"][r : r + 1, pad:], output_attentions=True)
        naive.append((out.attentions, layer_densities(out.attentions)))
    return model, record(model, forward), forward, naive


def _spy(policy: CachePolicy, seen: list) -> CachePolicy:
    """Keep the ModelView the allocator's model_keep receives."""
    original = policy.allocator.model_keep

    def model_keep(view):
        seen.append(view)
        return original(view)

    policy.allocator.model_keep = model_keep
    return policy


def test_d2o_allocates_per_prompt_as_the_naive_per_prompt_allocation(setup):
    model, rec, _, naive = setup
    seen: list = []
    with torch.inference_mode():
        cache = replay(model, _spy(build_policy("d2o", RATIO), seen), rec)
    assert cache.allocation == "whole-model"
    (view,) = seen
    mine = prompt_densities(view)
    for r, (maps, dens) in enumerate(naive):
        n = WIDTH - PADS[r]
        for i, att in enumerate(maps):  # the statistic: attention each key receives per query head
            got = view.head_attention(i)[r][:, PADS[r]:]
            torch.testing.assert_close(got, att[0].sum(dim=-2), rtol=0, atol=1e-5)
        assert [mine[i][r] for i in range(LAYERS)] == pytest.approx(dens, abs=1e-5)
        keep = -(-n // 2)  # ceil(n * (1 - 0.5))
        want = d2o_budgets(dens, keep, n)
        got = [int(layer.prefill_keep[r]) for layer in cache.policy_layers]
        assert got == want and sum(got) == LAYERS * keep
        assert len(set(got)) > 1  # not the uniform budgets the direct path gives
        for layer in cache.policy_layers:
            assert (layer.held()[r] == layer.prefill_keep[r]).all()


def test_the_direct_path_keeps_the_per_layer_rule(setup):
    model, _, forward, naive = setup
    cache = kvpolicy.make_cache(model, build_policy("d2o", RATIO))
    forward(cache)
    assert cache.allocation == "per-layer"
    for r in range(2):
        keep = -(-(WIDTH - PADS[r]) // 2)
        assert [int(x.prefill_keep[r]) for x in cache.policy_layers] == [keep] * LAYERS


@pytest.mark.parametrize("over", [{"allocator.per_prompt": False}, {"allocator.variances": [0.1, 0.5, 0.2, 0.9]}])
def test_given_densities_or_per_prompt_off_replay_as_the_direct_path(setup, over):
    model, rec, forward, _ = setup
    direct = kvpolicy.make_cache(model, build_policy("d2o", RATIO, over))
    forward(direct)
    with torch.inference_mode():
        replayed = replay(model, build_policy("d2o", RATIO, over), rec)
    assert replayed.allocation == "per-layer"
    for a, b in zip(direct.policy_layers, replayed.policy_layers):
        assert torch.equal(a.prefill_keep, b.prefill_keep)


def test_quirk_skip_layers_on_top_of_per_prompt_budgets(setup):
    model, rec, _, naive = setup
    with torch.inference_mode():
        cache = replay(model, build_policy("d2o", RATIO, {"allocator.quirk_skip_layers": True}), rec)
    for r, (_, dens) in enumerate(naive):
        n = WIDTH - PADS[r]
        want = d2o_budgets(dens, -(-n // 2), n)
        want = [n if i in (0, 1, LAYERS - 1) else k for i, k in enumerate(want)]
        assert [int(x.prefill_keep[r]) for x in cache.policy_layers] == want


class Fixed:
    """A whole-model allocator with a hand-made answer: layer i keeps keep - i entries (or the given tensor)."""

    def __init__(self, answer=None):
        self.answer = answer

    def layer_keep(self, layer_idx, num_layers, keep, n_tokens):
        return keep

    def model_keep(self, model):
        if self.answer is not None:
            return self.answer
        return torch.stack([model.keep - i for i in range(len(model.layers))])


def _custom(allocator) -> CachePolicy:
    return CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=RATIO), encode=FirstLast(2), allocator=allocator)


def test_model_keep_budgets_are_what_each_layer_keeps(setup):
    model, rec, _, _ = setup
    with torch.inference_mode():
        cache = replay(model, _custom(Fixed()), rec)
    for i, layer in enumerate(cache.policy_layers):
        for r in range(2):
            keep = -(-(WIDTH - PADS[r]) // 2) - i
            assert (layer.held()[r] == keep).all()
            newest = list(range(WIDTH - keep + 2, WIDTH))
            assert layer.kept_positions(r) == [PADS[r], PADS[r] + 1] + newest  # FirstLast: 2 sinks + newest


@pytest.mark.parametrize("answer, problem", [
    (torch.ones(3, 2, dtype=torch.long), "model_keep returned shape (3, 2); expected int64 [L, B] = [4, 2]"),
    ([1, 2], "model_keep returned list"),
    (torch.full((4, 2), -1), "returned negative budgets"),
])
def test_a_bad_model_keep_is_one_error_naming_the_allocator(setup, answer, problem):
    model, rec, _, _ = setup
    with pytest.raises(PartError, match="allocator Fixed") as err:
        replay(model, _custom(Fixed(answer)), rec)
    assert problem in str(err.value)
