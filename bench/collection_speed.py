"""Activation collection: batched (left padding) vs one text at a time, examples per second.

Collects the residual stream after every layer at the last token, in one run, for long
(chat-formatted question + answer, as CAA reads them) and short (bare question) texts.
Target: batched at least 4x faster.

    python bench/collection_speed.py [--n 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import steerbench as sb
from steerbench.model import MODEL_HELP
from steerbench.steering.caa import caa_inputs


def rate(model, inputs, hooks, batch_size) -> float:
    sb.collect(model, inputs[:2], hooks, batch_size=batch_size, progress=False)  # warm-up
    t = time.perf_counter()
    sb.collect(model, inputs, hooks, batch_size=batch_size, progress=False)
    return len(inputs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    items = sb.behavior("tone")
    hooks = [f"blocks.{L}.hook_resid_post" for L in range(model.n_layers)]
    long_inputs, _ = caa_inputs(model, items[: args.n // 2], "answer")
    short_inputs = [it.stem for it in items[: args.n]]
    print(f"{args.n} examples, all {model.n_layers} layers' resid_post at the last token")
    print(f"{'texts':34s} {'mean tokens':>11s} {'one-at-a-time/s':>16s} {'batched/s':>10s} {'speed-up':>9s}")
    for name, inputs in (("chat question + answer (CAA)", long_inputs), ("bare question", short_inputs)):
        mean_len = sum(len(model.encode(x) if isinstance(x, str) else x) for x in inputs) / len(inputs)
        one = rate(model, inputs, hooks, 1)
        many = rate(model, inputs, hooks, args.batch_size)
        print(f"{name:34s} {mean_len:11.1f} {one:16.2f} {many:10.2f} {many / one:8.2f}x")


if __name__ == "__main__":
    main()
