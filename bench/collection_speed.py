"""Activation collection: batched (left padding) vs one text at a time, examples per second,
against two references measured in the same run.

Collects the residual stream after every layer, in one run, for three kinds of text: chat
question + answer (as CAA reads them) and bare questions at the last token, and TruthfulQA
answers after the bench's instruction + primer prompt, averaged over the answer's tokens
(what the bench's "resid" activations are). Every text of a kind starts with the same
tokens (the chat template's system turn, the instruction and primer): batched collection
runs that prefix once; "no share" is the same batches with each text run whole.
Target: batched at least 4x faster than one at a time. References: an unwrapped Hugging
Face forward of the decoder (no lm_head) over the same left-padded whole texts, and the
FLOP floor: the forward FLOPs of the distinct tokens (the shared prefix counted once;
2 x non-embedding parameters per token, plus causal attention) at the rate a ``torch.mm``
of the model's shapes reaches here.

    python bench/collection_speed.py [--n 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import steerbench as sb
from steerbench.datasets import load_truthfulqa
from steerbench.model import MODEL_HELP, plain_hf_model
from steerbench.passes import Batch, SharedPrefix, length_batches
from steerbench.steering.caa import caa_inputs
from steerbench.truthfulqa import mc_items


def rate(model, inputs, hooks, batch_size, **kw) -> float:
    warm = {k: (v[:2] if k == "spans" else v) for k, v in kw.items()}
    sb.collect(model, inputs[:2], hooks, batch_size=batch_size, progress=False, **warm)  # warm-up
    t = time.perf_counter()
    sb.collect(model, inputs, hooks, batch_size=batch_size, progress=False, **kw)
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


def flops(model, hf, seqs, shared: int = 0) -> float:
    """Forward FLOPs of ``seqs``' distinct tokens: the weight matmuls and causal attention
    (the first ``shared`` tokens, common to all, counted once)."""
    embed = hf.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in hf.model.parameters()) - embed

    def attn(n: int, before: int = 0) -> float:  # QK^T and AV of n queries over before + (causal) n keys
        return 4 * model.n_layers * n * (before + n / 2) * model.n_heads * model.d_head

    tails = sum(2 * params * (len(s) - shared) + attn(len(s) - shared, shared) for s in seqs)
    return tails + 2 * params * shared + attn(shared)


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
    questions, answers = [], 0
    for q in load_truthfulqa():  # whole questions, up to n answers
        if answers >= args.n:
            break
        questions.append(q)
        answers += len(q.correct) + len(q.incorrect)
    prompts, conts = mc_items(model, questions, "instruction+primer")
    tqa_inputs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
    tqa_spans = [(len(p.ids), len(p.ids) + len(c)) for p, c in zip(prompts, conts)]
    hf = plain_hf_model(args.model)
    peak = mm_rate(model.d_model, int(getattr(model.cfg, "d_mlp", 0) or 4 * model.d_model))
    print(f"all {model.n_layers} layers' resid_post; torch.mm at {peak / 1e9:.0f} GFLOP/s; batches of {args.batch_size}")
    print(f"{'texts':34s} {'n':>4s} {'tokens':>6s} {'shared':>6s} {'one/s':>7s} {'no share/s':>10s} {'batched/s':>9s} "
          f"{'speed-up':>8s} {'HF fwd/s':>8s} {'vs HF':>6s} {'floor/s':>8s} {'vs floor':>8s}")
    workloads = (("chat question + answer (CAA), last", long_inputs, {}),
                 ("bare question, last", short_inputs, {}),
                 ("TruthfulQA instr+primer+answer, mean", tqa_inputs, {"position": "mean", "spans": tqa_spans}))
    for name, inputs, kw in workloads:
        seqs = [model.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        mean_len = sum(len(s) for s in seqs) / len(seqs)
        limit = min(s for s, _ in kw["spans"]) if "spans" in kw else min(len(s) for s in seqs) - 1
        shared = SharedPrefix.common_length(seqs, limit)
        if shared < sb.activations.MIN_SHARED_PREFIX:
            shared = 0
        one = rate(model, inputs, hooks, 1, share_prefix=False, **kw)
        whole = rate(model, inputs, hooks, args.batch_size, share_prefix=False, **kw)
        many = rate(model, inputs, hooks, args.batch_size, **kw)
        ref = hf_rate(model, hf, seqs, args.batch_size)
        floor = len(seqs) / (flops(model, hf, seqs, shared) / peak)
        print(f"{name:34s} {len(seqs):4d} {mean_len:6.1f} {shared:6d} {one:7.2f} {whole:10.2f} {many:9.2f} "
              f"{many / one:7.2f}x {ref:8.2f} {ref / many:5.2f}x {floor:8.1f} {floor / many:7.2f}x")
    print("speed-up: batched (prefix shared) over one at a time (whole texts); vs HF: batched collect's time over "
          "the unwrapped forward's of whole texts (target <= 1.5x); vs floor: over the FLOP floor of distinct tokens")


if __name__ == "__main__":
    main()
