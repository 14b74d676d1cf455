"""The model side of an evaluation: loading (memoised per process), building the policy, and the :class:`Context` a
batch runs in (model, tokenizer, end-of-sequence and padding ids, cache geometry).

The eos/pad rules live here once: the protocol stops generations on them, pads batches with them and strips them when
it decodes a generation for ROUGE-L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.policy import CachePolicy
from .tasks import text_tokenizer

# ================================================================================================== model handling
_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def load_eval_model(name: str, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """``kvpolicy.models.load_model`` memoised per process (a sweep calls :func:`evaluate` many times); ``dtype``
    ``auto`` is resolved for ``device`` first (:func:`kvpolicy.hardware.resolve_dtype`)."""
    from ..hardware import dtype_name, resolve_dtype

    resolved = resolve_dtype(dtype, device)
    key = (name, dtype_name(resolved), device)
    if key not in _MODELS:
        from ..models import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(name, dtype=resolved, device=device)
    return _MODELS[key]


def build_policy(policy: str | dict[str, Any], ratio: float | None, overrides: dict[str, Any] | None = None):
    from ..config import load_policy

    over = dict(overrides or {})
    if ratio is not None:
        over["ratio"] = ratio
    return load_policy(policy, overrides=over or None)


def validated_document(policy: CachePolicy) -> dict[str, Any] | None:
    """The resolved document of a policy built by ``load_policy`` (every part and parameter), else ``None``: a
    hand-built policy (tests, custom parts in Python) carries no description of its parts, so nothing can tell two
    of them apart."""
    try:
        from ..config import policy_to_dict

        return policy_to_dict(policy)
    except Exception:
        return None


def policy_document(policy: CachePolicy) -> dict[str, Any]:
    """What a result records as its policy: the validated document, else (a hand-built policy) its name and budget."""
    document = validated_document(policy)
    return document if document is not None else {"name": policy.name, "budget": policy.budget.model_dump()}


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    e = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    tok = text_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    """The id left padding and finished rows are fed: the tokenizer's, else the model's, else the first eos."""
    tok = text_tokenizer(tokenizer) if tokenizer is not None else None
    for value in (getattr(tok, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return eos[0] if eos else 0


@dataclass
class Context:
    model: Any
    tokenizer: Any
    eos: list[int]
    pad: int
    kl_topk: int
    device: torch.device
    vlm: bool
    full_layers: list[int]
    entry_bytes: list[int]  #: bytes of one token's key+value, all kv heads, per layer
    image_ids: frozenset[int] = frozenset()  #: placeholder ids of image/video positions (vision-language models)
    #: a :class:`~.prefill.PrefillStore`: batches replay the policy's cache from a prefill recorded once per batch
    #: (``None``: every run pays its own prefill)
    prefill_store: Any = None

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos]
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return text_tokenizer(self.tokenizer).decode(ids, skip_special_tokens=True)


def make_context(model: Any, tokenizer: Any, kl_topk: int = 256) -> Context:
    from ..core.engine import image_token_ids
    from ..models import is_vision_language_config

    text = model.config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)[:n]
    kv = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    elem = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    eos = eos_ids(model, tokenizer)
    vlm = is_vision_language_config(model.config)
    return Context(
        model=model,
        tokenizer=tokenizer,
        eos=eos,
        pad=pad_id(model, tokenizer, eos),
        kl_topk=kl_topk,
        device=next(model.parameters()).device,
        vlm=vlm,
        full_layers=[i for i, t in enumerate(types) if t == "full_attention"],
        entry_bytes=[2 * kv * head_dim * elem] * n,
        image_ids=image_token_ids(model.config) if vlm else frozenset(),
    )


__all__ = ["Context", "build_policy", "eos_ids", "load_eval_model", "make_context", "pad_id", "policy_document",
           "validated_document"]
