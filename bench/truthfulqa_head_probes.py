"""Per-head probe accuracy on TruthfulQA for the default model, and probe fitting speed.

Reads every head's z at the last token of "Q: {question} A: {answer}" for all true and
false answers of the 817 questions, fits one logistic probe per head (validation split by
question), prints the best heads, and writes bench/results/truthfulqa_head_probes.csv.
Then times fitting all head probes on ~1,000 of those examples: batched torch vs a
scikit-learn loop, in the same run.

    python bench/truthfulqa_head_probes.py [--limit 817]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import steerbench as sb
from steerbench.model import MODEL_HELP
from steerbench.probes import fit_probes

OUT = Path(__file__).parent / "results" / "truthfulqa_head_probes.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    questions = sb.load_truthfulqa(limit=args.limit)
    texts, labels, groups = sb.qa_examples(questions)
    t = time.perf_counter()
    acts = sb.collect_heads(model, texts, batch_size=32)
    print(f"collected z of {model.n_layers * model.n_heads} heads for {len(texts)} answers "
          f"({len(questions)} questions) in {time.perf_counter() - t:.0f}s")
    grid = fit_probes(acts, labels, groups)
    df = grid.to_frame().sort_values(["val_acc", "val_auc"], ascending=False)
    df.to_csv(OUT, index=False)
    share = float(np.mean(labels))
    print(f"{len(grid.val_idx)} validation answers of {len(set(np.asarray(groups)[grid.val_idx]))} questions; "
          f"majority-class accuracy {max(share, 1 - share):.3f}")
    print("best heads (layer, head): val_acc, val_auc")
    print(df.head(10).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"median head val_acc {df.val_acc.median():.3f}")

    # fitting speed on ~1,000 examples: whole questions, so the split stays by question
    keep = np.arange(min(1000, len(texts)))  # texts are ordered by question
    sub_acts, sub_labels, sub_groups = acts[keep], np.asarray(labels)[keep], np.asarray(groups)[keep]
    timings = {}
    for backend in ("torch", "sklearn"):
        t = time.perf_counter()
        g = fit_probes(sub_acts, sub_labels, sub_groups, backend=backend)
        timings[backend] = (time.perf_counter() - t, g)
    (tt, gt), (ts, gs) = timings["torch"], timings["sklearn"]
    diff = float((gt.val_acc - gs.val_acc).abs().max())
    print(f"fit 270 head probes on {len(keep)} examples: torch {tt:.2f}s, sklearn loop {ts:.2f}s "
          f"({ts / tt:.1f}x); largest val_acc difference {diff:.3f}")


if __name__ == "__main__":
    main()
