"""Random head-score tables for the tiny test models, so that ``duo_attention`` runs without a calibration."""

from __future__ import annotations

import torch

from kvpolicy.heads.store import policy_layers
from kvpolicy.heads.table import write_scores


def random_head_scores(path: str, model: torch.nn.Module, seed: int = 7) -> str:
    """Write a random table for ``model`` to ``path`` (returned): a score per kv head of the layers a head
    calibration scores (:func:`kvpolicy.heads.store.policy_layers`), ``nan`` for the others (sliding-window layers),
    as ``duo_attention``'s check of the table against the model requires."""
    text = model.config.get_text_config(decoder=True)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.full((text.num_hidden_layers, text.num_key_value_heads), float("nan"), dtype=torch.float64)
    for layer in policy_layers(model.config):
        scores[layer] = torch.rand(text.num_key_value_heads, generator=gen, dtype=torch.float64)
    write_scores(path, scores)
    return path
