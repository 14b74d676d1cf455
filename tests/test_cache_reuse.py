"""One cache across two generate() calls: what transformers' DynamicCache does, and what a PolicyCache does.

transformers reads a non-empty cache as the beginning of the same sequences: it feeds only the prompt columns after
those the cache has seen. A DynamicCache reused for another batch size fails inside torch ("Sizes of tensors must
match"); a prompt no longer than what it has seen reaches the model with no token at all. A PolicyCache raises
CacheReuseError naming the fix before the model runs, and continues a same-size batch exactly like DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from conftest import PAD, build_model, first_last_policy, keep_all_policy, make_batch
from kvpolicy import Budget, CacheReuseError

FIX = "a PolicyCache serves one generation: pass a fresh kvpolicy.make_cache(model, policy) to each generate() call"


def _gen(model, batch, cache, n=5):
    return model.generate(**batch, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    return kvpolicy.attach(build_model("llama"))


def _used(model, kind: str):
    """A cache after one generation of 2 left-padded rows (16 prompt columns + 5 new tokens: 20 columns seen)."""
    cache = DynamicCache(config=model.config) if kind == "dynamic" else kvpolicy.make_cache(
        model, first_last_policy(Budget(ratio=0.5))
    )
    _gen(model, make_batch(2, 16, [0, 3]), cache)
    assert cache.get_seq_length() == 20
    return cache


@pytest.mark.parametrize("rows", [1, 3])
def test_other_batch_size(model, rows):
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # transformers does not guard this
        _gen(model, make_batch(rows, 12, seed=2), _used(model, "dynamic"))
    cache = _used(model, "policy")
    before = [layer.kept_positions(0) for layer in cache.policy_layers]
    with pytest.raises(CacheReuseError) as info:
        _gen(model, make_batch(rows, 12, seed=2), cache)
    assert str(info.value) == (
        f"kvpolicy: this cache already holds a generation of 2 rows (20 columns seen) and was given a batch of "
        f"{rows}; {FIX}"
    )
    # raised before the model ran: the cache is untouched
    assert [layer.kept_positions(0) for layer in cache.policy_layers] == before and cache.get_seq_length() == 20


def test_prompt_that_brings_no_new_token(model):
    """10 prompt columns after 20 seen: generate() slices ``input_ids[:, -(10 - 20):]``, i.e. nothing."""
    with pytest.raises(RuntimeError, match="0 elements"):
        _gen(model, make_batch(2, 10, seed=2), _used(model, "dynamic"))
    with pytest.raises(CacheReuseError) as info:
        _gen(model, make_batch(2, 10, seed=2), _used(model, "policy"))
    assert str(info.value) == (
        "kvpolicy: this cache already holds a generation (20 columns seen) and the forward brings no new token "
        f"(generate() only feeds the prompt columns after those the cache has seen); {FIX}"
    )


def test_the_named_fix_gives_the_tokens_of_a_separate_run(model):
    """A fresh cache per call: the second batch (1 row) gets exactly what a DynamicCache run alone gives."""
    second = make_batch(1, 12, seed=2)
    _gen(model, make_batch(2, 16, [0, 3]), kvpolicy.make_cache(model, keep_all_policy()))
    got = _gen(model, second, kvpolicy.make_cache(model, keep_all_policy()))
    assert torch.equal(got, _gen(model, second, DynamicCache(config=model.config)))


def test_same_batch_continuation_matches_dynamic_cache(model):
    """Passing the first call's output plus more tokens continues the sequences, as with DynamicCache (ratio 0)."""
    first = make_batch(2, 16, [0, 3])
    extra = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(5))
    outs = []
    for cache in (DynamicCache(config=model.config), kvpolicy.make_cache(model, keep_all_policy())):
        out = _gen(model, first, cache)
        ids = torch.cat([out, extra], dim=1)
        mask = torch.cat([first["attention_mask"], torch.ones(2, ids.shape[1] - 16, dtype=torch.long)], dim=1)
        outs.append(_gen(model, {"input_ids": ids, "attention_mask": mask}, cache))
    assert outs[0].shape == (2, 16 + 5 + 4 + 5) and torch.equal(outs[0], outs[1])
