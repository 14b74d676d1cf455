"""Which worker runs a trial, whether it is still alive, and re-queuing the trials of dead workers; the heartbeat a
running trial records (Optuna records it only inside ``optimize``)."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import threading
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .storage import ATTR_PREFIX, retry_callback, trial_id

__all__ = ["Heartbeat", "reap_dead_trials", "worker_identity", "worker_is_dead"]


def _proc_start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":  # zombie: dead, not yet reaped
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start_time(pid), "boot": _boot_id()}


def worker_is_dead(worker: Mapping[str, Any]) -> bool | None:
    """True/False for a worker of this machine, ``None`` for another machine (decided by the heartbeat)."""
    if worker.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot is not None and worker.get("boot") not in (None, boot):
        return True
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = _proc_start_time(pid)
    if start is None:
        return True
    recorded = worker.get("start")
    return recorded is not None and start != recorded  # the pid now belongs to another process


def reap_dead_trials(study: Any, storage: Any, max_retries: int = 3, stale_unowned_s: float = 600.0) -> list[int]:
    """Fail the RUNNING trials of ``study`` (kept in ``storage``) whose worker is dead and re-queue them (same
    parameters). Workers on this machine are checked by process; workers elsewhere by Optuna's heartbeat
    (:func:`optuna.storages.fail_stale_trials`, after the grace period). Returns the numbers of the trials failed
    here."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with contextlib.suppress(Exception):
            optuna.storages.fail_stale_trials(study)
    failed = []
    now = datetime.now()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_callback(max_retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(ATTR_PREFIX + "worker")
        if worker is None:
            # asked but killed before it recorded its worker: dead if this old
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > stale_unowned_s
        else:
            dead = bool(worker_is_dead(worker))
        if not dead:
            continue
        try:
            tid = trial_id(storage, study, t.number)
            storage.set_trial_user_attr(tid, ATTR_PREFIX + "error",
                                        f"worker {worker} died while running this trial; re-queued")
            if storage.set_trial_state_values(tid, state=TrialState.FAIL):
                failed.append(t.number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry(study, copy.deepcopy(storage.get_trial(tid)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    return failed


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds in a thread (Optuna does it only inside optimize())."""

    def __init__(self, storage: Any, tid: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, tid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpolicy-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        if hasattr(self.storage, "record_heartbeat") and self.storage.get_heartbeat_interval() is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a heartbeat write under way finishes on its own (daemon thread, harmless)
            self._thread.join(timeout=2)

