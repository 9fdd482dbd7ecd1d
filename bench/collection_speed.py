"""Activation collection: batched (left padding) vs one text at a time, examples per second,
against two references measured in the same run.

Collects the residual stream after every layer at the last token, in one run, for long
(chat-formatted question + answer, as CAA reads them) and short (bare question) texts.
Target: batched at least 4x faster. References: an unwrapped Hugging Face forward of the
decoder (no lm_head) over the same left-padded batches, and the FLOP floor: the forward
FLOPs of the texts' real tokens (2 x non-embedding parameters per token, plus causal
attention) at the rate a ``torch.mm`` of the model's shapes reaches here.

    python bench/collection_speed.py [--n 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.model import MODEL_HELP, plain_hf_model
from steerbench.passes import Batch, length_batches
from steerbench.steering.caa import caa_inputs


def rate(model, inputs, hooks, batch_size) -> float:
    sb.collect(model, inputs[:2], hooks, batch_size=batch_size, progress=False)  # warm-up
    t = time.perf_counter()
    sb.collect(model, inputs, hooks, batch_size=batch_size, progress=False)
    return len(inputs) / (time.perf_counter() - t)


def hf_rate(model, hf, seqs, batch_size) -> float:
    """Texts per second of the plain decoder over the batches ``collect`` makes."""
    batches = [Batch.pad([seqs[i] for i in idx], model.pad_id, model.device)
               for idx in length_batches([len(s) for s in seqs], batch_size)]
    with torch.no_grad():
        hf.model(input_ids=batches[0].ids[:1, -4:])  # warm-up
        t = time.perf_counter()
        for b in batches:
            hf.model(input_ids=b.ids, attention_mask=b.attention_mask, position_ids=b.positions.clamp(min=0))
    return len(seqs) / (time.perf_counter() - t)


def mm_rate(d: int, ff: int, rows: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a [rows, d] x [d, ff] matmul (best of ``repeats``)."""
    a, b = torch.randn(rows, d), torch.randn(d, ff)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * d * ff / best


def flops(model, hf, seqs) -> float:
    """Forward FLOPs of ``seqs``' real tokens: the weight matmuls and causal attention."""
    embed = hf.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in hf.model.parameters()) - embed
    attn = sum(2 * model.n_layers * len(s) * len(s) * model.n_heads * model.d_head for s in seqs)  # QK^T and AV, half
    return sum(2 * params * len(s) for s in seqs) + attn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model = sb.load_model(args.model)
    items = sb.behavior("tone")
    hooks = [f"blocks.{L}.hook_resid_post" for L in range(model.n_layers)]
    long_inputs, _ = caa_inputs(model, items[: args.n // 2], "answer")
    short_inputs = [it.stem for it in items[: args.n]]
    hf = plain_hf_model(args.model)
    peak = mm_rate(model.d_model, int(getattr(model.cfg, "d_mlp", 0) or 4 * model.d_model))
    print(f"{args.n} examples, all {model.n_layers} layers' resid_post at the last token; torch.mm at "
          f"{peak / 1e9:.0f} GFLOP/s; batches of {args.batch_size}")
    print(f"{'texts':30s} {'tokens':>6s} {'one/s':>7s} {'batched/s':>9s} {'speed-up':>8s} {'HF fwd/s':>8s} "
          f"{'vs HF':>6s} {'floor/s':>8s} {'vs floor':>8s}")
    for name, inputs in (("chat question + answer (CAA)", long_inputs), ("bare question", short_inputs)):
        seqs = [model.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        mean_len = sum(len(s) for s in seqs) / len(seqs)
        one = rate(model, inputs, hooks, 1)
        many = rate(model, inputs, hooks, args.batch_size)
        ref = hf_rate(model, hf, seqs, args.batch_size)
        floor = len(seqs) / (flops(model, hf, seqs) / peak)
        print(f"{name:30s} {mean_len:6.1f} {one:7.2f} {many:9.2f} {many / one:7.2f}x {ref:8.2f} {ref / many:5.2f}x "
              f"{floor:8.1f} {floor / many:7.2f}x")
    print("vs HF: batched collect's time over the unwrapped forward's (target <= 1.5x); vs floor: over the FLOP floor")


if __name__ == "__main__":
    main()
