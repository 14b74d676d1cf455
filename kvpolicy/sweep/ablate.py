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

Entry points: :func:`run_ablation` (library), :func:`ablate_cli` (``kvpolicy ablate FILE``).
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

import numpy as np

from .config import (
    PolicyConfigError,
    policy_to_dict,
    read_policy_document,
    resolve_policy,
)
from .sweep_config import METRICS, AblationSpec, SweepConfigError, load_ablation

__all__ = ["AblationResult", "ablate_cli", "paired_bootstrap", "run_ablation"]


def _budget_label(budget: Mapping[str, Any]) -> str:
    if not budget:
        return "base budget"
    return ", ".join(f"{k} {v}" for k, v in budget.items())


def paired_bootstrap(base: Any, variant: Any, metric: str, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(delta, low, high)``: the variant's metric minus the base's over all samples, and the percentile interval of
    that difference over ``resamples`` paired resamples of the samples (same indices for both)."""
    n_base = base.n_samples()
    n_var = variant.n_samples()
    if n_base != n_var:
        raise ValueError(f"paired bootstrap needs the same samples: base has {n_base}, variant {n_var}")
    delta = float(variant.aggregate(metric)) - float(base.aggregate(metric))
    if n_base < 2:
        return delta, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_base, size=(resamples, n_base))
    diffs = np.asarray(variant.aggregate(metric, idx)) - np.asarray(base.aggregate(metric, idx))
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return delta, float("nan"), float("nan")
    alpha = 1.0 - confidence
    return delta, float(np.quantile(diffs, alpha / 2)), float(np.quantile(diffs, 1 - alpha / 2))


@dataclass
class AblationResult:
    rows: list[dict[str, Any]]
    output: Path
    markdown: str
    files: list[Path]


def _run_key(spec: AblationSpec, policy: Mapping[str, Any]) -> str:
    doc = {"model": spec.model, "evaluator": spec.evaluator, "task": spec.task, "samples": spec.samples,
           "policy": policy}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _to_json(ev: Any) -> dict[str, Any]:
    from .sweep import _json_default

    return json.loads(json.dumps({"metrics": ev.metrics, "per_sample": ev.per_sample, "details": ev.details},
                                 default=_json_default))


def _from_json(d: Mapping[str, Any]) -> Any:
    from .sweep import Evaluation

    return Evaluation(metrics=dict(d["metrics"]), per_sample={k: list(v) for k, v in d["per_sample"].items()},
                      details=dict(d.get("details") or {}))


def run_ablation(spec: AblationSpec, *, quiet: bool = False, console: Any = None, evaluator: Any = None,
                 plots: bool = True) -> AblationResult:
    """Evaluate the base and every variant at every budget, then write and return the delta table."""
    from rich.console import Console

    from .sweep import _make_progress, atomic_write_text, make_evaluator
    from .tracking import make_tracker

    console = console or Console(stderr=True, quiet=quiet)
    out = spec.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    base_doc, _ = read_policy_document(spec.base)
    plan: list[tuple[int, str, dict[str, Any]]] = []  # (budget index, variant name or "base", policy document)
    for bi, budget in enumerate(spec.budgets):
        plan.append((bi, "base", policy_to_dict(resolve_policy(base_doc, overrides=budget))))
        for v in spec.variants:
            plan.append((bi, v.name, policy_to_dict(resolve_policy(base_doc, overrides={**v.set, **budget}))))

    results: dict[tuple[int, str], Any] = {}
    evaluator_ready = False
    progress = _make_progress(console, quiet)
    t0 = time.perf_counter()
    with progress:
        runs_task = progress.add_task("policies", total=len(plan), info="")
        samples_task = progress.add_task("samples", total=spec.samples, visible=False, info="")
        for bi, name, policy in plan:
            key = _run_key(spec, policy)
            cache = out / "runs" / f"{key}.json"
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

    rows: list[dict[str, Any]] = []
    for bi, budget in enumerate(spec.budgets):
        base = results[(bi, "base")]
        for v in spec.variants:
            var = results[(bi, v.name)]
            for m in spec.metrics:
                try:
                    delta, lo, hi = paired_bootstrap(base, var, m, spec.bootstrap.resamples,
                                                     spec.bootstrap.confidence, spec.bootstrap.seed)
                except (KeyError, ValueError):
                    delta = float(var.metrics[m]) - float(base.metrics[m])
                    lo = hi = float("nan")
                b = float(base.metrics[m])
                significant = bool(math.isfinite(lo) and (lo > 0 or hi < 0))
                direction = METRICS[m].direction if m in METRICS else "minimize"
                if not significant:
                    effect = "n.s."
                else:
                    effect = "worse" if (delta > 0) == (direction == "minimize") else "better"
                rows.append({
                    "budget": _budget_label(budget),
                    "variant": v.name,
                    "metric": m,
                    "base": b,
                    "value": float(var.metrics[m]),
                    "delta": delta,
                    "ci_low": lo,
                    "ci_high": hi,
                    "delta_pct": 100.0 * delta / b if b else float("nan"),
                    "effect": effect,
                })

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
    from .sweep import _json_default, _versions

    doc = {
        "schema": "kvpolicy.ablation/1",
        "spec": json.loads(spec.model_dump_json()),
        "rows": rows,
        "runs": [{"budget": _budget_label(spec.budgets[bi]), "variant": name, "policy": policy,
                  **_to_json(results[(bi, name)])} for bi, name, policy in plan],
        "seconds": time.perf_counter() - t0,
        "written": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
    }
    atomic_write_text(out / "ablation.json", json.dumps(doc, indent=1, default=_json_default) + "\n")
    files.append(out / "ablation.json")
    if plots and rows:
        png = _plot(spec, rows, out / "ablation.png")
        if png is not None:
            files.append(png)
    tracker = make_tracker(spec.wandb, out, group=spec.name, quiet=quiet, console=console)
    tracker.log_table(f"{spec.name}-ablation", rows, {"ablation": json.loads(spec.model_dump_json())},
                      [f for f in files if f.suffix == ".png"])
    tracker.close()
    return AblationResult(rows=rows, output=out, markdown=md, files=files)


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
    from .sweep import _atomic_savefig

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
    _atomic_savefig(fig, path)
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


def ablate_cli(file: str | Path, samples: int | None = None, output: str | Path | None = None,
               wandb_project: str | None = None, no_wandb: bool = False, quiet: bool = False) -> AblationResult | None:
    """``kvpolicy ablate FILE``: validate the file, evaluate, print the delta table. Exit 2 on an invalid file."""
    from rich.console import Console
    from rich.text import Text

    from .sweep import _exit

    err = Console(stderr=True)
    overrides = {"samples": samples, "output": str(output) if output else None, "wandb_project": wandb_project,
                 "no_wandb": no_wandb}
    try:
        spec = load_ablation(file, overrides)
    except SweepConfigError as exc:
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        _exit(2)
        return None
    try:
        result = run_ablation(spec, quiet=quiet)
    except PolicyConfigError as exc:
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        _exit(2)
        return None
    except KeyboardInterrupt:
        err.print("interrupted; finished evaluations are kept under runs/ and skipped when the command is re-run")
        _exit(130)
        return None
    from .sweep import stdout_console

    print_table(stdout_console(), spec, result.rows)
    if not quiet:
        err.print(f"results in {result.output}: " + ", ".join(f.name for f in result.files))
    return result


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - ``python -m kvpolicy.ablate FILE``
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m kvpolicy.ablate")
    ap.add_argument("file")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--output")
    ap.add_argument("--wandb-project")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        ablate_cli(a.file, a.samples, a.output, a.wandb_project, a.no_wandb, a.quiet)
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if code is not None:
            sys.exit(code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
