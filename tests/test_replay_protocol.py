"""The evaluation protocol on a shared prefill (kvpolicy/eval/prefill.py) against its direct path.

For every shipped preset at ratios 0.5 and 0.9, on tiny GQA Llama / Qwen2 / LLaVA / Gemma 3 (sliding-window layers of 8
columns, prompts of 38-52 tokens) models, one left-padded batch of three samples runs through ``run_policy`` twice: with a prefill store on the context (the batch's prefill recorded
once, the policy's cache replayed from it) and without (the direct path, the independent reference). Every row must
report the same NLL, KL, top-1, argmax, greedy generation, budgets and bytes — bit for bit where both paths use the
same kernel, within :data:`~test_replay.ATOL` for the presets whose direct prefill uses the one-pass kernel (see
tests/test_replay.py, whose :data:`~test_replay.KERNEL` table decides) — in both protocol modes: one prompt
(query-aware) and context + appended question (query-agnostic, where only the context is recorded).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest
import torch
from head_tables import random_head_scores

import kvpolicy
from kvpolicy.core.replay import beyond_window
from kvpolicy.eval.context import build_policy, make_context
from kvpolicy.eval.prefill import batch_inputs
from kvpolicy.eval.honesty import ratio0_check
from kvpolicy.eval.protocol import run_exact, run_policy, run_reference
from kvpolicy.eval.runner import reference_from_row
from kvpolicy.eval.tasks import Sample
from kvpolicy.testing import VOCAB, CharTokenizer, build_model
from test_replay import ATOL, KERNEL, SAME


class DictStore:
    """The prefill store contract in a dict: what the harness's bounded store does, without bounds."""

    def __init__(self) -> None:
        self.items: dict[str, object] = {}
        self.records = 0

    def get_or_record(self, key: str, record: Callable[[], object]) -> object:
        if key not in self.items:
            self.records += 1
            self.items[key] = record()
        return self.items[key]


class _Tok(CharTokenizer):
    """Decodes ids for ROUGE-L; encodes KVzip's repeat prompt (:class:`~kvpolicy.testing.CharTokenizer`)."""

    eos_token_id, pad_token_id, bos_token_id, chat_template = 2, 0, None, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def make_samples(split: bool, seed: int = 5) -> list[Sample]:
    """Three prompts of different lengths (left padding, longer than snapkv's window of 32), with targets and
    generations; ``split``: the last tokens are a question chunk."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (c, q) in enumerate([(46, 6), (38, 4), (41, 5)]):
        ids = torch.randint(3, VOCAB - 3, (c + q,), generator=g).tolist()
        target = torch.randint(3, VOCAB - 3, (5,), generator=g).tolist()
        out.append(Sample(id=f"s{i}", prompt_ids=ids, target_ids=target, generate=True, max_new_tokens=5,
                          question_tokens=q if split else 0))
    return out


class Setting:
    """A tiny model's context with and without a prefill store, the batch, and its full-cache references."""

    def __init__(self, family: str, split: bool):
        self.family = family
        self.ctx = make_context(kvpolicy.attach(build_model(family)), _Tok(), kl_topk=32)
        self.store = DictStore()
        self.shared = dataclasses.replace(self.ctx, prefill_store=self.store)
        self.samples = make_samples(split)
        #: what the batch's recordings keep before a sliding window (beyond_window): one recording per answer
        self.keeps: set[frozenset[str]] = set()
        rows = run_reference(self.ctx, self.samples)
        self.refs = [reference_from_row(s, r, [x.id for x in self.samples]) for s, r in zip(self.samples, rows)]


FAMILIES = ("llama", "qwen2", "llava", "gemma3")


@pytest.fixture(scope="module", params=[(f, s) for f in FAMILIES for s in (False, True)],
                ids=lambda p: f"{p[0]}-{'context+question' if p[1] else 'prompt'}")
def setting(request, tmp_path_factory) -> Setting:
    setting = Setting(*request.param)
    setting.scores = tmp_path_factory.mktemp("duo") / "scores.tsv"
    return setting


def overrides(preset: str, setting: Setting) -> dict | None:
    """d2o's per-layer rule (its per-prompt allocation happens only on a shared prefill, tests/test_replay_d2o.py);
    duo_attention's random head-score table for the model and a window shorter than the prompts; kvzip's probe in
    chunks of 14 (several probe forwards per row, rows with different counts)."""
    if preset == "d2o":
        return {"allocator.per_prompt": False}
    if preset == "duo_attention":
        path = random_head_scores(str(setting.scores), setting.ctx.model)
        return {"sinks": 2, "reducer.recent": 6, "reducer.head_scores": path}
    if preset.startswith("kvzip"):
        return {"encode.chunk_size": 14}
    return None


def _close(a: list[float], b: list[float], exact: bool, atol: float) -> bool:
    if exact:
        return a == b
    return len(a) == len(b) and all(abs(x - y) <= atol for x, y in zip(a, b))


def compare_rows(direct, shared, exact: bool, atol: float = ATOL) -> None:
    for a, b in zip(direct, shared):
        assert not a.prefill_shared and a.prefill_reason == "no prefill store (sharing is off)"
        assert b.prefill_shared and b.prefill_reason is None
        assert a.allocation == b.allocation
        for name in ("nll", "kl"):
            assert _close(getattr(a, name), getattr(b, name), exact, atol), (name, getattr(a, name), getattr(b, name))
        for name in ("target", "argmax", "top1", "generation", "kept_prefill", "kept_end", "types_prefill",
                     "bytes_prefill", "bytes_end", "allocated_prefill", "allocated_end", "seen_end", "decode_steps",
                     "prompt_tokens"):
            assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("preset", sorted(KERNEL))
def test_shared_prefill_equals_the_direct_path(setting, preset, ratio):
    over = overrides(preset, setting)
    if setting.family == "llava" and build_policy(preset, ratio, over).probe_needs():
        for ctx in (setting.ctx, setting.shared):  # a probe cannot re-read the images: refused on both paths
            with pytest.raises(kvpolicy.UnsupportedModelError, match="vision-language"):
                run_policy(ctx, setting.samples, build_policy(preset, ratio, over), setting.refs)
        return
    direct = run_policy(setting.ctx, setting.samples, build_policy(preset, ratio, over), setting.refs)
    shared = run_policy(setting.shared, setting.samples, build_policy(preset, ratio, over), setting.refs)
    compare_rows(direct, shared, KERNEL[preset] == SAME)
    width = batch_inputs(setting.ctx, setting.samples).ids.shape[1]
    setting.keeps.add(beyond_window(build_policy(preset, ratio, over), setting.ctx.model, width))
    # one recording for the batch, whatever the policy — but for a probe or a query statistic on the Gemma 3 model
    # (sliding windows of 8, prompts of 38-52 tokens): those read before the window, and get a recording of their own
    assert setting.store.records == len(setting.keeps)
    assert setting.family == "gemma3" or setting.keeps == {frozenset()}


def test_the_full_cache_reference_continues_from_the_recording(setting):
    shared = run_reference(setting.shared, setting.samples)
    for ref, row in zip(setting.refs, shared):
        assert row.prefill_shared and row.allocation is None
        assert row.nll == ref.nll and row.generation == ref.generation and row.kept_prefill == ref.kept_per_layer_prefill
        assert torch.equal(torch.stack(row.topk_logp), ref.topk_logp)


def test_d2o_rows_say_which_allocation_ran(setting):
    """Whole-model on a shared prefill, except where a sliding window is shorter than the prompts (Gemma 3 here):
    there the replay keeps the per-layer rule, as the direct path does."""
    direct = run_policy(setting.ctx, setting.samples, build_policy("d2o", 0.5), setting.refs)
    shared = run_policy(setting.shared, setting.samples, build_policy("d2o", 0.5), setting.refs)
    replayed = "per-layer" if setting.family == "gemma3" else "whole-model"
    assert {r.allocation for r in direct} == {"per-layer"} and {r.allocation for r in shared} == {replayed}


class Refusing:
    def get_or_record(self, key, record):
        raise AssertionError("the ratio-0 check must run the direct path, never a replay")


def test_the_ratio0_check_never_replays():
    """A replay of one recording on both sides of the check would hide any prefill difference."""
    ctx = make_context(kvpolicy.attach(build_model("qwen2")), _Tok(), kl_topk=32)
    ctx = dataclasses.replace(ctx, prefill_store=Refusing())
    sample = make_samples(False)[0]
    assert ratio0_check(ctx, sample, build_policy("h2o", 0.0))["passed"]
    rows = run_exact(ctx, [sample], build_policy("h2o", 0.0), [sample.target_ids])
    assert not rows[0].prefill_shared and "ratio-0" in rows[0].prefill_reason


def test_prefill_seconds_are_the_replays_not_the_recordings():
    class SlowStore(DictStore):
        def get_or_record(self, key, record):
            def slow():
                time.sleep(2.0)
                return record()
            return super().get_or_record(key, slow)

    ctx = make_context(kvpolicy.attach(build_model("llama")), _Tok(), kl_topk=32)
    store = SlowStore()
    samples = make_samples(False)
    rows = run_reference(dataclasses.replace(ctx, prefill_store=store), samples)
    assert store.records == 1 and sum(r.prefill_s for r in rows) < 2.0
    assert sum(r.prefill_record_s for r in rows) > 0  # the recording's own time is reported apart
    again = run_reference(dataclasses.replace(ctx, prefill_store=store), samples)
    assert store.records == 1 and sum(r.prefill_record_s for r in again) == 0.0


def test_another_batch_composition_is_another_recording():
    ctx = make_context(kvpolicy.attach(build_model("llama")), _Tok(), kl_topk=32)
    store = DictStore()
    shared = dataclasses.replace(ctx, prefill_store=store)
    samples = make_samples(False)
    for batch in (samples, samples[:2], samples[::-1], make_samples(True)):
        run_reference(shared, batch)
    assert store.records == 4 and len(store.items) == 4
    run_reference(shared, samples[:2])
    assert store.records == 4


# ------------------------------------------------------------------------------------------ the default model
#: float32 rounding of the one-pass kernel carried through SmolLM2-135M's 30 layers, NLL and KL per token (measured:
#: at most 2.6e-5 on these samples, kept positions identical in every layer)
REAL_ATOL = 2e-4


def _default_model_samples(tokenizer, split: bool) -> list[Sample]:
    """4 continuation samples of different lengths (left padding), each also generating 4 tokens."""
    from kvpolicy.eval.tasks import get_task

    task = get_task("continuation")
    samples = task.load(tokenizer, 4, 0, task.Options(context_tokens=160, target_tokens=6))
    return [
        dataclasses.replace(s, prompt_ids=s.prompt_ids[-n:], generate=True, max_new_tokens=4,
                            question_tokens=8 if split else 0)
        for s, n in zip(samples, (160, 131, 117, 148))
    ]


def _kept_positions_agree(ctx, shared, samples, policy_name: str, ratio: float, over) -> None:
    from kvpolicy.eval.prefill import run_prefill

    inputs = batch_inputs(ctx, samples)
    a = run_prefill(ctx, samples, inputs, build_policy(policy_name, ratio, over), share=False).cache
    b = run_prefill(shared, samples, inputs, build_policy(policy_name, ratio, over)).cache
    for x, y in zip(a.policy_layers, b.policy_layers):
        for h in range(x.held().shape[1]):
            assert all(x.kept_positions(r, h) == y.kept_positions(r, h) for r in range(len(samples))), x.layer_idx


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_default_model_shared_prefill_equals_the_direct_path(dtype):
    """SmolLM2-135M, 4 samples in one left-padded batch, both protocol modes. In its default dtype (bfloat16 on a CPU
    with AVX-512 BF16) only the same-kernel presets are compared: there the one-pass kernel's bfloat16 rounding
    changes what later layers keep near ties, so the replay is not the direct path's result until the prefill kernel
    returns SDPA's outputs bit for bit (docs/architecture.md, "Recording and replay")."""
    from kvpolicy.eval.context import load_eval_model

    model, tokenizer = load_eval_model("smollm2-135m", dtype=dtype)
    ctx = make_context(kvpolicy.attach(model), tokenizer, kl_topk=64)
    store = DictStore()
    shared = dataclasses.replace(ctx, prefill_store=store)
    presets = [p for p in sorted(KERNEL) if dtype == "float32" or KERNEL[p] == SAME]
    for split in (False, True):
        samples = _default_model_samples(tokenizer, split)
        rows = run_reference(ctx, samples)
        refs = [reference_from_row(s, r, [x.id for x in samples]) for s, r in zip(samples, rows)]
        for preset in presets:
            over = {"allocator.per_prompt": False} if preset == "d2o" else None
            for ratio in (0.5, 0.9):
                direct = run_policy(ctx, samples, build_policy(preset, ratio, over), refs)
                replayed = run_policy(shared, samples, build_policy(preset, ratio, over), refs)
                compare_rows(direct, replayed, KERNEL[preset] == SAME, REAL_ATOL)
                if KERNEL[preset] != SAME and not split:
                    _kept_positions_agree(ctx, shared, samples, preset, ratio, over)
    assert store.records == 2  # one recording per batch (one per protocol mode), every policy replayed from it
