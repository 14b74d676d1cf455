"""Tiny random-init models with GQA, built locally (no downloads), and the two trivial policies of the core tests."""

from __future__ import annotations

import pytest
import torch

from kvpolicy import Budget, CachePolicy, LayerView, select_top

VOCAB = 128
PAD = 0
IMAGE_TOKEN = 127


def _text_kwargs(layers: int = 2) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
    )


def build_model(family: str, seed: int = 0, attn: str = "sdpa"):
    """A tiny random-init model of ``family`` (llama, qwen2, mistral, llava) with 4 query / 2 kv heads."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_text_kwargs()))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_text_kwargs()))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_text_kwargs(), sliding_window=None))
    elif family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
        )
        text = LlamaConfig(**_text_kwargs())
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
        model = LlavaForConditionalGeneration(config)
    else:
        raise ValueError(family)
    # larger weights than the default init, so logits are well separated and greedy ties cannot hide a bug
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.eval()
    model.set_attn_implementation(attn)
    return model


LLAVA_IMAGE_TOKENS = (28 // 7) ** 2  # CLS dropped by the default feature strategy


def make_batch(batch: int, length: int, pads: list[int] | None = None, seed: int = 1, image: bool = False):
    """Left-padded ``input_ids``/``attention_mask``; with ``image`` each row gets the LLaVA image placeholder run."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    pads = pads or [0] * batch
    for r, p in enumerate(pads):
        if image:
            ids[r, p + 2 : p + 2 + LLAVA_IMAGE_TOKENS] = IMAGE_TOKEN
        ids[r, :p] = PAD
        mask[r, :p] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if image:
        out["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=g)
    return out


class KeepAll:
    """Trivial encode scorer: every entry scores the same (with a budget that keeps all, nothing moves)."""

    needs = frozenset()

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.batch_size, 1, view.num_slots)


class FirstLast:
    """Trivial encode + decode scorer: keep the first ``first`` real tokens of each row, then the most recent."""

    needs = frozenset()

    def __init__(self, first: int = 2):
        self.first = first

    def score(self, view: LayerView) -> torch.Tensor:
        rank = view.rank().to(torch.float32)
        recent = view.positions.to(torch.float32)
        return torch.where(rank < self.first, float("inf"), recent)

    drop_scores = score


class Evict:
    def reduce(self, view, scores, keep):
        return select_top(view, scores, keep)


def keep_all_policy() -> CachePolicy:
    return CachePolicy(reducer=Evict(), budget=Budget(ratio=0.0), encode=KeepAll(), decode=FirstLast(), name="keep-all")


def first_last_policy(budget: Budget, first: int = 2, decode: bool = True) -> CachePolicy:
    return CachePolicy(
        reducer=Evict(),
        budget=budget,
        encode=FirstLast(first),
        decode=FirstLast(first) if decode else None,
        name="first-last",
    )


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def text_family(request) -> str:
    return request.param
