"""A head sweep on the default model: every attention head steered alone, TruthfulQA MC2.

Head probes are fitted on the first ``--fit-questions`` TruthfulQA questions (heads ranked
on their own validation split); the sweep scores ``--questions`` other questions (a
validation slice: never a test set) with each head steered alone at ``--alpha`` (ITI on
that head: mass-mean direction, alpha x sigma), instruction + primer prompt.

Timed against a baseline in the same run: the same settings for ``--baseline-heads``
heads scored one ``mc_scores`` call per head (the shared primer still computed once per
call), extrapolated to all heads. Prints the heads the sweep finds beside the best probe
heads.

    python bench/head_sweep.py [--questions 10] [--alpha 5] [--fit-questions 200]
"""

from __future__ import annotations

import argparse
import time

import steerbench as sb
from steerbench.model import MODEL_HELP
from steerbench.truthfulqa import head_sweep, mc_score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--fit-questions", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--baseline-heads", type=int, default=6)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    qs = sb.load_truthfulqa()
    fit, val = qs[: args.fit_questions], qs[args.fit_questions : args.fit_questions + args.questions]
    t0 = time.perf_counter()
    probes = sb.HeadProbes.fit(model, fit)
    print(f"probes on {len(fit)} questions: {time.perf_counter() - t0:.0f} s")
    sweep = head_sweep(model, probes, val, alphas=[args.alpha], progress=True)
    n_heads = len(sweep)
    print(f"sweep: {n_heads} heads x 1 alpha on {len(val)} questions "
          f"({sum(len(q.correct) + len(q.incorrect) for q in val)} answers): {sweep.attrs['seconds']:.0f} s "
          f"({sweep.attrs['seconds'] / n_heads:.2f} s per head); unsteered MC2 {sweep.attrs['unsteered']['mc2']:.3f}")
    some = probes.ranking()[: args.baseline_heads]
    t0 = time.perf_counter()
    for layer, head in some:
        mc_score(model, val, probes.on([(layer, head)], args.alpha))
    per = (time.perf_counter() - t0) / len(some)
    print(f"baseline, one mc_scores call per head: {per:.2f} s per head -> {per * n_heads:.0f} s for all; "
          f"the sweep takes {sweep.attrs['seconds'] / (per * n_heads):.2f}x that time")
    cols = ["layer", "head", "d_mc2", "probe_val_acc", "probe_rank"]
    print("heads the sweep finds (largest MC2 gain):")
    print(sweep.sort_values("d_mc2", ascending=False)[cols].head(8).round(3).to_string(index=False))
    print("the best probe heads:")
    print(sweep.sort_values("probe_rank")[cols].head(8).round(3).to_string(index=False))
    top = set(map(tuple, sweep.sort_values("d_mc2", ascending=False)[["layer", "head"]].head(16).values.tolist()))
    best = set(probes.ranking()[:16])
    print(f"overlap of the top 16 by MC2 gain and the top 16 probe heads: {len(top & best)}")


if __name__ == "__main__":
    main()
