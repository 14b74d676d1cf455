"""kvpolicy's side of the kept-entries comparison with kvpress: Jaccard overlap per layer and kv head.

Builds the model and prompt of ``benchmarks/kvpress_overlap.py`` (read by path: its :func:`build_model` and
:func:`prompt`), checks that they are the ones kvpress saw (weight checksum, full-cache logits), runs each kvpolicy
policy with a ``tokens`` budget equal to kvpress's kept count, and prints a markdown table (one row per method and
ratio: mean and minimum Jaccard over layers x kv heads, and the most entries one head keeps that the other does not)::

    .venv/bin/python benchmarks/kvpolicy_overlap.py --kvpress runs/overlap/kvpress.json [--output table.md]

Policies (kvpress press in brackets): ``keydiff`` [KeyDiffPress]; ``knorm`` [KnormPress]; ``local`` with 4 sinks
[StreamingLLMPress]; ``snapkv`` window 32, kernel 5, avg [SnapKVPress]; ``tova`` [TOVAPress]; ``h2o`` with no recent
window, once with the paper's sum and once with ``normalize: mean_over_visible`` [ObservedAttentionPress];
``expected_attention`` preset (512 future positions, 4 sinks, covariance, value norm) [ExpectedAttentionPress];
``kvzip`` preset (ranked across the kv heads of each layer) [KVzipPress, ``layerwise=True``] and ``kvzip_global``
[KVzipPress's default], both sides given the character tokenizer of ``kvpress_overlap.py`` for the repeat prompt;
``duo_attention`` preset with kvpress's head scores, sinks and window [DuoAttentionPress].

Equal kept counts: every method keeps kvpress's count through a ``tokens`` budget, except ``duo_attention``, whose
kept count per head is all or the window by design. kvpress's ratio there is the share of heads streamed; kvpolicy is
given the *entry* ratio kvpress reports for it (``m (n - c) / (U n)`` for ``m`` streamed of ``U`` heads, window
``c``), from which it derives its own number of streamed heads (``ceil(U (n - keep) / (n - c))``, the same ``m``);
the kept column then gives the entries both sides hold in total. KVzip's rows keep the ``kept`` count per head *on
average* over the heads of each layer (of the whole cache for ``kvzip_global``).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import tempfile
from pathlib import Path
from typing import Any

import torch

import kvpolicy
from kvpolicy.config import load_policy

SIDE = runpy.run_path(str(Path(__file__).with_name("kvpress_overlap.py")))

#: row label -> (kvpress method, kvpolicy policy document without its budget)
POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    "keydiff": ("keydiff", {"preset": "keydiff"}),
    "knorm": ("knorm", {"preset": "knorm"}),
    "local": ("local", {"encode": {"name": "local", "start_size": SIDE["SINKS"]}, "reducer": {"name": "evict"}}),
    "snapkv": (
        "snapkv",
        {"preset": "snapkv", "encode": {"window": SIDE["WINDOW"], "kernel_size": SIDE["KERNEL"], "pooling": "avg"}},
    ),
    "tova": ("tova", {"preset": "tova"}),
    "h2o (sum)": ("h2o", {"encode": {"name": "h2o", "recent": 0}, "reducer": {"name": "evict"}}),
    "h2o (mean_over_visible)": (
        "h2o",
        {"encode": {"name": "h2o", "recent": 0, "normalize": "mean_over_visible"}, "reducer": {"name": "evict"}},
    ),
    "expected_attention": ("expected_attention", {"preset": "expected_attention"}),
    "kvzip": ("kvzip", {"preset": "kvzip"}),
    "kvzip_global": ("kvzip_global", {"preset": "kvzip_global"}),
    "duo_attention": ("duo_attention", {"preset": "duo_attention"}),
}


def duo_document(duo: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The ``duo_attention`` preset with kvpress's head scores (written as a score file), sinks and window."""
    from kvpolicy.heads.table import write_scores

    path = write_scores(folder / "head_scores.tsv", torch.tensor(duo["head_scores"], dtype=torch.float64))
    return {"preset": "duo_attention", "sinks": duo["sinks"],
            "reducer": {"recent": duo["recent"], "head_scores": str(path)}}


def kvpolicy_kept(
    model: torch.nn.Module, ids: torch.Tensor, doc: dict[str, Any], budget: dict[str, Any]
) -> list[list[list[int]]]:
    """``[layer][kv head]`` -> sorted prompt positions kvpolicy keeps under ``budget`` (``tokens`` or ``ratio``)."""
    policy = load_policy({**doc, **budget})
    cache = kvpolicy.make_cache(model, policy, tokenizer=SIDE["CharTokenizer"]())
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [[layer.kept_positions(0, h) for h in range(layer.held().shape[1])] for layer in cache.policy_layers]


def compare(ours: list[list[list[int]]], theirs: list[list[list[int]]]) -> tuple[float, float, int]:
    """(mean Jaccard, min Jaccard, most entries of one head kept by one side only) over layers x kv heads."""
    jac, diff = [], 0
    for lo, lt in zip(ours, theirs, strict=True):
        for a, b in zip(lo, lt, strict=True):
            sa, sb = set(a), set(b)
            jac.append(len(sa & sb) / len(sa | sb))
            diff = max(diff, len(sa - sb))
    return sum(jac) / len(jac), min(jac), diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvpress", type=Path, required=True, help="the JSON written by kvpress_overlap.py")
    ap.add_argument("--output", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    ref = json.loads(args.kvpress.read_text())
    model = SIDE["build_model"](attn="sdpa")
    ids = SIDE["prompt"]()
    checksum = SIDE["weights_checksum"](model)
    if abs(checksum - ref["weights_checksum"]) > 1e-6 * max(1.0, abs(checksum)):
        raise SystemExit(f"the models differ: weight checksum {checksum} here, {ref['weights_checksum']} in kvpress's")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    dlogit = float((logits - torch.tensor(ref["last_logits"])).abs().max())
    if dlogit > 1e-3:
        raise SystemExit(f"the full-cache logits differ by {dlogit} (the two sides do not compute the same model)")
    kvpolicy.attach(model)
    lines = [
        f"model: tiny random Llama {ref['config']['num_hidden_layers']} layers, "
        f"{ref['config']['num_attention_heads']} query / {ref['config']['num_key_value_heads']} kv heads, "
        f"prompt {ref['length']} tokens, seed {ref['seed']}; full-cache logits max |diff| {dlogit:.1e}; "
        f"kvpress side: {ref['versions']}",
        "",
        "| method | ratio | kept | mean Jaccard | min Jaccard | max entries differing (one head) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    folder = Path(tempfile.mkdtemp(prefix="kvpolicy-overlap-"))
    for label, (method, doc) in POLICIES.items():
        for key in sorted(k for k in ref["kept"] if k.startswith(f"{method}@")):
            ratio = float(key.split("@")[1])
            theirs = ref["kept"][key]
            if method == "duo_attention":
                entry = ref["duo"]["entry_ratio"][key]
                ours = kvpolicy_kept(model, ids, duo_document(ref["duo"], folder), {"ratio": entry})
                total = sum(len(h) for layer in ours for h in layer)
                kept = f"{total} / {sum(len(h) for layer in theirs for h in layer)} in all"
                ratio_cell = f"{ratio} of heads = {entry:.4f} of entries"
            else:
                keep = SIDE["n_kept"](ref["length"], ratio)
                ours = kvpolicy_kept(model, ids, doc, {"tokens": keep})
                kept, ratio_cell = str(keep), str(ratio)
            mean, low, diff = compare(ours, theirs)
            lines.append(f"| {label} | {ratio_cell} | {kept} | {mean:.4f} | {low:.4f} | {diff} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(table)
        os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
