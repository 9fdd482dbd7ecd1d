"""TruthfulQA MC scoring throughput: batched with shared prompt caches vs naive.

Same run, same questions, same prompt (instruction + 6-shot primer), unsteered and with an
ITI steerer:
- naive: one forward pass of prompt + answer per answer (what a simple loop does);
- batched: ``mc_scores`` — the primer's keys/values computed once for the whole run
  (SharedPrefix), each batch's distinct question prompts once, answers batched on top.
Both must give the same MC2 (checked). Prints answers per second and the ratio.

    python bench/mc_scoring_speed.py [--questions 20] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.evaluation import continuation_logprobs
from steerbench.model import MODEL_HELP
from steerbench.truthfulqa import mc_items, mc_result, mc_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fit-questions", type=int, default=60)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    qs = sb.load_truthfulqa()
    test = qs[-args.questions:]
    iti = sb.HeadProbes.fit(model, qs[:args.fit_questions]).select(16, alpha=15.0)
    prompts, conts = mc_items(model, test)
    n = len(prompts)
    print(f"{len(test)} questions, {n} answers, prompt instruction+primer ({len(prompts[0].ids)}+ tokens)")
    for name, steer in (("unsteered", None), ("ITI K=16 alpha=15", iti)):
        t = time.perf_counter()
        naive = [float(continuation_logprobs(model, [p], [c], steer)[0]) for p, c in zip(prompts, conts)]
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        batched = mc_scores(model, test, [steer], batch_size=args.batch_size)[0]
        t_batched = time.perf_counter() - t
        ref = mc_result(test, naive)
        assert abs(ref.mc2 - batched.mc2) < 1e-4, (ref.mc2, batched.mc2)
        print(f"{name:>20}: naive {n / t_naive:6.1f} answers/s ({t_naive:6.1f} s), batched {n / t_batched:6.1f} "
              f"answers/s ({t_batched:6.1f} s): {t_naive / t_batched:.1f}x; MC2 {batched.mc2:.4f} both")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
