"""Shared prefills of image prompts through the harness's own protocol, on the tiny LLaVA-1.5 and Qwen2-VL checkpoints
(``scripts/make_tiny_vlms.py``) against the direct path.

What only a vision-language model exercises: the recorded token types (image entries, which LOOK-M's text prior reads)
and, for Qwen2-VL, the M-RoPE ``rope_deltas`` the prefill leaves in the model — a replay must put the recorded ones
back, or every decode step after it is positioned wrongly and the logits differ.
"""

from __future__ import annotations

import dataclasses

import pytest

import kvpolicy
from kvpolicy.eval.context import build_policy, make_context
from kvpolicy.eval.protocol import batches, run_policy, run_reference
from kvpolicy.eval.runner import reference_from_row
from test_replay import KERNEL, SAME
from test_replay_protocol import DictStore, compare_rows
from test_vlm_eval import load_samples, tiny


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny.make_all(tmp_path_factory.mktemp("tiny_vlms"))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_prompts_replay_as_the_direct_path(built, family):
    model, processor = tiny.load_tiny(getattr(built, family))
    ctx = make_context(kvpolicy.attach(model), processor, kl_topk=32)
    store = DictStore()
    shared = dataclasses.replace(ctx, prefill_store=store)
    samples = load_samples(processor, built.data, "jsonl", n=2)
    for batch in batches(samples, 4):
        group = [samples[i] for i in batch]
        refs = [reference_from_row(s, r, [s.id]) for s, r in zip(group, run_reference(ctx, group))]
        for preset in ("full", "local", "snapkv", "lookm", "h2o"):
            direct = run_policy(ctx, group, build_policy(preset, 0.5), refs)
            replayed = run_policy(shared, group, build_policy(preset, 0.5), refs)
            compare_rows(direct, replayed, KERNEL[preset] == SAME)
            if preset == "full":  # the prompt has image entries, and the replay's token types say so
                assert replayed[0].types_prefill[1] > 0
    assert store.records == len(batches(samples, 4))
