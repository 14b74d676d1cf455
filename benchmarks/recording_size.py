"""How big a batch's recorded prefill is (:mod:`kvpolicy.core.recording`), with sliding-window layers kept to their
window, against the same recording over every column of the prompt (what recording format 3 held).

For each ``--tokens`` value this records one batch of ``--batch`` random prompts (row ``r`` left-padded by ``7 r``
tokens) through ``--model`` and prints, in MiB: the recording in memory (``nbytes``) and on disk (``torch.save`` of
``to_dict``, what a spill directory holds), split into global and sliding layers, beside the whole-prompt recording
(every column of every tensor: :meth:`~kvpolicy.core.recording.LayerRecording.full`), and the same for the
recordings a probe (``keep=keys``, KVzip) and a query statistic wider than the window (``keep=queries``, Expected
Attention) get. ``--replay POLICY`` also times a replay of ``POLICY`` from the windowed recording against one from a
recording of every key and query (interleaved, medians), the cost of rebuilding the columns it did not keep.

Usage: ``python benchmarks/recording_size.py --model gemma3-270m --tokens 1024,2048 --batch 4``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import kvpolicy
from kvpolicy.core.recording import BEYOND_WINDOW, LayerRecording, PrefillRecording, record
from kvpolicy.core.replay import replay
from kvpolicy.eval.context import build_policy, load_eval_model

MIB = 2**20


def _whole(rec: LayerRecording) -> int:
    """Bytes of ``rec`` over every column (the recording format 3 kept)."""
    tensors = [t for t in rec.full() if t is not None] + [rec.valid]
    return sum(t.nbytes for t in tensors) + (0 if rec.position_ids is None else rec.position_ids.nbytes)


def _on_disk(rec: PrefillRecording) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rec.pt")
        torch.save(rec.to_dict(), path)
        return os.path.getsize(path)


def _sizes(rec: PrefillRecording, sliding: list[bool]) -> dict[str, float]:
    own = rec.nbytes() - sum(layer.nbytes() for layer in rec.layers)
    glob = sum(layer.nbytes() for layer, s in zip(rec.layers, sliding) if not s)
    slide = sum(layer.nbytes() for layer, s in zip(rec.layers, sliding) if s)
    whole = own + sum(_whole(layer) for layer in rec.layers)
    return {"global": glob / MIB, "sliding": slide / MIB, "total": rec.nbytes() / MIB,
            "disk": _on_disk(rec) / MIB, "whole": whole / MIB}


def _time_replays(model, policy: str, slim: PrefillRecording, whole: PrefillRecording, repeats: int) -> None:
    times: dict[str, list[float]] = {"windowed": [], "every column": []}
    with torch.inference_mode():
        for name, rec in (("windowed", slim), ("every column", whole)):  # warm: statistics computed, kept
            replay(model, build_policy(policy, 0.5), rec)
        for _ in range(repeats):
            for name, rec in (("windowed", slim), ("every column", whole)):
                t0 = time.perf_counter()
                replay(model, build_policy(policy, 0.5), rec)
                times[name].append(time.perf_counter() - t0)
    print(f"  replay {policy}@0.5 (median of {repeats}, after one warm replay each): "
          + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in times.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", default="1024,2048")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replay", default="", help="a preset to time replays of (windowed vs every column)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_eval_model(args.model, args.dtype)
    kvpolicy.attach(model)
    text = model.config.get_text_config(decoder=True)
    sliding = [kind == "sliding_attention" for kind in text.layer_types[: text.num_hidden_layers]] \
        if getattr(text, "layer_types", None) else [False] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None) if any(sliding) else None
    print(f"{args.model} {model.dtype}: {len(sliding)} layers, {sum(sliding)} sliding (window {window}); batch "
          f"{args.batch}; threads {torch.get_num_threads()}; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'tokens':>6} {'keep':>8} {'global':>8} {'sliding':>8} {'total':>8} {'on disk':>8} "
          f"{'whole':>8} {'whole/total':>11}   (MiB)")
    g = torch.Generator().manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = torch.randint(10, text.vocab_size - 10, (args.batch, tokens), generator=g)
        mask = torch.ones_like(ids)
        for r in range(1, args.batch):
            mask[r, : r * 7] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        def forward(cache, ids=ids, mask=mask, positions=positions):
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            logits_to_keep=1)
            return out.logits[:, -1]

        for keep in ((), ("keys",), ("queries",)) if window else ((),):
            t0 = time.perf_counter()
            rec = record(model, forward, frozenset(keep))
            s = _sizes(rec, sliding)
            print(f"{tokens:>6} {'+'.join(keep) or '-':>8} {s['global']:8.1f} {s['sliding']:8.1f} {s['total']:8.1f} "
                  f"{s['disk']:8.1f} {s['whole']:8.1f} {s['whole'] / s['total']:11.2f}   "
                  f"(recorded in {time.perf_counter() - t0:.1f} s)", flush=True)
            if args.replay and not keep:  # against every key and query kept (values before the window: never read)
                _time_replays(model, args.replay, rec, record(model, forward, frozenset(BEYOND_WINDOW)), args.repeats)
            del rec


if __name__ == "__main__":
    main()
