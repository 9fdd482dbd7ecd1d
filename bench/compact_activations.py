"""Storing activation sets in 16 bits: does what they feed change?

Collects every head's ``hook_z`` at the last token of each TruthfulQA answer (what ITI,
FASB and SADI-HEAD read) once in float32, then, for float16 and bfloat16, rounds the set
to that dtype (as it would be stored) and back. In each fold of a 2-fold split by
question (fit/validation inside the training part, as the bench does):

- head probes fitted on each set: validation accuracy per head, |difference| to float32
  (mean and max over the heads), and whether the top-K heads are the same;
- ITI from those probes (K and alpha fixed): MC1/MC2 on the fold's test questions,
  difference to float32.

Targets (issue 21): probe accuracy within 0.002 and MC2 within 1e-3 of float32; only a
dtype that meets both may be used for storage.

    python bench/compact_activations.py [--questions 200] [--k 16] [--alpha 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.benchmark import AnswerActivations, inner_split, question_folds
from steerbench.datasets import load_truthfulqa
from steerbench.model import MODEL_HELP
from steerbench.steering.iti import HeadProbes
from steerbench.truthfulqa import mc_scores

DTYPES = (torch.float16, torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=5.0)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    questions = load_truthfulqa(limit=args.questions)
    heads = AnswerActivations(model, questions, cache=False, progress=False)
    t0 = time.perf_counter()
    full = heads.all()
    print(f"{len(questions)} questions, {len(full)} answers: hook_z of every head collected in "
          f"{time.perf_counter() - t0:.0f} s ({full.numel() * 4 / 2**20:.0f} MB in float32); ITI K={args.k}, "
          f"alpha={args.alpha}; prompt instruction+primer; 2-fold CV by question, fit/val split inside the training "
          f"part; nothing chosen on test questions")
    sets = {"float32": full, **{str(d).removeprefix("torch."): full.to(d).float() for d in DTYPES}}
    for name, x in sets.items():
        if name != "float32":
            rel = float((x - full).norm() / full.norm())
            print(f"{name}: relative rounding error of the set {rel:.1e}")
    print(f"{'fold':>4s} {'dtype':>9s} {'acc |d| mean':>12s} {'acc |d| max':>11s} {'same top-K':>10s} "
          f"{'MC1':>7s} {'MC2':>8s} {'MC2 d':>9s}")
    worst = {n: [0.0, 0.0] for n in sets if n != "float32"}
    for f, (train, test) in enumerate(question_folds(len(questions))):
        fit, val = inner_split(train)
        fit_q, val_q = [questions[i] for i in fit], [questions[i] for i in val]
        idx = heads.rows(fit_q + val_q)
        probes = {n: HeadProbes.fit(model, fit_q, val_q, acts=x[idx]) for n, x in sets.items()}
        steers = {n: p.select(args.k, args.alpha) for n, p in probes.items()}
        scores = dict(zip(steers, mc_scores(model, [questions[i] for i in test], list(steers.values()))))
        ref_acc, ref_top = probes["float32"].grid.val_acc, probes["float32"].ranking()[: args.k]
        for n in sets:
            d = (probes[n].grid.val_acc - ref_acc).abs()
            dmc2 = scores[n].mc2 - scores["float32"].mc2
            if n in worst:
                worst[n] = [max(worst[n][0], float(d.max())), max(worst[n][1], abs(dmc2))]
            same = probes[n].ranking()[: args.k] == ref_top
            print(f"{f:4d} {n:>9s} {float(d.mean()):12.5f} {float(d.max()):11.5f} {str(same):>10s} "
                  f"{scores[n].mc1:7.4f} {scores[n].mc2:8.5f} {dmc2:+9.1e}")
    for n, (acc, mc2) in worst.items():
        ok = acc <= 0.002 and mc2 <= 1e-3
        print(f"{n}: worst probe accuracy difference {acc:.4f} (target <= 0.002), worst MC2 difference {mc2:.1e} "
              f"(target <= 1e-3): {'meets both' if ok else 'does NOT meet the targets'}")


if __name__ == "__main__":
    main()
