"""Conditional search spaces (``when:``), the too-few-trials warning on parameter importances, and the Pareto /
quality-vs-budget figures (checked artist by artist, not by pixels).

Runs use the ``synthetic`` evaluator (no model): its metrics are a deterministic function of the resolved policy, so
each trial's recorded value is checked against the evaluator run directly on a policy document written by hand.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import optuna
import pytest
import yaml

from kvpolicy.config import load_policy, resolve_policy
from kvpolicy.sweep import StudyMismatchError, SweepConfigError, SyntheticEvaluator, load_sweep, run_sweep
from kvpolicy.sweep.conditions import branches
from kvpolicy.sweep.importance import MIN_TOP_TRIALS, MIN_TRIALS, IMPORTANCE_QUANTILE, importance_warning
from kvpolicy.sweep.pareto_plot import LABEL_ALL_UP_TO, plot_pareto_front
from kvpolicy.sweep.plots import plot_importance, plot_quality_vs_budget

REPO = Path(__file__).resolve().parents[1]
TASK = {"sleep_s": 0.0, "part_costs": {"reducer.evict": 1.5, "reducer.anchor_merge": 1.02, "reducer.cam": 1.05}}
SPACE = {
    "ratio": {"type": "float", "low": 0.5, "high": 0.95},
    "reducer.name": ["evict", "anchor_merge", "cam"],
    "reducer.assign": {"choices": ["position", "cosine"], "when": {"reducer.name": "anchor_merge"}},
    "reducer.probability": {"choices": ["attention", "always"], "when": {"reducer.name": ["cam"]}},
}
#: which parameters each reducer's trials must have (and no others)
OWN = {"evict": set(), "anchor_merge": {"reducer.assign"}, "cam": {"reducer.probability"}}


def doc(tmp_path: Path | None = None, **changes) -> dict:
    d = {"name": "cond", "evaluator": "synthetic", "task": copy.deepcopy(TASK), "samples": 4,
         "policy": {"preset": "elastic"}, "space": copy.deepcopy(SPACE), "objectives": ["ppl", "cache_bytes"],
         "sampler": {"name": "random", "seed": 1}, "n_trials": 12, "wandb": False}
    if tmp_path is not None:
        d["output"] = str(tmp_path / "out")
    d.update(changes)
    return d


def one_issue(d: dict, path: str, *words: str) -> str:
    with pytest.raises(SweepConfigError) as info:
        load_sweep(d)
    assert len(info.value.issues) == 1, str(info.value)
    issue = info.value.issues[0]
    assert issue.path == path, str(info.value)
    for w in words:
        assert w in issue.message, issue.message
    return issue.message


# ======================================================================================================= validation
def test_a_conditional_space_validates():
    spec = load_sweep(doc())
    assert spec.conditional
    assert spec.space["reducer.assign"].when == {"reducer.name": ["anchor_merge"]}  # a single choice becomes a list


def test_a_parameter_that_exists_on_one_choice_only_names_the_branch_and_the_when_clause():
    d = doc()
    d["space"]["reducer.weighting"] = ["mean", "score"]  # an anchor_merge parameter, searched for every reducer
    msg = one_issue(d, "space.reducer.weighting", "when reducer.name=evict", "unknown parameter of reducer 'evict'")
    assert "add when: {reducer.name: [anchor_merge]}" in msg


def test_a_value_invalid_in_its_own_branch_names_the_branch_and_allowed_values():
    d = doc()
    d["space"]["reducer.probability"]["choices"] = ["attention", "uniform"]
    one_issue(d, "space.reducer.probability", "with value 'uniform'", "when reducer.name=cam", "'attention'",
              "'always'")


def test_an_unknown_choice_is_one_issue_on_its_parameter():
    d = doc()
    d["space"]["reducer.name"] = ["evict", "anchor_merge", "cam", "nope"]  # a switch
    one_issue(d, "space.reducer.name", "with value 'nope'", "unknown reducer 'nope'", "anchor_merge")
    d = doc()
    d["space"]["encode.name"] = ["frequency", "nope"]  # no condition names it: invalid in every branch, said once
    msg = one_issue(d, "space.encode.name", "with value 'nope'", "unknown encode scorer 'nope'", "frequency")
    assert " when " not in msg and "branch" not in msg


@pytest.mark.parametrize("when, path, words", [
    ({"reducer.nam": "cam"}, "space.reducer.probability.when", ("not a parameter", "did you mean 'reducer.name'")),
    ({"ratio": 0.5}, "space.reducer.probability.when", ("'ratio' is a float range", "reducer.name")),
    ({"reducer.name": "tova"}, "space.reducer.probability.when.reducer.name", ("'tova'", "evict, anchor_merge, cam")),
    ({"reducer.probability": "always"}, "space.reducer.probability.when", ("condition of itself",)),
])
def test_bad_conditions_name_the_field_and_what_is_allowed(when, path, words):
    d = doc()
    d["space"]["reducer.probability"]["when"] = when
    one_issue(d, path, *words)


def test_a_cycle_of_conditions_is_refused():
    d = doc()
    d["space"]["reducer.name"] = {"choices": ["evict", "anchor_merge", "cam"], "when": {"reducer.assign": "cosine"}}
    one_issue(d, "space", "cycle", "reducer.name", "reducer.assign")


def test_the_grid_sampler_refuses_a_conditional_space():
    d = doc(sampler="grid")
    d["space"]["ratio"]["step"] = 0.15
    one_issue(d, "space.reducer.assign.when", "grid sampler")


def test_nested_branches_match_a_hand_enumeration():
    d = doc()
    d["space"]["reducer.weighting"] = {"choices": ["mean", "score"], "when": {"reducer.assign": "cosine"}}
    spec = load_sweep(d)
    got = branches(spec.space)
    expected = [{"reducer.name": "evict"}, {"reducer.name": "cam"},
                {"reducer.name": "anchor_merge", "reducer.assign": "position"},
                {"reducer.name": "anchor_merge", "reducer.assign": "cosine"}]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, expected))


# ========================================================================================================= running
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    spec = load_sweep(doc(tmp))
    outcome = run_sweep(spec, quiet=True, poll_s=0.2)
    out = tmp / "out"
    return spec, outcome, out, json.loads((out / "trials.json").read_text())


def reference_ppl(row: dict) -> float:
    """The synthetic evaluator on a policy document written by hand from the trial's parameters."""
    name = row["params.reducer.name"]
    reducer = {"name": name}
    for p in OWN[name]:
        reducer[p.split(".", 1)[1]] = row[f"params.{p}"]
    policy = {"preset": "elastic", "ratio": row["params.ratio"], "reducer": reducer}
    return SyntheticEvaluator(task=TASK, samples=4).evaluate(policy).metrics["ppl"]


def test_each_trial_has_exactly_its_branch_parameters_and_records_the_branch(finished):
    spec, outcome, out, rows = finished
    assert outcome.stopped == "complete" and outcome.finished == 12
    taken = {r["params.reducer.name"] for r in rows}
    assert taken == set(OWN)  # every branch was visited
    for r in rows:
        name = r["params.reducer.name"]
        conditional = {k[len("params."):] for k in r if k.startswith("params.")} - {"ratio", "reducer.name"}
        assert conditional == OWN[name], r
        assert r["branch"] == f"reducer.name={name}"
        policy = json.loads((out / "trials" / f"trial-{r['number']:04d}.json").read_text())["policy"]
        assert policy["reducer"]["name"] == name
        for p in OWN[name]:
            assert policy["reducer"][p.split(".", 1)[1]] == r[f"params.{p}"]
        assert r["ppl"] == pytest.approx(reference_ppl(r), rel=1e-9)
    csv_head = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert "branch" in csv_head


def test_best_policy_is_the_chosen_trial_of_its_branch(finished):
    spec, outcome, out, rows = finished
    summary = json.loads((out / "summary.json").read_text())
    chosen = next(r for r in rows if r["number"] == summary["chosen_trial"])
    text = (out / "best_policy.yaml").read_text()
    assert f"# branch: {chosen['branch']}" in text
    policy = load_policy(out / "best_policy.yaml")
    best = yaml.safe_load(text)
    assert resolve_policy(best).budget.ratio == pytest.approx(chosen["params.ratio"])
    assert best["reducer"]["name"] == chosen["params.reducer.name"]
    for p in OWN[chosen["params.reducer.name"]]:
        assert best["reducer"][p.split(".", 1)[1]] == chosen[f"params.{p}"]
    assert policy is not None


def test_a_conditional_study_resumes_and_refuses_another_space(tmp_path):
    d = doc(tmp_path, n_trials=3, sampler={"name": "tpe", "seed": 0, "n_startup_trials": 2})
    first = run_sweep(load_sweep(d), quiet=True, poll_s=0.2)
    assert first.finished == 3
    before = json.loads((tmp_path / "out" / "trials.json").read_text())
    second = run_sweep(load_sweep({**d, "n_trials": 6}), quiet=True, poll_s=0.2)  # TPE models the branches now
    after = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert second.finished == 6 and second.ran_here + second.reused_here == 3
    keep = ("number", "ppl", "branch", "params.ratio", "params.reducer.name")
    assert [{k: r.get(k) for k in keep} for r in after[:3]] == [{k: r.get(k) for k in keep} for r in before]
    other = copy.deepcopy(d)
    other["space"]["reducer.assign"]["choices"] = ["cosine"]  # another branch space: its trials are not comparable
    with pytest.raises(StudyMismatchError, match="space"):
        run_sweep(load_sweep(other), quiet=True)


def test_the_shipped_conditional_example_validates():
    spec = load_sweep(REPO / "sweeps" / "merge_search.yaml", deep=False)
    assert spec.conditional and spec.task.get("split") == "dev"
    assert len(branches(spec.space)) > 1


# ====================================================================================================== importance
def study_of(n: int, conditional_every: int = 0) -> optuna.Study:
    """A finished single-objective study: ``x`` in every trial, ``y`` in every ``conditional_every``-th one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for i in range(n):
        params = {"x": (i * 7919 % 101) / 100}
        dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
        if conditional_every and i % conditional_every == 0:
            params["y"], dists["y"] = "a" if i % 2 else "b", optuna.distributions.CategoricalDistribution(["a", "b"])
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=params["x"] ** 2))
    return study


def test_the_threshold_is_five_trials_in_the_top_quantile():
    assert math.ceil(IMPORTANCE_QUANTILE * MIN_TRIALS) >= MIN_TOP_TRIALS
    assert math.ceil(IMPORTANCE_QUANTILE * (MIN_TRIALS - 1)) < MIN_TOP_TRIALS


def test_importance_warning_names_the_parameters_short_of_trials():
    few = importance_warning(study_of(3))
    assert few is not None and "x (3)" in few and str(MIN_TRIALS) in few
    assert importance_warning(study_of(MIN_TRIALS - 1)) is not None
    assert importance_warning(study_of(MIN_TRIALS)) is None
    # a conditional parameter counts only the trials of its branch
    short = importance_warning(study_of(MIN_TRIALS + 4, conditional_every=3))
    assert short is not None and "y (15)" in short and "x (" not in short


@pytest.mark.parametrize("n, warned", [(4, True), (MIN_TRIALS, False)])
def test_the_importance_plot_carries_the_warning(n, warned):
    import matplotlib.pyplot as plt

    spec = load_sweep(doc(objectives=["ppl"]))
    ax = plot_importance(study_of(n), spec, 0)
    texts = [t.get_text() for t in ax.figure.texts] + [ax.get_title(loc="left")]
    try:
        assert any("too few trials" in t.lower() for t in texts) == warned, texts
    finally:
        plt.close(ax.figure)


def test_summary_and_report_carry_the_warning(finished, capsys):
    from kvpolicy.sweep import report_study

    spec, outcome, out, rows = finished
    summary = json.loads((out / "summary.json").read_text())
    assert "reducer.assign (" in summary["importance_warning"]
    report_study([str(out)], plots=False)
    assert "warning: too few trials for parameter importances" in capsys.readouterr().out


# ========================================================================================================== figures
def dominated(p: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """Naive: some other point is no worse in both (both minimised) and better in one."""
    return any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in others)


def test_pareto_plot_labels_every_trial_and_marks_the_chosen_one(finished):
    import matplotlib.pyplot as plt

    spec, outcome, out, rows = finished
    chosen = json.loads((out / "summary.json").read_text())["chosen_trial"]
    fig = plot_pareto_front(rows, spec.metrics, spec.directions, chosen)
    try:
        ax = fig.axes[0]
        assert sorted(t.get_text() for t in ax.texts) == sorted(str(r["number"]) for r in rows)
        for t in ax.texts:  # each label sits on its trial
            r = rows[int(t.get_text())]
            assert tuple(t.xy) == pytest.approx((r["ppl"], r["cache_bytes"]))
        star = [c for c in ax.collections if c.get_label() == f"chosen: trial {chosen} (best_policy.yaml)"]
        assert len(star) == 1
        r = rows[chosen]
        assert tuple(star[0].get_offsets()[0]) == pytest.approx((r["ppl"], r["cache_bytes"]))
        front = next(line for line in ax.lines if line.get_label() == "Pareto front")
        pts = [(r["ppl"], r["cache_bytes"]) for r in rows]
        expected = sorted(p for p in pts if not dominated(p, pts))
        got = sorted(zip(front.get_xdata(), front.get_ydata()))
        assert [c for p in got for c in p] == pytest.approx([c for p in expected for c in p])
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {f"reducer.name={n}" for n in OWN} <= legend
    finally:
        plt.close(fig)


def test_pareto_plot_labels_only_the_front_when_crowded(finished):
    import matplotlib.pyplot as plt

    spec, outcome, out, rows = finished
    many = [dict(r, number=r["number"] + 100 * k) for k in range(LABEL_ALL_UP_TO // len(rows) + 1) for r in rows]
    fig = plot_pareto_front(many, spec.metrics, spec.directions, chosen=many[-1]["number"])
    try:
        shown = {int(t.get_text()) for t in fig.axes[0].texts}
        assert shown == {r["number"] for r in many if r["pareto"]} | {many[-1]["number"]}
    finally:
        plt.close(fig)


def test_quality_vs_budget_draws_one_line_per_branch_through_its_own_front(finished):
    import matplotlib.pyplot as plt

    spec, outcome, out, rows = finished
    fig = plot_quality_vs_budget({spec.name: rows}, spec.metrics)
    try:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sorted(legend) == sorted(f"reducer.name={n}" for n in OWN)  # no single "elastic"/"custom" group
        by_branch = {b: [(r["cache_fraction"], r["ppl"]) for r in rows if r["branch"] == b] for b in legend}
        lines = [line for line in ax.lines if len(line.get_xdata()) > 1]
        assert lines
        for line in lines:
            pts = list(zip(line.get_xdata(), line.get_ydata()))
            owner = [b for b, bp in by_branch.items() if all(p in bp for p in pts)]
            assert len(owner) == 1, pts  # a line never joins two branches
            own = by_branch[owner[0]]
            assert sorted(pts) == sorted(p for p in own if not dominated(p, own))
        drawn = {b for b, bp in by_branch.items() if sum(not dominated(p, bp) for p in bp) > 1}
        assert len(lines) == len(drawn)
    finally:
        plt.close(fig)
