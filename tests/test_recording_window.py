"""What a recording keeps of a sliding-window layer (kvpolicy/core/recording.py, "A sliding-window layer keeps its
window only") and what a replay does with less than the whole prompt (kvpolicy/core/replay.py).

References: transformers' own cache (a ``DynamicCache``'s sliding layer hands its attention every column of the
prompt: what the layer's recording would be whole), naive counts of the columns a window keeps, a naive log-sum-exp,
and the direct path (``make_cache`` + the model's own forward) for what a replay from the windowed recording holds.
The tiny Gemma 3 slides over 8 columns (:data:`~kvpolicy.testing.TINY_WINDOW`); prompts of 48 columns outrun it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.core.recording import LayerRecording, PrefillRecording, record
from kvpolicy.core.replay import beyond_window, replay
from kvpolicy.eval.context import build_policy as _build_policy
from kvpolicy.testing import TINY_GEMMA_LAYERS, TINY_WINDOW
from test_replay import SAME, TOK, WIDTH, Family, build_policy, compare_layers, gemma3_family

W = TINY_WINDOW
#: a row padded past the window (5 real tokens, all inside the last 8 columns) beside a whole row; and the tables' pads
PADDINGS = ([0, 7], [3, WIDTH - 5])


def transformers_states(fam: Family) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values over every column, as transformers' own ``DynamicCache`` hands them to the
    attention (its sliding layers return the whole prompt from ``update`` and keep only their window)."""
    cache = DynamicCache(config=fam.model.config)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(cache.layers):
        def capture(k, v, *args, _i=i, _update=layer.update, **kwargs):
            got[_i] = _update(k, v, *args, **kwargs)
            return got[_i]
        layer.update = capture
    fam.forward(cache)
    return got


def naive_lse(rec: LayerRecording, keys: torch.Tensor, sliding: bool) -> torch.Tensor:
    """float32 ``[B, Hq, kept]``: the log-sum-exp of each kept query's softmax over the keys its mask lets it see."""
    cols = torch.arange(WIDTH)
    qcols = cols[rec.query_start:]
    rep = keys.repeat_interleave(rec.query.shape[1] // keys.shape[1], dim=1).to(torch.float32)
    logits = rec.query.to(torch.float32) @ rep.transpose(-1, -2) * rec.scaling
    allowed = (cols[None, :] <= qcols[:, None]) & rec.valid[:, None, None, :]
    if sliding:
        allowed = allowed & (cols[None, :] > qcols[:, None] - W)
    return logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("pads", PADDINGS, ids=str)
def test_a_sliding_layer_records_only_its_window(pads):
    """Every column of a global layer; of a sliding layer the last W columns of keys, values, queries and lse (what
    its window rule keeps after the prefill), equal to transformers' own states there; validity and positions of
    every column. Bytes: a naive count from the model's shapes."""
    fam = gemma3_family(WIDTH, pads)
    states = transformers_states(fam)
    rec_all = fam.recording
    assert len(rec_all.layers) == len(TINY_GEMMA_LAYERS)
    b, h, hq, d, item = 2, 2, 4, 16, 4  # tiny Gemma 3: 2 kv / 4 query heads of 16, float32
    expected = rec_all.logits.nbytes + rec_all.token_types.nbytes + rec_all.input_ids.nbytes
    for i, (rec, kind) in enumerate(zip(rec_all.layers, TINY_GEMMA_LAYERS)):
        sliding = kind == "sliding_attention"
        held = W if sliding else WIDTH
        first = WIDTH - held
        assert (rec.key_start, rec.value_start, rec.query_start) == (first, first, first)
        assert rec.keys.shape == (b, h, held, d) and rec.values.shape == (b, h, held, d)
        assert rec.query.shape == (b, hq, held, d) and rec.lse.shape == (b, hq, held)
        assert rec.valid.tolist() == [[False] * p + [True] * (WIDTH - p) for p in pads]
        assert torch.equal(rec.position_ids, fam.positions)
        keys, values = states[i]
        assert keys.shape[2] == WIDTH  # the reference is the whole prompt
        assert torch.equal(rec.keys, keys[:, :, first:]) and torch.equal(rec.values, values[:, :, first:])
        naive = naive_lse(rec, keys, sliding)
        real = rec.valid[:, None, first:].expand_as(naive)
        torch.testing.assert_close(rec.lse[real], naive[real], rtol=0, atol=1e-4)
        # its own storage: slicing a view would keep (and save) every column
        assert rec.keys.untyped_storage().nbytes() == rec.keys.nbytes
        expected += b * held * ((2 * h + hq) * d * item + hq * 4) + b * WIDTH * (1 + 8)  # + valid, position_ids
    assert rec_all.nbytes() == expected
    full = rec_all.layers[0].full()
    assert all(t.shape[2] == WIDTH for t in full) and not bool(full[1][:, :, : WIDTH - W].any())


def test_what_a_recording_keeps_before_the_window():
    """``keep`` adds the keys (a probe) or the queries and lse (a query statistic) of every column; without an lse
    (eager attention) the keys start where the window's first query's own window does (column S - 2W + 1)."""
    fam = gemma3_family(WIDTH, [0, 7])
    start = WIDTH - W
    for keep, starts in ((frozenset({"keys"}), (0, start, start)), (frozenset({"queries"}), (start, start, 0)),
                         (frozenset({"keys", "queries"}), (0, start, 0))):
        rec = record(fam.model, fam.forward, keep).layers[0]
        assert (rec.key_start, rec.value_start, rec.query_start) == starts
        assert rec.keys.shape[2] == WIDTH - starts[0] and rec.values.shape[2] == W
        assert rec.query.shape[2] == rec.lse.shape[2] == WIDTH - starts[2]
    eager = gemma3_family(WIDTH, [0, 7], backend="eager").recording.layers[0]
    assert eager.lse is None
    assert (eager.key_start, eager.value_start, eager.query_start) == (start - W + 1, start, start)
    assert eager.keys.shape[2] == 2 * W - 1
    with pytest.raises(ValueError, match=r"keep=\['values'\]; allowed values: \['keys', 'queries'\]"):
        record(fam.model, fam.forward, frozenset({"values"}))


@pytest.mark.parametrize("preset", ["local", "snapkv", "h2o", "elastic", "tova"])
def test_an_eager_recording_replays_as_its_direct_path(preset):
    """Without an lse the statistics recompute each window query's softmax: over the keys from S - 2W + 1, which
    the recording keeps. Bit for bit the direct path (kept entries, keys, values, decode logits)."""
    fam = gemma3_family(WIDTH, [0, 7], backend="eager")
    direct = kvpolicy.make_cache(fam.model, build_policy(preset, 0.5))
    fam.forward(direct)
    with torch.inference_mode():
        replayed = replay(fam.model, build_policy(preset, 0.5), fam.recording)
    compare_layers(direct, replayed, SAME)
    for a, b in zip(fam.decode(direct), fam.decode(replayed)):
        assert torch.equal(a, b)
    # the statistics of the window's entries themselves, against a recording of every key and query
    whole = record(fam.model, fam.forward, frozenset({"keys", "queries"}))
    with torch.inference_mode():
        replay(fam.model, build_policy(preset, 0.5), whole)
    for rec, ref, kind in zip(fam.recording.layers, whole.layers, TINY_GEMMA_LAYERS):
        first = WIDTH - W if kind == "sliding_attention" else 0
        assert set(rec.statistics) == set(ref.statistics)
        for need, stat in rec.statistics.items():
            assert torch.equal(stat[..., first:], ref.statistics[need][..., first:]), (kind, need)


def test_beyond_window_names_what_a_policy_reads_before_the_window():
    gemma = gemma3_family(WIDTH, [0, 7])
    llama = Family("llama")
    kvzip, ea = build_policy("kvzip", 0.5), build_policy("expected_attention", 0.5)
    assert beyond_window(kvzip, gemma.model, WIDTH) == {"keys"}
    assert beyond_window(ea, gemma.model, WIDTH) == {"queries"}
    narrow = _build_policy({"preset": "expected_attention", "encode": {"query_window": W}}, None)
    assert beyond_window(narrow, gemma.model, WIDTH) == frozenset()  # its queries are the window's
    for name in ("snapkv", "h2o", "elastic", "d2o", "local"):
        assert beyond_window(build_policy(name, 0.5), gemma.model, WIDTH) == frozenset()
    assert beyond_window(kvzip, gemma.model, W) == beyond_window(ea, gemma.model, W) == frozenset()  # not outrun
    assert beyond_window(kvzip, llama.model, WIDTH) == beyond_window(None, gemma.model, WIDTH) == frozenset()


def test_a_replay_refuses_columns_the_recording_lacks_and_runs_on_the_windows_own():
    """A probe or a query statistic reaching before the window refuses a windowed recording (one message naming what
    to keep), before any layer is fed; a query statistic over the window's own queries replays from it, bit for bit
    the direct path."""
    fam = gemma3_family(WIDTH, [0, 7])
    for name, what in (("kvzip", "keys"), ("expected_attention", "queries")):
        with pytest.raises(ValueError, match=rf"layer 0 .* holds its {what} from column {WIDTH - W} of {WIDTH} only"
                                             rf".* keep={{'{what}'}}"), torch.inference_mode():
            replay(fam.model, build_policy(name, 0.5), fam.recording, tokenizer=TOK)
    spec = {"preset": "expected_attention", "ratio": 0.5, "encode": {"query_window": W}}
    direct = kvpolicy.make_cache(fam.model, _build_policy(spec, None))
    fam.forward(direct)
    with torch.inference_mode():
        replayed = replay(fam.model, _build_policy(spec, None), fam.recording)
    compare_layers(direct, replayed, SAME)
    for a, b in zip(fam.decode(direct), fam.decode(replayed)):
        assert torch.equal(a, b)


def test_a_windowed_recording_round_trips_and_is_a_fraction_of_a_whole_one(tmp_path):
    fam = gemma3_family(WIDTH, [0, 7])
    rec = fam.recording
    path = tmp_path / "rec.pt"
    torch.save(rec.to_dict(), path)
    back = PrefillRecording.from_dict(torch.load(path, weights_only=True))
    assert back.nbytes() == rec.nbytes()
    for x, y in zip(rec.layers, back.layers):
        assert (x.key_start, x.value_start, x.query_start) == (y.key_start, y.value_start, y.query_start)
        assert all(torch.equal(a, c) for a, c in zip(x.full()[:3], y.full()[:3]))
    # on disk too: a sliding layer's 8 of 48 columns (the file holds no view of the whole prompt)
    whole = record(fam.model, fam.forward, frozenset({"keys", "queries"}))
    torch.save(whole.to_dict(), tmp_path / "whole.pt")
    assert path.stat().st_size < 0.8 * (tmp_path / "whole.pt").stat().st_size


# ------------------------------------------------------------------------------------------ the real Gemma 3 270M
REAL_LENGTH, REAL_PADS, REAL_STEPS = 600, [0, 40], 3  # past the 512-column window, with padding


@pytest.fixture(scope="module")
def real_gemma3():
    model, tokenizer = kvpolicy.load_model("gemma3-270m")
    kvpolicy.attach(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (len(REAL_PADS), REAL_LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    for r, p in enumerate(REAL_PADS):
        ids[r, :p], mask[r, :p] = tokenizer.pad_token_id, 0
    return model, tokenizer, ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["snapkv", "h2o", "elastic", "kvzip", "expected_attention"])
def test_real_gemma3_replays_from_a_windowed_recording_bit_for_bit(real_gemma3, preset):
    """Gemma 3 270M, 600-column prompts (its sliding layers keep 512 of them): the direct path and a replay from the
    recording ``beyond_window`` asks for hold the same entries, keys and values, and decode the same logits."""
    model, tokenizer, ids, mask = real_gemma3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def forward(cache):
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        return out.logits[:, -1].to(torch.float32)

    def decode(cache) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        m, out = mask, []
        for t in range(REAL_STEPS):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            tok = torch.randint(100, 20000, (len(REAL_PADS), 1), generator=g)
            pos = positions[:, -1:] + t + 1
            with torch.inference_mode():
                o = model(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache)
            out.append(o.logits[:, -1].to(torch.float32))
        return out

    policy = _build_policy({"preset": preset, "ratio": 0.5}, None)
    recording = record(model, forward, beyond_window(policy, model, REAL_LENGTH))
    window = model.config.sliding_window
    for rec, kind in zip(recording.layers, model.config.layer_types):
        assert rec.values.shape[2] == (window if kind == "sliding_attention" else REAL_LENGTH)
    direct = kvpolicy.make_cache(model, _build_policy({"preset": preset, "ratio": 0.5}, None), tokenizer=tokenizer)
    assert torch.equal(forward(direct), recording.logits)
    with torch.inference_mode():
        replayed = replay(model, policy, recording, tokenizer=tokenizer)
    compare_layers(direct, replayed, SAME)
    for a, b in zip(decode(direct), decode(replayed)):
        assert torch.equal(a, b)
