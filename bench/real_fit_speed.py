"""REAL's fit against ITI's probe fit on the same head activations, same run.

The training questions of one fold (5-fold split of TruthfulQA by question: about 4,700
answers), ITI's 80/20 fit/validation split inside them. Collection is excluded (the head
activations are read once, cached on disk). Prints the seconds of each stage of REAL's fit
(the 270 autoencoders, encoding, each relevance scorer) against ITI's ``HeadProbes.fit``,
then checks that a few heads trained alone get the relevance they get in the batch, and
how REAL's ranking relates to ITI's (Spearman over all heads, top-K overlap).

    python bench/real_fit_speed.py [--folds 5] [--alone 3] [--k 16] [--csv bench/results/real_relevance.csv]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

import steerbench as sb
from steerbench.benchmark import AnswerActivations, inner_split, question_folds
from steerbench.model import MODEL_HELP
from steerbench.steering.real import SCORERS, HeadRelevance, module_relevance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--folds", type=int, default=5, help="the fit uses the training questions of fold 0 of this many")
    ap.add_argument("--alone", type=int, default=3, help="heads retrained alone to compare with the batch")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--csv", default="")
    args = ap.parse_args()
    model = sb.load_model(args.model)
    questions = sb.load_truthfulqa()
    train, _ = question_folds(len(questions), args.folds, 42)[0]
    fit_idx, val_idx = inner_split(train)
    fit_q, val_q = [questions[i] for i in fit_idx], [questions[i] for i in val_idx]
    store = AnswerActivations(model, questions)
    t0 = time.perf_counter()
    acts = store.of(fit_q + val_q)
    print(f"{model.name}: {model.n_layers} x {model.n_heads} heads, d_head {model.d_head}; {len(train)} questions, "
          f"{acts.shape[0]} answers ({len(fit_q)} fit / {len(val_q)} validation questions); "
          f"activations {'read from disk' if not store.seconds else 'collected'} in {time.perf_counter() - t0:.0f} s; "
          f"{torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    probes = sb.HeadProbes.fit(model, fit_q, val_q, acts=acts)
    iti_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rel = HeadRelevance.fit(model, fit_q, val_q, acts=acts, probes=probes, scorers=SCORERS)
    real_s = time.perf_counter() - t0
    print(f"ITI probes (270 logistic regressions):   {iti_s:6.1f} s")
    for stage, s in rel.seconds.items():
        print(f"REAL {stage:<35} {s:6.1f} s")
    gru_total = real_s - rel.seconds["probe"]
    probe_total = real_s - rel.seconds["gru"]
    print(f"REAL fit, GRU scorer:                    {gru_total:6.1f} s  ({gru_total / iti_s:.1f}x ITI)")
    print(f"REAL fit, probe scorer:                  {probe_total:6.1f} s  ({probe_total / iti_s:.1f}x ITI)")
    print(f"codebook perplexity (of {rel.settings['codebook']}): median {rel.perplexity.median():.1f}, "
          f"min {rel.perplexity.min():.1f}; reconstruction MSE median {rel.recon.median():.3f}")

    for scorer in rel.scorers:
        r = rel.relevance[scorer]
        print(f"{scorer:>5}: AUC max {r.max():.3f} median {r.median():.3f}; Spearman with ITI val acc "
              f"{rel.rank_correlation(scorer):+.3f}; top-{args.k} overlap with ITI {rel.overlap(args.k, scorer):.2f}; "
              f"top 5 {rel.ranking(scorer)[:5]}")
    print(f"ITI top 5 {probes.ranking()[:5]}")

    if args.alone:
        H = model.n_heads
        heads = rel.ranking("probe")[:1] + rel.ranking("probe")[-1:] + rel.ranking("gru")[: max(0, args.alone - 2)]
        flat = acts.reshape(acts.shape[0], model.n_layers * H, -1)
        _, labels, _ = sb.qa_examples(fit_q + val_q, "Q: {question} A: {answer}")
        for layer, h in heads:
            m = layer * H + h
            alone, _, _, _ = module_relevance(flat[:, [m]], torch.tensor(labels), probes.grid.train_idx,
                                           probes.grid.val_idx, seed=42, module_ids=[m])
            print(f"head L{layer}.{h} alone vs batched: " + ", ".join(
                f"{s} {float(alone[s][0]):.4f} vs {float(rel.relevance[s][layer, h]):.4f}" for s in rel.scorers))
    if args.csv:
        g = probes.grid
        pd.DataFrame([{"layer": L, "head": h, "iti_val_acc": float(g.val_acc[L, h]),
                       **{f"real_{s}": float(rel.relevance[s][L, h]) for s in rel.scorers},
                       "perplexity": float(rel.perplexity[L, h]), "recon": float(rel.recon[L, h])}
                      for L in range(model.n_layers) for h in range(model.n_heads)]).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
