"""Sweeps and ablations: Optuna studies over policy parameters, from a YAML file; resumable, distributable, logged
to W&B.

One sweep = one Optuna study (named by the file's ``name``), kept in an Optuna storage: by default an SQLite file in the
results folder (``results/sweeps/<name>/study.db``), or any storage URL (``--storage postgresql://...``) so workers on
several machines share one study. Running the same command again resumes the study by name.

Flow of one worker (:func:`run_sweep`, :mod:`.run`):

1. the sweep file is validated completely (:func:`load_sweep`, :mod:`.load`) — nothing is loaded before;
2. the study is created or loaded; a study created from a different model / task / samples / space / objectives is
   refused (its trials would not be comparable);
3. trials left RUNNING by a dead worker are failed and re-queued with the same parameters
   (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`): a worker on *this* machine is known dead when its
   recorded process is gone; a worker elsewhere when its trial's heartbeat is older than the grace period (Optuna's
   ``heartbeat_interval`` / ``grace_period`` on RDB storages);
4. trials run (ask → evaluate → tell) until the study holds ``n_trials`` finished (complete or pruned) trials, counted
   across every worker, or ``timeout`` passes. A trial's result goes to the storage first, then to the local results
   files (``trials.jsonl`` log, ``trials.csv`` / ``trials.json`` tables, atomic), and only then to W&B, so a W&B
   failure never loses a trial. Parameters identical to a finished trial's reuse its result (evaluation is
   deterministic: same model, same samples);
5. at the end: the best policy as a ready-to-use YAML (single objective: the best trial; several: the Pareto trial
   closest to the ideal point, and every Pareto policy under ``pareto/``), ``summary.json`` (best trials, Pareto front,
   parameter importances and whether they rest on enough trials), PNG plots and a W&B summary run.

Objectives are computed by an **evaluator** (:class:`Evaluator`): ``harness`` (the default) runs
:mod:`kvpolicy.eval` on the model; ``synthetic`` is a cheap deterministic stand-in with the same interface, for testing
the machinery (storage, resume, workers, W&B, plots) without a model; ``module:attribute`` plugs in your own.

A run ends with :attr:`SweepOutcome.stopped`: ``complete`` (the study holds its trials), ``timeout``, ``failures``
(trials kept failing) or ``interrupted`` (Ctrl-C / SIGTERM: the running trial is marked failed and re-queued for the
next run; the worker writes the tables and ``summary.json`` but leaves the plots and the W&B summary run to the run
that completes the study, and exits within ``$KVPOLICY_STOP_TIMEOUT_S`` seconds (default 5) whatever W&B does:
:mod:`.stopping`). The ``kvpolicy sweep`` command (:mod:`kvpolicy.cli.study`) turns that into its exit code.

Modules: :mod:`.spec` (the file models), :mod:`.space` (search space), :mod:`.conditions` (``when:`` clauses:
conditional spaces and their branches), :mod:`.load` (reading and validating files),
:mod:`.evaluation` / :mod:`.evaluators` / :mod:`.harness` / :mod:`.synthetic` (evaluators), :mod:`.storage` and
:mod:`.workers` (the study, its fingerprint, dead workers), :mod:`.trial` and :mod:`.run` (the trial loop),
:mod:`.records` / :mod:`.outputs` / :mod:`.plots` / :mod:`.pareto_plot` / :mod:`.importance` (with its
too-few-trials warning) / :mod:`.report` (results), :mod:`.tracking` (W&B),
:mod:`.stopping` (a bounded graceful stop), :mod:`.ablate` (single-part ablations).
"""

from __future__ import annotations

from ..io import atomic_write_text
from ..eval.aggregate import paired_bootstrap
from .ablate import AblationResult, run_ablation
from .evaluation import POOLED, BatchReport, Evaluation, Evaluator
from .evaluators import EvaluatorLookupError, get_evaluator_class, make_evaluator
from .harness import HarnessEvaluator
from .load import load_ablation, load_sweep, read_yaml_file
from .outputs import write_study_outputs
from .report import print_summary, report_study
from .run import SweepOutcome, run_sweep
from .space import expand_params
from .spec import METRICS, AblationSpec, SweepConfigError, SweepSpec
from .storage import ATTR_PREFIX, StudyMismatchError, open_storage, open_study
from .synthetic import SyntheticEvaluator
from .workers import reap_dead_trials, worker_identity

__all__ = [
    "ATTR_PREFIX",
    "METRICS",
    "POOLED",
    "AblationResult",
    "AblationSpec",
    "BatchReport",
    "Evaluation",
    "Evaluator",
    "EvaluatorLookupError",
    "HarnessEvaluator",
    "StudyMismatchError",
    "SweepConfigError",
    "SweepOutcome",
    "SweepSpec",
    "SyntheticEvaluator",
    "atomic_write_text",
    "expand_params",
    "get_evaluator_class",
    "load_ablation",
    "load_sweep",
    "make_evaluator",
    "open_storage",
    "open_study",
    "paired_bootstrap",
    "print_summary",
    "read_yaml_file",
    "reap_dead_trials",
    "report_study",
    "run_ablation",
    "run_sweep",
    "worker_identity",
    "write_study_outputs",
]
