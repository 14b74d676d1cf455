"""The pydantic models of what a user writes about a policy (:class:`PolicySpec`, :class:`PartRef`), the field
names resolution works with, and :class:`PolicyConfigError`. How the fields combine: :mod:`kvpolicy.config`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from ..registry import KINDS

__all__ = [
    "BUDGET_FIELDS",
    "DEFAULT_REDUCER",
    "ENGINE_CAPABILITIES",
    "ENGINE_QUIRKS",
    "KIND_WORDS",
    "PART_FIELDS",
    "PartRef",
    "PolicyConfigError",
    "PolicySpec",
]

PART_FIELDS: tuple[str, ...] = KINDS
BUDGET_FIELDS: tuple[str, ...] = ("ratio", "tokens")
#: quirks implemented by the engine itself (fields of CachePolicy), switchable by ``reference_quirks``
ENGINE_QUIRKS: dict[str, str] = {
    "drop_after_attention": "decode drops run after the step's attention (the authors' order)",
    "compressed_positions": "new tokens' RoPE positions count from the compressed cache length",
}
#: capability tags the engine itself supplies to every part (LayerView.token_types is always filled)
ENGINE_CAPABILITIES: frozenset[str] = frozenset({"token_types"})
#: the reducer used when a policy names none
DEFAULT_REDUCER = "evict"
#: each part field in words, as messages name it
KIND_WORDS: dict[str, str] = {
    "encode": "encode scorer",
    "decode": "decode scorer",
    "reducer": "reducer",
    "allocator": "allocator",
}


class PolicyConfigError(ConfigError):
    """A policy document is invalid."""

    def _header(self, count: int) -> str:
        return f"invalid policy{' ' + self.source if self.source else ''} ({count} problems):"


class PartRef(BaseModel):
    """A part as a policy names it: ``name`` plus the part's parameters as extra fields.

    A bare string is accepted for a part with default parameters (``reducer: evict``). ``name`` may be left out
    only when a preset (or a lower layer) supplies it."""

    model_config = ConfigDict(extra="allow")
    #: how a part is written, for an error about a field of this type (read by :mod:`kvpolicy.errors`)
    input_form: ClassVar[str] = "a part name or a mapping {name: <part>, <parameter>: <value>, ...}"

    name: str | None = Field(default=None, description="a registered part of this kind")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        return data

    @property
    def params(self) -> dict[str, Any]:
        """The parameters written for the part (everything but ``name``)."""
        return dict(self.model_extra or {})


class PolicySpec(BaseModel):
    """Everything a user writes about a policy (see :mod:`kvpolicy.config` for how the fields combine)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None,
        description="a label for tables, legends and result files (default: the file's stem, else the preset's name)",
    )
    preset: str | None = Field(default=None, description="a registered preset to start from")
    encode: PartRef | None = Field(default=None, description="encode scorer (prefill); none: no prefill compression")
    decode: PartRef | None = Field(default=None, description="decode scorer; none: no decode-stage drops")
    reducer: PartRef | None = Field(default=None, description=f"reducer (default: {DEFAULT_REDUCER!r})")
    allocator: PartRef | None = Field(default=None, description="per-layer budget allocator")
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="fraction of the cache removed")
    tokens: int | None = Field(default=None, ge=1, description="entries kept per layer and kv head")
    decode_budget: Literal["fraction", "fixed", "off"] | None = Field(
        default=None, description="decode-stage rule (default: fraction for a ratio, fixed for tokens)"
    )
    reference_quirks: bool | dict[str, bool] = Field(
        default=False, description="reproduce the original code's behaviour: true (all quirks) or {quirk: bool}"
    )
    sinks: int | None = Field(
        default=None,
        ge=0,
        le=1 << 20,
        description="protected sinks: the first real tokens of each row that no part drops or merges away (default: "
        "what the parts state, e.g. anchor_merge.start_size; 0 if none does)",
    )
    evaluation: dict[str, Any] | None = Field(
        default=None,
        description="how this policy was measured (model, task, samples, seed, batch_size, dtype, ...), so that "
        "`kvpolicy run --policy <file>` repeats the measurement; not part of the policy itself",
    )
