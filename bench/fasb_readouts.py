"""FASB's decision, measured: can a head readout tell false continuations from true ones
while they are being written? (issue 20, part 3's first measures)

For each fold of a 2-fold split of TruthfulQA by question (fit/validation inside the
training part, as the bench does):

1. Today's readout: head probes on ``hook_z`` at the last token of whole answers (the
   bench's "z" set, ``Q: ... A: ...``), the top-K heads by validation accuracy (FASB's K).
2. The same K heads read at *every* token of each reference answer in the context FASB
   reads them in (the instruction + primer prompt, then the answer: MC mode's and
   generation's), collected with the shared prefix run once.
3. Three readouts of those tokens: today's probes (``plain``), today's probes recalibrated
   per answer-position bucket (``calibrated``), and probes trained per bucket on the fit
   answers' tokens (``prefix``); see ``steerbench.steering.readouts``.

Measured on the fold's test answers: ROC-AUC of P(true) between true and false reference
answers at answer tokens 0, 1, 3, 9 and the last; and, at a threshold chosen on the
validation answers (the one that maximizes flagged-false minus flagged-true, flagging an
answer when P(true) falls below it at any of its tokens, as MC mode does), the share of
true and of false test answers flagged and where the first flag falls. Target: false
answers flagged at least twice as often as true ones.

    python bench/fasb_readouts.py [--questions 817] [--k 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import steerbench as sb
from steerbench.benchmark import AnswerActivations, inner_split, question_folds
from steerbench.datasets import load_truthfulqa, qa_examples
from steerbench.memory import peak_resident_bytes
from steerbench.model import MODEL_HELP
from steerbench.steering.iti import HeadProbes
from steerbench.steering.readouts import CalibratedReadout, PlainReadout, PrefixReadout
from steerbench.truthfulqa import mc_items

AT = (0, 1, 3, 9)  # answer tokens at which AUC is reported (and the last)


def tokens_of(acts: dict, heads: torch.Tensor, rows) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """[T, K, d_head] of the K heads at every token of answers ``rows``, with each token's
    answer row and position in the answer."""
    z, row, pos = [], [], []
    for r in rows:
        per = torch.stack([acts[int(L)][r][:, int(h)] for L, h in heads.tolist()], 1)  # [len, K, d]
        z.append(per)
        row += [r] * len(per)
        pos.append(torch.arange(len(per)))
    return torch.cat(z), np.asarray(row), torch.cat(pos)


def flags(p: torch.Tensor, row: np.ndarray, pos: torch.Tensor, thr: float) -> dict[int, int | None]:
    """First flagged answer position per answer row (None: never below ``thr``)."""
    out: dict[int, int | None] = {}
    for r in np.unique(row):
        m = row == r
        low = (p[m] < thr).nonzero().flatten()
        out[int(r)] = int(pos[m][low[0]]) if len(low) else None
    return out


def choose_threshold(p: torch.Tensor, row: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (over a grid of P(true) quantiles) that maximizes the share of false
    answers flagged minus the share of true answers flagged, on these (validation) tokens."""
    best, best_gap = 0.5, -2.0
    # an answer is flagged at threshold t iff its minimum P(true) is below t
    mins = {int(r): float(p[row == r].min()) for r in np.unique(row)}
    rs = np.array(list(mins))
    m, y = np.array([mins[r] for r in rs]), labels[rs]
    for t in np.unique(np.quantile(m, np.linspace(0, 1, 201))):
        gap = float((m[y == 0] < t).mean() - (m[y == 1] < t).mean())
        if gap > best_gap:
            best, best_gap = float(t), gap
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=None, help="first N TruthfulQA questions (default: all 817)")
    ap.add_argument("--k", type=int, default=16, help="FASB's K heads (the bench's default: 16 of 270)")
    args = ap.parse_args()
    t_all = time.perf_counter()
    model = sb.load_model(args.model)
    questions = load_truthfulqa(limit=args.questions)
    labels = np.asarray(qa_examples(questions)[1])
    heads_set = AnswerActivations(model, questions, progress=True)
    folds = []
    for train, test in question_folds(len(questions)):
        fit, val = inner_split(train)
        probes = HeadProbes.fit(model, [questions[i] for i in fit], [questions[i] for i in val],
                                acts=heads_set.of([questions[i] for i in fit + val]))
        folds.append((fit, val, test, probes.select(args.k, 1.0)))
    layers = sorted({int(L) for *_, iti in folds for L in iti.heads[:, 0]})
    prompts, conts = mc_items(model, questions, "instruction+primer")
    seqs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
    spans = [(len(p.ids), len(p.ids) + len(c)) for p, c in zip(prompts, conts)]
    t0 = time.perf_counter()
    hooks = [f"blocks.{L}.attn.hook_z" for L in layers]
    raw = sb.collect(model, seqs, hooks, position="all", spans=spans, progress=True)
    collect_s = time.perf_counter() - t0
    acts = {L: raw[h] for L, h in zip(layers, hooks)}
    n_tok = sum(e - s for s, e in spans)
    print(f"{len(questions)} questions, {len(seqs)} answers, {n_tok} answer tokens; hook_z of {len(layers)} layers at "
          f"every answer token (instruction+primer prompt, prefix shared) in {collect_s:.0f} s; K={args.k}; "
          f"2-fold CV by question, fit/val inside the training part; thresholds chosen on validation answers only")
    table = []
    for f, (fit, val, test, iti) in enumerate(folds):
        rows = {name: heads_set.rows([questions[i] for i in part]).numpy() for name, part in
                (("fit", fit), ("val", val), ("test", test))}
        tok = {name: tokens_of(acts, iti.heads, r) for name, r in rows.items()}
        zf, rf, pf = tok["fit"]
        t1 = time.perf_counter()
        readouts = {
            "plain": PlainReadout(iti.readout),
            "calibrated": CalibratedReadout.fit(iti.readout, zf, labels[rf], pf),
            "prefix": PrefixReadout.fit(iti.heads, zf, labels[rf], pf),
        }
        fit_s = time.perf_counter() - t1
        for name, ro in readouts.items():
            pv = ro.p_true(tok["val"][0], tok["val"][2])
            thr = choose_threshold(pv, tok["val"][1], labels)
            zt, rt, post = tok["test"]
            pt = ro.p_true(zt, post)
            aucs = []
            for at in (*AT, "last"):
                sel = []
                for r in np.unique(rt):
                    m = np.nonzero(rt == r)[0]
                    if at == "last":
                        sel.append(m[-1])
                    elif len(m) > at:
                        sel.append(m[at])
                sel = np.asarray(sel)
                aucs.append(roc_auc_score(labels[rt[sel]], pt[sel].numpy()))
            first = flags(pt, rt, post, thr)
            y = labels[np.array(list(first))]
            flagged = np.array([v is not None for v in first.values()])
            where = [v for v in first.values() if v is not None]
            table.append((f, name, thr, *aucs, flagged[y == 1].mean(), flagged[y == 0].mean(),
                          float(np.mean([w == 0 for w in where])) if where else float("nan"),
                          float(np.median(where)) if where else float("nan")))
        print(f"fold {f}: readouts fitted in {fit_s:.1f} s on {len(pf)} tokens of {len(rows['fit'])} fit answers")
    print(f"{'fold':>4s} {'readout':>10s} {'thr':>6s} " + " ".join(f"{'AUC@' + str(a):>7s}" for a in (*AT, "last"))
          + f" {'flag T':>7s} {'flag F':>7s} {'F/T':>5s} {'@tok0':>6s} {'median':>6s}")
    for f, name, thr, *rest in table:
        aucs, ft, ff, at0, med = rest[:5], *rest[5:]
        print(f"{f:4d} {name:>10s} {thr:6.3f} " + " ".join(f"{a:7.3f}" for a in aucs)
              + f" {ft:7.3f} {ff:7.3f} {ff / max(ft, 1e-9):5.2f} {at0:6.2f} {med:6.1f}")
    print("flag T / F: share of true / false test answers flagged (P(true) below thr at some token); F/T target >= 2; "
          "@tok0: share of flags at the first answer token; median: median position of the first flag")
    print(f"total {time.perf_counter() - t_all:.0f} s; peak resident memory {peak_resident_bytes() / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
