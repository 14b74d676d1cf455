"""What a shared prefill costs per policy: the direct prefill against recording once and replaying.

For the default model (or ``--model``) and a left-padded batch of ``--batch`` random prompts of ``--tokens`` tokens,
this prints the median wall time of

* ``direct``  -- the policy's cache filled by the model's own prefill forward (what every cell of a grid pays today);
* ``replay 1``  -- the same policy's cache built from a recording (:func:`kvpolicy.core.replay.replay`), the first
                    time the recording meets the policy's statistics: they are computed (and kept with the recording);
* ``replay 2``  -- the same again: what every further cell needing the same statistics pays (another ratio, another
                    policy with the same statistic: h2o and elastic both read the whole-prompt attention);

per policy, in the order given, interleaved with the direct runs (so a load change hits both), plus ``record`` (the
one recording forward, paid once per batch for the whole grid) and the recording's size. A grid of ``c`` cells then
costs about ``record + (statistics once) + c * replay 2`` of prefill instead of ``c * direct``.

Usage: ``python benchmarks/replay_prefill.py --tokens 2048 --batch 4 --policies local,h2o,snapkv,tova,elastic``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kvpolicy
from kvpolicy.core.recording import record
from kvpolicy.core.replay import beyond_window, replay
from kvpolicy.eval.context import build_policy, load_eval_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--policies", default="local,h2o,snapkv,tova,elastic")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_eval_model(args.model, args.dtype)
    kvpolicy.attach(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(10, vocab - 10, (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, args.batch):  # left padding: row r is r * 7 tokens shorter
        mask[r, : r * 7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def forward(cache):
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        logits_to_keep=1)
        return out.logits[:, -1]

    t0 = time.perf_counter()
    rec = record(model, forward)
    record_s = time.perf_counter() - t0
    print(f"{args.model} {model.dtype} batch {args.batch} x {args.tokens} tokens, threads {torch.get_num_threads()}, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"record {record_s:.2f} s once, recording {rec.nbytes() / 2**20:.0f} MiB")
    print(f"{'policy':>20} {'direct s':>9} {'replay 1 s':>10} {'replay 2 s':>10} {'replay 2/direct':>15}")
    recordings = {frozenset(): rec}  # a probe's or a wide query statistic's policy on a sliding model: its own
    for name in args.policies.split(","):
        keep = beyond_window(build_policy(name, args.ratio), model, args.tokens)
        if keep not in recordings:
            recordings[keep] = record(model, forward, keep)
            print(f"(recorded again for {name}: its sliding layers keep {'+'.join(sorted(keep))} before the window, "
                  f"{recordings[keep].nbytes() / 2**20:.0f} MiB)")
        rec = recordings[keep]
        direct, replayed = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward(kvpolicy.make_cache(model, build_policy(name, args.ratio)))
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                replay(model, build_policy(name, args.ratio), rec)
            replayed.append(time.perf_counter() - t0)
        d, r1, r2 = statistics.median(direct), replayed[0], statistics.median(replayed[1:] or replayed)
        print(f"{name:>20} {d:9.2f} {r1:10.2f} {r2:10.2f} {r2 / d:15.2f}", flush=True)


if __name__ == "__main__":
    main()
