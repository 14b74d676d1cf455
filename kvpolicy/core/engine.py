"""Running a policy inside a transformers model: attach the attention function, build the cache."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from . import attention
from .cache import PolicyCache, UnsupportedModelError
from .features import check_attention_modules
from .policy import CachePolicy
from .token_types import set_forward_inputs

#: model families whose attention path was checked against the engine's assumptions (cache.update() right before
#: ALL_ATTENTION_FUNCTIONS[...] in the same module, kv heads not repeated before the call, 1-D or M-RoPE positions
#: derived from get_seq_length())
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "gemma3",
    "gemma3_text",
)

BACKENDS = {"sdpa": attention.SDPA, "eager": attention.EAGER}


def check_model(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the model class when the engine has not been checked on it."""
    config = model.config
    kinds = {config.model_type, config.get_text_config(decoder=True).model_type}
    if not kinds & set(SUPPORTED_MODEL_TYPES):
        raise UnsupportedModelError(
            f"kvpolicy cannot run on {type(model).__name__} (model_type={config.model_type!r}): supported model types "
            f"are {', '.join(SUPPORTED_MODEL_TYPES)}. Pass strict=False to attach() to try it anyway."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"kvpolicy cannot run on encoder-decoder model {type(model).__name__}")


def attach(model: Any, backend: str = "sdpa", strict: bool = True) -> Any:
    """Route the model's attention through kvpolicy (``backend``: ``sdpa`` or ``eager`` outputs). Returns the model.

    A model whose cache is a plain ``DynamicCache`` behaves exactly as before: the function falls through to
    transformers' own attention for any layer that is not a policy layer."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if strict:
        check_model(model)
    attention.register()
    _watch_inputs(model)
    name = BACKENDS[backend]
    if "text_config" in getattr(model.config, "sub_configs", {}):
        # only the language model: a vision tower keeps its own attention (it has no cache to compress)
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)
    return model


def image_token_ids(config: Any) -> frozenset[int]:
    """Placeholder ids that mark image/video positions in a vision-language model's input_ids."""
    ids = set()
    for attr in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return frozenset(ids)


#: models whose forwards are watched -> their hook handles (weak: attaching keeps no model alive, and kvpolicy writes
#: no attribute of its own onto the user's model)
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _watch_inputs(model: Any) -> None:
    """Let the cache see each forward's ``input_ids`` (for token types) through forward hooks — read-only, no patching."""
    if model in _WATCHED:
        return
    image_ids = image_token_ids(model.config)

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PolicyCache):  # a reused cache fails here, naming the fix, not deep inside the model
            new = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
            if isinstance(new, torch.Tensor) and new.dim() >= 2:
                cache.check_inputs(new.shape[0], new.shape[1])
            cache.record_prompt(ids)
        set_forward_inputs(ids if isinstance(ids, torch.Tensor) else None, image_ids)

    def after(module, args, kwargs, output):
        set_forward_inputs(None, image_ids)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PolicyCache) and output is not None and cache.deferred:
            # the prefill has gone through every layer: the probe pass (if any), then the deferred compression
            cache.finish_prefill(module)

    _WATCHED[model] = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    )


def make_cache(model: Any, policy: CachePolicy, tokenizer: Any = None) -> PolicyCache:
    """A fresh :class:`PolicyCache` for one generate() call or one manual forward loop (a model whose attention
    carries learned sinks or soft-caps logits is refused here, :mod:`kvpolicy.core.features`).

    ``tokenizer``: for a policy with a probe that builds its input from text (KVzip's repeat prompt); by default the
    one saved next to a local checkpoint (``model.config.name_or_path``) is loaded."""
    impl = model.config.get_text_config(decoder=True)._attn_implementation
    if impl not in BACKENDS.values():
        raise RuntimeError(
            f"the model's attention implementation is {impl!r}: call kvpolicy.attach(model) before using a policy cache"
        )
    check_attention_modules(model)
    if policy.probe_needs() and image_token_ids(model.config):
        raise UnsupportedModelError(
            f"kvpolicy: policy {policy.name!r} runs a probe (a constructed text input read after the prompt), which "
            f"cannot re-read image inputs: {type(model).__name__} is a vision-language model"
        )
    bind_parts(policy, model)
    return PolicyCache(policy, model.config, tokenizer)


def bind_parts(policy: CachePolicy, model: Any) -> None:
    """Hand ``model`` to every part of ``policy`` that defines the optional hook ``bind_model(model)``, once per
    cache and before any forward: a part whose data belongs to one model (per-head scores calibrated for it) finds
    and checks them here, and fails before the prefill rather than in the middle of it."""
    for name in ("encode", "decode", "reducer", "allocator"):
        bind = getattr(getattr(policy, name), "bind_model", None)
        if bind is not None:
            bind(model)
