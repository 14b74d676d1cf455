"""Per-head scores (``kvpolicy.heads``): the calibration against the engine, its cache, the model identity, the score
files, and how the ``duo_attention`` reducer finds a model's calibrated scores.

The calibration's reference is the engine itself: for every kv head, a ``duo_attention`` cache whose table makes that
one head the only streamed one really compresses the prefilled context, the question and answer are appended
(``cache.appending()``), and the KL of their answer distributions against a plain cache must equal the calibration's
score for that head (the calibration streams the head with its own attention function over a shared prefill).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from typer.testing import CliRunner

import kvpolicy
from kvpolicy.cli import app
from kvpolicy.config import load_policy
from kvpolicy.heads import calibrate as calibration
from kvpolicy.heads.calibrate import CalibrationItem, calibrate_heads, item_from_sample, measure_heads
from kvpolicy.heads.settings import DEFAULT_TASKS, HeadCalibration
from kvpolicy.heads.store import model_identity, policy_layers, save_scores, scores_path
from kvpolicy.heads.table import HeadScores, HeadScoresError, parse_scores, read_scores, write_scores
from kvpolicy.testing import VOCAB

from test_duo_attention import tiny_llama

SINKS, RECENT = 2, 6


def items(count: int = 2, length: int = 60, seed: int = 3) -> list[CalibrationItem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(3, VOCAB - 2, (length + 7 * i,), generator=g).tolist()
        target = torch.randint(3, VOCAB - 2, (5,), generator=g).tolist()
        out.append(item_from_sample(prompt, target, question_tokens=8 if i % 2 == 0 else 0))
    return out


def settings(**kw) -> HeadCalibration:
    return HeadCalibration(sinks=SINKS, recent=RECENT, context_tokens=256, **kw)


def engine_kl(model, item: CalibrationItem, layer: int, head: int, tmp_path) -> float:
    """KL at the measured answer positions when the engine streams exactly (layer, head) of the prefilled context."""
    text = model.config
    table = torch.ones(text.num_hidden_layers, text.num_key_value_heads, dtype=torch.float64)
    table[[i for i in range(text.num_hidden_layers) if i not in policy_layers(model.config)]] = float("nan")
    table[layer, head] = 0.0
    path = tmp_path / f"one_{layer}_{head}.tsv"
    write_scores(path, table)
    n, units = len(item.context), int(torch.isfinite(table).sum())
    window = SINKS + RECENT
    policy = load_policy({"preset": "duo_attention", "sinks": SINKS, "ratio": (n - window) / (units * n),
                          "reducer": {"recent": RECENT, "head_scores": str(path)}})
    ctx, tail = torch.tensor([item.context]), torch.tensor([item.tail])
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        model(input_ids=ctx, past_key_values=plain)
        ref = torch.log_softmax(model(input_ids=tail, past_key_values=plain).logits[0, item.first:], -1)
        cache = kvpolicy.make_cache(model, policy)
        model(input_ids=ctx, past_key_values=cache)
        # a head holding less than its layer would uncompressed (a sliding layer: its window, not the context)
        streamed = [(pl.layer_idx, h) for pl in cache.policy_layers for h in range(pl.held().shape[1])
                    if int(pl.held()[0, h]) < int(pl.uncompressed()[0][0])]
        assert streamed == [(layer, head)]  # the engine streamed exactly this head
        with cache.appending():
            out = torch.log_softmax(model(input_ids=tail, past_key_values=cache).logits[0, item.first:], -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_calibration_equals_the_engine_streaming_one_head(tmp_path):
    model = tiny_llama(layers=3)
    data = items()
    scores = measure_heads(model, data, settings(batch=4))  # 6 heads: one batch of 4, one of 2
    assert scores.shape == (3, 2) and bool(torch.isfinite(scores).all())
    for layer in range(3):
        for head in range(2):
            want = sum(engine_kl(model, it, layer, head, tmp_path) for it in data) / len(data)
            assert float(scores[layer, head]) == pytest.approx(want, rel=1e-4, abs=1e-7), (layer, head)
    assert float(scores.max()) > 1e-3  # streaming a head of this model changes its answers: the test can fail


def test_calibration_is_deterministic_and_independent_of_the_batch():
    model = tiny_llama(layers=2)
    data = items()
    one = measure_heads(model, data, settings(batch=1))
    assert torch.equal(one, measure_heads(model, data, settings(batch=1)))
    assert torch.allclose(one, measure_heads(model, data, settings(batch=3)), rtol=1e-4, atol=1e-8)


def test_calibration_is_cached_per_model_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    model = tiny_llama(layers=2)
    first = calibrate_heads(model, settings=settings(), items=items())
    assert first.source.startswith(str(tmp_path / "head_scores")) and read_scores(first.source).scores.equal(
        first.scores)
    assert first.meta["model_identity"] == model_identity(model) and first.meta["items"] == 2

    def no_measure(*args, **kwargs):
        raise AssertionError("the second call must read the cache")

    monkeypatch.setattr(calibration, "measure_heads", no_measure)
    again = calibrate_heads(model, settings=settings(), items=items())
    assert torch.equal(again.scores, first.scores) and again.meta == first.meta
    with pytest.raises(AssertionError, match="read the cache"):  # other settings, other items: measured again
        calibrate_heads(model, settings=settings(seed=1), items=items())
    with pytest.raises(AssertionError, match="read the cache"):
        calibrate_heads(model, settings=settings(), items=items(seed=4))


def tiny_gemma3() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=16, max_position_embeddings=512, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return kvpolicy.attach(model.eval())


def test_one_kv_head_model_scores_whole_full_attention_layers(tmp_path):
    """Gemma 3: only the full-attention layers are scored (nan rows for the sliding ones, which duo_attention leaves
    to their window), one unit per layer; the scores still equal the engine's (whose sliding layers hold their window
    of the 70-token context, as transformers' sliding cache does in the calibration)."""
    model = tiny_gemma3()
    assert policy_layers(model.config) == [1, 3]
    data = items(count=1, length=70)
    scores = measure_heads(model, data, settings())
    assert scores.shape == (4, 1)
    assert bool(torch.isnan(scores[[0, 2]]).all()) and bool(torch.isfinite(scores[[1, 3]]).all())
    for layer in (1, 3):
        assert float(scores[layer, 0]) == pytest.approx(engine_kl(model, data[0], layer, 0, tmp_path), rel=1e-4,
                                                        abs=1e-7)


def test_model_identity_ignores_dtype_and_attention_but_not_weights():
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    ident = model_identity(a)
    assert model_identity(b) == ident
    b.set_attn_implementation("eager")
    assert model_identity(tiny_llama(layers=2).to(torch.bfloat16)) == ident
    c = tiny_llama(layers=2)
    with torch.no_grad():
        c.model.embed_tokens.weight[0, 0] += 1.0
    assert model_identity(c) != ident


def test_authors_file_format_and_errors(tmp_path):
    authors = ("6.054687500000000000e-01\t0.000000000000000000e+00\t9.687500000000000000e-01\n"
               "9.960937500000000000e-01\t1.000000000000000000e+00\t-2.0e-02\n")
    table = parse_scores(authors, "full_attention_heads.tsv")
    assert table.scores.tolist() == [[0.60546875, 0.0, 0.96875], [0.99609375, 1.0, -0.02]]  # not clipped
    path = tmp_path / "t.tsv"
    write_scores(path, torch.tensor([[float("nan")] * 2, [0.25, 1 / 3]], dtype=torch.float64))
    back = read_scores(path)
    assert back.scored_layers() == [1] and back.scores[1].tolist() == [0.25, 1 / 3]  # exact round trip
    for text, message in (("0.1\tnan\n", "mixes numbers and nan"), ("a b\n", "not a row of numbers"),
                          ("nan\nnan\n", "every layer is nan"), ("", "no scores"), ("1\tinf\n", "infinite")):
        with pytest.raises(HeadScoresError, match=message):
            parse_scores(text, "x.tsv")


def test_reducer_finds_the_models_calibrated_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    model = tiny_llama(layers=3)
    policy = load_policy({"preset": "duo_attention", "sinks": SINKS, "reducer": {"recent": RECENT}, "ratio": 0.5})
    with pytest.raises(HeadScoresError, match=f"kvpolicy calibrate-heads --model .* --sinks {SINKS} --recent {RECENT}"):
        kvpolicy.make_cache(model, policy)
    table = torch.tensor([[0.5, 0.1], [0.9, 0.2], [0.4, 0.3]], dtype=torch.float64)
    path = scores_path(model_identity(model), HeadCalibration(sinks=SINKS, recent=RECENT))
    save_scores(path, HeadScores(table, meta={"test": True}))
    cache = kvpolicy.make_cache(model, policy)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB - 2, (1, 40)), past_key_values=cache)
    held = torch.stack([pl.held()[0] for pl in cache.policy_layers])
    # 40 tokens, keep 20 per head on average: ceil(6 * 20 / 32) = 4 heads stream, the four lowest-scored
    assert held.tolist() == [[40, 8], [40, 8], [8, 8]]
    write_scores(path, table[:2])  # a table for another model shape fails when the cache is built
    with pytest.raises(HeadScoresError, match="2 layers x 2 kv heads; the model has 3 layers"):
        kvpolicy.make_cache(model, policy)


def test_default_tasks_are_rulers_needle_tasks():
    from kvpolicy.eval.tasks.ruler_text import NIAH_TASKS

    assert DEFAULT_TASKS == tuple(NIAH_TASKS)
    assert HeadCalibration().context_tokens == 1280 and HeadCalibration(recent=1024).context_tokens == 4352


def test_cli_rejects_bad_settings_before_loading_a_model():
    runner = CliRunner()
    out = runner.invoke(app, ["calibrate-heads", "--model", "no-such-model", "--context-tokens", "300"])
    assert out.exit_code == 2 and "context_tokens: 300 is too short" in out.output
    out = runner.invoke(app, ["calibrate-heads", "--model", "no-such-model", "--tasks", "niah_single_1,nope"])
    assert out.exit_code == 2 and "unknown RULER task(s) nope" in out.output
    out = runner.invoke(app, ["calibrate-heads", "--model", "no-such-model"])
    assert out.exit_code == 2 and "--model" in out.output and "unknown model" in out.output


@pytest.mark.slow
def test_smollm2_calibration_finds_retrieval_heads_and_runs_the_policy(tmp_path, monkeypatch):
    """The real model: one RULER sample; a few heads dominate (retrieval heads), and the preset with those scores
    answers the sample's question with a cache that keeps at most half of the entries."""
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    model, tok = kvpolicy.load_model("smollm2-135m")
    cal = HeadCalibration(samples=1, tasks="niah_single_1")
    scores = calibrate_heads(model, tok, cal)
    flat = scores.scores.flatten()
    assert flat.shape == (90,) and bool(torch.isfinite(flat).all())
    top = flat.sort(descending=True).values
    assert float(top[0]) > 10 * float(flat.median())  # a few heads matter far more than the typical one
    kvpolicy.attach(model)
    policy = load_policy({"preset": "duo_attention", "reducer": {"head_scores": scores.source}})
    item = calibration.calibration_items(tok, cal)[0]
    cache = kvpolicy.make_cache(model, policy)
    with torch.no_grad():
        model(input_ids=torch.tensor([item.context]), past_key_values=cache)
    held = sum(int(pl.held().sum()) for pl in cache.policy_layers)
    assert held <= math.ceil(len(item.context) * 0.5) * 90
