"""``dtype: auto``: bfloat16 only where the device multiplies it natively, float32 elsewhere; explicit dtypes pass.

The machine's capabilities are monkeypatched (torch's CPU capability, oneDNN, the CPU flags, CUDA), so every case
runs on any machine; the expected dtype of each case is the documented rule, written out by hand."""

from __future__ import annotations

import pytest
import torch

from kvpolicy import hardware
from kvpolicy.hardware import DTYPE_CHOICES, DtypeError, resolve_dtype

AVX2_FLAGS = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"})  # e.g. an AMD EPYC (Zen 2/3)
SKYLAKE_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}  # AVX-512 without BF16
COOPER_FLAGS = SKYLAKE_FLAGS | {"avx512_bf16"}  # AVX-512 BF16 (Cooper Lake, Zen 4)
AMX_FLAGS = COOPER_FLAGS | {"amx_bf16", "amx_tile", "amx_int8"}  # Sapphire Rapids


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU torch sees: ``cpu(flags, capability, mkldnn=True)``."""

    def set_cpu(flags: frozenset[str], capability: str, mkldnn: bool = True) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)

    return set_cpu


@pytest.mark.parametrize(
    "flags, capability, mkldnn, expected",
    [
        (AVX2_FLAGS, "AVX2", True, torch.float32),
        (SKYLAKE_FLAGS, "AVX512", True, torch.float32),
        (COOPER_FLAGS, "AVX512", True, torch.bfloat16),
        (AMX_FLAGS, "AVX512", True, torch.bfloat16),
        (AMX_FLAGS, "AVX512", False, torch.float32),  # no oneDNN: no fast bfloat16 matmul
        (AMX_FLAGS, "AVX2", True, torch.float32),  # torch restricted to AVX2 kernels (ATEN_CPU_CAPABILITY)
        (frozenset({"fp", "asimd", "bf16"}), "DEFAULT", True, torch.float32),  # an ARM CPU
    ],
    ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx", "amx-no-onednn", "amx-capped-avx2", "arm"],
)
def test_auto_on_cpu(cpu, flags, capability, mkldnn, expected):
    cpu(flags, capability, mkldnn)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize(
    "capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float32)]
)
def test_auto_on_cuda(monkeypatch, cpu, capability, expected):
    cpu(AVX2_FLAGS, "AVX2")  # the host CPU does not matter for a CUDA device
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: seen.append(device) or capability)
    assert resolve_dtype("auto", "cuda:1") == expected
    assert seen == [torch.device("cuda:1")]


def test_auto_on_cuda_without_cuda_and_other_devices(monkeypatch, cpu):
    cpu(AMX_FLAGS, "AVX512")  # even on a fast-bf16 host CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "cuda") == torch.float32
    assert resolve_dtype("auto", "meta") == torch.float32


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_explicit_dtype_passes_through(cpu, name):
    cpu(AVX2_FLAGS, "AVX2")  # bfloat16 is slow here, but an explicit choice is the user's
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    assert resolve_dtype(name, "cpu") == want
    assert resolve_dtype(f"torch.{name}", "cpu") == want
    assert resolve_dtype(want, "cpu") is want


@pytest.mark.parametrize("bad", ["bf16", "float64", "", "AUTO ", torch.float64, torch.int8])
def test_bad_dtype_is_one_line_naming_field_and_choices(bad):
    with pytest.raises(DtypeError) as err:
        resolve_dtype(bad, "cpu")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("dtype: ")
    assert "allowed values: auto, bfloat16, float16, float32" in msg
    assert DTYPE_CHOICES == ("auto", "bfloat16", "float16", "float32")


def test_cpu_flags_match_proc_cpuinfo():
    """The flags come from the kernel's list (checked here against a plain scan of the file, where it exists)."""
    hardware.cpu_flags.cache_clear()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert hardware.cpu_flags() == frozenset()
        return
    first = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    assert hardware.cpu_flags() == frozenset(first.split(":", 1)[1].split() if first else ())
