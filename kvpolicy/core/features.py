"""Attention features the engine does not implement: refused with one error, before any forward.

Once a layer is compressed kvpolicy computes its attention itself (grouped SDPA or eager math under the engine's
per-slot mask, and the statistics kernels), so a model whose attention adds something to that math would silently
get other outputs. Two such features exist in current models; each is refused when the cache is built
(:class:`~kvpolicy.core.cache.PolicyCache`, :func:`~kvpolicy.core.engine.make_cache`), rather than ignored:

* **logit soft-capping** (Gemma 2, ``attn_logit_softcapping`` in the config): logits pass through
  ``cap * tanh(logits / cap)`` before the softmax;
* **learned attention sinks** (GPT-OSS: a per-head ``sinks`` parameter on each attention module, handed to the
  attention function as ``s_aux``): one extra logit per head in the softmax's denominator. transformers' own SDPA
  function ignores it too, which is why such models run with eager or flash attention only.

:func:`refuse_attention_kwargs` is the backstop inside the attention function, for a cache built by hand around a
model these checks did not see.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnsupportedModelError", "check_attention_config", "check_attention_modules", "refuse_attention_kwargs"]

_SOFTCAP = "its attention soft-caps logits (attn_logit_softcapping={value})"
_SINKS = "its attention adds learned sink logits ({where}, passed to the attention function as s_aux)"
_FIX = "which kvpolicy's attention does not implement; supported: models without them (see docs/architecture.md)"


class UnsupportedModelError(ValueError):
    """The engine cannot run this model (names the model class and the reason)."""


def _refuse(name: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"kvpolicy cannot compress the cache of {name}: {reason}, {_FIX}")


def check_attention_config(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` when the text decoder's config asks for logit soft-capping."""
    text = config.get_text_config(decoder=True)
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None:
        raise _refuse(type(config).__name__, _SOFTCAP.format(value=cap))


def check_attention_modules(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` when an attention module of ``model`` carries learned sinks (a tensor
    attribute ``sinks``, GPT-OSS style)."""
    import torch

    for path, module in model.named_modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            raise _refuse(type(model).__name__, _SINKS.format(where=f"the `sinks` of {path}"))


def refuse_attention_kwargs(kwargs: dict[str, Any]) -> None:
    """Inside the attention function: raise when the model hands it soft-capping or sinks after all."""
    if kwargs.get("softcap") is not None:
        raise _refuse("this model", _SOFTCAP.format(value=kwargs["softcap"]))
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise _refuse("this model", _SINKS.format(where="s_aux"))
