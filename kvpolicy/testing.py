"""Test helpers for kvpolicy and for plugin authors: tiny random models, random layer views, trivial policies.

Why a module (as ``optuna.testing``): kvpolicy's own tests and a third-party plugin's tests need the same pieces — a
tiny GQA model that runs in a second on a CPU, a random :class:`~kvpolicy.core.policy.LayerView` with the awkward cases
(left padding, freed slots, shuffled slots, per-head layouts, mixed TEXT / IMAGE entries, tied scores) to compare a
part against a naive reference, and a policy whose effect is trivial to rebuild by hand. Nothing here imports pytest.

* tiny models: :func:`build_model` (llama, qwen2, mistral, llava, and gemma3 with sliding-window layers of
  :data:`TINY_WINDOW` columns; 4 query / 2 kv heads, random init, no download; its text decoder's keywords:
  :func:`tiny_text_config`), :func:`make_batch` (left-padded batches, optionally with LLaVA image placeholders) and
  :class:`CharTokenizer` (text to ids for parts that encode text);
* views: :func:`make_view`, and what a reduction keeps of one: :func:`kept_entries`;
* trivial parts and policies: :class:`KeepAll`, :class:`FirstLast`, :class:`PlainEvict`, :func:`keep_all_policy`,
  :func:`first_last_policy`.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvpolicy.core.policy import IMAGE, TEXT, AttentionStat, Budget, CachePolicy, LayerView, Reduction
from kvpolicy.core.selection import select_top

# ===================================================================================================== tiny models

VOCAB = 128
PAD = 0
IMAGE_TOKEN = 127
#: the sliding window of the tiny ``gemma3`` model: short, so that prompts and generations of a test outrun it
TINY_WINDOW = 8
#: its layers: a sliding layer first (transformers sizes the sliding mask from the first one), a global one, another
#: sliding one
TINY_GEMMA_LAYERS = ("sliding_attention", "full_attention", "sliding_attention")


def tiny_text_config(layers: int = 2) -> dict:
    """The text decoder of :func:`build_model` as config keywords (4 query / 2 kv heads, width 64), for a test that
    builds its own variant (another layer count, another weight scale) of the same tiny model."""
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


def build_model(family: str, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny random-init model of ``family`` (llama, qwen2, mistral, llava, gemma3) with 4 query / 2 kv heads;
    ``gemma3`` alternates sliding-window layers (:data:`TINY_WINDOW` columns) with a global one
    (:data:`TINY_GEMMA_LAYERS`)."""
    from transformers import (
        CLIPVisionConfig,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
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
        model = LlamaForCausalLM(LlamaConfig(**tiny_text_config()))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**tiny_text_config()))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**tiny_text_config(), sliding_window=None))
    elif family == "gemma3":
        config = Gemma3TextConfig(
            **{**tiny_text_config(len(TINY_GEMMA_LAYERS)), "max_position_embeddings": 512},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=TINY_WINDOW,
            layer_types=list(TINY_GEMMA_LAYERS),
        )
        model = Gemma3ForCausalLM(config)
    elif family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
        )
        text = LlamaConfig(**tiny_text_config())
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


def make_batch(
    batch: int, length: int, pads: list[int] | None = None, seed: int = 1, image: bool = False
) -> dict[str, torch.Tensor]:
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


class CharTokenizer:
    """A tokenizer for the tiny models: one id per character (``3 + ord(c) % (VOCAB - 5)``), no special tokens, no
    chat template. For parts that encode text (KVzip's repeat prompt) in tests: ``make_cache(..., tokenizer=)``."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None):
        ids = [3 + ord(c) % (VOCAB - 5) for c in text]
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids


# ===================================================================================================== views


def make_view(
    *,
    B: int = 3,
    H: int = 2,
    P: int = 14,
    D: int = 8,
    pads: tuple[int, ...] = (0, 3, 6),
    holes: int = 0,
    shuffle: bool = False,
    per_head_layout: bool = False,
    windows: tuple[int | None, ...] = (None, 1, 4),
    quantize: bool = False,
    token_types: Literal["mixed", "text"] = "mixed",
    stage: Literal["prefill", "decode"] = "prefill",
    new_tokens: int | None = None,
    layer_idx: int = 1,
    num_layers: int = 4,
    seed: int = 0,
) -> LayerView:
    """A random view of ``B`` rows, ``H`` kv heads, ``P`` slots and head size ``D``, the same for a given ``seed``.

    Row ``b`` has ``pads[b]`` left pads (invalid) and ``holes`` freed slots among its real tokens (the same columns
    for every head, or chosen per head with ``per_head_layout``); with ``shuffle`` the slots are permuted per row (or
    per row and head with ``per_head_layout``: slots are unordered, only ``positions`` orders them). Keys and values
    are standard normal; token types are random TEXT / IMAGE per column (``token_types="mixed"``) or all TEXT; a
    random attention statistic (0 where invalid) for every window in ``windows`` (``()``: none), integer-valued with
    ``quantize`` so that scores tie. ``new_tokens`` defaults to ``P`` at prefill and 1 while decoding."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, P, D, generator=g)
    values = torch.randn(B, H, P, D, generator=g)
    valid = torch.ones(B, H, P, dtype=torch.bool)
    cols = torch.arange(P).expand(B, H, P).clone()
    for b, pad in enumerate(pads):
        valid[b, :, :pad] = False
    lay = H if per_head_layout else 1
    for b in range(B):
        for h in range(lay):
            real = list(range(pads[b], P))
            for i in torch.randperm(len(real), generator=g)[:holes].tolist():
                if per_head_layout:
                    valid[b, h, real[i]] = False
                else:
                    valid[b, :, real[i]] = False
    types = torch.where(torch.rand(B, 1, P, generator=g) < 0.5, TEXT, IMAGE).to(torch.int8).expand(B, H, P).clone()
    if token_types == "text":
        types = torch.full_like(types, TEXT)
    if shuffle:
        perm = torch.stack([torch.stack([torch.randperm(P, generator=g) for _ in range(lay)]) for _ in range(B)])
        perm = perm.expand(B, H, P)
        keys = keys.gather(2, perm[..., None].expand_as(keys))
        values = values.gather(2, perm[..., None].expand_as(values))
        valid, cols, types = valid.gather(2, perm), cols.gather(2, perm), types.gather(2, perm)
    attention = {}
    for w in windows:
        a = torch.rand(B, H, P, generator=g)
        if quantize:
            a = (a * 3).floor()
        attention[w] = a.masked_fill(~valid, 0.0)
    return LayerView(
        layer_idx=layer_idx,
        num_layers=num_layers,
        stage=stage,
        keys=keys,
        values=values,
        valid=valid,
        positions=cols,
        seen=P,
        n_tokens=valid[:, 0].sum(-1),
        new_tokens=new_tokens if new_tokens is not None else (P if stage == "prefill" else 1),
        token_types=types,
        attention=attention,
    )


def kept_entries(view: LayerView, red: Reduction, b: int, h: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(slot, key, value)`` of every entry ``red`` keeps in row ``b`` and kv head ``h``, in the reduction's order:
    the key and value the cache will hold (the reduction's merged tensors, or the view's own where it has none).

    Why: a reducer's test compares exactly this against a naive reference; reading it also checks what the engine
    checks, that every kept slot is a valid one (AssertionError otherwise)."""
    out = []
    for k in range(red.index.shape[-1]):
        if not bool(red.valid[b, h, k]):
            continue
        slot = int(red.index[b, h, k])
        if not bool(view.valid[b, h, slot]):
            raise AssertionError(f"kept an invalid slot ({slot}, row {b}, kv head {h})")
        key = red.keys[b, h, k] if red.keys is not None else view.keys[b, h, slot]
        value = red.values[b, h, k] if red.values is not None else view.values[b, h, slot]
        out.append((slot, key, value))
    return out


# ===================================================================================================== trivial policies


class KeepAll:
    """Trivial encode scorer: every entry scores the same (with a budget that keeps all, nothing moves)."""

    needs: frozenset[AttentionStat] = frozenset()

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.batch_size, 1, view.num_slots)


class FirstLast:
    """Trivial encode + decode scorer: keep the first ``first`` real tokens of each row, then the most recent."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, first: int = 2):
        self.first = first

    def score(self, view: LayerView) -> torch.Tensor:
        rank = view.rank().to(torch.float32)
        recent = view.positions.to(torch.float32)
        return torch.where(rank < self.first, float("inf"), recent)

    drop_scores = score


class PlainEvict:
    """Trivial reducer: the ``evict`` plugin's rule (:func:`kvpolicy.core.selection.select_top`) without the plugin, so
    a core test does not depend on which plugins are installed."""

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        return select_top(view, scores, keep)


def keep_all_policy() -> CachePolicy:
    """Ratio 0 and a constant score: nothing is compressed or dropped (the output must equal the plain cache's)."""
    return CachePolicy(reducer=PlainEvict(), budget=Budget(ratio=0.0), encode=KeepAll(), decode=FirstLast(), name="keep-all")


def first_last_policy(budget: Budget, first: int = 2, decode: bool = True) -> CachePolicy:
    """StreamingLLM's rule in a few lines: the ``first`` oldest real tokens and the newest ones (easy to rebuild by
    hand in a reference cache)."""
    return CachePolicy(
        reducer=PlainEvict(),
        budget=budget,
        encode=FirstLast(first),
        decode=FirstLast(first) if decode else None,
        name="first-last",
    )
