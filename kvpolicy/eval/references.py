"""The full-cache reference of a sample, computed once and cached on disk.

A reference holds what every policy run of the sample is compared with: the teacher-forced target (the gold text, or
the full cache's greedy answer when the task has none), the full cache's NLL per target token, its argmax and top-k
log-probabilities per step (for KL and top-1 agreement), its greedy generation, and its budget and timing.

Key: SHA-256 of the model's fingerprint (name, config, a few weights), dtype, attention backend, the sample's content
hash (prompt ids, target ids, generation length, extra inputs), ``kl_topk``, the end-of-sequence ids, the package
versions (numerics may change with them) and :data:`FORMAT`. One file per sample under
``<cache root>/eval_refs/<key[:2]>/<key>.pt``, written through :func:`kvpolicy.io.atomic_write` (a temporary file
in the same directory published with ``os.replace``), so concurrent sweeps can share the directory and an interrupted
run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import provenance
from ..io import atomic_write

FORMAT = 1


@dataclass
class Reference:
    id: str
    target: list[int]  #: teacher-forced tokens (gold, or the full cache's greedy answer)
    target_kind: str  #: "gold" or "reference"
    nll: list[float]  #: full cache NLL of each target token
    argmax: list[int]  #: full cache argmax at each target step
    topk_ids: torch.Tensor  #: int32 [T, k]
    topk_logp: torch.Tensor  #: float32 [T, k]
    generation: list[int] | None  #: full cache greedy generation (when the sample asks for one)
    prompt_tokens: int
    kept_per_layer_prefill: list[float]
    kept_per_layer_end: list[float]
    bytes_prefill: int
    bytes_end: int
    allocated_prefill: float  #: the batch's allocated cache bytes (cache.nbytes()) divided by its rows
    allocated_end: float
    seen_end: int  #: real tokens the cache had seen when kept_per_layer_end was measured
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: list[str] = field(default_factory=list)  #: ids of the samples it was computed with (batch composition)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reference:
        d = dict(d)
        d.pop("format", None)
        return cls(**d)


def model_fingerprint(model: Any, name: str | None = None) -> str:
    """Cheap identity of a model's weights: its name, its config, and the raw bytes of a contiguous and a strided
    slice of a few parameters. No floating-point reduction is involved (a sum would depend on the thread count)."""
    h = hashlib.sha256()
    h.update((name or "").encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    params = list(model.named_parameters())
    for pname, p in params[:2] + params[-2:]:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{pname}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[:4096].to(torch.float32).cpu().numpy().tobytes())
        h.update(flat[::stride][:4096].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


#: the packages whose versions are part of a reference's key (a new torch or transformers may change the numerics)
KEY_PACKAGES = ("torch", "transformers", "kvpolicy")


def key_versions() -> dict[str, str | None]:
    """The versions in a reference's key (:func:`kvpolicy.provenance.versions` of :data:`KEY_PACKAGES`)."""
    found = provenance.versions(KEY_PACKAGES)
    return {name: found[name] for name in KEY_PACKAGES}


class ReferenceStore:
    """Per-sample reference files under ``directory`` (``None``: in memory only)."""

    def __init__(self, directory: str | Path | None, settings: dict[str, Any]):
        self.directory = Path(directory) if directory is not None else None
        self.settings = {**settings, "versions": key_versions(), "format": FORMAT}
        self.memory: dict[str, Reference] = {}
        self.hits = 0
        self.misses = 0

    def key(self, sample_hash: str) -> str:
        doc = json.dumps({"sample": sample_hash, **self.settings}, sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()

    def path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Reference | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.directory is not None:
            path = self.path(key)
            if path.exists():
                try:
                    ref = Reference.from_dict(torch.load(path, weights_only=True))
                except Exception:  # unreadable or from another format: recompute
                    ref = None
                if ref is not None:
                    self.memory[key] = ref
                    self.hits += 1
                    return ref
        return None

    def put(self, key: str, ref: Reference) -> None:
        self.misses += 1
        self.memory[key] = ref
        if self.directory is None:
            return
        doc = ref.to_dict()
        atomic_write(self.path(key), lambda fh: torch.save(doc, fh))


__all__ = ["FORMAT", "KEY_PACKAGES", "Reference", "ReferenceStore", "key_versions", "model_fingerprint"]
