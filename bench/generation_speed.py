"""Generation throughput: steerbench's loop unsteered vs CAA-steered vs Hugging Face generate.

All in one run, same model, same prompts, greedy, a fixed number of new tokens (EOS
ignored). Targets: steering costs at most 5% over the unsteered loop; the unsteered loop
is within 10% of Hugging Face ``generate`` on the same (eager-attention) model.

    python bench/generation_speed.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steerbench as sb
from steerbench.model import MODEL_HELP, plain_hf_model

PROMPTS = ["How was your weekend?", "What do you think about rainy days?", "Tell me about your favourite food."]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = sb.load_model(args.model)
    layer = model.layer_at(0.62)  # 18 of SmolLM2's 30 layers
    caa = sb.CAA.fit(model, sb.behavior("tone")[:16], read="answer", layer=layer, strength=4.0)
    prompts = [model.prompt(p) for p in PROMPTS]
    n_tok = args.tokens * len(prompts)

    def ours(steer):
        def run():
            for p in prompts:
                g = sb.generate(model, p, steer=steer, max_new_tokens=args.tokens, stop_at_eos=False, stop=())
                assert len(g.tokens) == args.tokens
        return run

    hf = plain_hf_model(args.model)

    def hf_generate():
        with torch.no_grad():
            for p in prompts:
                out = hf.generate(torch.tensor([p.ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                  do_sample=False, pad_token_id=model.pad_id)
                assert out.shape[1] == len(p) + args.tokens

    rows = [
        ("steerbench, unsteered", timed(ours(None), args.repeats)),
        (f"steerbench, CAA steered (layer {layer}, m=4)", timed(ours(caa), args.repeats)),
        ("Hugging Face generate (eager, no bridge)", timed(hf_generate, args.repeats)),
    ]
    base = rows[0][1]
    print(f"{n_tok} new tokens per run ({len(prompts)} prompts x {args.tokens}), median of {args.repeats}")
    print(f"{'':44s} {'tokens/s':>9s} {'time vs unsteered':>18s}")
    for name, sec in rows:
        print(f"{name:44s} {n_tok / sec:9.1f} {sec / base:17.3f}x")
    print(f"steering overhead: {100 * (rows[1][1] / base - 1):+.1f}% (target <= +5%)")
    print(f"unsteered loop vs HF generate: {100 * (base / rows[2][1] - 1):+.1f}% time (target within 10%)")


if __name__ == "__main__":
    main()
