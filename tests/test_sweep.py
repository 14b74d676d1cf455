"""Sweeps: file validation (one message naming the field, before anything loads), the study mechanics (resume after a
killed worker, two workers on PostgreSQL, pruning, grid, W&B failures), outputs and reports.

The mechanics run on the ``synthetic`` evaluator (no model: deterministic metrics of the policy, a sleep per sample),
in real subprocesses where a process is killed. The real-model sweep is ``sweeps/elastic.yaml`` (see docs/sweeps.md).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from checkpoints import tiny_checkpoint

from kvpolicy.sweep import SweepConfigError, load_sweep

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "evaluator": "synthetic",
    "task": {"sleep_s": 0.0},
    "samples": 4,
    "policy": {"preset": "elastic"},
    "space": {
        "ratio": {"type": "float", "low": 0.5, "high": 0.95},
        "decode.offset": {"type": "int", "low": -64, "high": -1},
    },
    "objectives": [{"metric": "ppl", "direction": "minimize"}, {"metric": "cache_bytes", "direction": "minimize"}],
    "sampler": {"name": "tpe", "seed": 0},
    "n_trials": 4,
    "wandb": False,
}


def sweep_doc(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    doc.update(changes)
    return doc


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_cli(args: list[str], env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kvpolicy.sweep", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def db_trials(db: Path, study: str) -> list[dict]:
    """Trials straight from the SQLite file (no Optuna in the checking path)."""
    con = sqlite3.connect(db)
    try:
        sid = con.execute("select study_id from studies where study_name = ?", (study,)).fetchone()[0]
        rows = con.execute("select trial_id, number, state, datetime_complete from trials where study_id = ? "
                           "order by number", (sid,)).fetchall()
        out = []
        for trial_id, number, state, done in rows:
            params = dict(con.execute("select param_name, param_value from trial_params where trial_id = ?",
                                      (trial_id,)).fetchall())
            values = [v for (v,) in con.execute("select value from trial_values where trial_id = ? order by "
                                                "objective", (trial_id,))]
            sys_attrs = {k: json.loads(v) for k, v in con.execute(
                "select key, value_json from trial_system_attributes where trial_id = ?", (trial_id,))}
            out.append({"number": number, "state": state, "complete": done, "params": params, "values": values,
                        "system": sys_attrs})
        return out
    finally:
        con.close()


# ======================================================================================================= validation
def _one_issue(doc_or_path, path_fragment: str, words: str = "") -> str:
    with pytest.raises(SweepConfigError) as info:
        load_sweep(doc_or_path)
    err = info.value
    assert len(err.issues) == 1, str(err)
    assert err.issues[0].path.startswith(path_fragment), str(err)
    assert path_fragment in str(err)
    if words:
        assert words in str(err), str(err)
    return str(err)


def test_valid_file_loads():
    spec = load_sweep(sweep_doc())
    assert spec.multi_objective and spec.directions == ["minimize", "minimize"]
    assert spec.target_trials() == 4


def test_bad_path_names_the_space_field():
    doc = sweep_doc()
    doc["space"]["decode.offst"] = {"type": "int", "low": -8, "high": -1}
    msg = _one_issue(doc, "space.decode.offst", "unknown parameter")
    assert "did you mean 'offset'" in msg


def test_path_the_base_policy_lacks():
    doc = sweep_doc()
    doc["space"]["encode.recent"] = {"type": "int", "low": 0, "high": 8}  # elastic's encode scorer has no 'recent'
    _one_issue(doc, "space.encode.recent", "frequency")


def test_value_outside_the_parameter_range():
    doc = sweep_doc()
    doc["space"]["ratio"]["high"] = 1.5
    _one_issue(doc, "space.ratio", "out of range")


def test_empty_range():
    doc = sweep_doc()
    doc["space"]["ratio"] = {"type": "float", "low": 0.9, "high": 0.5}
    _one_issue(doc, "space.ratio", "empty range")
    doc["space"]["ratio"] = {"type": "categorical", "choices": []}
    _one_issue(doc, "space.ratio", "empty choices")


def test_unknown_sampler():
    _one_issue(sweep_doc(sampler={"name": "tpee"}), "sampler.name", "did you mean 'tpe'")


def test_unknown_objective():
    _one_issue(sweep_doc(objectives=[{"metric": "perplexty"}]), "objectives[0].metric", "unknown metric")
    _one_issue(sweep_doc(objectives=[{"metric": "ppl", "direction": "down"}]), "objectives[0].direction")


def test_bad_yaml_syntax(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nspace:\n  ratio: {type: float, low: 0.5, high: 0.9\nobjectives: [ppl]\n")
    msg = _one_issue(f, "yaml", "line")
    assert str(f) in msg


def test_unknown_top_level_field():
    doc = sweep_doc()
    doc["n_trails"] = 3
    _one_issue(doc, "n_trails", "did you mean 'n_trials'")


def test_pruning_needs_one_objective():
    _one_issue(sweep_doc(pruning=True), "pruning", "single objective")


def test_grid_needs_a_step():
    _one_issue(sweep_doc(sampler="grid"), "space.ratio", "step")


def test_unknown_part_name_in_a_categorical():
    doc = sweep_doc()
    doc["space"]["encode.name"] = ["frequency", "nope"]
    _one_issue(doc, "space.encode.name", "unknown encode scorer")


def test_unknown_model_fails_before_loading(monkeypatch):
    import kvpolicy.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(kvpolicy.models, "load_model", boom)
    _one_issue(sweep_doc(evaluator="harness", model="no-such-model", task={"name": "continuation"}), "model",
               "unknown model")


def test_cli_reports_the_field_and_exits_2(tmp_path):
    doc = sweep_doc(output=str(tmp_path / "out"))
    doc["space"]["decode.offst"] = {"type": "int", "low": -8, "high": -1}
    r = run_cli([str(write_yaml(tmp_path / "s.yaml", doc))])
    assert r.returncode == 2, r.stderr
    assert "space.decode.offst" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was created before validation passed


def test_shipped_sweep_files_validate():
    for name in ("elastic", "h2o", "local"):
        spec = load_sweep(REPO / "sweeps" / f"{name}.yaml", deep=False)
        assert spec.multi_objective
        assert any(o.metric in ("cache_bytes", "cache_fraction") for o in spec.objectives)
        assert "ratio" in spec.space


def test_shipped_sweep_files_validate_deeply():
    pytest.importorskip("kvpolicy.eval.runner", reason="the evaluation harness is not installed")
    from kvpolicy.models import model_problem as check_model_name

    problem = check_model_name("smollm2-135m")
    if problem:
        pytest.skip(f"the default model is not installed here: {problem}")
    for name in ("elastic", "h2o", "local"):
        load_sweep(REPO / "sweeps" / f"{name}.yaml")


# ========================================================================================================= running
def _run(doc, tmp_path, **kw):
    from kvpolicy.sweep import run_sweep

    spec = load_sweep(sweep_doc(**{"output": str(tmp_path / "out"), **doc}))
    return spec, run_sweep(spec, quiet=True, poll_s=0.2, **kw)


def test_sweep_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from kvpolicy.config import load_policy, resolve_policy

    spec, outcome = _run({"n_trials": 6, "wandb": {"project": "kvpolicy-test"}}, tmp_path)
    out = tmp_path / "out"
    assert outcome.stopped == "complete" and outcome.finished == 6 and outcome.ok
    rows = json.loads((out / "trials.json").read_text())
    assert [r["number"] for r in rows] == list(range(6)) and all(r["state"] == "COMPLETE" for r in rows)
    assert (out / "trials.csv").read_text().count("\n") == 7
    assert len((out / "trials.jsonl").read_text().splitlines()) == 6
    # best policy: a ready-to-use document with the chosen trial's parameters
    best = yaml.safe_load((out / "best_policy.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    chosen = next(r for r in rows if r["number"] == summary["chosen_trial"])
    resolved = resolve_policy(best)
    assert resolved.budget.ratio == pytest.approx(chosen["params.ratio"])
    assert resolved.spec.decode.offset == chosen["params.decode.offset"]
    load_policy(out / "best_policy.yaml")
    assert summary["pareto_front"] and summary["best_trials"]
    assert {r["number"] for r in summary["best_trials"]} == {r["number"] for r in rows if r["pareto"]}
    assert len(list((out / "pareto").glob("*.yaml"))) == len(summary["best_trials"])
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"quality_vs_budget.png", "pareto_front.png", "history_ppl.png", "importance_ppl.png"} <= plots
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    # W&B offline: one run per trial plus the summary, all in the study's group
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 7
    assert sorted(json.loads((out / "wandb" / "logged.json").read_text())) == sorted(f"t/{i}" for i in range(6))


def test_resume_keeps_finished_trials(tmp_path):
    spec, first = _run({"n_trials": 3}, tmp_path)
    db = tmp_path / "out" / "study.db"
    before = db_trials(db, "t")
    assert [t["state"] for t in before] == ["COMPLETE"] * 3
    spec, second = _run({"n_trials": 5}, tmp_path)
    after = db_trials(db, "t")
    assert [t["state"] for t in after] == ["COMPLETE"] * 5
    assert after[:3] == before  # untouched: same params, values and completion times
    assert second.ran_here == 2
    # a third run has nothing to do (and loads nothing)
    spec, third = _run({"n_trials": 5}, tmp_path, evaluator=_ExplodingEvaluator())
    assert third.ran_here == 0 and third.finished == 5


class _ExplodingEvaluator:
    needs_model = False

    def setup(self):
        raise AssertionError("no trial should have been evaluated")

    def evaluate(self, policy, on_batch=None):
        raise AssertionError("no trial should have been evaluated")

    def close(self):
        pass


def test_a_different_sweep_under_the_same_name_is_refused(tmp_path):
    f = write_yaml(tmp_path / "s.yaml", sweep_doc(output=str(tmp_path / "out"), n_trials=1))
    assert run_cli([str(f), "--quiet"]).returncode == 0
    r = run_cli([str(f), "--quiet", "--samples", "3"])
    assert r.returncode == 2
    assert "samples" in r.stderr and "another name" in r.stderr


def _wait_for(cond, timeout: float, what: str, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial(db: Path, study: str) -> int | None:
    if not db.exists():
        return None
    try:
        trials = db_trials(db, study)
    except (sqlite3.Error, TypeError):
        return None
    done = sum(t["state"] == "COMPLETE" for t in trials)
    running = [t["number"] for t in trials if t["state"] == "RUNNING" and t["params"]]
    return running[0] if done >= 2 and running else None


# Run inside the sweep subprocess of the SIGTERM cases: W&B as it behaves on a loaded machine, where its service
# process is slow to flush and exit. Its exit hook (``ServiceConnection.teardown``, which joins the service process with
# no timeout) never returns, nor do the summary run's ``wandb.init`` and any ``finish`` once a stop is requested; and
# every trial's ``finish`` takes a second, announced by a file, so the test can signal the worker inside it.
STALLED_WANDB = """
import pathlib, runpy, sys, time
import wandb
from wandb.sdk import wandb_run
from wandb.sdk.lib.service import service_connection
from kvpolicy.sweep.stopping import stop_requested

MARKS = pathlib.Path(sys.argv.pop(1))
service_connection.ServiceConnection.teardown = lambda self, exit_code: time.sleep(3600)
_init, _finish = wandb.init, wandb_run.Run.finish

def init(*args, **kwargs):
    if kwargs.get("job_type") == "summary":
        time.sleep(3600)
    return _init(*args, **kwargs)

def finish(self, *args, **kwargs):
    if stop_requested():
        time.sleep(3600)
    (MARKS / ("finishing-" + self.name)).touch()
    time.sleep(1.0)
    return _finish(self, *args, **kwargs)

wandb.init, wandb_run.Run.finish = init, finish
sys.argv[0] = "kvpolicy.sweep"
runpy.run_module("kvpolicy.sweep", run_name="__main__", alter_sys=True)
"""
STOP_BOUND_S = 10.0  # a scheduler's grace period is often 30 s; the worker's own deadline is 3 s here


@pytest.mark.parametrize("case", ["sigkill", "sigterm-while-evaluating", "sigterm-inside-wandb-finish"])
def test_killed_sweep_resumes_and_keeps_every_finished_trial_once(tmp_path, case):
    """A real sweep process is killed mid-trial; the same command then completes the study: finished trials are kept
    (once, unchanged), the killed trial is failed and re-run with the same parameters. A SIGTERM stops the worker
    within the bound even when W&B hangs (as under load), wherever the signal lands."""
    out = tmp_path / "out"
    n = 5
    f = write_yaml(tmp_path / "s.yaml", sweep_doc(output=str(out), n_trials=n, task={"sleep_s": 0.15},
                                                  wandb={"project": "kvpolicy-test"}))
    db = out / "study.db"
    # its own W&B service, as a worker on a cluster has (an in-process test before may have left this process's
    # service in WANDB_SERVICE, which a child would join instead of starting and tearing down its own)
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1", "KVPOLICY_STOP_TIMEOUT_S": "3"}
    cmd = [sys.executable, "-m", "kvpolicy.sweep", str(f), "--quiet"]
    if case != "sigkill":
        (tmp_path / "stalled_wandb.py").write_text(STALLED_WANDB)
        cmd = [sys.executable, str(tmp_path / "stalled_wandb.py"), str(tmp_path), str(f), "--quiet"]
    sig = signal.SIGKILL if case == "sigkill" else signal.SIGTERM
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if case == "sigterm-inside-wandb-finish":  # trial 2 is complete in the study, its W&B run is finishing
            _wait_for(lambda: (tmp_path / "finishing-t-trial-0002").exists(), 120, "trial 2's W&B finish", proc)
            killed = None
        else:
            _wait_for(lambda: _running_trial(db, "t") is not None, 120, "two trials finished and a third running",
                      proc)
            killed = _running_trial(db, "t")
        proc.send_signal(sig)
        t_signal = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    before = db_trials(db, "t")
    finished_before = [t for t in before if t["state"] == "COMPLETE"]
    if case == "sigkill":
        assert rc == -signal.SIGKILL
        assert next(t["state"] for t in before if t["number"] == killed) == "RUNNING"  # nobody could record anything
    else:
        assert rc == 130, (rc, stderr)  # graceful: the trial is failed and re-queued by the worker itself
        assert stop_s < STOP_BOUND_S, f"the worker took {stop_s:.1f} s to exit after SIGTERM"
        assert "exiting now" in stderr, stderr  # the hung W&B was cut short by the worker's deadline
        # ... and no storage transaction was left open by the interrupt (one used to hold the stop's own writes for
        # SQLite's busy timeout, 120 s)
        assert "storage write" not in stderr, stderr
        if killed is not None:
            assert next(t["state"] for t in before if t["number"] == killed) == "FAIL"
        else:  # the signal hit W&B after trial 2 was recorded: nothing was failed
            assert [t["state"] for t in before] == ["COMPLETE"] * 3

    r = run_cli([str(f), "--quiet"])
    assert r.returncode == 0, r.stderr
    after = db_trials(db, "t")
    complete = [t for t in after if t["state"] == "COMPLETE"]
    assert len(complete) == n
    # every trial finished before the kill is still there, once, unchanged
    for t in finished_before:
        assert [x for x in after if x["number"] == t["number"]] == [t]
    if killed is not None:
        # the killed trial failed and its retry ran with the same parameters
        killed_row = next(t for t in after if t["number"] == killed)
        assert killed_row["state"] == "FAIL"
        retries = [t for t in after if t["system"].get("failed_trial") == killed]
        assert len(retries) == 1 and retries[0]["state"] == "COMPLETE"
        # (a kill can land between two suggestions: the retry keeps every parameter the killed trial had drawn)
        assert killed_row["params"] and killed_row["params"].items() <= retries[0]["params"].items()
    else:
        assert [t["state"] for t in after] == ["COMPLETE"] * n
    # the results files hold each trial once, from the storage
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == len({r["number"] for r in rows}) == len(after)
    assert sum(r["state"] == "COMPLETE" for r in rows) == n
    log = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    done_numbers = [x["number"] for x in log if x["state"] == "COMPLETE"]
    assert sorted(done_numbers) == sorted(t["number"] for t in complete)  # each finished trial logged exactly once
    # every finished trial reached W&B once (a trial finished just before a kill is caught up on resume)
    logged = json.loads((out / "wandb" / "logged.json").read_text())
    assert {f"t/{t['number']}" for t in complete} <= set(logged)


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_bad_stop_timeout_is_refused_before_anything_is_written(tmp_path, value):
    f = write_yaml(tmp_path / "s.yaml", sweep_doc(output=str(tmp_path / "out"), n_trials=1))
    r = run_cli([str(f), "--quiet"], env_extra={"KVPOLICY_STOP_TIMEOUT_S": value})
    assert r.returncode == 2
    assert "KVPOLICY_STOP_TIMEOUT_S" in r.stderr and repr(value) in r.stderr and "> 0" in r.stderr
    assert not (tmp_path / "out").exists()


def test_wandb_failure_never_loses_a_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    spec, outcome = _run({"n_trials": 3, "wandb": True}, tmp_path)
    assert outcome.finished == 3 and outcome.ok
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3


def test_failing_trials_are_recorded_and_stop_the_sweep(tmp_path):
    spec, outcome = _run({"n_trials": 4, "task": {"fail_ratio_above": 0.0}}, tmp_path)
    assert outcome.stopped == "failures" and not outcome.ok
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert rows and all(r["state"] == "FAIL" and "synthetic failure" in r["error"] for r in rows)


def test_pruning_single_objective(tmp_path):
    doc = {"objectives": ["ppl"], "samples": 6, "n_trials": 10, "sampler": {"name": "random", "seed": 1},
           "pruning": {"pruner": "median", "n_startup_trials": 2, "n_warmup_steps": 0}}
    spec, outcome = _run(doc, tmp_path)
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    states = [r["state"] for r in rows]
    assert outcome.finished == 10 and "PRUNED" in states, states
    assert (tmp_path / "out" / "best_policy.yaml").exists()


def test_grid_runs_every_point_once(tmp_path):
    doc = {"sampler": "grid", "n_trials": None, "space": {
        "ratio": {"type": "float", "low": 0.5, "high": 0.9, "step": 0.2},
        "encode.name": ["frequency", "tova"]}, "policy": {"preset": "elastic"}}
    spec, outcome = _run(doc, tmp_path)
    assert spec.target_trials() == 6 and outcome.finished == 6
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    points = {(round(r["params.ratio"], 6), r["params.encode.name"]) for r in rows}
    assert len(points) == 6


def test_tied_parameters_and_reused_results(tmp_path):
    doc = {"policy": {"preset": "h2o"}, "objectives": ["ppl"], "n_trials": 6,
           "sampler": {"name": "random", "seed": 3},
           "space": {"encode.recent,decode.recent": {"type": "int", "low": 0, "high": 1},
                     "ratio": [0.5, 0.75]}}
    spec, outcome = _run(doc, tmp_path)
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    for r in rows:  # both paths got the one value
        t = json.loads((tmp_path / "out" / "trials" / f"trial-{r['number']:04d}.json").read_text())
        assert t["policy"]["encode"]["recent"] == t["policy"]["decode"]["recent"] == r["params.encode.recent,decode.recent"]
    # only 4 distinct points: repeats reuse the first result instead of evaluating again
    assert outcome.reused_here == 6 - len({(r["params.ratio"], r["params.encode.recent,decode.recent"]) for r in rows})
    assert any(r["reused_from"] is not None for r in rows) == (outcome.reused_here > 0)


def test_report_from_folder_and_by_name(tmp_path, capsys):
    from kvpolicy.sweep import report_study

    spec, outcome = _run({"n_trials": 4}, tmp_path)
    out = tmp_path / "out"
    (out / "trials.csv").unlink()
    report_study([str(out)])
    assert (out / "trials.csv").exists()
    text = capsys.readouterr().out
    assert "Pareto front" in text and "study t" in text
    report_study(["t"], storage=f"sqlite:///{out / 'study.db'}", output=tmp_path / "again")
    assert (tmp_path / "again" / "best_policy.yaml").exists()


# ================================================================================================ two workers (RDB)
def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return cands[-1].parent if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 with a temporary data directory (initdb + pg_ctl, as the
    ``postgres`` user when the tests run as root). Skips only when no server can be started."""
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is needed for PostgreSQL")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="kvpolicy-pg-"))
    os.chmod(base, 0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        runuser = shutil.which("runuser") or shutil.which("su")
        as_user = ["runuser", "-u", "postgres", "--"] if runuser and runuser.endswith("runuser") else []
        if not as_user:
            pytest.skip("running as root without runuser to start PostgreSQL as 'postgres'")
    data, log, port = base / "data", base / "server.log", _free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kv", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=50",
                        "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logtext = log.read_text() if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not be started: {exc} {detail.decode(errors='replace')[-300:]} {logtext[-300:]}")
    try:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="kv", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE kvsweep")
        con.close()
        yield f"postgresql+psycopg2://kv@127.0.0.1:{port}/kvsweep"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_storage(request, tmp_path):
    """One study database for two workers: SQLite (one machine) or a real PostgreSQL server (several machines)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def test_two_workers_share_one_study(tmp_path, shared_storage):
    """Two worker processes join one study by name through one database (SQLite here, PostgreSQL as across machines)
    and finish N trials between them, with no trial evaluated twice."""
    import optuna

    n = 8
    f = write_yaml(tmp_path / "s.yaml", sweep_doc(name="pg", n_trials=n, task={"sleep_s": 0.2},
                                                  sampler={"name": "random", "seed": 0}))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "kvpolicy.sweep", str(f), "--quiet", "--no-wandb",
                               "--storage", shared_storage, "--output", str(tmp_path / f"worker{i}")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="pg", storage=shared_storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    # any extra trial is a surplus claim from a race at the very end, closed without evaluation
    for t in trials:
        if t.state.name == "FAIL":
            assert t.user_attrs["kvpolicy.error"].startswith("surplus")
    # both workers evaluated trials, each trial by one worker, and each appears once in the workers' logs
    workers = {t.user_attrs["kvpolicy.worker"]["pid"] for t in complete}
    assert len(workers) == 2
    logged = []
    for i in range(2):
        log = tmp_path / f"worker{i}" / "trials.jsonl"
        if log.exists():
            logged += [json.loads(x)["number"] for x in log.read_text().splitlines()
                       if json.loads(x)["state"] == "COMPLETE"]
    assert sorted(logged) == sorted(t.number for t in complete)


# ============================================================================================ the real harness, tiny
def test_sweep_on_a_tiny_model_through_the_evaluation_harness(tmp_path):
    pytest.importorskip("kvpolicy.eval.runner", reason="the evaluation harness is not installed")
    from kvpolicy.sweep import run_sweep

    model_dir = tiny_checkpoint(tmp_path / "tiny")
    spec = load_sweep(sweep_doc(
        evaluator="harness", model=str(model_dir), samples=4, batch_size=2, n_trials=3,
        task={"name": "continuation", "context_tokens": 48, "target_tokens": 6, "dtype": "float32",
              "reference_dir": str(tmp_path / "refs")},
        space={"ratio": {"type": "float", "low": 0.3, "high": 0.8}, "decode.offset": {"type": "int", "low": -8,
                                                                                      "high": -1}},
        objectives=["ppl", "cache_fraction"], output=str(tmp_path / "out")))
    outcome = run_sweep(spec, quiet=True)
    assert outcome.finished == 3 and outcome.ok
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    for r in rows:
        assert r["state"] == "COMPLETE" and r["ppl"] > 1 and 0 < r["cache_fraction"] < 1
        assert r["cache_bytes"] > 0 and r["kl"] >= 0 and 0 <= r["top1"] <= 1
        doc = json.loads((tmp_path / "out" / "trials" / f"trial-{r['number']:04d}.eval.json").read_text())
        assert doc["spec"]["samples"] == 4 and doc["policy"]["ratio"] == pytest.approx(r["params.ratio"])
    first = json.loads((tmp_path / "out" / "trials" / "trial-0000.json").read_text())
    assert first["details"]["honesty"]["passed"] is True  # the ratio-0 check ran on the first evaluation
    assert first["details"]["dtype"] == "float32"  # the dtype the trial computed in is recorded with it
    assert [h["done"] for h in first["history"]] == [2, 4]  # one report per batch (what pruning looks at)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_only_trials_of_dead_workers_are_reaped(tmp_path):
    """A RUNNING trial is failed and re-queued only when its worker is known dead: a dead process of this machine.
    A live process here, or a worker on another machine (decided by its heartbeat), is left alone."""
    from kvpolicy.sweep import ATTR_PREFIX, open_storage, open_study, reap_dead_trials, worker_identity

    spec = load_sweep(sweep_doc(output=str(tmp_path / "out")))
    storage = open_storage(spec.storage_url(), heartbeat_s=60)
    study = open_study(spec, storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = worker_identity()
    workers = {
        "alive": me,
        "dead": {**me, "pid": dead.pid, "start": None},
        "reused pid": {**me, "start": (me["start"] or 0) + 12345},  # same pid, another process start time
        "elsewhere": {**me, "host": "some-other-machine", "pid": 1},
    }
    trials = {}
    for label, worker in workers.items():
        t = study.ask()
        t.suggest_float("ratio", 0.5, 0.95)
        storage.set_trial_user_attr(t._trial_id, ATTR_PREFIX + "worker", worker)
        storage.record_heartbeat(t._trial_id)
        trials[label] = t.number
    reaped = reap_dead_trials(study, storage)
    assert sorted(reaped) == sorted([trials["dead"], trials["reused pid"]])
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[trials["alive"]] == states[trials["elsewhere"]] == "RUNNING"
    waiting = [t for t in study.get_trials() if t.state.name == "WAITING"]
    assert sorted(storage.get_trial(t._trial_id).system_attrs["failed_trial"] for t in waiting) == sorted(reaped)
    assert reap_dead_trials(study, storage) == []  # nothing twice


# ============================================================================ fingerprint: the dtype a study runs in
@pytest.mark.parametrize("dtype, resumable", [("auto", False), ("float32", True)])
def test_a_study_is_not_resumed_in_another_dtype(tmp_path, monkeypatch, dtype, resumable):
    """``dtype: auto`` resolves per machine (kvpolicy.hardware): a study started where it meant bfloat16 is refused on
    a CPU where it means float32 (its trials would mix dtypes); an explicit dtype is the same everywhere."""
    import kvpolicy.hardware as hardware
    from kvpolicy.sweep import ATTR_PREFIX, StudyMismatchError, open_storage, open_study

    spec = load_sweep(sweep_doc(evaluator="harness", model="smollm2-135m", output=str(tmp_path / "out"),
                                task={"name": "continuation", "dtype": dtype}), deep=False)
    storage = open_storage(spec.storage_url())
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)  # a CPU with AMX / AVX-512 BF16
    study = open_study(spec, storage)
    assert study.user_attrs[ATTR_PREFIX + "fingerprint"]["dtype"] == ("bfloat16" if dtype == "auto" else dtype)
    open_study(spec, storage)  # the same machine resumes it
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)  # a CPU without: auto means float32 there
    if resumable:
        open_study(spec, storage)
    else:
        with pytest.raises(StudyMismatchError, match=r"with a different dtype;"):
            open_study(spec, storage)


# ======================================================================== a plugin part returning a malformed result
class _FlatScores:
    """An encode scorer that forgets the head axis: [B, P] instead of [B, H or 1, P]."""

    needs = frozenset()

    def __init__(self, params):
        pass

    def score(self, view):
        return view.positions[:, 0].float()


def test_a_trial_whose_plugin_part_misbehaves_fails_with_the_part_error(tmp_path):
    """The trial is recorded as FAIL with PartError's one-line message (the part and its package) as its reason, and
    the sweep stops after the repeated failures instead of crashing."""
    pytest.importorskip("kvpolicy.eval.runner", reason="the evaluation harness is not installed")
    import types

    from pydantic import BaseModel

    from kvpolicy.hookspecs import PartSpec, hookimpl
    from kvpolicy.registry import Registry, reset_registry
    from kvpolicy.sweep import run_sweep

    class NoParams(BaseModel):
        pass

    @hookimpl
    def kvpolicy_parts():
        return [PartSpec("flat_scores", "encode", NoParams, _FlatScores, "scores with the head axis forgotten")]

    registry = Registry()  # the installed plugins, plus one from package kvpolicy-myplugin
    plugin = types.ModuleType("myplugin")
    plugin.kvpolicy_parts = kvpolicy_parts
    assert registry.register_module(plugin, source="kvpolicy-myplugin") == []
    reset_registry(registry)
    try:
        spec = load_sweep(sweep_doc(
            evaluator="harness", model=str(tiny_checkpoint(tmp_path / "tiny")), samples=2, batch_size=2, n_trials=2,
            policy={"encode": "flat_scores", "reducer": "evict"}, objectives=["ppl"],
            space={"ratio": {"type": "float", "low": 0.3, "high": 0.8}},
            task={"name": "continuation", "context_tokens": 32, "target_tokens": 4, "dtype": "float32",
                  "reference_dir": str(tmp_path / "refs")}, output=str(tmp_path / "out")))
        outcome = run_sweep(spec, quiet=True)
    finally:
        reset_registry()
    assert outcome.stopped == "failures" and outcome.finished == 0
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert rows and all(r["state"] == "FAIL" for r in rows)
    prefix = "PartError: encode scorer 'flat_scores' from package kvpolicy-myplugin returned shape (2, "
    for r in rows:
        assert r["error"].startswith(prefix) and "\n" not in r["error"], r["error"]
        assert r["error"].endswith("); expected scores [B, H or 1, P] = [2, 2, 32] (layer 0, prefill)"), r["error"]
