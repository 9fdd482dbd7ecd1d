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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm  # text, not a widget: a closed widget bar reads "model not found" after a reload

from steerbench.datasets import ABItem
from steerbench.errors import ParameterError
from steerbench.model import Model, Prompt
from steerbench.passes import SharedPrefix, forward_batch, length_batches, steered_suffixes
from steerbench.steerer import Flagger, Steerer, check_strength, refuse_observing


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
    return continuation_logprobs_many(model, prompts, continuations, [steer], batch_size, progress)[0]


def _split(prompt: Prompt) -> int:
    # the logits that predict the first answer token sit at the last prompt position
    return min(prompt.steer_from, len(prompt) - 1)


def continuation_logprobs_many(
    model: Model,
    prompts: Sequence[Prompt],
    continuations: Sequence[Sequence[int]],
    steers: Sequence[Steerer | None],
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """[len(steers), N] summed continuation log-probabilities; the unsteered prefix of each
    batch is computed once and shared by all steerers."""
    refuse_observing(steers, "continuation scoring")
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        raise ValueError("nothing to score")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    out = torch.empty(len(steers), len(prompts), dtype=torch.float64)
    # a prefix all prompts share (instruction, few-shot primer) is computed once for all batches
    head = SharedPrefix.of(model, [p.ids for p in prompts], limit=min(_split(p) for p in prompts) - 1)
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    for idx in tqdm(length_batches(lengths, batch_size), disable=not progress, leave=False):
        seqs = [list(prompts[i].ids) + list(continuations[i]) for i in idx]
        split = [_split(prompts[i]) for i in idx]
        targets = [torch.as_tensor(list(continuations[i]), device=model.device) for i in idx]
        steer_from = [prompts[i].steer_from for i in idx]
        for k, logits in steered_suffixes(model, seqs, split, steer_from, steers, head):
            for row, i in enumerate(idx):
                start = len(prompts[i]) - 1 - split[row]
                n_c = len(continuations[i])
                lp = torch.log_softmax(logits[row, start : start + n_c].float(), dim=-1)
                out[k, i] = lp.gather(-1, targets[row][:, None]).sum().double().cpu()
    return out


@dataclass
class FlaggedScores:
    """Continuation scores from two-pass scoring, and where and how strongly it intervened."""

    logprobs: torch.Tensor  # [N] float64: the flagged rows' re-scored values, the others' unsteered ones
    strengths: list[float | None]  # per row: the strength it was re-scored at, None if never flagged
    first_flag: list[int | None]  # per row: the continuation token that triggered it

    @property
    def rescored(self) -> float:
        """Share of the rows that were re-scored with steering."""
        return sum(s is not None for s in self.strengths) / len(self.strengths)


def flagged_logprobs(
    model: Model,
    prompts: Sequence[Prompt],
    continuations: Sequence[Sequence[int]],
    flagger: Flagger,
    batch_size: int = 16,
) -> FlaggedScores:
    """Score, flag, re-score: each continuation is scored unsteered while ``flagger`` reads
    the activations it needs; where it flags continuation token j at strength s, the row
    is scored again with ``flagger.rescore`` at s, steered from ``backtrack`` tokens before
    token j (never before the last prompt token). Rows never flagged keep their unsteered
    score. (FASB's multiple-choice mode; it partly re-ranks answers by the flagger's
    verdict, so report it apart from uniform steering.)
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts or any(len(c) == 0 for c in continuations):
        raise ValueError("nothing to score: every continuation needs at least one token")
    refuse_observing([flagger.rescore], "the re-scoring pass")
    seqs = [list(p.ids) + list(c) for p, c in zip(prompts, continuations)]
    split = [len(p.ids) - 1 for p in prompts]  # column 0: the last prompt token
    prefix = SharedPrefix.of(model, [p.ids for p in prompts], limit=min(split) - 1)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    strengths: list[float | None] = [None] * len(seqs)
    flags: list[int | None] = [None] * len(seqs)

    def logprob(logits: torch.Tensor, rows: list[int]) -> list[float]:
        out = []
        for r, i in enumerate(rows):
            n = len(continuations[i])
            lp = torch.log_softmax(logits[r, :n].float(), -1)  # column j predicts continuation token j
            out.append(float(lp.gather(-1, torch.as_tensor(list(continuations[i]))[:, None]).sum()))
        return out

    for idx in length_batches([len(x) for x in seqs], batch_size):
        store: dict = {}
        sp = [split[i] for i in idx]
        (_, logits), = steered_suffixes(model, [seqs[i] for i in idx], sp, sp, [None], prefix,
                                        extra_hooks=flagger.read_hooks(store))
        again, rows_s, steer_from = [], [], []
        for r, (i, v, verdict) in enumerate(zip(idx, logprob(logits, idx),
                                                flagger.flag(store, [len(continuations[i]) for i in idx]))):
            scores[i] = v
            if verdict is None:
                continue
            j, s = verdict
            pos = len(prompts[i].ids) + j  # absolute position of the flagged token
            again.append(i)
            rows_s.append(s)
            steer_from.append(max(pos - flagger.backtrack, split[i]))
            strengths[i], flags[i] = float(s), int(j)
        if again:
            (_, logits), = steered_suffixes(model, [seqs[i] for i in again], [split[i] for i in again], steer_from,
                                            [flagger.rescore], prefix, row_strengths=torch.tensor(rows_s))
            for i, v in zip(again, logprob(logits, again)):
                scores[i] = v
    return FlaggedScores(scores, strengths, flags)


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
    return letter_scores_many(model, items, [steer], batch_size, system)[0]


def letter_scores_many(
    model: Model,
    items: Sequence[ABItem],
    steers: Sequence[Steerer | None],
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """[len(steers), N] letter scores, sharing each batch's unsteered prefix across steerers."""
    refuse_observing(steers, "letter scoring")
    if not items:
        raise ValueError("no items to score")
    letter_id = _letter_ids(model, {x for it in items for x in (it.matching, it.not_matching)})
    prompts = [model.prompt(it.question, answer_prefix="(", system=system) for it in items]
    out = torch.empty(len(steers), len(items), dtype=torch.float64)
    for chunk in _batches(len(items), batch_size):
        idx = list(chunk)
        seqs = [prompts[i].ids for i in idx]
        split = [min(prompts[i].steer_from, len(prompts[i]) - 1) for i in idx]
        for k, logits in steered_suffixes(model, seqs, split, [prompts[i].steer_from for i in idx], steers):
            for row, i in enumerate(idx):
                last = len(prompts[i]) - 1 - split[row]
                probs = torch.softmax(logits[row, last].float(), dim=-1)
                pm = probs[letter_id[items[i].matching]]
                pn = probs[letter_id[items[i].not_matching]]
                out[k, i] = float(pm / (pm + pn))
    return out


def likelihood_margins(
    model: Model,
    items: Sequence[ABItem],
    steer: Steerer | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Per item: log p(matching answer text) - log p(non-matching answer text) after the stem."""
    return likelihood_margins_many(model, items, [steer], batch_size, system)[0]


def likelihood_margins_many(
    model: Model,
    items: Sequence[ABItem],
    steers: Sequence[Steerer | None],
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """[len(steers), N] likelihood margins."""
    if not items:
        raise ValueError("no items to score")
    prompts, conts = [], []
    for it in items:
        p = model.prompt(it.stem, system=system)
        for text in (it.matching_text, it.not_matching_text):
            prompts.append(p)
            conts.append(model.encode(text, bos=False))
    lp = continuation_logprobs_many(model, prompts, conts, steers, batch_size, progress)
    return lp[:, 0::2] - lp[:, 1::2]


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


def ab_scores(
    model: Model,
    items: Sequence[ABItem],
    steers: Sequence[Steerer | None],
    readouts: Sequence[str] = READOUTS,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> list[ABScore]:
    """A/B readouts for each of ``steers`` (None = unsteered), sharing the unsteered prompt prefix.
    ``readouts``: names from READOUTS (one name may be given as a plain string)."""
    if isinstance(readouts, str):
        readouts = (readouts,)
    bad = [r for r in readouts if r not in READOUTS]
    if bad or not readouts:
        raise ParameterError(f"unknown readout(s) {bad}; choose one or more of {READOUTS}")
    scores = [ABScore(n=len(items)) for _ in steers]
    if "letter" in readouts:
        letters = letter_scores_many(model, items, steers, batch_size, system)
        for s, row in zip(scores, letters):
            s.letter = float(row.mean())
    if "likelihood" in readouts:
        margins = likelihood_margins_many(model, items, steers, batch_size, system, progress)
        for s, m in zip(scores, margins):
            s.win_rate = float((m > 0).double().mean())
            s.margin = float(m.mean())
    return scores


def ab_score(
    model: Model,
    items: Sequence[ABItem],
    steer: Steerer | None = None,
    readouts: Sequence[str] = READOUTS,
    batch_size: int = 16,
    system: str | None = None,
) -> ABScore:
    """Both A/B readouts (or the ones named) for ``steer`` on ``items``."""
    return ab_scores(model, items, [steer], readouts, batch_size, system)[0]


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
    whatever the layer, so it is scored once. All settings share each batch's unsteered
    prompt prefix, so a setting costs only the steered tail of the prompts. The table's
    ``unit`` column says what the multiplier counts (the steerers' ``strength_unit``).
    """
    import pandas as pd

    if not layers or not multipliers:
        raise ValueError("give at least one layer and one multiplier")
    layers = [model.check_layer(L) for L in layers]
    multipliers = [check_strength(m, "multiplier") for m in multipliers]
    grid = [(L, m) for L in layers for m in multipliers]
    steers: list[Steerer | None] = [None]
    where = []
    for layer, mult in grid:
        if mult == 0:
            where.append(0)
        else:
            steers.append(make(layer, mult))
            where.append(len(steers) - 1)
    scores = ab_scores(model, items, steers, readouts, batch_size, progress=progress)
    units = {s.strength_unit for s in steers if s is not None}
    unit = units.pop() if len(units) == 1 else "multiplier"
    rows = [{"layer": L, "multiplier": m, "unit": unit, **scores[w].as_dict()} for (L, m), w in zip(grid, where)]
    return pd.DataFrame(rows)


# fp32 logits one batch may hold: every position's are needed for KL, and Gemma 3's 262k
# vocabulary makes them 1 MB a position (8 rows of 250 tokens: 2 GB, times the copies the
# log-softmaxes make); a batch past this is halved until it fits
LOGITS_BUDGET = 512 * 2**20


def _logit_budget(batches: list[list[list[int]]], vocab: int) -> Iterator[list[list[int]]]:
    for batch in batches:
        rows = len(batch)
        while rows > 1 and rows * max(len(s) for s in batch) * vocab * 4 > LOGITS_BUDGET:
            rows = (rows + 1) // 2
        for i in range(0, len(batch), rows):
            yield batch[i:i + rows]


# The unsteered log-probabilities of the KL texts stay on the model for the next call with
# the same texts and weights: the bench asks once per method and fold, and that pass was half
# of a one-setting call (neutral paragraphs, one CAA setting, one thread: 7.5 s the first
# call, 3.2-3.5 s the next ones). Kept up to this size (the neutral paragraphs: 606 tokens,
# 119 MB on SmolLM2's 49k vocabulary, 635 MB on Gemma 3's 262k).
KL_REFERENCE_BUDGET = 1 << 30


def _unsteered_logprobs(model: Model, batches: list[list[list[int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(mask of real tokens, their unsteered log-probabilities) per batch, from the model's
    cache when the texts, batching and weights (every storage and version counter) are the same."""
    key = (model._weights_key(), tuple(tuple(s) for b in batches for s in b), tuple(len(b) for b in batches))
    if model._kl_reference is not None and model._kl_reference[0] == key:
        yield from model._kl_reference[1]
        return
    model._kl_reference = None
    keep_it = sum(len(s) for b in batches for s in b) * model.d_vocab * 4 <= KL_REFERENCE_BUDGET
    kept = []
    for batch in batches:
        base, b = forward_batch(model, batch)
        assert base is not None
        keep = b.attention_mask.bool()
        out = (keep, torch.log_softmax(base.float(), -1)[keep])
        del base
        if keep_it:
            kept.append(out)
        yield out
    if keep_it:
        model._kl_reference = (key, kept)


def kl_to_unsteered(
    model: Model,
    texts: Sequence[str],
    steers: Sequence[Steerer | None],
    batch_size: int = 8,
) -> list[float]:
    """Mean KL(unsteered || steered) of the next-token distributions, per steerer.

    Every position of every text is steered (from the first token on) and every position's
    prediction counts, as ITI's off-task KL on neutral text. 0 for None. A dynamic steerer
    is measured as it steers once it acts (``Steerer.when_acting``). The unsteered pass is
    kept on the model for the next call on the same texts and weights
    (``KL_REFERENCE_BUDGET``; ``model._kl_reference = None`` frees it).
    """
    steers = [s.when_acting() if s is not None else None for s in steers]
    if not texts:
        raise ValueError("no texts to measure KL on")
    seqs = [model.encode(t) for t in texts]
    total = torch.zeros(len(steers), dtype=torch.float64)
    count = 0
    batches = list(_logit_budget([[seqs[i] for i in chunk] for chunk in _batches(len(seqs), batch_size)],
                                 model.d_vocab))
    # (the generator first: zip then runs it past its last batch, where it keeps the pass)
    for (keep, base_lp), batch in zip(_unsteered_logprobs(model, batches), batches):
        count += int(keep.sum())
        for k, steer in enumerate(steers):
            if steer is None:
                continue
            logits, _ = forward_batch(model, batch, steer, steer_from=[0] * len(batch))
            assert logits is not None
            lp = torch.log_softmax(logits.float(), -1)[keep]
            total[k] += float((base_lp.exp() * (base_lp - lp)).sum())
    return (total / count).tolist()
