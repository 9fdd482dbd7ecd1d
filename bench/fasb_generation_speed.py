"""FASB generation time: against unsteered generation and a reference-style loop.

Same run, same questions (TruthfulQA instruction + primer prompt), greedy, a fixed number
of new tokens (EOS ignored), threshold 1 so that FASB always backtracks once (the
expensive case), at 50 and 200 new tokens:
- unsteered: steerbench's loop with a KV cache;
- FASB: the same loop, probes read at every token, rollback crops the cache;
- reference-style: FASB recomputing the whole sequence every step with no cache,
  steering only the newest position (as the reference implementation does).
Target: FASB at most 1.5x the unsteered time, rollback included.
Last, one-line answers as ``steerbench bench --generate`` writes them, with the
instruction + primer's keys and values computed once (SharedPrefix) vs for every question.

    python bench/fasb_generation_speed.py [--questions 2] [--tokens 50 200] [--reference-tokens 50]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.model import MODEL_HELP, Prompt
from steerbench.truthfulqa import PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--reference-tokens", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--answers", type=int, default=10, help="questions for the shared-primer comparison")
    args = ap.parse_args()
    model = sb.load_model(args.model)
    qs = sb.load_truthfulqa()
    fasb = sb.FASB.from_probes(sb.HeadProbes.fit(model, qs[:60]), k=16, strength=15.0, threshold=1.0, backtrack=10)
    prompts = []
    for q in qs[-args.questions:]:
        ids = model.encode(PROMPTS["instruction+primer"].format(question=q.question))
        prompts.append(Prompt(ids, steer_from=len(ids) - 1))
    print(f"{len(prompts)} questions, prompt {len(prompts[0].ids)}+ tokens; FASB K=16, always backtracks 10 once")

    def run(steer, n, **kw) -> float:
        t = time.perf_counter()
        for p in prompts:
            g = sb.generate(model, p, steer=steer, max_new_tokens=n, stop_at_eos=False, **kw)
            assert len(g.tokens) == n
        return time.perf_counter() - t

    run(None, 4)  # warm-up
    for n in args.tokens:
        base = run(None, n)
        ours = run(fasb, n)
        line = f"{n:4d} new tokens: unsteered {base:6.1f} s, FASB {ours:6.1f} s ({ours / base:.2f}x)"
        if n in args.reference_tokens:
            ref = run(sb.FASB(fasb.heads, 15.0, 1.0, 10, newest_only=True), n, use_cache=False)
            line += f", reference-style no cache {ref:7.1f} s ({ref / ours:.1f}x FASB)"
        print(line, flush=True)

    from steerbench.passes import SharedPrefix

    ids = [model.encode(PROMPTS["instruction+primer"].format(question=q.question)) for q in qs[-args.answers:]]
    for steer, name in ((None, "unsteered"), (sb.FASB(fasb.heads, 15.0, 0.6, 10), "FASB threshold 0.6")):
        times, texts = {}, {}
        for shared in (False, True):
            t = time.perf_counter()
            head = SharedPrefix.of(model, ids, limit=min(map(len, ids)) - 1) if shared else None
            texts[shared] = [sb.generate(model, Prompt(x, steer_from=len(x) - 1), steer=steer, max_new_tokens=50,
                                         stop=("\n",), prefix=head).text for x in ids]
            times[shared] = time.perf_counter() - t
        assert texts[True] == texts[False]
        print(f"{len(ids)} one-line answers, {name}: prompt each time {times[False]:.1f} s, shared primer "
              f"{times[True]:.1f} s ({times[False] / times[True]:.2f}x, same answers)", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
