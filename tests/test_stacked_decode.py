"""The stacked decode path (kvpolicy/core/stacked.py, slotpack.py) against each layer dropping on its own.

Where every layer of a cache holds a full layout of one length and the policy's decode parts say they score rows on
their own (``stack_layers``), a decode step's drops and new-slot writes run once for all layers, on their per-slot
tensors stacked in one buffer. Each layer must end with exactly what its own drop would have given it: here the same
generation runs stacked, unstacked (``StackedDrops.enabled`` off: every layer alone, the fast paths of
tests/test_decode_fast_paths.py otherwise on) and through the general path (no shortcut at all), on a 4-layer GQA
model, batches of three rows of equal length (the stacked path taken: checked) and left-padded (not full: every
layer alone), and logits, tokens and held entries must be identical at every step.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core import layer as layer_module
from kvpolicy.core.partcheck import PartError
from kvpolicy.core.policy import AttentionStat, Budget, CachePolicy, LayerView
from kvpolicy.core.slotpack import SlotPack
from kvpolicy.core.storage import PaddedStorage
from kvpolicy.testing import FirstLast, PlainEvict, make_batch, tiny_text_config

STEPS = 12
#: policies whose decode parts stack, with the parameters that take other branches of their scorers
CASES = {
    "h2o": {},
    "h2o-mean-over-visible": {"preset": "h2o", "decode.normalize": "mean_over_visible"},
    "h2o-head-mean": {"preset": "h2o", "decode.per_head": False},
    "tova": {},
    "local": {},
    "elastic": {},
    "elastic-merge": {"preset": "elastic", "reducer.decode_merge": True},
    "elastic_reference": {},
}
BUDGETS = ({"ratio": 0.6}, {"ratio": 0.6, "decode_budget": "fixed"})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return kvpolicy.attach(LlamaForCausalLM(LlamaConfig(**tiny_text_config(layers=4))).eval())


def _policy(case: str, budget: dict) -> CachePolicy:
    spec = dict(CASES[case])
    preset = spec.pop("preset", case)
    return load_policy({"preset": preset}, overrides={**budget, **spec})


class GeneralStorage(PaddedStorage):
    """A padded storage that trusts nothing it knows of its layout (the engine before its shortcuts)."""

    @property
    def full(self) -> bool:
        return False

    def rank_for(self, valid, positions):
        return None

    def prepare(self, col, token_type, slack) -> bool:
        return False

    def mask(self, q, seen):
        self._full = False
        return super().mask(q, seen)


def _held(cache) -> list:
    return [
        [[layer.kept_positions(b, h) for h in range(layer.keys.shape[1])] for b in range(layer.n_tokens.shape[0])]
        for layer in cache.policy_layers
    ]


def _generate(model, batch, policy: CachePolicy, mode: str, monkeypatch) -> tuple[torch.Tensor, list, list, dict]:
    """Greedy decode one forward at a time: every step's logits, tokens, entries held after every step, and the
    count of stacked steps. ``mode``: stacked (the default engine), alone (no stacking), general (no shortcut)."""
    with monkeypatch.context() as patch:
        if mode == "general":
            patch.setattr(layer_module, "PaddedStorage", GeneralStorage)
        cache = kvpolicy.make_cache(model, policy)
        if mode != "stacked":
            for layer in cache.policy_layers:
                layer.stacked.enabled = False
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(**batch, position_ids=positions, past_key_values=cache)
        pos = positions[:, -1:]
        logits, tokens, held = [out.logits[:, -1]], [], []
        for _ in range(STEPS):
            tok = logits[-1].argmax(-1, keepdim=True)
            mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
            with torch.inference_mode():
                out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache)
            logits.append(out.logits[:, -1])
            tokens.append(tok)
            held.append(_held(cache))
    return torch.stack(logits), torch.cat(tokens, 1), held, dict(cache.policy_layers[0].stacked.stacked_steps)


@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 3, 6]], ids=["same-length", "left-padded"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_steps_equal_every_layer_alone_and_the_general_path(case, pads, monkeypatch):
    model = _model()
    batch = make_batch(3, 20, pads, seed=7)
    for budget in BUDGETS:
        stacked = _generate(model, batch, _policy(case, budget), "stacked", monkeypatch)
        for mode in ("alone", "general"):
            other = _generate(model, batch, _policy(case, budget), mode, monkeypatch)
            assert torch.equal(stacked[0], other[0]), (case, budget, mode)
            assert torch.equal(stacked[1], other[1]), (case, budget, mode)
            assert stacked[2] == other[2], (case, budget, mode)
            assert other[3] == {"drop": 0, "prepare": 0}
        if pads == [0, 0, 0]:
            # the comparison must not pass because nothing was stacked: every step drops (or, at ratio 0.6 between
            # drops, only observes) stacked, and prepares its new slot stacked unless the layers grow
            assert stacked[3]["drop"] >= STEPS - 1 and stacked[3]["prepare"] >= STEPS // 2, (case, budget, stacked[3])
        else:
            assert stacked[3] == {"drop": 0, "prepare": 0}  # left padding: no layer is full, each drops alone


class KeyNormDecode:
    """A decode scorer that reads the keys (their norm; the newest entry kept): stacked, its view's keys are made."""

    needs: frozenset[AttentionStat] = frozenset()
    stack_layers = True

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        newest = view.rank() == view.held()[..., None] - 1
        return view.keys.float().norm(dim=-1).masked_fill(newest, float("inf"))


class NanInLayer:
    """A decode scorer whose scores are NaN in the rows of one layer only (seeded at prefill, where layers are
    scored one at a time): a stacked failure must name that layer."""

    needs: frozenset[AttentionStat] = frozenset()
    stack_layers = True

    def __init__(self, bad: int):
        self.bad = bad

    def init_state(self, view: LayerView) -> dict[str, torch.Tensor]:
        return {"bad": torch.full(view.valid.shape, float(view.layer_idx == self.bad))}

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return torch.where(view.slot_state["bad"] > 0, float("nan"), view.rank().float())


def test_a_scorer_that_reads_keys_gets_every_layers_keys(monkeypatch):
    model = _model()
    batch = make_batch(2, 20, [0, 0], seed=3)
    policy = lambda: CachePolicy(  # noqa: E731
        reducer=PlainEvict(), budget=Budget(tokens=9), encode=FirstLast(), decode=KeyNormDecode()
    )
    stacked = _generate(model, batch, policy(), "stacked", monkeypatch)
    alone = _generate(model, batch, policy(), "alone", monkeypatch)
    assert stacked[3]["drop"] >= STEPS - 1
    assert torch.equal(stacked[0], alone[0]) and stacked[2] == alone[2]


@pytest.mark.parametrize("bad", [0, 2])
def test_nan_scores_name_the_layer_they_come_from(bad, monkeypatch):
    model = _model()
    batch = make_batch(2, 20, [0, 0], seed=3)
    errors = []
    for mode in ("stacked", "alone"):
        policy = CachePolicy(reducer=PlainEvict(), budget=Budget(tokens=9), encode=FirstLast(), decode=NanInLayer(bad))
        with pytest.raises(PartError) as info:
            _generate(model, batch, policy, mode, monkeypatch)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and f"(layer {bad}, decode)" in errors[0]


def _storage(g: torch.Generator, b: int, h: int, n: int, cap: int, state: bool) -> PaddedStorage:
    """A full, compressed layout of ``n`` entries at shuffled columns (capacity ``cap``), its rank kept."""
    d = 4
    storage = PaddedStorage(torch.zeros(b, h, 1, d), torch.zeros(b, h, 1, d))
    cols = torch.randperm(n + 5, generator=g)[:n].sort().values
    storage.append(torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g), cols,
                   torch.zeros(n, dtype=torch.int8), slack=cap - n)
    if state:
        storage.set_slot_state("acc", torch.rand(b, h, cap, generator=g))
    storage.pristine = False
    storage.rank_for(storage.valid, storage.positions)
    return storage


def _snapshot(storage: PaddedStorage) -> list[torch.Tensor]:
    out = [storage.valid.clone(), storage.positions.clone(), storage.token_types.clone()]
    out += [t.clone() for t in storage.slot_state.values()]
    out.append(storage.rank_for(storage.valid, storage.positions).clone())
    return out


@pytest.mark.parametrize("seed", range(6))
def test_a_pack_writes_what_each_storage_writes_alone(seed):
    """Random rounds of one drop per row (inside the update or after attention) and a new token (into the hole or
    at the end): a pack of three storages and three copies working alone hold the same validity, columns, types,
    state and rank after every round; a member that grows leaves the pack, which is rebuilt."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, h, n = 2, 3, 9
    state = seed % 2 == 0
    packed = [_storage(g, b, h, n, n + 2, state) for _ in range(3)]
    alone = [_storage(torch.Generator().manual_seed(0), b, h, n, n + 2, state) for _ in range(3)]
    for p, a in zip(packed, alone):  # the same contents in both
        a.adopt({k: t.clone() for k, t in p.slot_buffers().items()})
    pack = SlotPack()
    col = 100
    for _ in range(12):
        assert pack.covering(packed)
        length = packed[0].length
        if rng.random() < 0.7:  # a drop of one entry per row
            victims = torch.stack([torch.randint(0, length, (b, h, 1), generator=g) for _ in packed])
            refill = rng.random() < 0.5
            pack.free_one(victims.flatten(0, 1), length, refill)
            for a, v in zip(alone, victims):
                a.free(v, refill=refill)
            assert pack.prepare_holes(col, 2)
            for a in alone:
                assert a.prepare(col, 2, 1)
        else:
            done = pack.prepare_end(length, col, 2)
            assert done == (length < packed[0].capacity)
            if not done:
                for p in packed:
                    assert p.prepare(col, 2, 1)  # grows: the member leaves the pack
                assert not pack.covers(packed)
            for a in alone:
                assert a.prepare(col, 2, 1)
        for p, a in zip(packed, alone):
            assert all(torch.equal(x, y) for x, y in zip(_snapshot(p), _snapshot(a)))
            assert p.new_slots is not None and torch.equal(p.new_slots, a.new_slots)
        col += 1
