"""Weights & Biases logging for sweeps and ablations: one W&B run per trial, grouped by study, and a summary run.

* **Offline by default.** ``WANDB_MODE`` (if the user set it) wins, then the sweep file's ``wandb.mode``, else
  ``offline``: runs are written under ``<results>/wandb/`` and can be uploaded later with ``wandb sync``. No account
  or network is needed.
* **Never in the way.** A trial is logged only after it is safe in the Optuna storage and the local results files;
  any W&B error (not installed, init timeout, disk full...) becomes one warning and the tracker switches itself off
  for the rest of the run — the sweep goes on.
* Per trial: ``config`` = the full resolved policy document, the trial's parameters, model, task and samples; the
  history = the running metrics after each sample batch; the summary = every metric, the objective values, the state,
  the cache and speed figures the evaluator reported.
* At the end: a ``summary`` run in the same group with the trials table, the best trials / Pareto front, the
  parameter importances and the PNG plots.
* Trials finished by an earlier run on this machine that never reached W&B (killed in between) are logged when the
  sweep is resumed (``<results>/wandb/logged.json`` lists the trials already logged).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .spec import WandbSpec
from .storage import ATTR_PREFIX
from .workers import worker_is_dead

__all__ = ["NullTracker", "WandbTracker", "make_tracker", "resolve_mode"]


class NullTracker:
    """Logs nothing (``--no-wandb``)."""

    enabled = False

    def catch_up(self, study: Any, spec: Any) -> None:
        pass

    def log_trial(self, trial: Any, spec: Any, history: Sequence[Mapping[str, Any]], details: Mapping[str, Any]
                  ) -> None:
        pass

    def log_summary(self, study: Any, spec: Any, summary: Mapping[str, Any], out: Path) -> None:
        pass

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                  images: Sequence[Path] = ()) -> None:
        pass

    def close(self) -> None:
        pass


def resolve_mode(spec: WandbSpec) -> str:
    """``WANDB_MODE`` if set (the user configured W&B), else the file's ``mode``, else ``offline``."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if spec.mode:
        return spec.mode
    return "offline"


def make_tracker(spec: WandbSpec, out: Path, group: str, quiet: bool = False, console: Any = None) -> Any:
    if not spec.enabled:
        return NullTracker()
    mode = resolve_mode(spec)
    if mode == "disabled":
        return NullTracker()
    try:
        import wandb  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        if console is not None:
            console.print(f"[yellow]warning: W&B is not available ({type(exc).__name__}: {exc}); logging off "
                          "(pip install wandb, or --no-wandb)[/]")
        return NullTracker()
    return WandbTracker(spec, out, group=group, mode=mode, quiet=quiet, console=console)


def _clean(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


class WandbTracker:
    """One W&B run per trial in ``group`` (the study name) and a summary run; see the module docstring."""

    enabled = True

    def __init__(self, spec: WandbSpec, out: Path, group: str, mode: str = "offline", quiet: bool = False,
                 console: Any = None):
        self.spec = spec
        self.out = Path(out)
        self.group = group
        self.mode = mode
        self.quiet = quiet
        self.console = console
        self.dir = self.out  # wandb writes <dir>/wandb/<run>
        self.marker = self.out / "wandb" / "logged.json"
        self._failed = False

    # ------------------------------------------------------------------------------------------------- helpers
    def _warn(self, what: str, exc: BaseException) -> None:
        self._failed = True
        if self.console is not None:
            self.console.print(f"[yellow]warning: W&B {what} failed ({type(exc).__name__}: {exc}); W&B logging is off "
                               "for the rest of this run — results are in the study and the results folder[/]")

    def _init(self, name: str, job_type: str, config: Mapping[str, Any]) -> Any:
        import wandb

        (self.out / "wandb").mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True,
                                  disable_git=True, x_save_requirements=False, init_timeout=60)
        return wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            group=self.group,
            job_type=job_type,
            name=name,
            config=_clean(dict(config)),
            tags=list(self.spec.tags) or None,
            dir=str(self.dir),
            mode=self.mode,  # type: ignore[arg-type]
            reinit="create_new",
            settings=settings,
        )

    def _logged(self) -> set[str]:
        try:
            return set(json.loads(self.marker.read_text()))
        except (OSError, ValueError):
            return set()

    def _mark(self, key: str) -> None:
        done = self._logged() | {key}
        atomic_write_text(self.marker, json.dumps(sorted(done)))

    # ------------------------------------------------------------------------------------------------ sweeps
    def catch_up(self, study: Any, spec: Any) -> None:
        """Log finished trials of dead workers of this machine that never reached W&B."""
        if self._failed:
            return
        logged = self._logged()
        for t in study.get_trials(deepcopy=False):
            if t.state.name not in ("COMPLETE", "PRUNED", "FAIL") or f"{spec.name}/{t.number}" in logged:
                continue
            worker = t.user_attrs.get(ATTR_PREFIX + "worker") or {}
            if worker_is_dead(worker) is not True:
                continue
            if t.state.name == "FAIL" and str(t.user_attrs.get(ATTR_PREFIX + "error", "")).startswith("surplus"):
                continue
            self.log_trial(t, spec, [], t.user_attrs.get(ATTR_PREFIX + "details") or {})
            if self._failed:
                return

    def log_trial(self, trial: Any, spec: Any, history: Sequence[Mapping[str, Any]], details: Mapping[str, Any]
                  ) -> None:
        if self._failed:
            return
        try:
            config = {
                "study": spec.name,
                "trial": trial.number,
                "policy": trial.user_attrs.get(ATTR_PREFIX + "policy"),
                "params": trial.params,
                "branch": trial.user_attrs.get(ATTR_PREFIX + "branch"),  # W&B groups runs by it (part choices)
                "model": spec.model,
                "evaluator": spec.evaluator,
                "task": spec.task,
                "samples": spec.samples,
                "objectives": [o.model_dump() for o in spec.objectives],
            }
            run = self._init(f"{spec.name}-trial-{trial.number:04d}", "trial", config)
            try:
                for h in history:
                    run.log({f"running/{k}": v for k, v in h.items() if k not in ("step",)}, step=int(h["step"]))
                summary: dict[str, Any] = {"state": trial.state.name}
                for m, v in zip(spec.metrics, trial.values or [], strict=False):
                    summary[f"objective/{m}"] = v
                for k, v in (trial.user_attrs.get(ATTR_PREFIX + "metrics") or {}).items():
                    summary[k] = v
                for k, v in _flat(details, "details").items():
                    if isinstance(v, (int, float, str, bool)) or v is None:
                        summary[k] = v
                if trial.duration is not None:
                    summary["duration_s"] = trial.duration.total_seconds()
                err = trial.user_attrs.get(ATTR_PREFIX + "error")
                if err:
                    summary["error"] = str(err)
                for k, v in summary.items():
                    run.summary[k] = v
            finally:
                run.finish(exit_code=0 if trial.state.name != "FAIL" else 1)
            self._mark(f"{spec.name}/{trial.number}")
        except Exception as exc:  # noqa: BLE001
            self._warn(f"logging of trial {trial.number}", exc)

    def log_summary(self, study: Any, spec: Any, summary: Mapping[str, Any], out: Path) -> None:
        if self._failed:
            return
        try:
            import wandb

            rows = json.loads((out / "trials.json").read_text()) if (out / "trials.json").exists() else []
            run = self._init(f"{spec.name}-summary", "summary", {"study": spec.name, "sweep": summary.get("sweep")})
            try:
                if rows:
                    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                                  if k in rows[0] else 10**6)
                    run.log({"trials": wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols]
                                                                       for r in rows])})
                best = summary.get("best_trials") or []
                if best:
                    cols = list(best[0])
                    run.log({"pareto_front" if spec.multi_objective else "best_trial":
                             wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in best])})
                imp = summary.get("importances") or {}
                if imp:
                    run.log({"importances": wandb.Table(columns=["objective", "parameter", "importance"],
                                                        data=[[m, p, v] for m, d in imp.items()
                                                              for p, v in d.items()])})
                for rel in summary.get("plots") or []:
                    path = out / rel
                    if path.exists():
                        run.log({f"plots/{path.stem}": wandb.Image(str(path))})
                run.summary["trials"] = summary.get("trials")
                run.summary["chosen_trial"] = summary.get("chosen_trial")
            finally:
                run.finish()
        except Exception as exc:  # noqa: BLE001
            self._warn("summary logging", exc)

    # --------------------------------------------------------------------------------------------- ablations
    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                  images: Sequence[Path] = ()) -> None:
        if self._failed:
            return
        try:
            import wandb

            run = self._init(name, "ablation", config)
            try:
                if rows:
                    cols = list(rows[0])
                    run.log({"deltas": wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols]
                                                                       for r in rows])})
                for p in images:
                    if Path(p).exists():
                        run.log({f"plots/{Path(p).stem}": wandb.Image(str(p))})
            finally:
                run.finish()
        except Exception as exc:  # noqa: BLE001
            self._warn("ablation logging", exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            import wandb

            if wandb.run is not None:
                wandb.run.finish()


def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    else:
        out[prefix] = d
    return out
