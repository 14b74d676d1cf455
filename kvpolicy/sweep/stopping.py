"""A bounded graceful stop for sweep workers: after SIGTERM the process is gone within a known time.

Why: schedulers (SLURM, Kubernetes) send SIGTERM, wait a grace period (often 30 s) and then SIGKILL. The sweep's
graceful stop (fail and re-queue the running trial, rewrite the tables) is quick (the whole stop took 1.9-3.9 s on
a loaded 2-core machine, interpreter exit and W&B included), but what comes after it is not ours to bound: W&B's teardown waits, without a timeout, for its service process to flush and exit
(``ServiceConnection.teardown`` joins the process), a ``run.finish()`` the signal interrupted can leave that service
waiting, and on a loaded machine each of those can take longer than the grace period. So once a stop is requested a
daemon *deadline* thread is started: if the process has not exited ``stop_timeout_s()`` seconds later, it waits (at
most as long again) for any storage writes that must happen together (:data:`CRITICAL`, held by the sweep around
them, so a study is never left half-updated), says why on stderr and ends the process with ``os._exit(130)``. Everything that matters is in the
study and the results files by then; W&B catches up on the next run (``logged.json``).

Interrupts are *held*, not just bounded, while the main thread is inside a storage transaction
(:func:`hold_interrupts` / :func:`release_interrupts`; the sweep wraps every Optuna session with them): a
``KeyboardInterrupt`` raised inside an SQLite call leaves a read open in the process, and the stop's own writes (fail
and re-queue the trial) then wait on it for SQLite's busy timeout (120 s) — what held a worker past 60 s after
SIGTERM on a loaded machine, where a signal often lands in a storage call. A held signal is raised as soon as the
transaction closes. This is done in Python, not with ``pthread_sigmask``: a signal blocked in the main thread is
still delivered through any other thread (the heartbeat, W&B's), and Python runs its handler in the main thread.

Only a process that is stopping anyway arms the deadline: the SIGTERM handler of a sweep, and the ``kvpolicy sweep`` command
when it returns after an interruption. ``run_sweep`` called from Python and stopped by Ctrl-C never arms it, so an
interactive session is not killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["CRITICAL", "DEFAULT_STOP_TIMEOUT_S", "STOP_TIMEOUT_ENV", "arm_stop_deadline", "held_interrupts",
           "hold_interrupts", "interrupt_handler", "release_interrupts", "stop_requested", "stop_timeout_s"]

#: environment variable: seconds a stopping worker may take before it is ended (default
#: :data:`DEFAULT_STOP_TIMEOUT_S`); below a scheduler's grace period, so the stop stays ours and not a SIGKILL
STOP_TIMEOUT_ENV = "KVPOLICY_STOP_TIMEOUT_S"
DEFAULT_STOP_TIMEOUT_S = 5.0

#: held by the sweep around storage writes that must happen together (a trial and its owner; failing a trial and
#: queuing its retry); the deadline thread takes it before ending the process
CRITICAL = threading.RLock()

_armed = threading.Event()
_EXIT_CODE = 130


class _Held:
    """Main-thread state of held interrupts: nesting depth, the first signal that arrived meanwhile, and whether a
    SIGTERM has already been raised (a second one must not cut the stop's own cleanup short)."""

    depth = 0
    pending: int | None = None
    term_raised = False


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def hold_interrupts() -> None:
    """Enter a section (main thread; nests) in which SIGINT/SIGTERM are held; the stop deadline waits for it."""
    if _main():
        CRITICAL.acquire()
        _Held.depth += 1


def release_interrupts() -> None:
    """Leave a held section; leaving the outermost one raises ``KeyboardInterrupt`` if a signal arrived meanwhile."""
    if not _main() or _Held.depth == 0:
        return
    _Held.depth -= 1
    CRITICAL.release()
    if _Held.depth == 0 and _Held.pending is not None:
        signum, _Held.pending = _Held.pending, None
        _raise_for(signum)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """``with held_interrupts():`` storage writes that must happen together."""
    hold_interrupts()
    try:
        yield
    finally:
        release_interrupts()


def interrupt_handler(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM handler of a running sweep: ``KeyboardInterrupt`` (the running trial is failed and re-queued),
    held until a storage transaction closes; a SIGTERM also arms the stop deadline at once, so the process ends in
    bounded time even if something holds the interrupt too long."""
    if signum == signal.SIGTERM:
        arm_stop_deadline()
        if _Held.term_raised:
            return
    if _Held.depth > 0:
        if _Held.pending is None:
            _Held.pending = signum
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        _Held.term_raised = True
    raise KeyboardInterrupt(f"signal {signum}")


def stop_timeout_s() -> float:
    """The stop deadline in seconds, from ``$KVPOLICY_STOP_TIMEOUT_S``. Raises ``ValueError`` naming the variable
    for a value that is not a positive number (the sweep reports it before anything runs)."""
    raw = os.environ.get(STOP_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_STOP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{STOP_TIMEOUT_ENV}: {raw!r} is not allowed; give a number of seconds > 0 "
                         f"(default {DEFAULT_STOP_TIMEOUT_S:g})")
    return value


def stop_requested() -> bool:
    """Whether a stop deadline is running in this process."""
    return _armed.is_set()


def arm_stop_deadline(seconds: float | None = None) -> bool:
    """Start the deadline thread (once per process; later calls do nothing and return False)."""
    if _armed.is_set():
        return False
    _armed.set()
    limit = stop_timeout_s() if seconds is None else seconds
    thread = threading.Thread(target=_deadline, args=(limit,), name="kvpolicy-stop-deadline", daemon=True)
    thread.start()
    return True


def _deadline(limit: float) -> None:
    time.sleep(limit)
    # a storage write in progress gets at most the same time again; SQLite/PostgreSQL transactions are atomic anyway
    t0 = time.monotonic()
    CRITICAL.acquire(timeout=limit)
    waited = time.monotonic() - t0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001,S110 - the process is ending; a closed stream must not stop that
            pass
    try:
        storage = f" (then waited {waited:.1f} s for a storage write to finish)" if waited >= 0.1 else ""
        os.write(2, (f"kvpolicy: still running {limit:g} s after the stop request{storage}: W&B or another cleanup "
                     f"did not finish; exiting now. The study and the results files are saved; run the same command "
                     f"again to resume (set {STOP_TIMEOUT_ENV} to wait longer)\n").encode())
    finally:
        os._exit(_EXIT_CODE)
