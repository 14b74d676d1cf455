"""A head-score table: one number per decoder layer and kv head, read from and written to a tab-separated file.

Why one format: DuoAttention's authors publish their learned gates as ``full_attention_heads.tsv`` (one line per
decoder layer, one tab-separated value per kv head, higher = the head needs the full context; written by
``numpy.savetxt``), and kvpolicy's own calibration (:mod:`kvpolicy.heads.calibrate`) writes the same layout, so a
user can hand either to a part that reads per-head scores. Lines of ``nan`` mark layers that have no score: the
layers a policy does not manage (Gemma 3's sliding-window layers), which kvpolicy's calibration leaves unmeasured.

Values are read as they are: unlike the authors' loader (and kvpress's), nothing is clipped to ``[0, 1]``, because
kvpolicy's scores are output divergences (nats, unbounded) and clipping would only turn distinct values into ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import atomic_write_text

__all__ = ["HeadScores", "HeadScoresError", "read_scores", "write_scores"]


class HeadScoresError(ConfigError):
    """Head scores cannot be used (a file missing, not a table of numbers, of another model's shape; no calibration
    for the model): an input error the user acts on, one line naming the file or the command to run."""


@dataclass
class HeadScores:
    """Per-layer, per-kv-head scores: float64 ``[L, H]``; a whole row of NaN = a layer without a score.

    ``source`` says where they came from (a file path, or ``calibration``), ``meta`` what produced them (the
    calibration's settings and model identity, when known)."""

    scores: torch.Tensor
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scores.shape[1])

    def scored_layers(self) -> list[int]:
        """Layers with a score (the rows that are not NaN)."""
        return [i for i in range(self.num_layers) if not bool(torch.isnan(self.scores[i]).all())]


def parse_scores(text: str, source: str) -> HeadScores:
    """The table in ``text`` (tab- or space-separated numbers, one line per layer; blank lines and ``#`` comments
    ignored). Raises :class:`HeadScoresError` naming ``source`` and the line for anything else."""
    rows: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            row = [float(x) for x in line.replace(",", " ").split()]
        except ValueError:
            raise HeadScoresError(f"{source}: line {number} is not a row of numbers: {line[:60]!r}") from None
        if any(math.isinf(x) for x in row):
            raise HeadScoresError(f"{source}: line {number} holds an infinite value; scores must be finite or nan")
        nan = [math.isnan(x) for x in row]
        if any(nan) and not all(nan):
            raise HeadScoresError(
                f"{source}: line {number} mixes numbers and nan; a layer is either scored (every kv head) or not (nan)"
            )
        if rows and len(row) != len(rows[0]):
            raise HeadScoresError(
                f"{source}: line {number} has {len(row)} values, the first row {len(rows[0])}; one value per kv head"
            )
        rows.append(row)
    if not rows:
        raise HeadScoresError(f"{source}: no scores (expected one line per decoder layer, one value per kv head)")
    scores = torch.tensor(rows, dtype=torch.float64)
    if bool(torch.isnan(scores).all()):
        raise HeadScoresError(f"{source}: every layer is nan; at least one layer needs scores")
    return HeadScores(scores, source=source)


def read_scores(path: str | Path) -> HeadScores:
    """The table in the file ``path`` (see :func:`parse_scores`)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise HeadScoresError(f"{p}: no such head-score file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadScoresError(f"{p}: cannot be read as text ({exc})") from None
    return parse_scores(text, str(p))


def format_scores(scores: torch.Tensor) -> str:
    """The table as text, in the authors' layout: one line per layer, tab-separated, 18 significant digits (a float64
    round-trips exactly), ``nan`` for unscored layers."""
    lines = ["\t".join("nan" if math.isnan(v) else f"{v:.18e}" for v in row) for row in scores.tolist()]
    return "\n".join(lines) + "\n"


def write_scores(path: str | Path, scores: torch.Tensor) -> Path:
    """Write the table atomically (a reader never sees half a file)."""
    return atomic_write_text(Path(path), format_scores(scores.to(torch.float64)))
