"""What a bench run is measured on: the machine and packages (recorded with every result) and the model."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .shapes import BUILTIN_CONFIGS
from .spec import BenchSpec, jsonable


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Package versions and the device, recorded with every result."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            p: _version(p)
            for p in (
                "kvpolicy",
                "torch",
                "transformers",
                "pydantic",
                "rich",
                "matplotlib",
            )
        },
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _mem_total(),
    }
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _mem_total() -> int | None:
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


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
    dtype = getattr(torch, spec.dtype)
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
        dtype=spec.dtype,
        config=jsonable(model.config.to_dict()),
    )
    return model, info


