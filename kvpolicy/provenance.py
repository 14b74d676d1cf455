"""What every result file records about where it came from: package versions, the machine, the device.

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

__all__ = ["PACKAGES", "cpu_name", "environment", "memory_total_bytes", "versions"]

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
