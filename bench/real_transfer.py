"""Transfer: heads and directions fitted on TruthfulQA, scored on the embedded
misconceptions set (78 questions, no question shared with TruthfulQA) without refitting.

ITI's probes and REAL's relevance are fitted once on all 817 TruthfulQA questions (ITI's
80/20 fit/validation split by question inside them, seed 42). Each method steers at a
setting chosen on TruthfulQA validation questions in the cross-validated bench
(``steerbench bench --methods iti real real-probe``), passed as ``--iti K,ALPHA`` and so on;
the misconceptions set is never used to choose anything. Prints MC1/MC2/MC3 under the
instruction + primer prompt, the top-K overlap between the methods' heads, and the times.

    python bench/real_transfer.py [--iti 8,5] [--real 16,5] [--real-probe 16,5]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.benchmark import AnswerActivations
from steerbench.model import MODEL_HELP
from steerbench.steering.real import SCORERS
from steerbench.truthfulqa import mc_scores


def setting(text: str) -> tuple[int, float]:
    k, alpha = text.split(",")
    return int(k), float(alpha)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--iti", type=setting, default=(8, 5.0), help="K,alpha")
    ap.add_argument("--real", type=setting, default=(16, 5.0), help="K,alpha (GRU scorer)")
    ap.add_argument("--real-probe", type=setting, default=(16, 5.0), help="K,alpha (probe scorer)")
    ap.add_argument("--prompt", default="instruction+primer")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = sb.load_model(args.model)
    train = sb.load_truthfulqa()
    target = sb.load_truthfulqa("misconceptions")
    acts = AnswerActivations(model, train).all()
    t0 = time.perf_counter()
    probes = sb.HeadProbes.fit(model, train, acts=acts)
    iti_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rel = sb.HeadRelevance.fit(model, train, acts=acts, probes=probes, scorers=SCORERS)  # trains with gradients on by itself
    real_s = time.perf_counter() - t0
    steers = {"ITI": probes.select(*args.iti), "REAL (GRU)": rel.select(*args.real, scorer="gru"),
              "REAL (probe)": rel.select(*args.real_probe, scorer="probe")}
    print(f"fitted on {len(train)} TruthfulQA questions ({acts.shape[0]} answers): ITI probes {iti_s:.1f} s, "
          f"REAL {real_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in rel.seconds.items())})")
    t0 = time.perf_counter()
    res = mc_scores(model, target, [None, *steers.values()], prompt=args.prompt)
    print(f"scored {len(target)} misconceptions questions in {time.perf_counter() - t0:.0f} s, prompt {args.prompt!r}; "
          "settings chosen on TruthfulQA validation, none on this set")
    print(f"{'method':>14}  {'setting':>16}  MC1    MC2    MC3")
    for name, steer, r in zip(["unsteered", *steers], [None, *steers.values()], res):
        what = f"K={steer.k} alpha={steer.strength:g}" if steer is not None else "-"
        print(f"{name:>14}  {what:>16}  {r.mc1:.3f}  {r.mc2:.3f}  {r.mc3:.3f}")
    for scorer in rel.scorers:
        k = steers["REAL (GRU)" if scorer == "gru" else "REAL (probe)"].k
        print(f"REAL {scorer} top-{k} heads shared with ITI's top-{k}: {rel.overlap(k, scorer):.2f}; "
              f"Spearman over all heads {rel.rank_correlation(scorer):+.3f}")


if __name__ == "__main__":
    main()
