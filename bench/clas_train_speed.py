"""One CLAS training run on 10 + 10 examples: time and peak memory, against the plain
forward passes it is made of, same run.

For each set (COPA: short sentences; tone: chat prompts; BoolQ: passages of a few hundred
tokens) the 10 training and 10 validation examples of draw 0 of ``--few-label 10``. Prints
per set: the training time of CLAS (8 epochs: 8 optimizer steps over the 10 training
examples, 9 validation passes), of LoRA rank 1, the time of one unsteered forward pass
over the 20 examples (the floor a pass costs), their ratio, and the process's peak
resident memory after the set (``ru_maxrss``; it only grows, so the sets run short to long).

    python bench/clas_train_speed.py [--sets copa tone boolq]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import steerbench as sb
from steerbench.benchmark import AnswerActivations, FitData, clas_data, few_label_splits
from steerbench.datasets import mc_set
from steerbench.model import MODEL_HELP
from steerbench.steering.clas import CLAS, LoRA, example_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--sets", nargs="+", default=["copa", "tone", "boolq"])
    args = ap.parse_args()
    model = sb.load_model(args.model)
    print(f"{model}; torch threads {torch.get_num_threads()}")
    print(f"{'set':>8} {'tokens/ex':>9} {'forward s':>9} {'CLAS s':>7} {'x fwd':>6} {'LoRA s':>7} {'x fwd':>6} "
          f"{'peak RSS GB':>11}")
    for name in args.sets:
        qs = sb.load_mc(name, limit=400 if name == "boolq" else None)
        spec = mc_set(name)
        fit, val, _ = few_label_splits(len(qs), 10, 10, 1, seed=42)[0]
        data = FitData(model, [qs[i] for i in fit], [qs[i] for i in val], AnswerActivations(model, qs, spec.features),
                       prompt=spec.prompt)
        train_set, val_set, vectors = clas_data(data)
        n_tok = sum(len(e.prompt) + len(e.target) for e in train_set + val_set) / 20
        t0 = time.perf_counter()
        with torch.no_grad():
            example_nll(model, None, train_set + val_set)
        fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        CLAS.fit(model, train_set, val_set, vectors)
        t_clas = time.perf_counter() - t0
        t0 = time.perf_counter()
        LoRA.fit(model, train_set, val_set)
        t_lora = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{name:>8} {n_tok:9.0f} {fwd:9.2f} {t_clas:7.1f} {t_clas / fwd:6.1f} {t_lora:7.1f} {t_lora / fwd:6.1f} "
              f"{rss:11.2f}")


if __name__ == "__main__":
    main()
