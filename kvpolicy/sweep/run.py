"""The trial loop of one sweep worker (:func:`run_sweep`): open (or join) the study, re-queue the trials of dead
workers, run trials until the study holds ``n_trials`` finished ones (counted across every worker) or the timeout
passes, then write the study's outputs. See :mod:`kvpolicy.sweep` for the whole flow."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .evaluators import make_evaluator
from .outputs import write_study_outputs
from .progress import make_progress
from .spec import SweepConfigError, SweepSpec
from .stopping import held_interrupts, interrupt_handler, stop_timeout_s
from .storage import ATTR_PREFIX, FINISHED, open_storage, open_study, safe_url, trial_id
from .trial import TrialRun, fail_and_requeue, run_trial, tell
from .workers import Heartbeat, reap_dead_trials, worker_identity

__all__ = ["SweepOutcome", "run_sweep"]


@dataclass
class SweepOutcome:
    """How one worker's run of a study ended. ``stopped``: ``complete`` (the study holds its trials), ``timeout``
    (this run's time was up), ``failures`` (trials kept failing) or ``interrupted`` (Ctrl-C / SIGTERM)."""

    study: str
    output: Path
    storage: str
    target: int
    finished: int
    ran_here: int
    failed_here: int
    reused_here: int
    reaped: list[int]
    stopped: str  # "complete" | "timeout" | "failures" | "interrupted"
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """The run did what was asked: the study holds its trials, or the timeout stopped the loop."""
        return self.stopped in ("complete", "timeout")


@dataclass
class _Worker:
    """The loop's state: the shared trial context, the target, this worker's identity and its counts."""

    run: TrialRun
    target: int
    me: dict[str, Any]
    evaluator_ready: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {"complete": 0, "reused": 0, "pruned": 0, "failed": 0})
    consecutive_failures: int = 0

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.consecutive_failures = self.consecutive_failures + 1 if outcome == "failed" else 0


def _state_counts(study: Any) -> tuple[int, int, bool, dict[int, str]]:
    """finished (complete + pruned), running, whether any is waiting, and number -> state."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state.name in FINISHED for t in trials)
    running = sum(t.state.name == "RUNNING" for t in trials)
    waiting = any(t.state.name == "WAITING" for t in trials)
    return finished, running, waiting, {t.number: t.state.name for t in trials}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the worker) is handled like Ctrl-C: the running trial is failed and re-queued,
    and the process exits within :func:`kvpolicy.sweep.stopping.stop_timeout_s` seconds (see that module)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGINT too: its KeyboardInterrupt is held while a storage transaction is open, like SIGTERM's
    old = {sig: signal.signal(sig, interrupt_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_sweep(spec: SweepSpec, **kwargs: Any) -> SweepOutcome:
    """Run (or resume, or join) the study of ``spec`` until it holds its trials; see :mod:`kvpolicy.sweep`.

    Keyword arguments: ``quiet``, ``console`` (a rich Console for progress and messages), ``evaluator`` (an
    :class:`~kvpolicy.sweep.Evaluator` instance instead of the file's), ``tracker``, ``plots``,
    ``max_consecutive_failures``, ``poll_s`` (seconds between checks while other workers finish the last trials).
    Raises :class:`~kvpolicy.sweep.SweepConfigError` (a bad ``$KVPOLICY_STOP_TIMEOUT_S``, before anything is written)
    and :class:`~kvpolicy.sweep.StudyMismatchError` (the study was created by a different sweep)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return _run_sweep(spec, **kwargs)


def _run_sweep(
    spec: SweepSpec,
    *,
    quiet: bool = False,
    console: Any = None,
    evaluator: Any = None,
    tracker: Any = None,
    plots: bool = True,
    max_consecutive_failures: int = 3,
    poll_s: float = 2.0,
) -> SweepOutcome:
    import optuna
    from rich.console import Console

    from .tracking import make_tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = console or Console(stderr=True, quiet=quiet)
    try:
        stop_limit = stop_timeout_s()
    except ValueError as exc:  # before anything is written
        raise SweepConfigError(str(exc)) from None
    out = spec.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    url = spec.storage_url()
    storage = open_storage(url, spec.heartbeat_s, spec.grace_s, spec.max_retries)
    study = open_study(spec, storage)
    atomic_write_text(out / "sweep.json", spec.model_dump_json(indent=1) + "\n")
    reaped = reap_dead_trials(study, storage, spec.max_retries)
    target = spec.target_trials()
    finished0, running0, _, _ = _state_counts(study)
    if not quiet:
        console.print(f"study [bold]{spec.name}[/] in {safe_url(url)}: {finished0}/{target} trials finished"
                      + (f", {running0} running elsewhere" if running0 else "")
                      + (f"; re-queued {len(reaped)} trial(s) of a dead worker: {reaped}" if reaped else ""))
    if tracker is None:
        tracker = make_tracker(spec.wandb, out, group=spec.name, quiet=quiet, console=console)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tracker.catch_up(study, spec)
    run = TrialRun(study, storage, spec, evaluator, make_progress(console, quiet), 0, out, tracker, console, quiet)
    worker = _Worker(run, target, worker_identity())
    with run.progress, _sigterm_as_interrupt():
        stopped = _loop(worker, finished0, max_consecutive_failures, poll_s)
    stopped, summary = _finish(worker, stopped, plots, stop_limit)
    c = worker.counts
    return SweepOutcome(study=spec.name, output=out, storage=safe_url(url), target=target,
                        finished=_state_counts(study)[0], ran_here=c["complete"] + c["pruned"],
                        failed_here=c["failed"], reused_here=c["reused"], reaped=reaped, stopped=stopped,
                        summary=summary)


def _loop(w: _Worker, finished0: int, max_consecutive_failures: int, poll_s: float) -> str:
    """Trials until the study holds its target, the timeout passes, trials keep failing or a stop is requested.
    Returns why it stopped."""
    run, spec, progress = w.run, w.run.spec, w.run.progress
    trials_task = progress.add_task("trials", total=w.target, completed=min(finished0, w.target), info="")
    run.samples_task = progress.add_task("samples", total=spec.samples, visible=False, info="")
    t_start = time.monotonic()
    try:
        while True:
            reap_dead_trials(run.study, run.storage, spec.max_retries)
            finished, running, waiting, _ = _state_counts(run.study)
            progress.update(trials_task, completed=min(finished, w.target))
            if finished >= w.target:
                return "complete"
            if spec.timeout is not None and time.monotonic() - t_start >= spec.timeout:
                return "timeout"
            if w.consecutive_failures >= max_consecutive_failures:
                return "failures"
            if not waiting and finished + running >= w.target:
                progress.update(trials_task, description=f"trials (waiting for {running} running elsewhere)")
                time.sleep(poll_s)
                continue
            progress.update(trials_task, description="trials")
            _ensure_evaluator(w)
            outcome = _claim_and_run(w)
            if outcome is not None:
                w.count(outcome)
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        progress.update(run.samples_task, visible=False)


def _ensure_evaluator(w: _Worker) -> None:
    """Build and set up the evaluator the first time there is a trial to evaluate (it loads the model)."""
    if w.evaluator_ready:
        return
    run = w.run
    if run.evaluator is None:
        spec = run.spec
        run.evaluator = make_evaluator(spec.evaluator, spec.model, spec.task, spec.samples, spec.batch_size)
    run.progress.update(run.samples_task, description="loading model and data", visible=True)
    run.evaluator.setup()
    w.evaluator_ready = True


def _claim_and_run(w: _Worker) -> str | None:
    """Ask for a trial, record this worker as its owner, and run it under a heartbeat. ``None`` when the trial was a
    surplus claim (the study already had its trials). On an interrupt the trial is failed and re-queued."""
    run = w.run
    trial = None
    try:
        with held_interrupts():  # the trial and its owner are recorded together
            trial = run.study.ask()
            trial.set_user_attr(ATTR_PREFIX + "worker", w.me)
            if trial.user_attrs.get(ATTR_PREFIX + "error"):  # a retry inherits the failed trial's attrs
                trial.set_user_attr(ATTR_PREFIX + "error", None)
        tid = trial_id(run.storage, run.study, trial.number)
        with Heartbeat(run.storage, tid, run.spec.heartbeat_s):
            if _surplus(w, trial, tid):
                return None
            return run_trial(run, trial)
    except KeyboardInterrupt:
        if trial is not None:
            fail_and_requeue(run.study, run.storage, trial, run.spec, run.out, "interrupted; re-queued")
            if not run.quiet:
                run.console.print(f"trial {trial.number}: interrupted; it will run again when the sweep is resumed")
        raise


def _surplus(w: _Worker, trial: Any, tid: int) -> bool:
    """Workers asking at once can overshoot the target: the later (new) trial gives way, failed as a surplus."""
    from optuna.trial import TrialState

    run = w.run
    if run.storage.get_trial(tid).system_attrs.get("failed_trial") is not None:
        return False  # a retry of a dead worker's trial always runs
    fin, _, _, states = _state_counts(run.study)
    before = sum(1 for n, s in states.items() if s == "RUNNING" and n < trial.number)
    if fin + before < w.target:
        return False
    trial.set_user_attr(ATTR_PREFIX + "error", "surplus: the study already had its trials; not evaluated")
    tell(run.study, run.storage, trial, state=TrialState.FAIL)
    return True


def _finish(w: _Worker, stopped: str, plots: bool, stop_limit: float) -> tuple[str, dict[str, Any] | None]:
    """The study's outputs and the W&B summary; the tracker closed, bounded when stopping; the evaluator closed."""
    run = w.run
    summary = None
    stopping = stopped == "interrupted"
    try:
        # a stopping worker writes only the fast outputs: the plots and the W&B summary run (seconds, unbounded under
        # load) come with the run that completes the study, or from `kvpolicy report`
        summary = write_study_outputs(run.study, run.spec, run.out, plots=plots and not stopping)
        if not stopping:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run.tracker.log_summary(run.study, run.spec, summary, run.out)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        _close_tracker(run.tracker, stop_limit if stopped == "interrupted" else None)
        if run.evaluator is not None and w.evaluator_ready:
            with contextlib.suppress(Exception):
                run.evaluator.close()
    return stopped, summary


def _close_tracker(tracker: Any, limit_s: float | None) -> None:
    """``tracker.close()``; when stopping, in a daemon thread given ``limit_s`` seconds: W&B's ``finish`` can wait on
    its service process without a timeout, and a stop must not (what it did not log is caught up on resume)."""
    if limit_s is None:
        tracker.close()
        return

    def close() -> None:
        with contextlib.suppress(Exception):
            tracker.close()

    thread = threading.Thread(target=close, name="kvpolicy-tracker-close", daemon=True)
    thread.start()
    thread.join(limit_s)
