"""Progress bars of sweeps and ablations (rich), or nothing at all with ``quiet``."""

from __future__ import annotations

from typing import Any

__all__ = ["NullProgress", "make_progress"]


def make_progress(console: Any, quiet: bool) -> Any:
    """A rich ``Progress`` on ``console`` (a description, a bar, done/total, elapsed and remaining time, an info
    field), or a :class:`NullProgress` when ``quiet``."""
    if quiet:
        return NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet,
        transient=False,
    )


class NullProgress:
    """The ``Progress`` interface doing nothing."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass
