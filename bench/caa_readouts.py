"""Which layer and read position move each behaviour, under both A/B readouts.

For each behaviour, fits CAA with both read positions on the training split, then scores
the held-out A/B items at multipliers x layers. Writes bench/results/caa_readouts.csv.
Takes about half an hour on 2 CPU cores with the defaults.

    python bench/caa_readouts.py [--train 100] [--test 30] [--layers 6 12 18 24] [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import steerbench as sb
from steerbench.evaluation import ab_sweep
from steerbench.model import MODEL_HELP

OUT = Path(__file__).parent / "results" / "caa_readouts.csv"
BEHAVIOURS = [("caa", "refusal"), ("caa", "corrigible-neutral-HHH"), ("caa", "survival-instinct"),
              ("project", "tone"), ("project", "refusal")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="default: 20/40/62/83%% of the depth (6 12 18 24 of 30 layers)")
    ap.add_argument("--multipliers", type=float, nargs="+", default=[-4, 0, 4])
    ap.add_argument("--behaviours", nargs="+", default=[f"{s}:{n}" for s, n in BEHAVIOURS],
                    help="source:name pairs (default: %(default)s)")
    ap.add_argument("--append", action="store_true", help="add to the existing results file")
    ap.add_argument("--out", type=Path, default=OUT, help="results file (default: %(default)s)")
    args = ap.parse_args()
    model = sb.load_model(args.model)
    layers = args.layers or sorted({model.layer_at(f) for f in (0.2, 0.4, 0.62, 0.83)})
    frames = [pd.read_csv(args.out)] if args.append and args.out.exists() else []
    for source, name in (b.split(":", 1) for b in args.behaviours):
        train = sb.behavior(name, "train", source)[: args.train]
        test = sb.behavior(name, "test", source)[: args.test]
        for read in ("letter", "answer"):
            t = time.time()
            caa = sb.CAA.fit(model, train, read=read)
            df = ab_sweep(model, lambda L, m: caa.at(L).scaled(m), test, layers, args.multipliers, progress=False)
            df.insert(0, "read", read)
            df.insert(0, "behaviour", f"{source}:{name}")
            if args.model:  # the default model's rows keep their old columns
                df.insert(0, "model", model.name)
            frames.append(df)
            pd.concat(frames).to_csv(args.out, index=False)
            print(f"{source}:{name} read={read} ({time.time() - t:.0f}s)")
            print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)


if __name__ == "__main__":
    main()
