"""``kvpolicy ablate``: what each part of a policy is worth — single-part swaps against a base, on the same samples.

An ablation file (``sweeps/ablations.yaml``) names a base policy, budgets, and variants; each variant lays a few dotted
fields over the base (``reducer: evict``, ``encode: {name: h2o, recent: 0}``, ``reference_quirks.compressed_positions:
true``). Every policy is evaluated at every budget on the **same** samples, so the difference to the base is paired:
the table reports, per budget, variant and metric, the base value, the variant's value, the delta and a **paired
bootstrap** confidence interval (the samples are resampled with the same indices for the base and the variant; corpus
perplexity is recomputed from the resampled NLL sums, not averaged per sample).

Outputs in the results folder (``results/ablations/<name>`` by default): ``ablation.md`` and ``ablation.csv`` (the
delta table), ``ablation.json`` (everything, with per-sample values), ``ablation.png`` (deltas with their intervals),
and ``runs/`` (one cached evaluation per policy and budget: re-running the command skips what is done).

Entry points: :func:`run_ablation` (library), ``kvpolicy ablate FILE`` (:mod:`kvpolicy.cli.study`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from ..config import policy_to_dict, read_policy_document, resolve_policy
from ..eval.aggregate import paired_bootstrap
from ..io import atomic_savefig, atomic_write_text, json_default
from ..provenance import versions
from .evaluation import Evaluation
from .evaluators import make_evaluator
from .progress import make_progress
from .spec import METRICS, PREFILL_SETTINGS, AblationSpec
from .tracking import make_tracker

__all__ = ["AblationResult", "print_table", "run_ablation"]


def _budget_label(budget: Mapping[str, Any]) -> str:
    if not budget:
        return "base budget"
    return ", ".join(f"{k} {v}" for k, v in budget.items())


@dataclass
class AblationResult:
    rows: list[dict[str, Any]]
    output: Path
    markdown: str
    files: list[Path]


def _run_key(spec: AblationSpec, policy: Mapping[str, Any]) -> str:
    """The cached run's name: what decides its numbers (the prefill-sharing settings do not: a run computed with or
    without a shared prefill is the same run, see kvpolicy.eval.compare)."""
    task = {k: v for k, v in spec.task.items() if k not in PREFILL_SETTINGS}
    doc = {"model": spec.model, "evaluator": spec.evaluator, "task": task, "samples": spec.samples,
           "policy": policy}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _to_json(ev: Evaluation) -> dict[str, Any]:
    return json.loads(json.dumps({"metrics": ev.metrics, "per_sample": ev.per_sample, "details": ev.details},
                                 default=json_default))


def _from_json(d: Mapping[str, Any]) -> Evaluation:
    return Evaluation(metrics=dict(d["metrics"]), per_sample={k: list(v) for k, v in d["per_sample"].items()},
                      details=dict(d.get("details") or {}))


def run_ablation(spec: AblationSpec, *, quiet: bool = False, console: Any = None, evaluator: Any = None,
                 plots: bool = True) -> AblationResult:
    """Evaluate the base and every variant at every budget, then write and return the delta table."""
    from rich.console import Console

    console = console or Console(stderr=True, quiet=quiet)
    out = spec.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(spec)
    t0 = time.perf_counter()
    results = _evaluate_plan(spec, plan, out, evaluator, make_progress(console, quiet))
    rows = _delta_rows(spec, results)
    md, files = _write_files(spec, rows, plan, results, out, time.perf_counter() - t0, plots)
    tracker = make_tracker(spec.wandb, out, group=spec.name, quiet=quiet, console=console)
    tracker.log_table(f"{spec.name}-ablation", rows, {"ablation": json.loads(spec.model_dump_json())},
                      [f for f in files if f.suffix == ".png"])
    tracker.close()
    return AblationResult(rows=rows, output=out, markdown=md, files=files)


def _plan(spec: AblationSpec) -> list[tuple[int, str, dict[str, Any]]]:
    """(budget index, variant name or "base", resolved policy document) for every policy at every budget."""
    base_doc, _ = read_policy_document(spec.base)
    plan: list[tuple[int, str, dict[str, Any]]] = []
    for bi, budget in enumerate(spec.budgets):
        plan.append((bi, "base", policy_to_dict(resolve_policy(base_doc, overrides=budget))))
        for v in spec.variants:
            plan.append((bi, v.name, policy_to_dict(resolve_policy(base_doc, overrides={**v.set, **budget}))))
    return plan


def _evaluate_plan(spec: AblationSpec, plan: list[tuple[int, str, dict[str, Any]]], out: Path, evaluator: Any,
                   progress: Any) -> dict[tuple[int, str], Evaluation]:
    """Every policy of the plan evaluated, or read from its cached run under ``runs/``; the evaluator is built and set
    up only when something is left to evaluate."""
    results: dict[tuple[int, str], Evaluation] = {}
    evaluator_ready = False
    with progress:
        runs_task = progress.add_task("policies", total=len(plan), info="")
        samples_task = progress.add_task("samples", total=spec.samples, visible=False, info="")
        for bi, name, policy in plan:
            cache = out / "runs" / f"{_run_key(spec, policy)}.json"
            label = f"{name} @ {_budget_label(spec.budgets[bi])}"
            if cache.exists():
                with contextlib.suppress(Exception):
                    results[(bi, name)] = _from_json(json.loads(cache.read_text())["evaluation"])
            if (bi, name) not in results:
                if not evaluator_ready:
                    if evaluator is None:
                        evaluator = make_evaluator(spec.evaluator, spec.model, spec.task, spec.samples,
                                                   spec.batch_size)
                    progress.update(samples_task, description="loading model and data", visible=True)
                    evaluator.setup()
                    evaluator_ready = True
                progress.update(samples_task, description=label, completed=0, total=spec.samples, visible=True)

                def on_batch(rep: Any) -> None:
                    progress.update(samples_task, completed=rep.done, total=rep.total)

                ev = evaluator.evaluate(policy, on_batch)
                missing = [m for m in spec.metrics if m not in ev.metrics]
                if missing:
                    raise RuntimeError(f"the evaluator did not report {', '.join(missing)} for {label}")
                results[(bi, name)] = ev
                atomic_write_text(cache, json.dumps({"label": label, "policy": policy, "evaluation": _to_json(ev),
                                                     "result": ev.document}, indent=1, default=str) + "\n")
            progress.update(runs_task, advance=1)
        progress.update(samples_task, visible=False)
    if evaluator is not None and evaluator_ready:
        with contextlib.suppress(Exception):
            evaluator.close()
    return results


def _delta_row(spec: AblationSpec, budget: Mapping[str, Any], variant: str, metric: str, base: Evaluation,
               var: Evaluation) -> dict[str, Any]:
    """One row of the table: the variant's metric against the base's at one budget, with its paired interval."""
    try:
        delta, lo, hi = paired_bootstrap(base, var, metric, spec.bootstrap.resamples, spec.bootstrap.confidence,
                                         spec.bootstrap.seed)
    except (KeyError, ValueError):
        delta = float(var.metrics[metric]) - float(base.metrics[metric])
        lo = hi = float("nan")
    b = float(base.metrics[metric])
    significant = bool(math.isfinite(lo) and (lo > 0 or hi < 0))
    direction = METRICS[metric].direction if metric in METRICS else "minimize"
    if not significant:
        effect = "n.s."
    else:
        effect = "worse" if (delta > 0) == (direction == "minimize") else "better"
    return {
        "budget": _budget_label(budget),
        "variant": variant,
        "metric": metric,
        "base": b,
        "value": float(var.metrics[metric]),
        "delta": delta,
        "ci_low": lo,
        "ci_high": hi,
        "delta_pct": 100.0 * delta / b if b else float("nan"),
        "effect": effect,
    }


def _delta_rows(spec: AblationSpec, results: Mapping[tuple[int, str], Evaluation]) -> list[dict[str, Any]]:
    return [_delta_row(spec, budget, v.name, m, results[(bi, "base")], results[(bi, v.name)])
            for bi, budget in enumerate(spec.budgets) for v in spec.variants for m in spec.metrics]


def _write_files(spec: AblationSpec, rows: list[dict[str, Any]], plan: list[tuple[int, str, dict[str, Any]]],
                 results: Mapping[tuple[int, str], Evaluation], out: Path, seconds: float, plots: bool
                 ) -> tuple[str, list[Path]]:
    """``ablation.md``, ``ablation.csv``, ``ablation.json`` and (with ``plots``) ``ablation.png``, atomically."""
    files: list[Path] = []
    md = _markdown(spec, rows)
    atomic_write_text(out / "ablation.md", md)
    files.append(out / "ablation.md")
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    files.append(out / "ablation.csv")
    doc = {
        "schema": "kvpolicy.ablation/1",
        "spec": json.loads(spec.model_dump_json()),
        "rows": rows,
        "runs": [{"budget": _budget_label(spec.budgets[bi]), "variant": name, "policy": policy,
                  **_to_json(results[(bi, name)])} for bi, name, policy in plan],
        "seconds": seconds,
        "written": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
    }
    atomic_write_text(out / "ablation.json", json.dumps(doc, indent=1, default=json_default) + "\n")
    files.append(out / "ablation.json")
    if plots and rows:
        png = _plot(spec, rows, out / "ablation.png")
        if png is not None:
            files.append(png)
    return md, files


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    a = abs(x)
    s = f"{x:+.4g}" if signed else f"{x:.4g}"
    if a >= 1e5:
        s = f"{x:+.3e}" if signed else f"{x:.3e}"
    return s


def _markdown(spec: AblationSpec, rows: Sequence[Mapping[str, Any]]) -> str:
    conf = int(round(spec.bootstrap.confidence * 100))
    lines = [f"# Ablation: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Model `{spec.model}`, evaluator `{spec.evaluator}`, task `{json.dumps(spec.task)}`, {spec.samples} "
              f"paired samples; delta = variant − base, {conf}% paired bootstrap interval "
              f"({spec.bootstrap.resamples} resamples). *effect* is judged by the metric's direction; n.s. = the "
              "interval contains 0.", ""]
    for budget in dict.fromkeys(r["budget"] for r in rows):
        lines += [f"## {budget}", "", f"| variant | metric | base | variant | delta | {conf}% CI | delta % | effect |",
                  "| --- | --- | ---: | ---: | ---: | :---: | ---: | --- |"]
        for r in rows:
            if r["budget"] != budget:
                continue
            lines.append(f"| {r['variant']} | {r['metric']} | {_fmt(r['base'])} | {_fmt(r['value'])} | "
                         f"{_fmt(r['delta'], True)} | [{_fmt(r['ci_low'], True)}, {_fmt(r['ci_high'], True)}] | "
                         f"{_fmt(r['delta_pct'], True)} | {r['effect']} |")
        lines.append("")
    return "\n".join(lines)


def _plot(spec: AblationSpec, rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    with plt.style.context("default"):
        return _draw(spec, rows, path, plt)


def _draw(spec: AblationSpec, rows: Sequence[Mapping[str, Any]], path: Path, plt: Any) -> Path | None:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 3.5, 0.5 + 0.4 * len(variants) *
                                                       len(budgets) + 1.2), squeeze=False, sharey=True)
    for col, (ax, m) in enumerate(zip(axes[0], metrics, strict=False)):
        ys, labels = [], []
        for bi, b in enumerate(budgets):
            for vi, v in enumerate(variants):
                r = next((x for x in rows if x["metric"] == m and x["budget"] == b and x["variant"] == v), None)
                if r is None:
                    continue
                y = -(bi * (len(variants) + 1) + vi)
                d, lo, hi = r["delta_pct"], r["ci_low"], r["ci_high"]
                base = r["base"]
                scale = 100.0 / base if base else 1.0
                err = [[max(0.0, (r["delta"] - lo) * scale)], [max(0.0, (hi - r["delta"]) * scale)]] \
                    if math.isfinite(lo) else None
                color = {"worse": "tab:red", "better": "tab:green"}.get(r["effect"], "tab:gray")
                ax.errorbar([d], [y], xerr=err, fmt="o", color=color, capsize=3)
                ys.append(y)
                labels.append(f"{v} ({b})" if len(budgets) > 1 else v)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(ys)
        if col == 0:
            ax.set_yticklabels(labels, fontsize=8)
        else:
            ax.tick_params(axis="y", left=False)
        direction = METRICS[m].direction if m in METRICS else ""
        ax.set_title(f"{m} ({'lower' if direction == 'minimize' else 'higher'} is better)", fontsize=10)
        ax.set_xlabel("change vs base, %")
        ax.grid(True, axis="x", alpha=0.3)
    conf = int(round(spec.bootstrap.confidence * 100))
    fig.suptitle(f"{spec.name}: single-part swaps vs the base ({conf}% paired bootstrap CI)")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def print_table(console: Any, spec: AblationSpec, rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.table import Table

    conf = int(round(spec.bootstrap.confidence * 100))
    for budget in dict.fromkeys(r["budget"] for r in rows):
        table = Table(title=f"{spec.name} — {budget}: variant − base ({conf}% paired bootstrap CI, "
                            f"{spec.samples} samples)")
        for col, just in (("variant", "left"), ("metric", "left"), ("base", "right"), ("variant value", "right"),
                          ("delta", "right"), (f"{conf}% CI", "center"), ("delta %", "right"), ("effect", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in rows:
            if r["budget"] != budget:
                continue
            style = {"worse": "red", "better": "green"}.get(r["effect"], "")
            table.add_row(r["variant"], r["metric"], _fmt(r["base"]), _fmt(r["value"]), _fmt(r["delta"], True),
                          f"[{_fmt(r['ci_low'], True)}, {_fmt(r['ci_high'], True)}]", _fmt(r["delta_pct"], True),
                          f"[{style}]{r['effect']}[/]" if style else r["effect"])
        console.print(table)
