"""What every result file records about where it came from: package versions, the machine, the device, the model.

One capture for every app (evaluation, sweeps, ablations, bench, the reference store), so that two numbers from
kvpolicy can always be traced to the same kind of record — and so that a time is never published without the CPU it
was measured on (CPUs of the same cloud "kind" differ by 50x in bf16 matmul speed).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "cpu_name", "environment", "memory_total_bytes", "model_info", "versions"]

#: the distributions whose versions change kvpolicy's numbers (kernels, tokenisation, metrics, search)
PACKAGES = ("kvpolicy", "torch", "transformers", "optuna", "wandb", "pydantic", "numpy", "rouge-score", "rich",
            "matplotlib")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (``None`` where one is not installed), plus Python's."""
    return {"python": sys.version.split()[0], **{p: _version(p) for p in packages}}


def cpu_name() -> str:
    """The CPU model as ``lscpu`` names it (from /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int | None:
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, platform, CPU, threads, memory, load at the start and (on CUDA) the GPU: recorded with every result."""
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "device": device,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": memory_total_bytes(),
    }
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def model_info(model: Any) -> dict[str, Any]:
    """Shape facts a KV-cache report needs, read from the (text decoder) config of a model or a config.

    Keys: ``architecture`` (class name), ``model_type``, ``num_layers``, ``num_q_heads``, ``num_kv_heads``,
    ``kv_groups`` (q heads per kv head, the GQA factor), ``head_dim``, ``sliding_window`` and ``layer_types``
    (``None`` unless some layer is not full attention, e.g. Gemma 3's 5:1 sliding/full pattern or Mistral's
    window on every layer, where a KV policy must treat the layer kinds differently), ``num_params`` (``None``
    for a bare config).
    """
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        config, architecture, num_params = model, (model.architectures or [type(model).__name__])[0], None
    else:
        config, architecture = model.config, type(model).__name__
        num_params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config(decoder=True)
    q_heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
    num_layers = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None)
    layer_types = list(getattr(text, "layer_types", None) or [])
    if not layer_types and window is not None:  # Mistral-style: one window, applied by every layer
        layer_types = ["sliding_attention"] * num_layers
    has_sliding = any(t != "full_attention" for t in layer_types)
    return {
        "architecture": architecture,
        "model_type": text.model_type,
        "num_layers": num_layers,
        "num_q_heads": q_heads,
        "num_kv_heads": kv_heads,
        "kv_groups": q_heads // kv_heads,
        "head_dim": int(head_dim),
        "sliding_window": window if has_sliding else None,
        "layer_types": layer_types if has_sliding else None,
        "num_params": num_params,
    }
