"""Running evaluations for people: ``run_cli`` (one policy beside the full cache) and ``compare_cli`` (a grid of
policies x ratios x tasks, tables with bootstrap intervals, one plot per task and metric), plus the result files.

Both are plain functions (the ``kvpolicy run`` / ``kvpolicy compare`` commands are thin wrappers). Every file is
written atomically (temporary file + ``os.replace``). ``compare`` writes one JSON file per cell as soon as the cell is
done and skips cells whose file already holds a complete result for the same settings, so an interrupted grid
resumes where it stopped and several processes can share one grid.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .runner import EvalResult, EvalSpec, SideMetrics, evaluate

#: metrics shown per task, first = the headline metric; (key, label, higher_is_better)
TASK_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "continuation": [("ppl", "PPL", False), ("kl", "KL", False), ("top1", "top-1", True)],
    "instruct": [("rouge_l", "ROUGE-L", True), ("ppl", "PPL", False), ("kl", "KL", False), ("top1", "top-1", True)],
    "needle": [
        ("exact_match", "match", True),
        ("ppl", "PPL", False),
        ("rouge_l", "ROUGE-L", True),
        ("kl", "KL", False),
    ],
}
DEFAULT_METRICS = [("ppl", "PPL", False), ("rouge_l", "ROUGE-L", True), ("kl", "KL", False), ("top1", "top-1", True)]


def metrics_for(task: str) -> list[tuple[str, str, bool]]:
    return TASK_METRICS.get(task, DEFAULT_METRICS)


# ----------------------------------------------------------------------------------------------- files
def write_json_atomic(path: str | Path, doc: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, default=str, allow_nan=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def result_json(result: EvalResult) -> dict[str, Any]:
    return result.model_dump(mode="json")


def load_result(path: str | Path) -> EvalResult:
    return EvalResult.model_validate(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------- formatting
def fmt(value: float | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("kl",):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    if key in ("rouge_l", "top1", "exact_match", "ratio_prefill", "ratio_end"):
        return f"{value:.3f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None, key: str = "") -> str:
    if ci is None or value is None:
        return fmt(value, key)
    return f"{fmt(value, key)} [{fmt(ci[0], key)}, {fmt(ci[1], key)}]"


def _metric(m: SideMetrics, key: str) -> tuple[float | None, tuple[float, float] | None]:
    return getattr(m, key, None), getattr(m, f"{key}_ci", None)


# ----------------------------------------------------------------------------------------------- run
def run_table(result: EvalResult) -> Any:
    """A rich table metric / full / policy / delta for one result."""
    from rich.table import Table

    title = (
        f"{result.policy_name} ({budget_label(result.policy)}) vs full cache · "
        f"{result.task['name']} · {len(result.samples)} samples · {result.model.get('name')} ({result.model['dtype']})"
    )
    caption = None
    if result.reference.get("hits"):
        caption = "full-cache timings are those of its cached reference computation (possibly another run)"
    t = Table(title=title, caption=caption)
    for col in ("metric", "full", "policy", "delta (policy - full)"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    keys = [k for k, _, _ in metrics_for(result.task["name"])]
    keys += [k for k, _, _ in DEFAULT_METRICS if k not in keys]
    labels = {k: lab for k, lab, _ in TASK_METRICS.get(result.task["name"], []) + DEFAULT_METRICS}
    for key in keys + ["exact_match"]:
        fv, fci = _metric(result.full, key)
        pv, pci = _metric(result.policy_metrics, key)
        if fv is None and pv is None:
            continue
        if key == "exact_match" and key in keys[:-1]:
            continue
        d = result.delta.get(key)
        t.add_row(
            labels.get(key, key),
            fmt_ci(fv, fci, key) if key not in ("kl", "top1") else fmt(fv, key),
            fmt_ci(pv, pci, key),
            fmt_ci(d.value, d.ci, key) if d is not None else "-",
        )
    f, p = result.full, result.policy_metrics
    t.add_row("PPL, mean of per-sample", fmt(f.ppl_per_sample_mean), fmt(p.ppl_per_sample_mean), "")
    t.add_row("tokens kept / layer (prefill)", fmt(f.kept_tokens_prefill), fmt(p.kept_tokens_prefill), "")
    t.add_row("tokens kept / layer (end)", fmt(f.kept_tokens_end), fmt(p.kept_tokens_end), "")
    # multimodal prompts: where the kept budget went. The full cache holds the whole prompt, so its column is the
    # prompt's own image/text positions and the last column says how much of each survived the prefill compression
    prompt_split, kept_split = p.prompt_tokens_by_type, p.kept_by_type_prefill
    if prompt_split is not None and kept_split is not None and prompt_split["image"] > 0:
        for kind in ("image", "text"):
            whole, kept = prompt_split[kind], kept_split[kind]
            share = f"{kept / whole:.1%} of the prompt's {kind}" if whole > 0 else ""
            t.add_row(f"{kind} positions kept / layer (prefill)", fmt(whole), fmt(kept), share)
    t.add_row(
        "ratio achieved (prefill / end)",
        f"{f.ratio_prefill:.3f} / {f.ratio_end:.3f}",
        f"{p.ratio_prefill:.3f} / {p.ratio_end:.3f}",
        "",
    )
    t.add_row("cache bytes held / sample (end)", f"{f.bytes_end:,.0f}", f"{p.bytes_end:,.0f}", "")
    t.add_row(
        "prefill s / sample",
        fmt(f.prefill_s / max(1, len(result.samples))),
        fmt(p.prefill_s / max(1, len(result.samples))),
        "",
    )
    t.add_row("decode tokens / s", fmt(f.decode_tokens_per_s), fmt(p.decode_tokens_per_s), "")
    return t


def budget_label(policy_doc: dict[str, Any]) -> str:
    """``ratio 0.574`` or ``128 tokens``: the budget a policy actually ran with (its resolved document)."""
    if policy_doc.get("ratio") is not None:
        return f"ratio {policy_doc['ratio']:g}"
    if policy_doc.get("tokens") is not None:
        return f"{policy_doc['tokens']} tokens"
    return "budget unknown"


def run_cli(
    policy: str = "elastic",
    ratio: float | None = None,
    model: str = "smollm2-135m",
    task: str = "continuation",
    samples: int = 50,
    seed: int = 0,
    out: str | Path | None = "results.json",
    as_json: bool = False,
    quiet: bool = False,
    console: Any = None,
    **spec_fields: Any,
) -> EvalResult:
    """``kvpolicy run``: evaluate one policy and the full cache side by side, print a table (or the JSON) and write
    the result file atomically. ``ratio=None`` keeps the policy's own budget (a preset's or a file's ratio).
    ``spec_fields`` are further :class:`EvalSpec` fields (``task_options``, ``batch_size``, ``protocol``, ...)."""
    from rich.console import Console

    spec = EvalSpec(
        model=model,
        task=task,
        policy=policy,
        ratio=ratio,
        samples=samples,
        seed=seed,
        quiet=quiet or as_json,
        **spec_fields,
    )
    result = evaluate(spec)
    doc = result_json(result)
    if out:
        write_json_atomic(out, doc)
    if as_json:
        print(json.dumps(doc, default=str))
    else:
        console = console or Console()
        console.print(run_table(result))
        h = result.honesty
        if h.get("checked"):
            console.print(
                f"ratio-0 check passed on sample {h['sample']} (bit-identical logits, PPL {h['ppl_full']:.4f})"
            )
        else:
            console.print(f"[yellow]ratio-0 check not run: {h.get('reason')}[/]")
        console.print(
            f"{result.wall_s:.1f} s wall; references: {result.reference['hits']} cached, "
            f"{result.reference['computed']} computed" + (f"; wrote {out}" if out else "")
        )
    return result


# ----------------------------------------------------------------------------------------------- compare
def cell_name(task: str, policy: str, ratio: float) -> str:
    """The cell's file stem; a label that is not a plain word (a policy's free-form ``name:``) is made one."""
    return f"{task}__{re.sub(r'[^A-Za-z0-9_.+-]', '_', policy)}__{ratio:g}"


def cell_ratio(doc: dict[str, Any]) -> float | None:
    """The ratio a cell ran at: the one the grid set, else the policy's own (``compare`` without ``--ratios``)."""
    ratio = doc["spec"]["ratio"]
    return ratio if ratio is not None else doc["policy"].get("ratio")


def _spec_signature(spec: EvalSpec, dtype: str | None = None) -> dict[str, Any]:
    """What makes two cells the same computation: the spec without display/threading settings, with ``dtype`` the
    resolved one (``dtype``, else ``spec.dtype`` resolved here), so an ``auto`` cell computed in bfloat16 is not
    taken as done on a machine where ``auto`` means float32 (an explicit ``float32`` cell matches ``auto`` there)."""
    from ..hardware import dtype_name, resolve_dtype

    d = spec.model_dump(mode="json")
    for k in ("quiet", "threads"):
        d.pop(k, None)
    d["dtype"] = dtype or dtype_name(resolve_dtype(spec.dtype, spec.device))
    return d


def _cell_dtype(doc: dict[str, Any]) -> str | None:
    """The dtype a cell file was computed in: its ``dtype``, or (older files) its model's ``torch.<name>``."""
    recorded = doc.get("dtype") or (doc.get("model") or {}).get("dtype")
    return str(recorded).removeprefix("torch.") if recorded else None


def compare(
    policies: Sequence[str | tuple[str, dict[str, Any]]],
    ratios: Sequence[float] | None,
    tasks: Sequence[str],
    out_dir: str | Path,
    base: dict[str, Any] | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
    task_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate every (task, policy, ratio) cell, one JSON file per cell in ``out_dir/cells``; returns the summary
    (also written to ``out_dir/compare.json``). A policy is a preset name / YAML path (labelled by its resolved name:
    the preset's, or the file's ``name:`` or stem), or a ``(label, document)`` pair. ``ratios=None`` runs each policy
    at its own ratio. ``full`` is not run as a policy: its row is the full-cache side shared by all cells of a task.

    Every cell is validated (model name, task, options, policy) before anything is written or any model loads."""
    out = Path(out_dir)
    from .preflight import plan_cells

    cells = plan_cells(policies, ratios, tasks, dict(base or {}), task_options)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for label, task, ratio, spec in cells:
        path = out / "cells" / f"{cell_name(task, label, ratio)}.json"
        if resume and path.exists():
            try:
                old = json.loads(path.read_text())
                old_signature = _spec_signature(EvalSpec(**old["spec"]), dtype=_cell_dtype(old))
                if old.get("complete") and old_signature == _spec_signature(spec):
                    continue
            except (ValueError, KeyError, TypeError):
                pass
        t0 = time.perf_counter()
        result = evaluate(spec)
        write_json_atomic(path, {"label": label, **result_json(result)})
        if log:
            m = result.policy_metrics
            log(
                f"{task:12s} {label:8s} {ratio:.2f}: ppl {m.ppl:.3f} (full {result.full.ppl:.3f}) "
                f"rouge {fmt(m.rouge_l)} match {fmt(m.exact_match)} kl {fmt(m.kl, 'kl')} "
                f"kept {m.kept_tokens_prefill:.1f}/{m.prompt_tokens:.1f} "
                f"{time.perf_counter() - t0:.1f}s"
            )
    labels = ["full", *dict.fromkeys(label for label, _, _, _ in cells)]
    summary = summarize(out, labels, sorted({r for _, _, r, _ in cells}), tasks)
    write_json_atomic(out / "compare.json", summary)
    return summary


def summarize(
    out_dir: str | Path,
    policies: Sequence[str] | None = None,
    ratios: Sequence[float] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read the cell files of a grid into ``{task: {policy: {ratio: metrics}}}`` (``full`` under ratio 0)."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    for path in sorted(Path(out_dir, "cells").glob("*.json")):
        doc = json.loads(path.read_text())
        task, pol, ratio = doc["task"]["name"], doc["spec"]["policy"], cell_ratio(doc)
        if tasks is not None and task not in tasks:
            continue
        if ratios is not None and ratio not in ratios:
            continue
        name = doc.get("label") or (pol if isinstance(pol, str) else doc["policy_name"])
        if policies is not None and name not in policies:
            continue
        entry = cells.setdefault(task, {})
        pm, fm = doc["policy_metrics"], doc["full"]
        entry.setdefault(name, {})[f"{ratio:g}"] = _cell_summary(pm, doc)
        entry.setdefault("full", {})["0"] = _cell_summary(fm, doc, full=True)
        meta.setdefault(
            task,
            {
                "samples": len(doc["samples"]),
                "options": doc["task"].get("options"),
                "model": doc["model"].get("name"),
                "dtype": doc["model"].get("dtype"),
                "honesty": doc["honesty"],
                "environment": doc["environment"],
                "by_kind_full": _by_kind(doc, "full"),
            },
        )
        meta[task].setdefault("trial_s", {})[f"{name}@{ratio:g}"] = doc["wall_s"]
        meta[task].setdefault("by_kind", {})[f"{name}@{ratio:g}"] = _by_kind(doc, "policy")
    return {"cells": cells, "meta": meta}


def _by_kind(doc: dict[str, Any], side: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in doc["samples"]:
        groups.setdefault(s["kind"], []).append(s[side])
    out = {}
    for kind, rows in groups.items():
        n = sum(r["scored_tokens"] for r in rows)
        em = [r["exact_match"] for r in rows if r.get("exact_match") is not None]
        rl = [r["rouge_l"] for r in rows if r.get("rouge_l") is not None]
        out[kind] = {
            "n": len(rows),
            "ppl": math.exp(sum(r["nll_sum"] for r in rows) / n) if n else float("nan"),
            "exact_match": sum(em) / len(em) if em else None,
            "rouge_l": sum(rl) / len(rl) if rl else None,
        }
    return out


def _cell_summary(m: dict[str, Any], doc: dict[str, Any], full: bool = False) -> dict[str, Any]:
    keys = ("ppl", "kl", "top1", "rouge_l", "exact_match")
    out = {k: m.get(k) for k in keys}
    out.update({f"{k}_ci": m.get(f"{k}_ci") for k in keys})
    if not full:
        for k, d in doc["delta"].items():
            out[f"delta_{k}"] = d["value"]
            out[f"delta_{k}_ci"] = d["ci"]
    out.update(
        kept_prefill=m["kept_tokens_prefill"],
        prompt_tokens=m["prompt_tokens"],
        ratio_prefill=m["ratio_prefill"],
        ratio_end=m["ratio_end"],
        bytes_end=m["bytes_end"],
        prefill_s=m["prefill_s"],
        decode_s=m["decode_s"],
        decode_tokens_per_s=m["decode_tokens_per_s"],
    )
    return out


def compare_tables(summary: dict[str, Any], metrics: Sequence[str] | None = None) -> list[Any]:
    """Rich tables: one per task and metric, rows = policies, columns = ratios, cells = value [95% CI]."""
    from rich.table import Table

    tables = []
    for task, entry in summary["cells"].items():
        ratios = sorted({r for pol, by in entry.items() if pol != "full" for r in by}, key=float)
        for key, label, higher in metrics_for(task):
            if metrics is not None and key not in metrics:
                continue
            t = Table(title=f"{task}: {label} ({'higher' if higher else 'lower'} is better), 95% bootstrap CI")
            t.add_column("policy")
            for r in ratios:
                t.add_column(f"ratio {r}", justify="right")
            full = entry.get("full", {}).get("0", {})
            t.add_row("full", *[fmt_ci(full.get(key), full.get(f"{key}_ci"), key)] * len(ratios))
            for pol, by in entry.items():
                if pol == "full":
                    continue
                t.add_row(
                    pol, *[fmt_ci(by[r].get(key), by[r].get(f"{key}_ci"), key) if r in by else "" for r in ratios]
                )
            tables.append(t)
    return tables


def markdown_tables(summary: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """The same tables as GitHub markdown (for docs/results.md)."""
    lines: list[str] = []
    for task, entry in summary["cells"].items():
        ratios = sorted({r for pol, by in entry.items() if pol != "full" for r in by}, key=float)
        for key, label, higher in metrics_for(task):
            if metrics is not None and key not in metrics:
                continue
            lines.append(f"**{task} — {label}** ({'higher' if higher else 'lower'} is better; value [95% CI])\n")
            lines.append("| policy | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
            lines.append("| --- | " + " | ".join("---:" for _ in ratios) + " |")
            full = entry.get("full", {}).get("0", {})
            lines.append(
                "| full | " + " | ".join(fmt_ci(full.get(key), full.get(f"{key}_ci"), key) for _ in ratios) + " |"
            )
            for pol, by in entry.items():
                if pol == "full":
                    continue
                cells = []
                for r in ratios:
                    c = by.get(r)
                    cells.append(fmt_ci(c.get(key), c.get(f"{key}_ci"), key) if c else "not run")
                lines.append(f"| {pol} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One PNG per task and metric: the metric against the ratio removed, one curve per policy with its 95%
    bootstrap interval as error bars, the full cache as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, entry in summary["cells"].items():
        for key, label, higher in metrics_for(task):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            full = entry.get("full", {}).get("0", {})
            if full.get(key) is not None:
                ax.axhline(full[key], color="black", lw=1, ls="--", label="full")
                ci = full.get(f"{key}_ci")
                if ci:
                    ax.axhspan(ci[0], ci[1], color="black", alpha=0.08)
            drawn = False
            for i, (pol, by) in enumerate(sorted((p, b) for p, b in entry.items() if p != "full")):
                rs = sorted(by, key=float)
                xs = [float(r) for r in rs]
                ys = [by[r].get(key) for r in rs]
                if all(y is None for y in ys):
                    continue
                lo = [y - (by[r].get(f"{key}_ci") or (y, y))[0] if y is not None else 0 for r, y in zip(rs, ys)]
                hi = [(by[r].get(f"{key}_ci") or (y, y))[1] - y if y is not None else 0 for r, y in zip(rs, ys)]
                off = (i - 2) * 0.004  # small horizontal jitter so the error bars do not hide each other
                ax.errorbar([x + off for x in xs], ys, yerr=[lo, hi], marker="o", capsize=3, label=pol)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xlabel("ratio (fraction of the cache removed)")
            ax.set_ylabel(label)
            if key == "ppl" or key == "kl":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {label} vs budget ({'higher' if higher else 'lower'} is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{task}_{key}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def paired_difference(
    doc_a: dict[str, Any], doc_b: dict[str, Any], key: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """Policy A minus policy B on the samples both cells share (their ``policy`` sides), with a paired percentile
    bootstrap CI: pooled PPL for ``ppl``, token-pooled ``kl``/``top1``, per-sample means for ``rouge_l`` and
    ``exact_match``. ``None`` when the metric is missing."""
    import numpy as np

    from . import metrics as M

    a = {s["id"]: s["policy"] for s in doc_a["samples"]}
    b = {s["id"]: s["policy"] for s in doc_b["samples"]}
    ids = [i for i in a if i in b]
    if not ids:
        return None

    def col(side: dict[str, dict[str, Any]], name: str) -> np.ndarray:
        return np.array([np.nan if side[i].get(name) is None else side[i][name] for i in ids], dtype=np.float64)

    if key == "ppl":
        an, ac, bn, bc = col(a, "nll_sum"), col(a, "scored_tokens"), col(b, "nll_sum"), col(b, "scored_tokens")
        stat = lambda i: M.pooled_ppl(an[i], ac[i]) - M.pooled_ppl(bn[i], bc[i])  # noqa: E731
    elif key in ("kl", "top1"):
        num = "kl_sum" if key == "kl" else "top1_hits"
        an, ac, bn, bc = col(a, num), col(a, "steps"), col(b, num), col(b, "steps")
        stat = lambda i: float(an[i].sum() / ac[i].sum() - bn[i].sum() / bc[i].sum())  # noqa: E731
    else:
        d = col(a, key) - col(b, key)
        if np.all(np.isnan(d)):
            return None
        stat = lambda i: float(np.nanmean(d[i]))  # noqa: E731
    idx = np.arange(len(ids))
    lo, hi = M.bootstrap(stat, len(ids), n_boot, seed)
    return {"value": stat(idx), "ci": (lo, hi), "n": len(ids)}


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["context_tokens=512", "variants=[single]"]`` -> ``{"context_tokens": 512, "variants": ["single"]}``
    (values parsed as YAML), for ``--task-option`` style CLI flags."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _split(text: str | Sequence[Any], cast: Callable[[str], Any]) -> list[Any]:
    if isinstance(text, str):
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    return [cast(str(x)) for x in text]


def compare_cli(
    policies: str | Sequence[str] = "full,local,h2o,elastic",
    ratios: str | Sequence[float] | None = None,
    model: str = "smollm2-135m",
    task: str | Sequence[str] = "continuation",
    samples: int = 50,
    seed: int = 0,
    out_dir: str | Path = "compare",
    plot: bool = True,
    as_json: bool = False,
    quiet: bool = False,
    resume: bool = True,
    console: Any = None,
    **spec_fields: Any,
) -> dict[str, Any]:
    """``kvpolicy compare``: a quality-vs-budget grid. Prints one table per task and metric (value and 95% bootstrap
    CI per cell), writes ``out_dir/cells/*.json`` (one per cell, resumable), ``out_dir/compare.json`` and, with
    ``plot``, ``out_dir/<task>_<metric>.png`` (one curve per policy). ``ratios=None``: each policy at its own ratio."""
    from rich.console import Console

    console = console or Console(stderr=as_json)
    pols = _split(policies, str)
    try:
        rats = None if ratios is None else _split(ratios, float)
    except ValueError as exc:
        from ..config import ConfigError, ConfigIssue

        raise ConfigError(ConfigIssue("ratios", f"expected comma-separated numbers in [0, 1), got {ratios!r}")) from exc
    tasks = _split(task, str)
    base = {"model": model, "samples": samples, "seed": seed, "quiet": quiet or as_json, **spec_fields}
    log = None if (quiet or as_json) else (lambda line: console.print(line))
    summary = compare(pols, rats, tasks, out_dir, base=base, resume=resume, log=log)
    if plot:
        summary["plots"] = [str(p) for p in plot_summary(summary, out_dir)]
        write_json_atomic(Path(out_dir) / "compare.json", summary)
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        for t in compare_tables(summary):
            console.print(t)
        if plot:
            console.print("plots: " + ", ".join(summary["plots"]))
    return summary


__all__ = [
    "compare",
    "compare_cli",
    "compare_tables",
    "budget_label",
    "cell_ratio",
    "load_result",
    "markdown_tables",
    "paired_difference",
    "parse_options",
    "plot_summary",
    "result_json",
    "run_cli",
    "run_table",
    "summarize",
    "write_json_atomic",
]
