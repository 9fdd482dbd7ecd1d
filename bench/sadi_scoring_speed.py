"""SADI scoring cost against unsteered scoring, same run, same items.

SADI's reference reading scales the *clean* activation at the last prompt token, so each
steered pass first runs that column once with the steering off (``passes.forward_pass``).
This measures what that costs per 100 items on an accuracy set, for the reference reading
and the in-place one (no clean pass), each scored alone (``mc_scores`` with one steerer),
best of ``--repeats``. Prints seconds per 100 items and the ratio to unsteered.

    python bench/sadi_scoring_speed.py [--data copa] [--items 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import steerbench as sb
from steerbench.datasets import mc_set
from steerbench.model import MODEL_HELP
from steerbench.truthfulqa import mc_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--data", default="copa")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    spec = mc_set(args.data)
    items = sb.load_mc(args.data, limit=args.items)
    sadi = sb.SADI.fit(model, items[: len(items) // 2], elements="head", k=6, strength=5.0, template=spec.features)
    steers = {"unsteered": None, "SADI-HEAD reference": sadi,
              "SADI-HEAD in place": dataclasses.replace(sadi, reading="in_place")}
    print(f"{len(items)} {args.data} items, prompt {spec.prompt!r}, batch size {args.batch_size}, best of {args.repeats}")
    times = {}
    for name, steer in steers.items():
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = mc_scores(model, items, [steer], prompt=spec.prompt, batch_size=args.batch_size)[0]
            best = min(best, time.perf_counter() - t)
        times[name] = best
        print(f"{name:>22}: {100 * best / len(items):5.2f} s per 100 items ({best / times['unsteered']:.2f}x "
              f"unsteered); accuracy {res.mc1:.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
