"""Decode speed: steerbench's loop unsteered vs CAA-steered vs Hugging Face generate.

All in one run, same model, same prompts, greedy, a fixed number of new tokens (EOS
ignored), the configurations interleaved (one repeat of each, then the next repeat), so
a machine that slows down mid-run slows every row alike; each row is the median of the
repeats, with the fastest and slowest printed. Targets: steering costs at most 5% over
the unsteered loop; the unsteered loop is within 10% of Hugging Face ``generate`` on the
same weights and attention implementation (eager). Two references: ``generate`` on the
bridge's own ``hf_model`` (its modules wrapped in place by TransformerLens: what every
pass cost before steerbench ran on the unwrapped modules), and the memory-bandwidth floor
(every weight read once per token, at the bandwidth a large tensor sum reaches here).

    python bench/generation_speed.py [--tokens 48] [--repeats 7] [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steerbench as sb
from steerbench.model import MODEL_HELP, plain_hf_model

PROMPTS = ["How was your weekend?", "What do you think about rainy days?", "Tell me about your favourite food."]


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s a sum over a ``nbytes`` fp32 tensor reads at (best of ``repeats``)."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = sb.load_model(args.model)
    layer = model.layer_at(0.62)  # 18 of SmolLM2's 30 layers
    caa = sb.CAA.fit(model, sb.behavior("tone")[:16], read="answer", layer=layer, unit="resid", strength=0.4)
    prompts = [model.prompt(p) for p in PROMPTS]
    n_tok = args.tokens * len(prompts)

    def ours(steer):
        def run():
            for p in prompts:
                g = sb.generate(model, p, steer=steer, max_new_tokens=args.tokens, stop_at_eos=False, stop=())
                assert len(g.tokens) == args.tokens
        return run

    def hf_generate(hf):
        def run():
            with torch.no_grad():
                for p in prompts:
                    out = hf.generate(torch.tensor([p.ids]), max_new_tokens=args.tokens,
                                      min_new_tokens=args.tokens, do_sample=False, pad_token_id=model.pad_id)
                    assert out.shape[1] == len(p) + args.tokens
        return run

    hf = plain_hf_model(args.model)
    # the same attention as the runner: eager, with the grouped heads stacked (bit-identical to
    # Hugging Face's eager, without repeat_kv's copies; steerbench.runner.grouped_eager_attention)
    hf.set_attn_implementation(model.runner.config._attn_implementation)
    assert hf.config._attn_implementation == model.runner.config._attn_implementation
    rows = {
        "steerbench, unsteered": ours(None),
        f"steerbench, CAA steered (layer {layer}, s=0.4 resid)": ours(caa),
        "Hugging Face generate (eager, no bridge)": hf_generate(hf),
        "HF generate on the bridge's wrapped modules": hf_generate(model.hf_model),
    }
    for fn in rows.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    bw = read_bandwidth()
    floor = weights / bw
    base = med["steerbench, unsteered"]
    print(f"{model.name}: {n_tok} new tokens per run ({len(prompts)} prompts x {args.tokens}); "
          f"median of {args.repeats} interleaved repeats [fastest, slowest]")
    print(f"{'':52s} {'tokens/s':>9s} {'spread':>15s} {'time vs unsteered':>18s}")
    for name, v in times.items():
        print(f"{name:52s} {n_tok / med[name]:9.1f} [{n_tok / max(v):5.1f}, {n_tok / min(v):5.1f}] "
              f"{med[name] / base:17.3f}x")
    print(f"memory-bandwidth floor: {weights / 1e6:.0f} MB of weights at {bw / 1e9:.1f} GB/s = "
          f"{1000 * floor:.1f} ms/token = {1 / floor:.1f} tokens/s")
    hf_med = med["Hugging Face generate (eager, no bridge)"]
    print(f"steering overhead: {100 * (med[list(rows)[1]] / base - 1):+.1f}% (target <= +5%)")
    print(f"unsteered loop vs HF generate: {base / hf_med:.3f}x the time (target <= 1.10x)")
    print(f"HF generate, wrapped vs unwrapped modules: {med[list(rows)[3]] / hf_med:.3f}x the time")
    print(f"unsteered loop vs the bandwidth floor: {base / n_tok / floor:.2f}x")


if __name__ == "__main__":
    main()
