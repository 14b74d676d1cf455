"""Where calibrated head scores are kept: ``<cache_root()>/head_scores/<model identity>/<settings key>.tsv``.

Why keyed by a *model identity* computed from the weights rather than the name the user typed: the same model is
reached through an alias, a local path or a Hub id, and a part that looks its scores up (while a cache is built) sees
only the model object. The identity hashes the architecture (the config's shape fields, not its paths or its
attention implementation, which ``kvpolicy.attach`` changes) and the raw bytes of a few weight slices rounded to
bfloat16, so the model loaded in float32 on a CPU and in bfloat16 on a GPU has the same identity (a float32 copy of
a bfloat16 checkpoint rounds back exactly). Next to each table a JSON file records what produced it.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch

from ..io import write_json_atomic
from ..models import cache_root
from .settings import HeadCalibration
from .table import HeadScores, read_scores, write_scores

__all__ = ["IDENTITY_FIELDS", "cached_scores", "model_identity", "save_scores", "scores_path", "policy_layers"]

#: the text config's fields that define the architecture (what the identity hashes besides the weights)
IDENTITY_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
    "intermediate_size", "vocab_size", "layer_types", "sliding_window", "rope_theta",
)

_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(model: Any) -> str:
    """A sha256 hex digest of the model's architecture and weights (see the module docstring); memoised per model."""
    known = _IDENTITIES.get(model)
    if known is not None:
        return known
    text = model.config.get_text_config(decoder=True)
    h = hashlib.sha256()
    shape = {name: getattr(text, name, None) for name in IDENTITY_FIELDS}
    h.update(json.dumps(shape, sort_keys=True, default=str).encode())
    params = list(model.named_parameters())
    for name, p in params[:2] + params[-2:]:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(p.shape)}".encode())
        for part in (flat[:4096], flat[::stride][:4096]):
            h.update(part.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    digest = h.hexdigest()
    _IDENTITIES[model] = digest
    return digest


def policy_layers(config: Any) -> list[int]:
    """The decoder layers whose kv heads a head calibration scores: the full-attention ones. A sliding-window layer
    is a policy layer too, but it already holds only its window, and the calibration's streamed head (the first
    ``sinks`` and last ``recent`` context tokens) is defined over the whole context, which such a layer does not see:
    ``duo_attention`` streams no head of an unscored layer, which then holds its window."""
    text = config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None) or ["full_attention"] * n
    return [i for i, kind in enumerate(types[:n]) if kind == "full_attention"]


def scores_path(identity: str, settings: HeadCalibration, extra: str = "") -> Path:
    """The cached table for a model identity and calibration settings (``extra``: a further key component, e.g. the
    hash of calibration samples a caller supplied instead of generating them)."""
    name = settings.key() if not extra else hashlib.sha256(f"{settings.key()}:{extra}".encode()).hexdigest()[:16]
    return cache_root() / "head_scores" / identity[:24] / f"{name}.tsv"


def save_scores(path: Path, scores: HeadScores) -> Path:
    """Write the table and, beside it (``.json``), its ``meta``."""
    write_scores(path, scores.scores)
    write_json_atomic(path.with_suffix(".json"), scores.meta)
    return path


def cached_scores(path: Path) -> HeadScores | None:
    """The table cached at ``path`` with its meta, or ``None`` when there is none yet."""
    if not path.exists():
        return None
    found = read_scores(path)
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        found.meta = json.loads(meta_path.read_text())
    found.source = str(path)
    return found
