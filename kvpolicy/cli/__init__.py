"""The ``kvpolicy`` command line. Thin by design: parse arguments, call the library, print; the only place where an
error becomes an exit code.

One module per command group: :mod:`.plugins` (``plugins``), :mod:`.evaluate` (``demo``, ``run``, ``compare``),
:mod:`.study` (``sweep``, ``ablate``, ``report``), :mod:`.heads` (``calibrate-heads``) and :mod:`.bench` (``bench``,
imported only when it runs); the
shared pieces (the application, lazy loading, consoles, one-line errors) are in :mod:`.common`.
"""

from __future__ import annotations

from . import evaluate, heads, plugins, study  # noqa: F401 - importing a command module registers its commands on ``app``
from .common import LAZY_COMMANDS, app, load_lazy_command, main

__all__ = ["LAZY_COMMANDS", "app", "load_lazy_command", "main"]
