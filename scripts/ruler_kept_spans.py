"""Which parts of a RULER prompt a policy keeps: the share of the needle's value tokens, of its key tokens, of the
prompt's first 16 tokens and of the context's newest 32, averaged over layers and kv heads.

Why: a policy's RULER score says whether it answered, not what it dropped; when two policies keep the same share of
the needle and only one answers (docs/long-context.md, Expected Attention), the other spans are where to look. The
context alone is compressed (query-agnostic), as in the grid, with :func:`kvpolicy.compress_context`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ruler_kept_spans.py --policies expected_attention,keydiff,kvzip \\
        --samples 6 --ratio 0.75 --length 2048
"""

from __future__ import annotations

import argparse
import re

import torch

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.eval.compressed import compress_context
from kvpolicy.eval.tasks.base import get_task
from kvpolicy.models import load_model


def token_span(tokenizer, ids: list[int], text: str) -> list[int]:
    """Positions of ``text``'s tokens in ``ids`` (tokenized alone or after a space, whichever occurs)."""
    for variant in (text, " " + text):
        sub = tokenizer.encode(variant, add_special_tokens=False)
        for i in range(len(ids) - len(sub) + 1):
            if ids[i:i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    raise ValueError(f"{text!r} is not a token span of the context")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="expected_attention,keydiff,kvzip")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2")
    ap.add_argument("--samples", type=int, default=6, help="in total, spread over the tasks")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    model, tok = load_model(args.model, dtype="auto")
    kvpolicy.attach(model)
    task = get_task("ruler")
    opts = task.options({"context_tokens": args.length, "tasks": args.tasks.split(",")})
    samples = task.load(tok, args.samples, args.seed, opts)
    for name in args.policies.split(","):
        shares: dict[tuple[str, str], list[float]] = {}
        for s in samples:
            ctx = s.prompt_ids[: len(s.prompt_ids) - s.question_tokens]
            key = re.search(r"for (.+?) mentioned", s.question or "")
            spans = {"value": token_span(tok, ctx, s.answers[0]), "first16": list(range(16)),
                     "last32": list(range(len(ctx) - 32, len(ctx)))}
            if key:
                spans["key"] = token_span(tok, ctx, key.group(1))
            cache = compress_context(model, tok, load_policy({"preset": name, "ratio": args.ratio}), [ctx]).cache()
            per_span: dict[str, list[float]] = {k: [] for k in spans}
            for layer in cache.layers:
                for h in range(int(layer.held().shape[1])):
                    kept = set(layer.kept_positions(0, h))
                    for k, pos in spans.items():
                        per_span[k].append(sum(p in kept for p in pos) / len(pos))
            for k, v in per_span.items():
                shares.setdefault((s.kind, k), []).append(sum(v) / len(v))
        print(name, {f"{t}/{k}": round(sum(v) / len(v), 3) for (t, k), v in shares.items()}, flush=True)


if __name__ == "__main__":
    main()
