"""The decode step's fast paths against the general path they stand in for.

A decode step on a compressed layer takes shortcuts where the engine knows the answer without reading the cache
(docs/performance.md, "Decode at budget B"): the storage remembers that every slot is valid or where its one free slot
is (no search, no mask), the budget rule of such a layout runs on Python numbers, ``LayerView`` computes ``order`` /
``rank`` / ``held`` once, and the drops of all policy layers run back to back. Each must choose, write and attend
exactly as the general path: here every registered preset generates with all shortcuts and with none of them (a
storage that never trusts its layout, each layer dropping on its own), on a tiny GQA model, and the logits of every
step, the tokens and the entries held at every step must be identical. A cache built from a recorded prefill
(:func:`~kvpolicy.core.replay.replay`) runs its decode steps through the same layers: its steps must equal the general
path's too, and take the same shortcuts.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

import kvpolicy
from kvpolicy import Budget
from kvpolicy.config import load_policy
from kvpolicy.core import layer as layer_module
from kvpolicy.core import storage as storage_module
from kvpolicy.core.policy import LayerView
from kvpolicy.core.recording import record
from kvpolicy.core.replay import beyond_window, replay
from kvpolicy.core.storage import PaddedStorage
from kvpolicy.registry import get_registry
from kvpolicy.testing import PAD, CharTokenizer, build_model, make_batch, tiny_text_config
from head_tables import random_head_scores

STEPS = 14
OVERRIDES = ({"ratio": 0.6}, {"ratio": 0.6, "decode_budget": "fixed"})
#: a 4-layer GQA Llama, and the tiny Gemma 3 whose sliding-window layers (window 8) are policy layers too: the
#: 20-column prompts and 14 steps outrun the window, so its rule frees slots at every step
FAMILIES = ("llama", "gemma3")
_TABLES: dict[str, object] = {}

#: KVzip's probe encodes its repeat prompt with a tokenizer (the tiny models have none; other presets ignore it)
TOK = CharTokenizer()


@pytest.fixture(scope="module", autouse=True)
def _tables(tmp_path_factory):
    """Where the random head-score tables of the tiny models go, so duo_attention needs no calibration."""
    _TABLES["dir"] = tmp_path_factory.mktemp("duo")
    yield
    _TABLES.clear()


def _policy(preset: str, overrides: dict, model):
    """The preset under ``overrides``; duo_attention with a window that fits the 20-column prompts and a random
    score table for ``model``."""
    doc: dict = {"preset": preset}
    if preset == "duo_attention":
        family = model.config.model_type
        path = random_head_scores(str(_TABLES["dir"] / f"{family}.tsv"), model)  # type: ignore[operator]
        doc.update(sinks=2, reducer={"recent": 4, "head_scores": path})
    return load_policy(doc, overrides=overrides)


class GeneralStorage(PaddedStorage):
    """A padded storage that never uses what it knows of its layout: every step searches for a free slot, checks
    validity for the mask and frees through the masked path, as the engine did before the shortcuts."""

    @property
    def full(self) -> bool:
        return False

    def _append_into_free(self, k, v, cols, types) -> None:
        self._full, self._hole = False, None
        super()._append_into_free(k, v, cols, types)

    def free(self, victims, ok=None, refill=False) -> None:
        assert ok is not None, "the general path always masks its victims"
        super().free(victims, ok, refill)

    def mask(self, q, seen):
        self._full = False
        return super().mask(q, seen)

    def rank_for(self, valid, positions):
        return None  # every view sorts its slots

    def prepare(self, col, token_type, slack) -> bool:
        return False  # every one-token step searches for its slot when it writes


def _model(family: str = "llama") -> torch.nn.Module:
    if family == "llama":
        torch.manual_seed(0)
        return kvpolicy.attach(LlamaForCausalLM(LlamaConfig(**tiny_text_config(layers=4))).eval())
    return kvpolicy.attach(build_model(family))


def _run(model, batch, policy, general: bool, monkeypatch) -> tuple[torch.Tensor, list, list]:
    """Greedy generation; returns the logits of every step, the tokens, and the positions each layer, row and kv
    head holds after every step."""
    with monkeypatch.context() as patch:
        if general:
            patch.setattr(layer_module, "PaddedStorage", GeneralStorage)
        cache = kvpolicy.make_cache(model, policy, tokenizer=TOK)
        if general:
            for layer in cache.policy_layers:
                layer.group = [layer]
        held: list = []

        class Record:
            def __call__(self, input_ids, scores):
                held.append(_held(cache))
                return scores

        out = model.generate(
            **batch, past_key_values=cache, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            pad_token_id=PAD, output_logits=True, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([Record()]),
        )
        held.append(_held(cache))
        if general and policy.decode is not None:
            assert all(isinstance(layer.storage, GeneralStorage) for layer in cache.policy_layers)
    return torch.stack(out.logits), out.sequences, held


def _held(cache) -> list:
    out = []
    for layer in cache.policy_layers:
        rows = layer.n_tokens.shape[0]
        heads = layer.keys.shape[1] if type(layer.storage).__name__ != "BucketedStorage" else layer.storage.num_heads
        out.append([[layer.kept_positions(b, h) for h in range(heads)] for b in range(rows)])
    return out


def _presets() -> list[str]:
    return sorted(name for name in get_registry().presets() if name != "full")


@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 3, 6]], ids=["same-length", "left-padded"])
@pytest.mark.parametrize("preset", _presets())
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_generate_exactly_what_the_general_path_does(family, preset, pads, monkeypatch):
    model = _model(family)
    batch = make_batch(3, 20, pads)
    for overrides in OVERRIDES:
        fast = _run(model, batch, _policy(preset, overrides, model), general=False, monkeypatch=monkeypatch)
        general = _run(model, batch, _policy(preset, overrides, model), True, monkeypatch)
        assert torch.equal(fast[0], general[0]), (preset, overrides)
        assert torch.equal(fast[1], general[1]), (preset, overrides)
        assert fast[2] == general[2], (preset, overrides)


_recording_model = functools.lru_cache(maxsize=None)(_model)
#: columns of the recorded batches
RECORDED_WIDTH = 20


@functools.lru_cache(maxsize=None)
def _recorded(family: str, pads: tuple[int, ...], keep: frozenset[str] = frozenset()):
    """The model, a batch with these left pads, its prompt positions and its prefill recorded once (per ``keep``:
    what a sliding layer keeps before its window, for a probe or a query statistic, ``beyond_window``)."""
    model = _recording_model(family)
    batch = make_batch(len(pads), RECORDED_WIDTH, list(pads))
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def forward(cache) -> torch.Tensor:
        with torch.inference_mode():
            out = model(**batch, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].to(torch.float32)

    return model, batch, positions, record(model, forward, keep)


def _greedy(model, batch, positions, cache, first: torch.Tensor, steps: int = STEPS):
    """Decode ``steps`` greedy tokens one forward at a time after a prefill whose last logits are ``first``: every
    step's logits, the tokens, and the positions held after the prefill and after every step."""
    mask, pos = batch["attention_mask"], positions[:, -1:]
    logits, tokens, held = [first], [], [_held(cache)]
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        with torch.inference_mode():
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache)
        logits.append(out.logits[:, -1].to(torch.float32))
        tokens.append(tok)
        held.append(_held(cache))
    return torch.stack(logits[1:]), torch.cat(tokens, 1), held


def _replayed(family: str, pads: tuple[int, ...], preset: str, overrides: dict, general: bool, monkeypatch):
    """Greedy decode steps on ``policy``'s cache replayed from the recorded prefill, with all shortcuts or (general)
    with none of them, as :func:`_run` does on the direct path."""
    model = _recording_model(family)
    policy = _policy(preset, overrides, model)
    model, batch, positions, recording = _recorded(family, pads, beyond_window(policy, model, RECORDED_WIDTH))
    with monkeypatch.context() as patch:
        if general:
            patch.setattr(layer_module, "PaddedStorage", GeneralStorage)
        with torch.inference_mode():
            cache = replay(model, policy, recording, tokenizer=TOK)
        if general:
            for layer in cache.policy_layers:
                layer.group = [layer]
        out = _greedy(model, batch, positions, cache, recording.logits)
        if general and policy.decode is not None:
            assert all(isinstance(layer.storage, GeneralStorage) for layer in cache.policy_layers)
    return out


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 6)], ids=["same-length", "left-padded"])
@pytest.mark.parametrize("preset", _presets())
@pytest.mark.parametrize("family", FAMILIES)
def test_a_replayed_cache_decodes_exactly_as_the_general_path(family, preset, pads, monkeypatch):
    """A replay fills each layer's storage through the layer's own update and compression, not through a forward:
    the decode steps that follow must still choose, write and attend as the general path does."""
    for overrides in OVERRIDES:
        fast = _replayed(family, pads, preset, overrides, general=False, monkeypatch=monkeypatch)
        general = _replayed(family, pads, preset, overrides, general=True, monkeypatch=monkeypatch)
        assert torch.equal(fast[0], general[0]), (preset, overrides)
        assert torch.equal(fast[1], general[1]), (preset, overrides)
        assert fast[2] == general[2], (preset, overrides)


@pytest.mark.parametrize("source", ["direct", "replay"])
def test_the_shortcuts_are_taken_on_a_batch_without_padding(source, monkeypatch):
    """The comparisons above must not pass because nothing took a shortcut: on rows of equal length a local policy's
    layers stay full (no search, no mask), and drop and choose their new token's slot back to back at the first
    layer's update — after the model's own prefill and after a replayed one alike."""
    policy = load_policy({"preset": "local"}, overrides={"ratio": 0.6})
    early = []
    original, update = layer_module.PolicyLayer.begin_early, layer_module.PolicyLayer.update

    def spy(self, q):
        original(self, q)
        early.append([self.layer_idx, self._begun, None])

    def first_update(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        if self.layer_idx == 0:  # the batch ran: every other layer's slot is chosen before its own update
            for entry in early[-(len(self.group) - 1):]:
                entry[2] = self.group[entry[0]].storage._prepared
        return out

    monkeypatch.setattr(layer_module.PolicyLayer, "begin_early", spy)
    monkeypatch.setattr(layer_module.PolicyLayer, "update", first_update)
    masks = []
    real = storage_module.slot_mask
    monkeypatch.setattr(storage_module, "slot_mask", lambda *args: masks.append(args[2]) or real(*args))
    if source == "direct":
        model = _model()
        cache = kvpolicy.make_cache(model, policy)
        model.generate(**make_batch(2, 20, [0, 0]), past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                       do_sample=False, pad_token_id=PAD)
    else:
        model, batch, positions, recording = _recorded("llama", (0, 0))
        with torch.inference_mode():
            cache = replay(model, policy, recording, tokenizer=TOK)
        _greedy(model, batch, positions, cache, recording.logits, steps=6)
    assert early and all(layer.prefilled for layer in cache.policy_layers)
    assert all(layer.storage.full for layer in cache.policy_layers)
    assert not masks  # no decode step built a mask or read validity for one
    assert {i for i, _, _ in early} == {1, 2, 3} and all(begun == 1 for _, begun, _ in early)
    assert all(slot is not None for _, _, slot in early)  # each layer's slot chosen and described in the batch


def _view(storage: PaddedStorage) -> LayerView:
    """A view of ``storage`` that sorts for its rank (no ``rank_source``)."""
    return LayerView(layer_idx=0, num_layers=1, stage="decode", keys=storage.keys, values=storage.values,
                     valid=storage.valid.clone(), positions=storage.positions.clone(), seen=0,
                     n_tokens=torch.zeros(1, dtype=torch.long), new_tokens=0, token_types=storage.token_types)


@pytest.mark.parametrize("seed", range(8))
def test_storage_knows_its_layout_only_when_it_is_so(seed):
    """Random appends, drops (one or several, with and without a mask), padding marks and row selections: whenever
    the storage claims a full layout every used slot is valid, a remembered hole is the one free slot of its row, and
    a rank it keeps equals the sorted one; and the slots it writes are the ones the first-free-slot search picks."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, h, d = 3, 2, 4
    storage = PaddedStorage(torch.zeros(b, h, 1, d), torch.zeros(b, h, 1, d))
    storage.append(torch.randn(b, h, 7, d, generator=g), torch.randn(b, h, 7, d, generator=g),
                   torch.arange(7), torch.zeros(7, dtype=torch.int8), slack=0)
    storage.pristine = False
    col = 7
    for _ in range(60):
        op = rng.choice(["append", "append", "drop1", "dropk", "pad", "rows"])
        valid = storage.valid.clone()
        if op == "append":
            free = ~valid
            expect = torch.where(free.any(-1), free.to(torch.int8).argmax(-1), storage.length)
            storage.append(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g), col, 2, 1)
            assert torch.equal(storage.new_slots[..., 0], expect)
            col += 1
        elif op == "drop1" and bool(valid.all(-1).any()) and storage.length > 1:
            scores = torch.rand(b, h, storage.length, generator=g).masked_fill(~valid, float("inf"))
            victims = scores.argmin(-1, keepdim=True)
            if storage.full and rng.random() < 0.5:  # a drop inside the update: the token is prepared at once
                free = ~valid.scatter(2, victims, False)
                expect = torch.where(free.any(-1), free.to(torch.int8).argmax(-1), storage.length)
                storage.free(victims, refill=True)
                assert storage.prepare(col, 2, 1)
                storage.append(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g), col, 2, 1)
                assert torch.equal(storage.new_slots[..., 0], expect)
                col += 1
            elif storage.full:
                storage.free(victims)  # every victim valid, every row drops one: the unmasked path
            else:
                storage.free(victims, valid.gather(2, victims))
        elif op == "dropk" and storage.length > 2:
            victims = torch.rand(b, h, storage.length, generator=g).argsort(-1)[..., :2]
            storage.free(victims, torch.rand(b, h, 2, generator=g) < 0.7)
        elif op == "pad" and storage.new_slots is not None:
            storage.invalidate_new(torch.rand(b, storage.new_slots.shape[-1], generator=g) < 0.8)
        elif op == "rows":
            storage.select_rows(torch.randint(0, b, (b,), generator=g))
        valid = storage.valid
        if rng.random() < 0.5:  # a view asks for the rank: from now on the storage keeps it
            storage.rank_for(valid, storage.positions)
        if storage._rank is not None:
            by_sort = LayerView.rank(_view(storage))
            assert torch.equal(storage._rank[:, :, : storage.length], by_sort)
        if storage.full:
            assert bool(valid.all())
        if storage._hole is not None:
            assert torch.equal((~valid).sum(-1), torch.ones(b, h, dtype=torch.long))
            assert not bool(valid.gather(2, storage._hole).any())
        assert (storage.mask(1, col) is None) == bool(valid.all())


@pytest.mark.parametrize("seed", range(4))
def test_budget_rule_on_python_numbers_equals_the_tensor_rule(seed):
    g = torch.Generator().manual_seed(seed)
    for budget in (Budget(ratio=0.2), Budget(ratio=0.5), Budget(ratio=0.75), Budget(ratio=0.9),
                   Budget(ratio=1 / 3), Budget(ratio=0.5, decode="fixed"), Budget(tokens=37), Budget(ratio=0.5,
                   decode="off")):
        for _ in range(200):
            rows = int(torch.randint(1, 5, (1,), generator=g))
            n = torch.randint(1, 5000, (rows,), generator=g)
            appended = torch.randint(0, 50, (rows,), generator=g) * (torch.rand(rows, generator=g) < 0.3)
            keep = budget.prefill_keep(n)
            share = 1.0 if budget.ratio is None else 1 - budget.ratio
            held = int(math.ceil(int(n.max()) * share)) + int(torch.randint(-3, 4, (1,), generator=g))
            held = max(held, 0)
            tensor = budget.decode_excess(torch.full((rows, 2), held), n, keep, appended)
            python = budget.decode_excess_rows(held, n.tolist(), keep.tolist(), appended.tolist())
            assert tensor[:, 0].tolist() == python and tensor[:, 1].tolist() == python
