"""FASB's decision, measured: can a head readout tell false continuations from true ones
while they are being written? (issue 20, part 3's first measures)

For each fold of a 2-fold split of TruthfulQA by question (fit/validation inside the
training part, as the bench does):

1. Today's readout: head probes on ``hook_z`` at the last token of whole answers (the
   bench's "z" set, ``Q: ... A: ...``), the top-K heads by validation accuracy (FASB's K).
2. The same K heads read at *every* token of each reference answer in the context FASB
   reads them in (the instruction + primer prompt, then the answer: MC mode's and
   generation's), collected with the shared prefix run once (``sb.answer_tokens``).
3. Three readouts of those tokens: today's probes (``plain``), today's probes recalibrated
   per answer-position bucket (``calibrated``), and probes trained per bucket on the fit
   answers' tokens (``prefix``); see ``steerbench.steering.readouts``.

Measured on the fold's test answers: ROC-AUC of P(true) between true and false reference
answers at answer tokens 0, 1, 3, 9 and the last; and, at a threshold chosen on the
validation answers (``FASB.with_readout``: the one that maximizes flagged-false minus
flagged-true, flagging an answer when P(true) falls below it at any of its tokens, as MC
mode does), the share of
true and of false test answers flagged and where the first flag falls. Target: false
answers flagged at least twice as often as true ones.

    python bench/fasb_readouts.py [--questions 817] [--k 16]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import steerbench as sb
from steerbench.benchmark import AnswerActivations, inner_split, question_folds
from steerbench.datasets import load_truthfulqa
from steerbench.memory import peak_resident_bytes
from steerbench.model import MODEL_HELP
from steerbench.steering.iti import HeadProbes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=None, help="first N TruthfulQA questions (default: all 817)")
    ap.add_argument("--k", type=int, default=16, help="FASB's K heads (the bench's default: 16 of 270)")
    args = ap.parse_args()
    t_all = time.perf_counter()
    model = sb.load_model(args.model)
    questions = load_truthfulqa(limit=args.questions)
    heads_set = AnswerActivations(model, questions, progress=True)
    rows, collect_s, fit_s = [], 0.0, 0.0
    for f, (train, test) in enumerate(question_folds(len(questions))):
        fit, val = inner_split(train)
        part = {"fit": [questions[i] for i in fit], "val": [questions[i] for i in val],
                "test": [questions[i] for i in test]}
        probes = HeadProbes.fit(model, part["fit"], part["val"], acts=heads_set.of(part["fit"] + part["val"]))
        fasb = sb.FASB(probes.select(args.k))
        t0 = time.perf_counter()
        tok = {name: sb.answer_tokens(model, qs, fasb.heads.heads, progress=True) for name, qs in part.items()}
        collect_s += time.perf_counter() - t0
        for name in sb.READOUTS:
            t0 = time.perf_counter()
            readout = fasb.with_readout(name, tok["fit"])  # fitted on the fit answers' tokens
            fit_s += time.perf_counter() - t0
            readout = readout.with_readout(name, val=tok["val"])  # its threshold, on the validation answers'
            test_p = readout.p_true(tok["test"].z, tok["test"].pos)
            rows.append({"fold": f, "readout": name, **sb.decision_table(test_p, tok["test"], readout.threshold)})
        print(f"fold {f}: {len(tok['fit'])} fit / {len(tok['val'])} val / {len(tok['test'])} test answer tokens")
    print(f"{len(questions)} questions; hook_z of FASB's K={args.k} heads at every answer token (instruction+primer "
          f"prompt, prefix shared): {collect_s:.0f} s; fitting the readouts {fit_s:.1f} s in all; 2-fold CV by "
          "question, fit/val inside the training part; thresholds chosen on validation answers only")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).round(3).to_string(index=False))
    print("flag_true / flag_false: share of true / false test answers flagged (P(true) below the threshold at some "
          "token); target false_over_true >= 2; flags_at_token0: share of flags at the first answer token")
    print(f"total {time.perf_counter() - t_all:.0f} s; peak resident memory {peak_resident_bytes() / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
