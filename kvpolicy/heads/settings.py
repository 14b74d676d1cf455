"""What a head calibration is run with: the streaming window it tests and the calibration set it measures on.

Separate from the measurement (:mod:`kvpolicy.heads.calibrate`) because a part that only *reads* calibrated scores
needs these settings too — they are the key under which the scores are cached (:mod:`kvpolicy.heads.store`) — and
must not pull in the model-running code to get them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = ["CALIBRATION_SEED", "CALIBRATION_VERSION", "DEFAULT_TASKS", "HeadCalibration"]

#: bumped whenever the measurement changes in a way that changes the numbers (old cached scores are then not reused)
CALIBRATION_VERSION = 1

#: the calibration's default seed: evaluations use small seeds (``kvpolicy run --seed`` defaults to 0), and the
#: ``ruler`` generators draw a sample's needles from ``(task, seed, index)`` whatever the length, so a calibration on
#: seed 0 would have seen the needles of the samples it is later evaluated on
CALIBRATION_SEED = 1000

#: RULER's eight needle-in-a-haystack tasks (``kvpolicy.eval.tasks.ruler_text.NIAH_TASKS``, named here so that reading
#: the settings never imports the evaluation package): retrieval from anywhere in the context, what streaming heads
#: cannot do
DEFAULT_TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
)


class HeadCalibration(BaseModel):
    """Settings of one head calibration (``kvpolicy calibrate-heads``).

    A kv head is *streamed* by keeping only the context's first ``sinks`` and last ``recent`` tokens for it; its score
    is how much that changes the model's answer distribution on RULER samples generated at ``context_tokens``."""

    model_config = ConfigDict(extra="forbid")

    sinks: int = Field(default=64, ge=0, le=1 << 20, description="first context tokens a streamed head keeps")
    recent: int = Field(default=256, ge=0, le=1 << 20, description="last context tokens a streamed head keeps")
    context_tokens: int | None = Field(
        default=None, ge=256, le=1 << 17,
        description="length of each calibration prompt in the model's tokens (default: 1024, or 4 x (sinks + recent) "
        "rounded up to 256 when that is longer)",
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASKS), min_length=1,
        description="RULER tasks the samples are dealt over (comma list); default: the eight niah_* tasks",
    )
    samples: int = Field(default=8, ge=1, le=4096, description="calibration samples (round-robin over the tasks)")
    seed: int = Field(
        default=CALIBRATION_SEED, ge=0,
        description="seed of the RULER generators (default 1000: not an evaluation's seed, so that no evaluated "
        "sample's needles were part of the calibration)",
    )
    chat: bool | None = Field(default=None, description="use the chat template (default: when the tokenizer has one)")
    batch: int = Field(
        default=4, ge=1, le=256,
        description="kv heads measured per forward (memory vs speed; not part of the cache key: the scores do not "
        "depend on it beyond float rounding)",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def comma_list(cls, value: Any) -> Any:
        """``--tasks vt,cwe`` is one string: parsed as the ``ruler`` task parses its own option (only when tasks are
        given, so reading the defaults never imports the evaluation package)."""
        from ..eval.tasks.ruler import RulerOptions

        return RulerOptions.comma_list(value)

    @field_validator("tasks")
    @classmethod
    def known_tasks(cls, value: list[str]) -> list[str]:
        from ..eval.tasks.ruler_text import RULER_TASKS  # only when tasks are given: the defaults are known names

        unknown = [t for t in value if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; allowed: {', '.join(RULER_TASKS)}")
        return value

    @field_validator("context_tokens")
    @classmethod
    def window_inside_context(cls, value: int | None, info: ValidationInfo) -> int | None:
        window = info.data.get("sinks", 0) + info.data.get("recent", 0)
        if value is not None and window >= value // 2:
            raise ValueError(
                f"{value} is too short for sinks + recent = {window}: a streamed head must lose most of the context "
                f"for its score to mean anything; allowed: >= {2 * window + 2}"
            )
        return value

    @model_validator(mode="after")
    def _default_context(self) -> HeadCalibration:
        if self.context_tokens is None:
            self.context_tokens = max(1024, -(-4 * (self.sinks + self.recent) // 256) * 256)
        return self

    def key_document(self) -> dict[str, Any]:
        """What the scores depend on (``batch`` left out), with the measurement's version."""
        doc = self.model_dump(exclude={"batch"})
        doc["version"] = CALIBRATION_VERSION
        return doc

    def key(self) -> str:
        """A short hash of :meth:`key_document`: the file name of the cached scores."""
        text = json.dumps(self.key_document(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
