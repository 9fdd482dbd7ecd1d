"""Scoring A/B behaviour items under any Steerer.

Two readouts:
- ``letter`` (the CAA reference): prompt = chat(question with choices) + "(", score =
  P(matching letter) / (P(A) + P(B)) at the next token, averaged over items.
- ``likelihood``: the summed log-probability of each answer's own text after the chat-
  formatted question stem (as TruthfulQA MC scoring does); reports the matching answer's
  win rate (its log-probability is the higher of the two) and the mean margin
  log p(matching) - log p(non-matching).

Both are batched with left padding, and steering applies from the end of the user
instruction on, answer tokens included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from steerbench.datasets import ABItem
from steerbench.generation import forward_batch
from steerbench.model import Model, Prompt
from steerbench.steerer import Steerer


def _batches(n: int, size: int) -> Iterable[range]:
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def continuation_logprobs(
    model: Model,
    prompts: Sequence[Prompt],
    continuations: Sequence[Sequence[int]],
    steer: Steerer | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Summed log-probability of each continuation after its prompt, steered from ``prompt.steer_from``."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    out = torch.empty(len(prompts), dtype=torch.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
    for chunk in tqdm(list(_batches(len(order), batch_size)), disable=not progress, leave=False):
        idx = [order[i] for i in chunk]
        seqs = [list(prompts[i].ids) + list(continuations[i]) for i in idx]
        logits, batch = forward_batch(model, seqs, steer, [prompts[i].steer_from for i in idx])
        for row, i in enumerate(idx):
            n_p, n_c = len(prompts[i]), len(continuations[i])
            start = batch.offsets[row] + n_p - 1  # logits at the last prompt token predict the first answer token
            lp = torch.log_softmax(logits[row, start : start + n_c].float(), dim=-1)
            target = torch.as_tensor(list(continuations[i]), device=lp.device)
            out[i] = lp.gather(-1, target[:, None]).sum().double().cpu()
    return out


def _letter_ids(model: Model, letters: Iterable[str]) -> dict[str, int]:
    base = model.encode("(", bos=False)
    ids = {}
    for letter in letters:
        full = model.encode(f"({letter}", bos=False)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"the tokenizer does not split '({letter}' into '(' + '{letter}'; the letter readout needs it")
        ids[letter] = full[-1]
    return ids


def letter_scores(
    model: Model,
    items: Sequence[ABItem],
    steer: Steerer | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Per item: P(matching letter) / (P(matching) + P(non-matching)) after "("."""
    if not items:
        raise ValueError("no items to score")
    letter_id = _letter_ids(model, {x for it in items for x in (it.matching, it.not_matching)})
    prompts = [model.prompt(it.question, answer_prefix="(", system=system) for it in items]
    out = torch.empty(len(items), dtype=torch.float64)
    for chunk in _batches(len(items), batch_size):
        idx = list(chunk)
        logits, _ = forward_batch(model, [prompts[i].ids for i in idx], steer, [prompts[i].steer_from for i in idx])
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        for row, i in enumerate(idx):
            pm = probs[row, letter_id[items[i].matching]]
            pn = probs[row, letter_id[items[i].not_matching]]
            out[i] = float(pm / (pm + pn))
    return out


def likelihood_margins(
    model: Model,
    items: Sequence[ABItem],
    steer: Steerer | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Per item: log p(matching answer text) - log p(non-matching answer text) after the stem."""
    if not items:
        raise ValueError("no items to score")
    prompts, conts = [], []
    for it in items:
        p = model.prompt(it.stem, system=system)
        for text in (it.matching_text, it.not_matching_text):
            prompts.append(p)
            conts.append(model.encode(text, bos=False))
    lp = continuation_logprobs(model, prompts, conts, steer, batch_size)
    return lp[0::2] - lp[1::2]


@dataclass
class ABScore:
    """A/B readouts of one steering configuration."""

    letter: float | None = None  # mean P(matching letter) / (P(A) + P(B))
    win_rate: float | None = None  # share of items whose matching answer text is likelier
    margin: float | None = None  # mean log p(matching) - log p(non-matching), nats
    n: int = 0

    def as_dict(self) -> dict:
        return {"letter": self.letter, "win_rate": self.win_rate, "margin": self.margin, "n": self.n}


READOUTS = ("letter", "likelihood")


def ab_score(
    model: Model,
    items: Sequence[ABItem],
    steer: Steerer | None = None,
    readouts: Sequence[str] = READOUTS,
    batch_size: int = 16,
    system: str | None = None,
) -> ABScore:
    """Both A/B readouts (or the ones named) for ``steer`` on ``items``."""
    bad = [r for r in readouts if r not in READOUTS]
    if bad:
        raise ValueError(f"unknown readout(s) {bad}; choose from {READOUTS}")
    score = ABScore(n=len(items))
    if "letter" in readouts:
        score.letter = float(letter_scores(model, items, steer, batch_size, system).mean())
    if "likelihood" in readouts:
        m = likelihood_margins(model, items, steer, batch_size, system)
        score.win_rate = float((m > 0).double().mean())
        score.margin = float(m.mean())
    return score


def ab_sweep(
    model: Model,
    make: Callable[[int, float], Steerer],
    items: Sequence[ABItem],
    layers: Sequence[int],
    multipliers: Sequence[float],
    readouts: Sequence[str] = READOUTS,
    batch_size: int = 16,
    progress: bool = True,
):
    """A/B scores over a layer x multiplier grid, as a tidy pandas DataFrame.

    ``make(layer, multiplier)`` returns the Steerer to score. Multiplier 0 is unsteered
    whatever the layer, so it is scored once and repeated for each layer.
    """
    import pandas as pd

    rows = []
    base = None
    grid = [(L, m) for L in layers for m in multipliers]
    for layer, mult in tqdm(grid, desc="sweep", disable=not progress, leave=False):
        if mult == 0:
            if base is None:
                base = ab_score(model, items, None, readouts, batch_size)
            s = base
        else:
            s = ab_score(model, items, make(layer, mult), readouts, batch_size)
        rows.append({"layer": layer, "multiplier": mult, **s.as_dict()})
    return pd.DataFrame(rows)
