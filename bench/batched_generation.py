"""Answers per second: one TruthfulQA answer at a time vs ``generate_many`` batches.

The bench's workload: the first ``--questions`` TruthfulQA questions (64), the bench's
prompt (instruction + primer, shared by every question and computed once), greedy, a stop
at the first newline, at most 50 new tokens; unsteered and CAA-steered. One-at-a-time is
``generate`` with the shared prefix (the loop the bench used before); batched is
``generate_many`` at each ``--batch`` size, through the same loop. The answers are checked
to be the same (up to near ties, counted). Target: batch 16 at least 5x the answers/s.

    python bench/batched_generation.py [--questions 64] [--batch 8 16 32] [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
import steerbench.generation as gen_module
from steerbench.model import MODEL_HELP
from steerbench.passes import SharedPrefix, length_batches
from steerbench.truthfulqa import PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--fixed", action="store_true", help="also time fixed batches (no rows joining)")
    ap.add_argument("--refill-fraction", type=int, nargs="+", default=[gen_module.REFILL_FRACTION],
                    help="refill once 1/N of the batch is free (generation.REFILL_FRACTION)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = sb.load_model(args.model)
    qs = sb.load_truthfulqa()[: args.questions]
    ids = [model.encode(PROMPTS["instruction+primer"].format(question=q.question)) for q in qs]
    prompts = [sb.Prompt(x, steer_from=len(x) - 1) for x in ids]
    head = SharedPrefix.of(model, ids, limit=min(len(x) for x in ids) - 1)
    caa = sb.CAA.fit(model, sb.behavior("tone")[:16], read="answer", layer=model.layer_at(0.62), unit="resid",
                     strength=0.2)
    kw = dict(max_new_tokens=args.tokens, stop=("\n",), prefix=head)
    print(f"{model.name}: {len(qs)} TruthfulQA questions, instruction+primer prompt (shared prefix of {len(head)} "
          f"tokens), greedy, stop at a newline, <= {args.tokens} new tokens")
    print(f"{'':26s} {'steer':>6s} {'seconds':>8s} {'answers/s':>10s} {'vs one at a time':>17s} "
          f"{'tokens':>7s} {'same text':>10s}")
    for name, steer in (("none", None), ("CAA", caa)):
        t = time.perf_counter()
        ref = [sb.generate(model, p, steer=steer, **kw) for p in prompts]
        base = time.perf_counter() - t
        n_tok = sum(len(g.tokens) for g in ref)
        print(f"{'one at a time':26s} {name:>6s} {base:8.1f} {len(qs) / base:10.2f} {1.0:16.2f}x {n_tok:7d}")
        for b in args.batch:
            runs = [(f"batch {b}, refilled", lambda b=b: sb.generate_many(
                model, prompts, steer=steer, batch_size=b, progress=False, **kw))]
            if args.fixed:  # the reference: fixed batches of like length, each run until its longest answer
                runs.insert(0, (f"batch {b}, fixed", lambda b=b: _fixed(model, prompts, steer, b, kw)))
            for label, run in runs:
                for frac in args.refill_fraction if "refilled" in label else [None]:
                    if frac is not None:
                        gen_module.REFILL_FRACTION = frac
                    t = time.perf_counter()
                    got = run()
                    sec = time.perf_counter() - t
                    same = sum(g.text == r.text for g, r in zip(got, ref))
                    lab = label + (f" at 1/{frac}" if frac is not None and len(args.refill_fraction) > 1 else "")
                    print(f"{lab:26s} {name:>6s} {sec:8.1f} {len(qs) / sec:10.2f} "
                          f"{base / sec:16.2f}x {sum(len(g.tokens) for g in got):7d} {same:>5d}/{len(qs)}")


def _fixed(model, prompts, steer, b, kw):
    out = [None] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], b):
        for i, g in zip(idx, sb.generate_many(model, [prompts[i] for i in idx], steer=steer, batch_size=len(idx),
                                              progress=False, **kw)):
            out[i] = g
    return out


if __name__ == "__main__":
    main()
