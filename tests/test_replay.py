"""A prefill recorded once and replayed per policy (kvpolicy/core/recording.py, replay.py) against the direct path.

The independent reference is the direct path itself: the same policy's cache after the model's own prefill forward
(``make_cache`` + ``model(...)``). For every shipped preset at ratios 0.5 and 0.9, on tiny GQA Llama / Qwen2 / LLaVA
(with an image) / Gemma 3 (sliding-window layers of 8 columns around a global one, prompts of 48 columns) models and a
left-padded batch of two rows, the replayed cache must hold what the direct one holds — kept positions per layer
(sliding layers included), row and kv head, keys and values, budgets — and continue identically for a few decode
steps.

Equality: bit for bit where both paths compute every layer's inputs with the same kernel. The exception is the
one-pass kernel (``attention_with_received``): the direct path computes the outputs of a layer about to be compressed
with whole-prompt statistics from the statistics' own probability blocks, equal to SDPA's only up to float32
rounding, while a recording holds the full cache's SDPA outputs. The statistics of the *first* policy layer are still
computed by the same kernel from the same inputs (bit-identical there); later layers see inputs that differ by
rounding, so their kept positions must still agree on these tiny models and keys, values and logits agree within
:data:`ATOL`. When the prefill kernel returns SDPA's outputs bit for bit, a preset's line in :data:`KERNEL` becomes
``SAME`` and its case is held to bit-identity.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from head_tables import random_head_scores

import kvpolicy
from kvpolicy.core.policy import AttentionStat
from kvpolicy.core.probe import ProbeError
from kvpolicy.core.recording import PrefillRecording, record
from kvpolicy.core.replay import beyond_window, can_share, full_cache, replay
from kvpolicy.eval.context import build_policy as _build_policy
from kvpolicy.registry import get_registry
from kvpolicy.testing import (
    TINY_WINDOW,
    VOCAB,
    CharTokenizer,
    build_model,
    make_batch,
    tiny_text_config,
)

SAME, ONE_PASS = "same kernel", "one-pass kernel"
#: which kernel the direct path's prefill outputs come from, per shipped preset (prompt of 48 columns, ratio > 0,
#: SDPA backend on CPU). Every one is SAME: a layer about to be compressed with whole-prompt statistics runs
#: transformers' own SDPA call through the flash kernel (kvpolicy.core.sdpa: bit-identical outputs plus the lse), and
#: the statistics come from that lse both in the direct path and in the replay (from the recorded lse). ONE_PASS (the
#: one-pass kernel, equal to SDPA up to rounding) remains the path where no lse exists (eager, non-CPU devices).
KERNEL = {
    "adakv": SAME,
    "cam": SAME,
    "d2o": SAME,
    "duo_attention": SAME,
    "elastic": SAME,
    "elastic_reference": SAME,
    "expected_attention": SAME,
    "full": SAME,
    "h2o": SAME,
    "h2o_elastic_code": SAME,
    "keydiff": SAME,
    "knorm": SAME,
    "kvzip": SAME,
    "kvzip_global": SAME,
    "local": SAME,
    "lookm": SAME,
    "pyramidkv": SAME,
    "random": SAME,
    "snapkv": SAME,
    "tova": SAME,
}


@pytest.fixture(scope="module", autouse=True)
def _duo_scores(tmp_path_factory):
    """Where the random head-score tables of the tiny models go, so duo_attention needs no calibration."""
    _DUO["dir"] = tmp_path_factory.mktemp("duo")
    yield
    _DUO.clear()


_DUO: dict = {}


def build_policy(name: str, ratio: float, model=None):
    """The preset at ``ratio``; duo_attention gets a small window and a random score table for ``model`` (default:
    the tiny Llama; 48-column prompts); the kvzip presets reconstruct the context in chunks of 14 tokens (4 probe
    forwards for the 48-token row, 3 for the 41-token one: rows with different chunk counts)."""
    if name == "duo_attention":
        model = model if model is not None else build_model("llama")
        path = random_head_scores(str(_DUO["dir"] / f"{type(model).__name__}.tsv"), model)
        return _build_policy({"preset": name, "sinks": 2, "ratio": ratio,
                              "reducer": {"recent": 6, "head_scores": path}}, None)
    if name.startswith("kvzip"):
        return _build_policy({"preset": name, "ratio": ratio, "encode": {"chunk_size": 14}}, None)
    return _build_policy(name, ratio)


#: the tokenizer KVzip's probe encodes its repeat prompt with (the tiny models have none); both paths get it
TOK = CharTokenizer()


#: float32 rounding of the one-pass kernel, carried through a 2-layer model (measured differences are ~1e-6)
ATOL = 1e-4
WIDTH, PADS, STEPS = 48, [0, 7], 4
FAMILIES = ("llama", "qwen2", "llava", "gemma3")


def test_the_kernel_table_covers_every_preset_and_loosens_only_one_pass_cases():
    assert set(KERNEL) == set(get_registry().presets())
    for name, kernel in KERNEL.items():
        policy = build_policy(name, 0.5)
        whole = any(isinstance(n, AttentionStat) and (n.window is None or n.window >= WIDTH)
                    for n in policy.prefill_needs())
        # a preset that compresses with whole-prompt statistics would be ONE_PASS without the lse route
        assert kernel == SAME, (name, whole and policy.encode is not None)


class Family:
    """A tiny model, its left-padded batch, and the batch's prefill recorded once (once per :func:`beyond_window`
    answer: what a sliding layer keeps before its window for a probe or a query statistic)."""

    def __init__(self, family: str):
        self.model = kvpolicy.attach(build_model(family))
        self.batch = make_batch(2, WIDTH, pads=PADS, image=family == "llava")
        self.vlm = vlm = family == "llava"
        self.positions = None if vlm else (self.batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        self.recording = record(self.model, self.forward)
        self.recordings = {frozenset(): self.recording}

    def recording_for(self, policy) -> PrefillRecording:
        keep = beyond_window(policy, self.model, self.batch["input_ids"].shape[1])
        if keep not in self.recordings:
            self.recordings[keep] = record(self.model, self.forward, keep)
        return self.recordings[keep]

    def forward(self, cache) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(**self.batch, position_ids=self.positions, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].to(torch.float32)

    def decode(self, cache, steps: int = STEPS) -> list[torch.Tensor]:
        """Teacher-force the same random tokens through ``cache``: each step's logits."""
        g = torch.Generator().manual_seed(3)
        mask, out = self.batch["attention_mask"], []
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            tok = torch.randint(3, VOCAB - 2, (2, 1), generator=g)
            pos = None if self.positions is None else self.positions[:, -1:] + t + 1
            with torch.inference_mode():
                o = self.model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache)
            out.append(o.logits[:, -1].to(torch.float32))
        return out


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request) -> Family:
    return Family(request.param)


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(a, b), f"{what}: max |diff| {float((a - b).abs().max()) if a.shape == b.shape else a.shape}"
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=what)


def compare_layers(direct, replayed, kernel: str) -> None:
    for i, (a, b) in enumerate(zip(direct.policy_layers, replayed.policy_layers)):
        exact = kernel == SAME or i == 0  # the first policy layer's inputs are the same on both paths
        assert torch.equal(a.held(), b.held()), f"layer {a.layer_idx}: entries held"
        assert (a.prefill_keep is None) == (b.prefill_keep is None)
        if a.prefill_keep is not None:
            assert torch.equal(a.prefill_keep, b.prefill_keep), f"layer {a.layer_idx}: budgets"
        for h in range(a.held().shape[1]):
            for r in range(a.held().shape[0]):
                assert a.kept_positions(r, h) == b.kept_positions(r, h), f"layer {a.layer_idx} row {r} head {h}"
            va, pa, ta = a.slots(h)
            vb, pb, tb = b.slots(h)
            assert torch.equal(va, vb) and torch.equal(pa[va], pb[vb]) and torch.equal(ta[va], tb[vb])
            (ka, xa), (kb, xb) = a.head_kv(h), b.head_kv(h)
            _same(ka[va], kb[vb], exact, f"layer {a.layer_idx} head {h} keys")
            _same(xa[va], xb[vb], exact, f"layer {a.layer_idx} head {h} values")


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("preset", sorted(KERNEL))
def test_replay_equals_the_direct_path(fam, preset, ratio):
    kernel = KERNEL[preset]
    if fam.vlm and build_policy(preset, ratio).probe_needs():
        # a probe re-reads the prompt as token ids, without the images: both paths refuse it before any forward
        with pytest.raises(kvpolicy.UnsupportedModelError, match="vision-language"):
            kvpolicy.make_cache(fam.model, build_policy(preset, ratio), tokenizer=TOK)
        with pytest.raises(kvpolicy.UnsupportedModelError, match="vision-language"), torch.inference_mode():
            replay(fam.model, build_policy(preset, ratio), fam.recording, tokenizer=TOK)
        return
    direct = kvpolicy.make_cache(fam.model, build_policy(preset, ratio, fam.model), tokenizer=TOK)
    logits = fam.forward(direct)
    with torch.inference_mode():
        # d2o's per-prompt allocation exists only on a replay (tests/test_replay_d2o.py): its per-layer rule here
        policy = build_policy(preset, ratio, fam.model)
        replayed = replay(fam.model, policy, fam.recording_for(policy), whole_model=False, tokenizer=TOK)
    assert replayed.allocation == direct.allocation == "per-layer"
    _same(logits, fam.recording.logits, kernel == SAME, "prefill logits")
    compare_layers(direct, replayed, kernel)
    for t, (a, b) in enumerate(zip(fam.decode(direct), fam.decode(replayed))):
        _same(a, b, kernel == SAME, f"decode step {t} logits")
    compare_layers(direct, replayed, kernel)
    if preset != "full":  # the comparison can fail: something was dropped, at prefill or while decoding
        assert any(bool((x.held() < x.n_tokens[:, None]).any()) for x in replayed.policy_layers)


def test_full_cache_from_a_recording_is_the_dynamic_cache(fam):
    """The full-cache reference continues from the recording: transformers' own cache, bit for bit."""
    from transformers import DynamicCache

    plain = DynamicCache(config=fam.model.config)
    logits = fam.forward(plain)
    rebuilt = full_cache(fam.model, fam.recording)
    assert torch.equal(logits, fam.recording.logits)
    for a, b in zip(plain.layers, rebuilt.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for a, b in zip(fam.decode(plain), fam.decode(rebuilt)):
        assert torch.equal(a, b)


def test_a_replay_leaves_the_recording_untouched(fam):
    before = [(x.keys.clone(), x.values.clone()) for x in fam.recording.policy_layers]
    with torch.inference_mode():
        cache = replay(fam.model, build_policy("elastic", 0.9), fam.recording)
    fam.decode(cache)
    for (k, v), x in zip(before, fam.recording.policy_layers):
        assert torch.equal(k, x.keys) and torch.equal(v, x.values)


def test_recording_round_trips_through_torch_save_weights_only(tmp_path):
    fam = Family("qwen2")
    rec = fam.recording
    path = tmp_path / "rec.pt"
    torch.save(rec.to_dict(), path)
    back = PrefillRecording.from_dict(torch.load(path, weights_only=True))
    again = pickle.loads(pickle.dumps(rec))
    assert back.nbytes() == again.nbytes() == rec.nbytes()
    expected = sum(x.keys.nbytes + x.values.nbytes + x.query.nbytes + x.valid.nbytes + x.position_ids.nbytes
                   + (0 if x.lse is None else x.lse.nbytes) for x in rec.policy_layers)
    expected += rec.logits.nbytes + rec.token_types.nbytes + rec.input_ids.nbytes
    assert torch.equal(back.input_ids, fam.batch["input_ids"])  # what a probe reads
    assert all(x.lse is not None for x in rec.policy_layers)  # the recording ran the flash call (CPU, sdpa)
    assert rec.nbytes() == expected
    policy = build_policy("snapkv", 0.5)
    with torch.inference_mode():
        a, b = replay(fam.model, policy, rec), replay(fam.model, build_policy("snapkv", 0.5), back)
    for x, y in zip(a.policy_layers, b.policy_layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.valid, y.valid)
    bad = rec.to_dict()
    bad["format"] = 0
    with pytest.raises(ValueError, match="recording format 0"):
        PrefillRecording.from_dict(bad)


def gemma3_family(width: int, pads: list[int], backend: str = "sdpa") -> Family:
    """The tiny Gemma 3 (sliding windows of :data:`~kvpolicy.testing.TINY_WINDOW`) on a batch of two rows of
    ``width`` columns, left-padded by ``pads``, attached with ``backend``."""
    fam = Family.__new__(Family)
    fam.model = kvpolicy.attach(build_model("gemma3", attn=backend), backend=backend)
    fam.batch = make_batch(2, width, pads=pads, seed=5)
    fam.vlm = False
    fam.positions = (fam.batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    fam.recording = record(fam.model, fam.forward)
    fam.recordings = {frozenset(): fam.recording}
    return fam


@pytest.mark.parametrize("width,whole", [(WIDTH, False), (TINY_WINDOW - 1, True)])
def test_a_whole_model_allocation_needs_every_window_to_cover_the_prompt(width, whole):
    """d2o's per-prompt allocation (``model_keep``) spreads one budget over layers that each hold the prompt; a
    sliding layer whose window the prompt outruns holds less, so the replay keeps the per-layer rule there (and then
    equals the direct path); a prompt inside the window gets the whole-model allocation."""
    fam = gemma3_family(width, [0, 2])
    with torch.inference_mode():
        replayed = replay(fam.model, build_policy("d2o", 0.5), fam.recording)
    assert replayed.allocation == ("whole-model" if whole else "per-layer")
    if not whole:
        direct = kvpolicy.make_cache(fam.model, build_policy("d2o", 0.5))
        fam.forward(direct)
        compare_layers(direct, replayed, SAME)
        for a, b in zip(fam.decode(direct), fam.decode(replayed)):
            assert torch.equal(a, b)


def test_replay_refuses_a_recording_of_another_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = Family("llama")
    other = kvpolicy.attach(LlamaForCausalLM(LlamaConfig(**tiny_text_config(3))).eval())
    with pytest.raises(ValueError, match="2 layers recorded for a cache of 3"):
        replay(other, build_policy("local", 0.5), small.recording)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_can_share_needs_an_attached_model(family):
    """Nothing else is a reason: compressed_positions, decode stages, merges, sliding-window layers (Gemma 3)."""
    model = build_model(family)
    assert "attach" in can_share(build_policy("h2o", 0.5), model)
    kvpolicy.attach(model)
    for name in KERNEL:
        assert can_share(build_policy(name, 0.5, model), model) is None


def test_a_recording_holds_one_forward():
    fam = Family("llama")

    def twice(cache):
        fam.forward(cache)
        return fam.forward(cache)

    with pytest.raises(RuntimeError, match="one prefill forward"):
        record(fam.model, twice)


def test_a_recording_holds_each_policy_layers_queries_keys_and_validity():
    fam = Family("llama")
    rec = fam.recording.policy_layers[0]
    assert rec.query.shape == (2, 4, WIDTH, 16) and rec.keys.shape == (2, 2, WIDTH, 16)
    assert rec.valid.tolist() == [[True] * WIDTH, [False] * PADS[1] + [True] * (WIDTH - PADS[1])]
    assert torch.equal(rec.position_ids, fam.positions)
    assert rec.lse is not None and rec.lse.shape == (2, 4, WIDTH) and rec.lse.dtype == torch.float32
    # the lse of each real query's softmax over its causal prefix (a naive computation)
    rep = rec.keys.repeat_interleave(2, dim=1).to(torch.float32)
    logits = rec.query.to(torch.float32) @ rep.transpose(-1, -2) * 16**-0.5
    allowed = torch.ones(WIDTH, WIDTH, dtype=torch.bool).tril() & rec.valid[:, None, None, :]
    naive = logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    real = rec.valid[:, None, :].expand_as(naive)
    torch.testing.assert_close(rec.lse[real], naive[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", ["local", "snapkv", "h2o", "elastic"])
def test_the_eager_backend_replays_as_its_direct_path(preset):
    """The recording runs the backend the model is attached with, so eager outputs are recorded for an eager run."""
    fam = Family.__new__(Family)
    fam.model = kvpolicy.attach(build_model("qwen2", attn="eager"), backend="eager")
    fam.batch = make_batch(2, WIDTH, pads=PADS)
    fam.positions = (fam.batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    fam.recording = record(fam.model, fam.forward)
    direct = kvpolicy.make_cache(fam.model, build_policy(preset, 0.9))
    logits = fam.forward(direct)
    with torch.inference_mode():
        replayed = replay(fam.model, build_policy(preset, 0.9), fam.recording)
    _same(logits, fam.recording.logits, KERNEL[preset] == SAME, "prefill logits")
    compare_layers(direct, replayed, KERNEL[preset])
    for a, b in zip(fam.decode(direct), fam.decode(replayed)):
        _same(a, b, KERNEL[preset] == SAME, "decode logits")


class Vandal:
    """An encode scorer that breaks the read-only contract: it scores by attention, then zeroes the statistic."""

    needs = frozenset({AttentionStat(None)})

    def score(self, view):
        scores = view.attention[None].clone()
        view.attention[None].zero_()
        return scores


def test_statistics_are_computed_once_per_recording_and_never_shared_by_reference():
    from kvpolicy.core.budget import Budget
    from kvpolicy.core.policy import CachePolicy
    from kvpolicy.testing import PlainEvict

    fam = Family("llama")

    def policy():
        return CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=Vandal())

    direct = kvpolicy.make_cache(fam.model, policy())
    fam.forward(direct)
    with torch.inference_mode():
        first = replay(fam.model, policy(), fam.recording)
        memo = [dict(x.statistics) for x in fam.recording.policy_layers]
        second = replay(fam.model, policy(), fam.recording)
    assert all(set(m) == {AttentionStat(None)} for m in memo)
    assert all(m[AttentionStat(None)] is x.statistics[AttentionStat(None)] and bool(m[AttentionStat(None)].any())
               for m, x in zip(memo, fam.recording.policy_layers))  # computed by the first replay, kept intact
    compare_layers(direct, first, ONE_PASS)
    compare_layers(first, second, SAME)


def test_a_probe_runs_once_per_recording_and_hands_each_policy_the_direct_paths_statistic(monkeypatch):
    """KVzip's probe (kvpolicy/core/probe.py) runs after the prefill, on the replayed cache (which still holds the
    whole recorded prompt, and the recording its input_ids). Its statistic depends on the prompt, the model and the
    probe only: the first replay computes it for every policy layer and the recording keeps it for the next policies.
    Reference: the statistic the direct path hands its own deferred prefill stage."""
    from kvpolicy.core import cache as cache_module
    from kvpolicy.core.cache import PolicyCache

    fam = Family("qwen2")
    assert torch.equal(fam.recording.input_ids, fam.batch["input_ids"])
    handed: list[dict] = []
    compress = PolicyCache.compress_deferred
    monkeypatch.setattr(PolicyCache, "compress_deferred", lambda self, scores: handed.append(scores)
                        or compress(self, scores))
    probes: list[int] = []
    run_probe = cache_module.run_probe
    monkeypatch.setattr(cache_module, "run_probe", lambda *a, **k: probes.append(1) or run_probe(*a, **k))
    direct = kvpolicy.make_cache(fam.model, build_policy("kvzip", 0.5), tokenizer=TOK)
    fam.forward(direct)
    assert len(probes) == 1 and len(handed) == 1
    with torch.inference_mode():
        plain = replay(fam.model, build_policy("kvzip", 0.0), fam.recording, tokenizer=TOK)  # drops nothing
        assert not probes[1:] and handed[1:] == [{}]  # every layer waited; none drops, so no probe ran
        assert all(bool((x.held() == x.n_tokens[:, None]).all()) for x in plain.policy_layers)
        cells = [("kvzip", 0.5), ("kvzip_global", 0.9), ("kvzip", 0.5)]
        caches = [replay(fam.model, build_policy(name, r), fam.recording, tokenizer=TOK) for name, r in cells]
    assert len(probes) == 2 and len(handed) == 5  # one probe for the three replays
    need = next(iter(build_policy("kvzip", 0.5).probe_needs()))
    for layer, rec in zip(direct.policy_layers, fam.recording.policy_layers):
        assert torch.equal(rec.statistics[need], handed[0][layer.layer_idx][need])
        assert bool(rec.statistics[need].any())
        assert all(h[layer.layer_idx][need] is not rec.statistics[need] for h in handed[2:])  # copies
    compare_layers(direct, caches[0], SAME)
    compare_layers(caches[0], caches[2], SAME)


def test_a_recording_of_embeddings_cannot_feed_a_probe():
    fam = Family("llama")

    def embeds(cache) -> torch.Tensor:
        with torch.inference_mode():
            e = fam.model.get_input_embeddings()(fam.batch["input_ids"])
            out = fam.model(inputs_embeds=e, attention_mask=fam.batch["attention_mask"], position_ids=fam.positions,
                            past_key_values=cache, use_cache=True)
        return out.logits[:, -1].to(torch.float32)

    rec = record(fam.model, embeds)
    assert rec.input_ids is None
    with pytest.raises(ProbeError, match="no input_ids"), torch.inference_mode():
        replay(fam.model, build_policy("kvzip", 0.5), rec, tokenizer=TOK)
