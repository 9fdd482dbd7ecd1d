"""A layer x strength A/B sweep: shared prompt prefix vs recomputing it for every setting.

Same run, same items: ``ab_sweep`` (every setting reuses each batch's unsteered prompt
prefix) against the obvious baseline, one ``ab_score`` call per setting. The baseline
runs on a subset of layers (it is slow); per-setting times are compared, and the full
30-layer x 5-strength sweep is timed with sharing.

    python bench/sweep_speed.py [--items 25] [--baseline-layers 0 10 20]
"""

from __future__ import annotations

import argparse
import time

import steerbench as sb
from steerbench.evaluation import ab_score, ab_sweep
from steerbench.model import MODEL_HELP

STRENGTHS = [-4.0, -2.0, 0.0, 2.0, 4.0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--items", type=int, default=25)
    ap.add_argument("--baseline-layers", type=int, nargs="+", default=None,
                    help="default: 0, 1/3 and 2/3 of the depth (0 10 20 of 30 layers)")
    args = ap.parse_args()
    model = sb.load_model(args.model)
    if args.baseline_layers is None:
        args.baseline_layers = [model.layer_at(f) for f in (0.0, 0.345, 0.69)]
    caa = sb.CAA.fit(model, sb.behavior("tone"), read="answer")
    items = sb.behavior("tone", "test")[: args.items]

    def make(layer, m):
        return caa.at(layer).scaled(m)

    t = time.perf_counter()
    naive = []
    for layer in args.baseline_layers:
        for m in STRENGTHS:
            naive.append(ab_score(model, items, make(layer, m) if m else None))
    t_naive = time.perf_counter() - t
    n_naive = len(naive)

    t = time.perf_counter()
    sub = ab_sweep(model, make, items, args.baseline_layers, STRENGTHS, progress=False)
    t_sub = time.perf_counter() - t
    assert all(abs(a.margin - b) < 1e-3 for a, b in zip(naive, sub.margin)), "shared and naive scores differ"

    t = time.perf_counter()
    full = ab_sweep(model, make, items, list(range(model.n_layers)), STRENGTHS, progress=False)
    t_full = time.perf_counter() - t
    print(f"{len(items)} tone items, both readouts, strengths {STRENGTHS}")
    print(f"baseline, one ab_score per setting: {n_naive} settings in {t_naive:.1f}s ({t_naive / n_naive:.2f}s/setting)")
    print(f"ab_sweep, shared prefix, same settings: {t_sub:.1f}s ({t_naive / t_sub:.1f}x faster, same scores)")
    print(f"ab_sweep, all {model.n_layers} layers x {len(STRENGTHS)} strengths ({len(full)} rows): {t_full:.1f}s; "
          f"the baseline would take ~{t_naive / n_naive * len(full):.0f}s")


if __name__ == "__main__":
    main()
