"""The engine's query statistics (``QueryStat``) against a naive computation on captured queries.

The reference captures the *pre-RoPE* queries straight from each layer's ``q_proj`` (a forward hook: no rotation is
ever applied or inverted on that side), selects each row's counted queries with Python loops (real tokens only, the
row's first ``skip_first`` skipped, the last ``window`` kept) and computes mean and biased covariance in float64.
GQA (4 query / 2 kv heads) and left-padded batches; positions as a plain forward (columns) and as generate() gives
them (counted from each row's first real token).
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.core.cache import PolicyCache, UnsupportedModelError
from kvpolicy.core.policy import Budget, CachePolicy, LayerView, QueryStat
from kvpolicy.core.querystats import RopeFrequencies, average_rotation, rotate
from kvpolicy.testing import KeepAll, PlainEvict, build_model, make_batch


class Recorder:
    """Encode scorer that records ``view.queries`` per layer (and scores by position)."""

    def __init__(self, need: QueryStat):
        self.needs = frozenset({need})
        self.seen: dict[int, object] = {}

    def score(self, view: LayerView) -> torch.Tensor:
        self.seen[view.layer_idx] = next(iter(view.queries.values()))
        return view.positions.to(torch.float32)


def _captured(model) -> tuple[dict[int, torch.Tensor], list]:
    """Hooks that capture each layer's q_proj output ``[B, q, Hq*D]`` (pre-RoPE queries), and the hook handles."""
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out.detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    return caught, hooks


def _reference(q: torch.Tensor, mask: torch.Tensor, hq: int, window, skip: int):
    """float64 mean ``[B, Hq, D]`` and covariance ``[B, Hq, D, D]`` over the counted queries of each row, by loops."""
    b, n, _ = q.shape
    d = q.shape[-1] // hq
    q = q.double().view(b, n, hq, d)
    means, covs = torch.zeros(b, hq, d, dtype=torch.float64), torch.zeros(b, hq, d, d, dtype=torch.float64)
    for r in range(b):
        cols = [c for c in range(n) if mask[r, c]][skip:]
        if window is not None:
            cols = cols[-window:]
        for h in range(hq):
            x = torch.stack([q[r, c, h] for c in cols])
            mu = x.mean(0)
            means[r, h] = mu
            covs[r, h] = sum(torch.outer(v - mu, v - mu) for v in x) / len(cols)
    return means, covs


@pytest.mark.parametrize("window,skip,generate_positions", [(None, 0, False), (5, 0, True), (None, 3, True), (40, 2, False)])
def test_query_stats_equal_naive_on_captured_queries(window, skip, generate_positions):
    torch.manual_seed(0)
    model = kvpolicy.attach(build_model("llama").to(torch.float32))
    batch = make_batch(3, 17, pads=[0, 4, 7])
    need = QueryStat(window=window, covariance=True, skip_first=skip)
    rec = Recorder(need)
    policy = CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=rec)
    caught, hooks = _captured(model)
    kwargs = {}
    if generate_positions:  # what generate() passes: positions counted from each row's first real token
        pos = batch["attention_mask"].cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(batch["attention_mask"] == 0, 1)
    with torch.no_grad():
        model(**batch, **kwargs, past_key_values=kvpolicy.make_cache(model, policy), use_cache=True)
    for h in hooks:
        h.remove()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    assert hq > hkv  # GQA
    mask = batch["attention_mask"].bool()
    for i, q in caught.items():
        stats = rec.seen[i]
        mu, cov = _reference(q, mask, hq, window, skip)
        b, _, _, d = stats.mean.shape
        assert stats.mean.shape == (3, hkv, hq // hkv, d)
        torch.testing.assert_close(stats.mean.reshape(b, hq, d).double(), mu, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(stats.covariance.reshape(b, hq, d, d).double(), cov, atol=2e-5, rtol=1e-4)
        real = mask.sum(-1)
        counted = (real - skip) if window is None else (real - skip).clamp(max=window)
        assert stats.count.tolist() == counted.tolist()
        # the next RoPE position: generate()'s counts from each row's first real token, a plain forward's columns
        expect = real if generate_positions else torch.full((3,), 17)
        assert stats.next_position.tolist() == expect.tolist()


def test_pad_queries_never_count():
    """Pad tokens' queries set to huge values (through their embeddings) change no statistic."""
    torch.manual_seed(0)
    model = kvpolicy.attach(build_model("llama").to(torch.float32))
    batch = make_batch(2, 12, pads=[0, 5])
    out = []
    for pad_id in (0, 7):
        ids = batch["input_ids"].clone()
        ids[1, :5] = pad_id
        rec = Recorder(QueryStat(covariance=True))
        policy = CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=rec)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=batch["attention_mask"], past_key_values=kvpolicy.make_cache(model, policy))
        out.append(rec.seen[0])
    torch.testing.assert_close(out[0].mean, out[1].mean)
    torch.testing.assert_close(out[0].covariance, out[1].covariance)


def test_rotate_inverts_and_average_rotation_is_the_mean_of_rotations():
    g = torch.Generator().manual_seed(3)
    rope = RopeFrequencies(1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)), 1.25)
    x = torch.randn(2, 3, 5, 16, generator=g)
    pos = torch.tensor([[0, 3, 9, 40, 1000], [1, 2, 3, 4, 5]])
    torch.testing.assert_close(rotate(rotate(x, pos, rope), pos, rope, inverse=True), x, atol=1e-5, rtol=1e-5)
    # transformers' own RoPE (apply_rotary_pos_emb) is what rotate() must reproduce
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ang = pos.double()[..., None] * rope.inv_freq
    emb = torch.cat((ang, ang), -1)
    cos, sin = (emb.cos() * 1.25).float(), (emb.sin() * 1.25).float()
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotate(x, pos, rope), ref, atol=1e-5, rtol=1e-5)
    # average rotation: mean over positions of (rotate to p), applied as a matrix
    start, n = torch.tensor([7, 100]), 6
    r = average_rotation(rope, start, n)
    v = torch.randn(2, 16, generator=g)
    naive = torch.stack(
        [
            torch.stack([rotate(v[b].view(1, 1, 1, 16), torch.tensor([[p]]), rope)[0, 0, 0] for p in range(s, s + n)]).mean(0)
            for b, s in enumerate(start.tolist())
        ]
    )
    torch.testing.assert_close(torch.einsum("bij,bj->bi", r, v), naive, atol=1e-5, rtol=1e-5)


def test_unsupported_rope_is_refused_naming_the_model():
    from transformers import LlamaConfig, Qwen2VLConfig

    policy = CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=Recorder(QueryStat()))
    with pytest.raises(UnsupportedModelError, match="Qwen2VLConfig.*M-RoPE"):
        PolicyCache(policy, Qwen2VLConfig())
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    cfg.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedModelError, match="LlamaConfig.*partial_rotary_factor"):
        PolicyCache(policy, cfg)
    # a policy without a QueryStat never reads the RoPE configuration
    plain = CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=KeepAll())
    assert all(layer.rope is None for layer in PolicyCache(plain, Qwen2VLConfig()).policy_layers)


def test_generate_hands_each_row_its_own_positions():
    """Under generate() (left padding), the statistic's positions are generate()'s: each row's next position is its
    number of real tokens, and the statistics equal those of the same rows run one by one without padding."""
    torch.manual_seed(0)
    model = kvpolicy.attach(build_model("llama").to(torch.float32))
    batch = make_batch(2, 14, pads=[0, 5])
    kw = {"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": False, "pad_token_id": 0}

    def run(ids, mask):
        rec = Recorder(QueryStat(covariance=True, skip_first=1))
        policy = CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=rec)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=kvpolicy.make_cache(model, policy), **kw)
        return rec.seen

    both = run(batch["input_ids"], batch["attention_mask"])
    alone = run(batch["input_ids"][1:, 5:], batch["attention_mask"][1:, 5:])
    assert both[0].next_position.tolist() == [14, 9]
    for i in both:
        torch.testing.assert_close(both[i].mean[1], alone[i].mean[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both[i].covariance[1], alone[i].covariance[0], atol=1e-5, rtol=1e-4)
