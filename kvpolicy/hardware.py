"""Which floating-point type to compute in: ``dtype: auto`` resolved for the device at hand.

bfloat16 halves memory and is what the models were trained in, but it is only fast where the hardware multiplies it
natively. On a CPU without AVX-512 BF16 or AMX, torch's bfloat16 matmul falls back to a scalar path: measured on an
AMD EPYC with AVX2 only, a 576x1536 matmul ran at 0.4 GFLOPS in bfloat16 against 20 in float32, and a 8-sample
evaluation of the default model took 47 s of prefill instead of 7 s. ``auto`` therefore picks:

* **bfloat16** on a CUDA device that supports it natively (compute capability 8.0 and later; ROCm: torch's own
  check), and on a CPU whose flags include ``amx_bf16`` or ``avx512_bf16`` while torch dispatches AVX-512 kernels
  (``torch.backends.cpu.get_cpu_capability()``) and has oneDNN (which holds the fast bfloat16 matmul);
* **float32** everywhere else (older CPUs, CUDA devices before Ampere, other devices).

The CPU decision reads flags rather than timing a matmul on purpose: a timing depends on the machine's load at that
instant, so on a shared machine the same command could resolve to different dtypes from one run to the next and
compute different numbers; the flags are free to read and give the same answer every time. Flags come from
``/proc/cpuinfo`` (Linux); elsewhere torch's cpuinfo-based probe is used when this torch build has it, and float32
otherwise (an explicit ``--dtype bfloat16`` still works everywhere).

The module imports torch only inside functions, so the command line can import it while answering ``--help``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the values a ``dtype`` field accepts
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
#: CPU flags (``/proc/cpuinfo``) of native bfloat16 matrix arithmetic
FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: ``torch.backends.cpu.get_cpu_capability()`` values below AVX-512, where no native bfloat16 kernel can run
_SLOW_CAPABILITIES = frozenset({"DEFAULT", "NO AVX", "AVX", "AVX2"})


class DtypeError(ValueError):
    """A ``dtype`` value that is not one of :data:`DTYPE_CHOICES` (the message is one line naming the field)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when torch on this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16 through oneDNN)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    if torch.backends.cpu.get_cpu_capability() in _SLOW_CAPABILITIES:
        return False
    flags = cpu_flags()
    if flags:
        return bool(flags & FAST_BF16_CPU_FLAGS)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # no /proc/cpuinfo: torch's own cpuinfo probe
    return bool(probe()) if callable(probe) else False


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True for a CUDA device with native bfloat16 (capability >= 8.0; on ROCm, torch's check)."""
    import torch

    if not torch.cuda.is_available():
        return False
    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported())
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """What ``dtype: auto`` means on ``device``: bfloat16 where it is native, float32 otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        fast = cuda_has_fast_bf16(dev)
    elif dev.type == "cpu":
        fast = cpu_has_fast_bf16()
    else:  # mps, xpu, ...: no check we trust yet; float32 is correct everywhere
        fast = False
    return torch.bfloat16 if fast else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for a ``dtype`` setting: ``auto`` resolved for ``device`` (see the module docstring), a name
    (``bfloat16``, ``float16``, ``float32``, also spelt ``torch.float32``) or a torch dtype passed through.

    Raises :class:`DtypeError` (one line naming the field and the allowed values) for anything else."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16, torch.float32):
            return dtype
        raise DtypeError(f"dtype: {dtype} is not allowed; allowed values: {', '.join(DTYPE_CHOICES)}")
    name = str(dtype).strip().removeprefix("torch.")
    if name not in DTYPE_CHOICES:
        raise DtypeError(f"dtype: {dtype!r} is not allowed; allowed values: {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return auto_dtype(device)
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling result files and ``--dtype`` use)."""
    return str(dtype).removeprefix("torch.")


__all__ = [
    "DTYPE_CHOICES",
    "FAST_BF16_CPU_FLAGS",
    "DtypeError",
    "auto_dtype",
    "cpu_flags",
    "cpu_has_fast_bf16",
    "cuda_has_fast_bf16",
    "dtype_name",
    "resolve_dtype",
]
