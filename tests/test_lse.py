"""Prefill statistics from SDPA's log-sum-exp: transformers' outputs bit for bit, statistics equal a full softmax.

References: transformers' own ``sdpa_attention_forward`` (outputs, compared with ``torch.equal``), the full cache's
logits of the whole prompt (a policy's prefill must not change them), and a naive float64 softmax over every query
and key (statistics)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core import attention as attention_module
from kvpolicy.core import statistics as statistics_module
from kvpolicy.core.lse import received_from_lse
from kvpolicy.core.sdpa import sdpa_with_lse
from kvpolicy.testing import build_model, make_batch


def _module(hq: int, h: int, causal: bool = True) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_key_value_groups=hq // h, is_causal=causal, layer_idx=0)


def _padding_mask(valid: torch.Tensor, q: int) -> torch.Tensor:
    """transformers' boolean SDPA mask ``[B, 1, q, P]`` for left padding, queries at the last ``q`` columns."""
    p = valid.shape[1]
    causal = torch.arange(p)[None, :] <= torch.arange(p - q, p)[:, None]
    return (causal[None] & valid[:, None, :])[:, None]


def naive_received(query, key, valid, query_valid, scaling, window, col0, sliding_window=None):
    """Float64 softmax of every real query over the real keys at or before its column (and, with a
    ``sliding_window``, less than that many columns before it), summed over the last ``window`` queries, mean over
    each group's query heads."""
    b, hq, q, _ = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    logits = torch.einsum("bhqd,bhpd->bhqp", query.double(), key.double().repeat_interleave(g, 1)) * scaling
    own = torch.arange(q)[:, None] + col0
    allowed = valid[:, None, None, :] & (torch.arange(p)[None, :] <= own)
    if sliding_window is not None:
        allowed = allowed & (torch.arange(p)[None, :] > own - sliding_window)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    keep = query_valid.clone()
    if window is not None:
        keep[:, : max(0, q - window)] = False
    probs = probs * keep[:, None, :, None]
    return probs.sum(2).view(b, h, g, p).mean(2).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 4, 9]])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("hq,h", [(6, 2), (4, 4)])
def test_outputs_equal_transformers_sdpa_bit_for_bit(dtype, pads, masked, hq, h):
    """Both of transformers' GQA branches (``enable_gqa`` without a mask, ``repeat_kv`` with one) and no GQA, left
    padding, float32 and bfloat16: the outputs are transformers' own, bit for bit."""
    torch.manual_seed(0)
    b, q, d = len(pads), 23, 16
    query = torch.randn(b, q, hq, d, dtype=dtype).transpose(1, 2)  # non-contiguous, as the model's projections
    key, value = torch.randn(b, h, q, d, dtype=dtype), torch.randn(b, h, q, d, dtype=dtype)
    valid = torch.ones(b, q, dtype=torch.bool)
    for r, n in enumerate(pads):
        valid[r, :n] = False
    mask = _padding_mask(valid, q) if masked or any(pads) else None
    module = _module(hq, h)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=d**-0.5)
    got = sdpa_with_lse(module, query, key, value, mask, scaling=d**-0.5)
    assert got is not None
    out, lse = got
    assert torch.equal(out, expected)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, q)
    logits = torch.einsum("bhqd,bhpd->bhqp", query.double(), key.double().repeat_interleave(hq // h, 1)) * d**-0.5
    allowed = _padding_mask(valid, q).expand(b, hq, q, q)
    ref = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1)
    real = valid[:, None, :].expand(b, hq, q)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lse[real].double(), ref[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pads", [[0, 0], [0, 9]])
@pytest.mark.parametrize("past", [0, 5])
def test_sliding_layer_outputs_equal_transformers_sdpa_bit_for_bit(dtype, pads, past):
    """A sliding-window layer: transformers' own sliding mask (``sdpa_mask`` with its sliding-window mask function
    and the padding, as Gemma 3 builds it; queries after ``past`` cached columns), GQA; the outputs are transformers'
    own bit for bit and the lse is that of the softmax over each query's window."""
    from transformers.masking_utils import and_masks, padding_mask_function, sliding_window_causal_mask_function

    torch.manual_seed(4)
    b, hq, h, q, d, window = len(pads), 4, 2, 21, 16, 6
    p = past + q
    query = torch.randn(b, q, hq, d, dtype=dtype).transpose(1, 2)
    key, value = torch.randn(b, h, p, d, dtype=dtype), torch.randn(b, h, p, d, dtype=dtype)
    valid = torch.ones(b, p, dtype=torch.bool)
    for r, n in enumerate(pads):
        valid[r, :n] = False
    mask_fn = and_masks(sliding_window_causal_mask_function(window), padding_mask_function(valid))
    mask = sdpa_mask(batch_size=b, q_length=q, kv_length=p, q_offset=past, mask_function=mask_fn,
                     attention_mask=valid, local_size=window)
    assert mask is not None  # the window binds: transformers materialises the mask
    module = _module(hq, h)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=d**-0.5, sliding_window=window)
    got = sdpa_with_lse(module, query, key, value, mask, scaling=d**-0.5, sliding_window=window)
    assert got is not None
    out, lse = got
    assert torch.equal(out, expected)
    logits = torch.einsum("bhqd,bhpd->bhqp", query.double(), key.double().repeat_interleave(hq // h, 1)) * d**-0.5
    own = torch.arange(q)[:, None] + past
    allowed = (torch.arange(p)[None, :] <= own) & (torch.arange(p)[None, :] > own - window) & valid[:, None, None, :]
    ref = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1)
    real = valid[:, None, past:].expand(b, hq, q)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lse[real].double(), ref[real], atol=tol, rtol=tol)


def test_causal_call_with_more_keys_slices_like_transformers():
    """No mask, more keys than queries: transformers slices the keys to the queries' length; so does the copy."""
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 14, 8), torch.randn(2, 2, 14, 8)
    module = _module(4, 2)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    out, _ = sdpa_with_lse(module, query, key, value, None, scaling=0.3)
    assert torch.equal(out, expected)


def test_calls_the_flash_kernel_cannot_reproduce_answer_none():
    """Single-query calls, dropout, a position bias, gradients, a value head size SDPA sends to its math kernel, and
    the math backend forced by the user: ``None`` (the caller keeps its other path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    module = _module(4, 2)
    assert sdpa_with_lse(module, query, key, value, None) is not None
    assert sdpa_with_lse(module, query[:, :, :1], key, value, None) is None
    assert sdpa_with_lse(module, query, key, value, None, dropout=0.1) is None
    assert sdpa_with_lse(module, query, key, value, None, position_bias=torch.zeros(1, 4, 5, 5)) is None
    assert sdpa_with_lse(module, query.requires_grad_(), key, value, None) is None
    assert sdpa_with_lse(module, query.detach(), key, value[..., :4], None) is None
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_with_lse(module, query.detach(), key, value, None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5, 1])
@pytest.mark.parametrize("block", [(1, 1), (4, 3), (7, 64), (None, None)])
@pytest.mark.parametrize("col0", [0, 6])
@pytest.mark.parametrize("sliding", [None, 4])
def test_statistics_equal_a_naive_full_softmax(dtype, window, block, col0, sliding):
    """GQA, left padding (keys and queries), queries after earlier columns (``col0``), windows, blocks down to one
    query by one key and blocks whose diagonal spans tiles, a sliding-window layer's band (its lse made under the
    band, as its mask makes it): the statistics from the kernel's lse equal a float64 softmax over every query and
    key."""
    torch.manual_seed(2)
    b, hq, h, q, d = 3, 6, 2, 19, 16
    p = col0 + q
    query = torch.randn(b, hq, q, d, dtype=dtype) * 1.5
    key = torch.randn(b, h, p, d, dtype=dtype)
    valid = torch.ones(b, p, dtype=torch.bool)
    for r, n in enumerate([0, 3, 10]):
        valid[r, :n] = False
    query_valid = valid[:, col0:]
    own = torch.arange(q)[:, None] + col0
    mask = torch.arange(p)[None, :] <= own
    if sliding is not None:
        mask = mask & (torch.arange(p)[None, :] > own - sliding)
    mask = (mask[None] & valid[:, None, :])[:, None]
    value = torch.randn(b, h, p, d, dtype=dtype)
    _, lse = sdpa_with_lse(_module(hq, h), query, key, value, mask, scaling=d**-0.5)
    valid_h = valid[:, None].expand(b, h, p)
    got = received_from_lse(
        query, key, lse, valid_h, query_valid, d**-0.5, window, 100, 100 + col0, rows=block[0], tile=block[1],
        sliding_window=sliding,
    )
    ref = naive_received(query, key, valid, query_valid, d**-0.5, window, col0, sliding)
    tol = 1e-5 if dtype == torch.float32 else 2e-4
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert not got[~valid_h].any()  # padding keys receive nothing
    if window is None:  # every real query hands out one unit of attention per head
        units = query_valid.sum(-1, keepdim=True).float().expand(b, h)
        torch.testing.assert_close(got.sum(-1), units, atol=0, rtol=tol)


def test_extreme_logits_stay_finite():
    """A key far above the rest (an attention sink) and padding keys with huge logits: no inf or NaN leaks into
    real keys, and the sink's share matches the naive softmax."""
    torch.manual_seed(3)
    b, hq, h, q, d = 2, 4, 2, 12, 8
    query, key = torch.randn(b, hq, q, d), torch.randn(b, h, q, d)
    key[:, :, 3] = query.mean((1, 2))[:, None] * 40  # a sink
    key[1, :, :2] = query[1].mean((0, 1)) * 1e4  # padding keys that real queries would love
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[1, :2] = False
    mask = _padding_mask(valid, q)
    _, lse = sdpa_with_lse(_module(hq, h), query, key, torch.randn(b, h, q, d), mask, scaling=d**-0.5)
    got = received_from_lse(query, key, lse, valid[:, None].expand(b, h, q), valid, d**-0.5, None, 0, 0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, naive_received(query, key, valid, valid, d**-0.5, None, 0), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# In the model: a compressing prefill leaves the whole prompt's logits untouched


def _prompt_logits(model, batch, cache):
    with torch.no_grad():
        return model(**batch, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("preset", ["h2o", "elastic", "tova", "snapkv"])
def test_compressing_prefill_logits_equal_the_full_cache_bit_for_bit(dtype, family, preset, monkeypatch):
    """h2o / elastic / tova / snapkv at ratio 0.5 on a left-padded batch: every prompt position's logits equal the
    full cache's bit for bit (each layer's outputs are transformers' own; Gemma 3's sliding layers, whose window the
    40-column prompts outrun, included), the statistics come from the lse route, and the cache really is
    compressed."""
    model = build_model(family).to(dtype)
    batch = make_batch(3, 40, [0, 5, 13])
    expected = _prompt_logits(model, batch, DynamicCache(config=model.config))
    kvpolicy.attach(model)
    calls = []
    real = statistics_module.received_from_lse
    monkeypatch.setattr(statistics_module, "received_from_lse", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(attention_module, "attention_with_received", None)  # the one-pass path must not run
    cache = kvpolicy.make_cache(model, load_policy({"preset": preset, "ratio": 0.5}))
    got = _prompt_logits(model, batch, cache)
    assert torch.equal(got, expected)
    assert len(calls) >= model.config.num_hidden_layers
    for layer in cache.policy_layers:  # every layer holds less than it would uncompressed (a sliding one: its window)
        assert (layer.held()[:, 0] < layer.uncompressed()[0]).all(), layer.layer_idx


def test_eager_attention_keeps_the_one_pass_path():
    """With eager attention there is no lse: the one-pass path computes outputs and statistics (equal to eager's
    outputs up to float rounding), and the policy still compresses."""
    model = build_model("llama", attn="eager")
    batch = make_batch(2, 30, [0, 7])
    expected = _prompt_logits(model, batch, DynamicCache(config=model.config))
    kvpolicy.attach(model, backend="eager")
    cache = kvpolicy.make_cache(model, load_policy({"preset": "h2o", "ratio": 0.5}))
    got = _prompt_logits(model, batch, cache)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (cache.policy_layers[0].held()[:, 0] < batch["attention_mask"].sum(-1)).all()


@pytest.mark.parametrize("preset", ["h2o", "snapkv"])
def test_ratio_zero_with_statistics_generates_like_the_full_cache(preset):
    """A policy whose prefill needs statistics but drops nothing (ratio 0) still reproduces the full cache's greedy
    generation token for token (the honesty check's guarantee), now through the lse route."""
    model = build_model("qwen2")
    batch = make_batch(3, 36, [0, 4, 11])
    kwargs = dict(batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    kvpolicy.attach(model)
    cache = kvpolicy.make_cache(model, load_policy({"preset": preset, "ratio": 0.0}))
    got = model.generate(**kwargs, past_key_values=cache)
    assert torch.equal(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_compressing_prefill_logits_equal_the_full_cache(name, dtype):
    """The real models (every layer compressed, Gemma 3's sliding ones included), a left-padded batch of ~300
    tokens, h2o and elastic at ratio 0.5: the prompt's logits equal the full cache's bit for bit."""
    model, tokenizer = kvpolicy.load_model(name, dtype=dtype)
    texts = ["The history of the Roman empire spans many centuries, " * 30, "Light becomes chemical energy. " * 20]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = _prompt_logits(model, batch, DynamicCache(config=model.config))
    kvpolicy.attach(model)
    real = batch["attention_mask"].bool()
    for preset in ("h2o", "elastic"):
        cache = kvpolicy.make_cache(model, load_policy({"preset": preset, "ratio": 0.5}))
        got = _prompt_logits(model, batch, cache)
        assert torch.equal(got[real], expected[real]), preset
        assert (cache.policy_layers[0].held()[:, 0] < batch["attention_mask"].sum(-1)).all()
