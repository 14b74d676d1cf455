"""What a bench run is measured on: the machine and packages (recorded with every result) and the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..hardware import resolve_dtype
from .shapes import BUILTIN_CONFIGS
from .spec import BenchSpec, jsonable


def load_warning(env: dict[str, Any]) -> str | None:
    """A warning when other jobs already loaded the CPU when :func:`environment` was read (timings will be noisy)."""
    load = (env.get("loadavg_start") or [0.0])[0]
    if env.get("device") != "cpu" or load <= (os.cpu_count() or 1) - 0.5:
        return None
    warning = f"load average {load:.1f} on {os.cpu_count()} cores at start: other jobs share the CPU; timings are noisy"
    if torch.get_num_threads() > 1:
        warning += " (with several threads, OpenMP barriers stall: --threads 1 is steadier)"
    return warning


def build_model(spec: BenchSpec) -> tuple[Any, dict[str, Any]]:
    """The model (eval mode, on the device, in the dtype) and a description of it for the result."""
    dtype = resolve_dtype(spec.dtype, spec.device)
    if spec.model is not None:
        from ..models import load_model

        model, _ = load_model(spec.model, dtype=dtype, device=spec.device)
        info = {"name": spec.model, "weights": "pretrained"}
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

        name = spec.config
        assert name is not None
        if name in BUILTIN_CONFIGS:
            longest = (
                max(spec.contexts or [0])
                + max(spec.steps or 0, spec.long_steps or 0)
                + 64
            )
            config = LlamaConfig(
                **BUILTIN_CONFIGS[name], max_position_embeddings=max(4096, longest)
            )
        else:
            path = Path(name)
            if not path.exists():
                raise FileNotFoundError(
                    f"config {name!r} is neither a file nor a built-in shape ({', '.join(BUILTIN_CONFIGS)})"
                )
            doc = json.loads(path.read_text())
            model_type = doc.pop("model_type", "llama")
            config = AutoConfig.for_model(model_type, **doc)
        torch.manual_seed(spec.seed)
        with torch.device(spec.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        info = {"name": name, "weights": f"random (seed {spec.seed})"}
    model.eval()
    text = model.config.get_text_config(decoder=True)
    head_dim = (
        getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    )
    info.update(
        architecture=type(model).__name__,
        model_type=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        q_heads=text.num_attention_heads,
        kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        dtype=str(dtype).removeprefix("torch."),
        config=jsonable(model.config.to_dict()),
    )
    return model, info


