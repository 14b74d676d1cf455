"""The Optuna storage of a study: opening it (any RDB URL, with heartbeats and a retry callback for dead workers'
trials), the study's fingerprint (a resumed study must compute its trials the same way), samplers and pruners, and
SIGINT/SIGTERM held while a storage transaction is open (:mod:`kvpolicy.sweep.stopping`)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .evaluators import get_evaluator_class
from .spec import SweepSpec
from .stopping import hold_interrupts, release_interrupts

__all__ = ["ATTR_PREFIX", "FINISHED", "StudyMismatchError", "open_storage", "open_study", "retry_callback",
           "hold_interrupts_in_transactions", "safe_url", "study_fingerprint", "trial_id"]

#: prefix of the user attributes kvpolicy records on trials and studies
ATTR_PREFIX = "kvpolicy."
#: trial states that count towards a study's ``n_trials``
FINISHED = ("COMPLETE", "PRUNED")


class StudyMismatchError(RuntimeError):
    """The study named by the sweep already exists but was created by a sweep with different trial semantics."""


def retry_callback(max_retries: int) -> Any:
    """Optuna's callback that re-queues a dead worker's trial (renamed in Optuna 4.9; both names work)."""
    import optuna.storages as st

    cls = getattr(st, "RetryHeartbeatStaleTrialCallback", None) or st.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=max_retries)


def _stale_kwarg() -> str:
    import inspect

    from optuna.storages import RDBStorage

    params = inspect.signature(RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def open_storage(url: str, heartbeat_s: int = 15, grace_s: int | None = None, max_retries: int = 3) -> Any:
    """An Optuna storage for ``url``. RDB URLs (sqlite, postgresql, mysql...) get a heartbeat (``heartbeat_s``), a
    grace period (default 4 heartbeats) and a retry callback (``max_retries``) for trials whose worker died."""
    import optuna
    from optuna.storages import RDBStorage

    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if str(db) not in ("", ":memory:"):
            db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    import sqlalchemy.exc

    stale_kwarg = _stale_kwarg()
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s or 4 * heartbeat_s,
                    **{stale_kwarg: retry_callback(max_retries)},
                )
                hold_interrupts_in_transactions(storage)
                return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            # workers starting together on an empty database race to create Optuna's tables; the loser retries
            # (and a database that is still starting gets a few seconds)
            if attempt == 5:
                raise
            time.sleep(0.5 + attempt + (os.getpid() % 7) / 10)
    raise AssertionError("unreachable")


def fingerprint_hash(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _make_sampler(spec: SweepSpec, seed_offset: int) -> Any:
    import optuna

    seed = None if spec.sampler.seed is None else spec.sampler.seed + seed_offset
    name = spec.sampler.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.GridSampler(spec.grid() or {}, seed=seed)
        if name == "nsgaii":
            pop = spec.sampler.population_size or max(2, min(50, spec.target_trials() // 3))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        startup = spec.sampler.n_startup_trials
        if startup is None:
            startup = min(10, max(3, spec.target_trials() // 3))
        # group: a conditional space is modelled per group of parameters that occur together (Optuna's TPE needs it
        # to model parameters that only some trials have); an unconditional study keeps the sampler it always had
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True, **({"group": True} if spec.conditional else {}))


def _make_pruner(spec: SweepSpec) -> Any:
    import optuna

    p = spec.pruning
    if not p.enabled or p.pruner == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.HyperbandPruner()


def study_fingerprint(spec: SweepSpec) -> dict[str, Any]:
    """What a trial's values depend on: the sweep's fingerprint (:meth:`SweepSpec.fingerprint`) plus what the evaluator
    resolves on this machine (``resolved_settings``: the harness's dtype, where ``auto`` differs between machines)."""
    fp = spec.fingerprint()
    resolved = getattr(get_evaluator_class(spec.evaluator), "resolved_settings", None)
    if callable(resolved):
        fp.update(resolved(spec.model, spec.task, spec.samples, spec.batch_size))
    return fp


def _check_directions(study: Any, spec: SweepSpec, storage: Any) -> None:
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise StudyMismatchError(
            f"study {spec.name!r} in {safe_url(storage)} optimises {[d.name.lower() for d in study.directions]}, "
            f"this sweep {spec.directions}: give the sweep another name to start a new study")


def _check_fingerprint(study: Any, spec: SweepSpec, storage: Any) -> None:
    """Record the fingerprint on a new study; refuse an existing study whose fingerprint differs, naming the fields."""
    fp = study_fingerprint(spec)
    fp_hash = fingerprint_hash(fp)
    attrs = study.user_attrs
    stored = attrs.get(ATTR_PREFIX + "fingerprint_hash")
    if stored is None:
        study.set_user_attr(ATTR_PREFIX + "fingerprint_hash", fp_hash)
        study.set_user_attr(ATTR_PREFIX + "fingerprint", json.loads(json.dumps(fp, default=str)))
        study.set_user_attr(ATTR_PREFIX + "sweep", json.loads(spec.model_dump_json()))
    elif stored != fp_hash:
        old = attrs.get(ATTR_PREFIX + "fingerprint", {})
        differ = sorted(k for k in set(old) | set(fp) if json.dumps(old.get(k), sort_keys=True, default=str)
                        != json.dumps(json.loads(json.dumps(fp.get(k), default=str)), sort_keys=True, default=str))
        raise StudyMismatchError(
            f"study {spec.name!r} already exists in {safe_url(storage)} with a different {', '.join(differ) or 'setup'}"
            f"; its trials would not be comparable. Give this sweep another name (name: ...), or another --output / "
            f"--storage")


def open_study(spec: SweepSpec, storage: Any, seed_offset: int | None = None) -> Any:
    """Create the study or load it by name; refuse a study whose trials were computed differently."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                load_if_exists=True)
    _check_directions(study, spec, storage)
    _check_fingerprint(study, spec, storage)
    if seed_offset is None:
        seed_offset = len(study.get_trials(deepcopy=False))
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=_make_sampler(spec, seed_offset),
                             pruner=_make_pruner(spec))


def trial_id(storage: Any, study: Any, number: int) -> int:
    """The storage's id of trial ``number`` of ``study`` (Optuna keeps it private on trial objects)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def hold_interrupts_in_transactions(storage: Any) -> None:
    """Make every Optuna session of ``storage`` hold SIGINT/SIGTERM from its first statement until it is closed (main
    thread): a ``KeyboardInterrupt`` inside an SQLite call left a read open, on which the stop's own writes then
    waited for the busy timeout (:mod:`kvpolicy.sweep.stopping`). The held interrupt is raised when ``close()`` returns."""
    from sqlalchemy import event

    registry = getattr(storage, "scoped_session", None)
    factory = getattr(registry, "session_factory", None)
    if factory is None or getattr(factory.class_, "holds_interrupts", False):
        return

    class HoldingSession(factory.class_):  # type: ignore[misc,name-defined]
        holds_interrupts = True

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self.info.pop("kvpolicy.held", False):
                    release_interrupts()

    def after_begin(session: Any, transaction: Any, connection: Any) -> None:
        if threading.current_thread() is threading.main_thread() and not session.info.get("kvpolicy.held"):
            session.info["kvpolicy.held"] = True
            hold_interrupts()

    event.listen(HoldingSession, "after_begin", after_begin)
    factory.class_ = HoldingSession
    registry.remove()  # this thread's session was made from the old class


def safe_url(storage: Any) -> str:
    url = getattr(storage, "url", None) or str(storage)
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url

