"""Result files written so that a crash never leaves half a file behind.

Every file kvpolicy writes for a user (results, cells, study tables, best-policy YAML, plots, reference tensors) goes
through one of these functions: the bytes land in a temporary file in the same folder, are flushed to disk, and one
``os.replace`` puts them in place. A reader — a resumed sweep, a second worker, ``compare`` picking up its cells — sees
either the old file or the new one, never a torn one. The temporary name carries the process and thread so that
workers sharing a folder never write into each other's temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

__all__ = ["append_jsonl", "atomic_savefig", "save_figure", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "json_default", "write_json_atomic"]


def _temporary(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(fh)`` on a binary temporary file next to ``path``, fsync it, then move it into place.

    ``suffix`` matters where the writer looks at the file name (matplotlib picks the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, suffix)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # readable by the other users of a shared results folder
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
    """JSON for the values results carry besides plain Python: numpy scalars/arrays, datetimes, paths, tensors."""
    if hasattr(o, "tolist"):  # numpy scalars and arrays, torch tensors
        return o.tolist()
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def write_json_atomic(path: str | Path, doc: Any, *, indent: int = 1) -> Path:
    """``doc`` as JSON (NaN kept as ``NaN``: a failed metric stays visible), one trailing newline."""
    return atomic_write_text(path, json.dumps(doc, indent=indent, default=json_default, allow_nan=True) + "\n")


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (the temporary file keeps the extension, which picks the format)."""
    path = Path(path)
    options = {"dpi": 120, "bbox_inches": "tight", **kwargs}
    return atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png", **options),
                        suffix=path.suffix)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Lay out, write atomically and close a finished figure (pyplot keeps every open figure alive until closed, and a
    grid of plots would otherwise hold them all)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, **kwargs)
    finally:
        plt.close(fig)


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor: lines from workers sharing the
    file never interleave, and a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=json_default) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
