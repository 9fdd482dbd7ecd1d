"""Head readouts that know where in the answer they read (issue 20; FASB's decision).

Today's readout (:class:`~steerbench.steering.iti.HeadReadout`) holds probes trained, as
ITI's, on each head's ``hook_z`` at the *last* token of whole answers; FASB reads it at the
*newest* token of a partial answer. The two readouts here are trained where they are read,
on every token of each reference answer (labelled by its answer's truth), by answer
position bucket (``BUCKETS``: token 0, tokens 1-2, 3-8, 9 and later):

- :class:`PrefixReadout`: one probe per head and bucket on that bucket's tokens;
- :class:`CalibratedReadout`: today's probes, their mean P(true) recalibrated per bucket by
  a one-feature logistic regression on its logit. Within a bucket this is monotone, so it
  cannot separate true from false answers better than the probes it recalibrates; it
  changes what a threshold means at each position (how often it flags).

Both give ``p_true(z, pos)`` for head activations ``z [..., K, d_head]`` at answer
positions ``pos [...]`` (0 = the answer's first token). FASB takes either as its
``readout`` (None: today's); :func:`answer_tokens` collects what they are fitted on and
:func:`fit_readout` fits one by name (``READOUTS``). Every token of every answer is kept,
for the K heads only: all 5,880 TruthfulQA answers (55,455 tokens) x 16 heads x 64 are
227 MB in fp32, so positions are not sampled.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerbench.blocks import z_hook
from steerbench.datasets import MCQuestion
from steerbench.model import Model
from steerbench.steerer import register_part
from steerbench.steering.iti import HeadReadout, _heads_tensor

BUCKETS = (0, 1, 3, 9)  # bucket b holds answer positions [BUCKETS[b], BUCKETS[b + 1])
READOUTS = ("plain", "calibrated", "prefix")  # plain: today's probes, unchanged


def bucket_of(pos: torch.Tensor | int) -> torch.Tensor:
    """The bucket of each answer position (0-based token index in the answer)."""
    pos = torch.as_tensor(pos).contiguous()
    if (pos < 0).any():
        raise ValueError("answer positions count from 0")
    return torch.bucketize(pos, torch.tensor(BUCKETS[1:]), right=True)


def _logistic(x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        raise ValueError("a readout bucket holds answers of one label only: use more questions")
    clf = LogisticRegression(C=C, max_iter=1000).fit(x, y)
    return clf.coef_[0], float(clf.intercept_[0])


def _bucket_rows(b: torch.Tensor, y: np.ndarray):
    """(bucket, indices of its tokens) for every bucket; rows None for a later bucket that
    lacks true or false tokens (short answers only): it then shares the bucket before it,
    with a warning. Token 0 must hold both labels."""
    for bk in range(len(BUCKETS)):
        rows = (b == bk).nonzero().flatten()
        if bk > 0 and len(np.unique(y[rows.numpy()])) < 2:
            warnings.warn(f"no true and false answer tokens at positions {BUCKETS[bk]}+ (answers this short): "
                          f"bucket {bk} shares the probes of bucket {bk - 1}", stacklevel=3)
            yield bk, None
        else:
            yield bk, rows


def _check(z: torch.Tensor, labels, pos, k: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    y = np.asarray(labels, dtype=np.int64)
    pos = torch.as_tensor(pos)
    if z.ndim != 3 or z.shape[1] != k:
        raise ValueError(f"z must be [tokens, {k}, d_head], got {tuple(z.shape)}")
    if not (len(y) == len(pos) == z.shape[0]) or len(y) == 0:
        raise ValueError(f"z, labels and pos need one entry per token, got {z.shape[0]}, {len(y)}, {len(pos)}")
    if not torch.isfinite(z).all():
        raise ValueError("z holds NaN or inf")
    return z.to(torch.float64), y, bucket_of(pos)


@register_part
@dataclass
class PrefixReadout:
    """Per head and answer-position bucket, a logistic probe on standardized ``hook_z``."""

    name = "prefix"

    heads: torch.Tensor  # [K, 2] (layer, head)
    weight: torch.Tensor  # [B, K, d_head] float64
    bias: torch.Tensor  # [B, K]
    mean: torch.Tensor  # [B, K, d_head]
    std: torch.Tensor  # [B, K, d_head]

    def __post_init__(self) -> None:
        self.heads = _heads_tensor(self.heads)

    @classmethod
    def fit(cls, heads, z: torch.Tensor, labels, pos, C: float = 1.0) -> PrefixReadout:
        """Fit on answer tokens: ``z [T, K, d_head]`` (the K ``heads``), ``labels [T]`` (the
        truth of each token's answer) and ``pos [T]`` (its position in the answer)."""
        heads = _heads_tensor(heads)
        x, y, b = _check(z, labels, pos, len(heads))
        B, K, d = len(BUCKETS), x.shape[1], x.shape[2]
        weight, bias = torch.zeros(B, K, d, dtype=torch.float64), torch.zeros(B, K, dtype=torch.float64)
        mean, std = torch.zeros(B, K, d, dtype=torch.float64), torch.ones(B, K, d, dtype=torch.float64)
        for bk, rows in _bucket_rows(b, y):
            if rows is None:
                for t in (weight, bias, mean, std):
                    t[bk] = t[bk - 1]
                continue
            xb = x[rows]
            mean[bk], std[bk] = xb.mean(0), xb.std(0).clamp(min=1e-6)
            for h in range(K):
                w, c = _logistic(((xb[:, h] - mean[bk, h]) / std[bk, h]).numpy(), y[rows.numpy()], C)
                weight[bk, h], bias[bk, h] = torch.from_numpy(w), c
        return cls(heads, weight, bias, mean, std)

    def p_true(self, z: torch.Tensor, pos) -> torch.Tensor:
        """Mean over the K heads of P(true) under each token's bucket probe: ``[...]``."""
        b = bucket_of(pos)
        x = (z.detach().to("cpu", torch.float64) - self.mean[b]) / self.std[b]
        return torch.sigmoid((x * self.weight[b]).sum(-1) + self.bias[b]).mean(-1)


@register_part
@dataclass
class CalibratedReadout:
    """Today's readout with its mean P(true) recalibrated per answer-position bucket:
    ``sigmoid(a_b * logit(p) + c_b)``."""

    name = "calibrated"

    base: HeadReadout
    scale: torch.Tensor  # [B]
    shift: torch.Tensor  # [B]

    @property
    def heads(self) -> torch.Tensor:
        return self.base.heads

    @classmethod
    def fit(cls, base: HeadReadout, z: torch.Tensor, labels, pos, C: float = 1e4) -> CalibratedReadout:
        """Fit the per-bucket recalibration on answer tokens (as :meth:`PrefixReadout.fit`).
        ``C``: weak regularization; one feature per bucket, thousands of tokens."""
        x, y, b = _check(z, labels, pos, base.k)
        logit = torch.logit(base.p_true(x), eps=1e-6)
        scale, shift = torch.ones(len(BUCKETS), dtype=torch.float64), torch.zeros(len(BUCKETS), dtype=torch.float64)
        for bk, rows in _bucket_rows(b, y):
            if rows is None:
                scale[bk], shift[bk] = scale[bk - 1], shift[bk - 1]
                continue
            w, c = _logistic(logit[rows].numpy()[:, None], y[rows.numpy()], C)
            scale[bk], shift[bk] = float(w[0]), c
        return cls(base, scale, shift)

    def p_true(self, z: torch.Tensor, pos) -> torch.Tensor:
        b = bucket_of(pos)
        logit = torch.logit(self.base.p_true(z), eps=1e-6)
        return torch.sigmoid(self.scale[b] * logit + self.shift[b])


# -------------------------------------------------------------------------------------
# what the readouts are fitted on, and the threshold they are read at


@dataclass
class AnswerTokens:
    """The K heads' ``hook_z`` at every token of a set of answers, in the context they are
    scored in (the prompt, then the answer)."""

    z: torch.Tensor  # [T, K, d_head] float32
    labels: np.ndarray  # [T]: 1 where the token's answer is true
    pos: torch.Tensor  # [T]: its position in the answer (0 = first token)
    answer: np.ndarray  # [T]: its answer's index (``mc_items`` order of the questions)
    heads: torch.Tensor  # [K, 2]: the (layer, head) of each of z's K columns
    questions: list[MCQuestion]
    pieces: list[str]  # [T]: each token's text (for figures)

    def __len__(self) -> int:
        return len(self.pos)

    def of_answer(self, a: int) -> np.ndarray:
        """Indices of answer ``a``'s tokens, in order."""
        idx = np.nonzero(self.answer == a)[0]
        if len(idx) == 0:
            raise IndexError(f"no answer {a} among {int(self.answer.max()) + 1}")
        return idx

    def answer_labels(self) -> np.ndarray:
        """The label of each answer (in answer order)."""
        out = np.zeros(int(self.answer.max()) + 1, dtype=np.int64)
        out[self.answer] = self.labels
        return out


def answer_tokens(model: Model, questions: Sequence[MCQuestion], heads, prompt: str = "instruction+primer",
                  batch_size: int = 16, progress: bool | None = None) -> AnswerTokens:
    """:class:`AnswerTokens` of ``heads`` ([K, 2] (layer, head)) over every answer of
    ``questions``: each reference answer after the scoring ``prompt`` (``mc_items``), as FASB
    reads them in MC mode and while generating. One pass per answer, the prompt prefix all
    share run once; only the heads' layers are collected."""
    from steerbench.activations import collect
    from steerbench.truthfulqa import mc_items

    heads = _heads_tensor(heads)
    questions = list(questions)
    prompts, conts = mc_items(model, questions, prompt)
    labels = np.asarray([label for q in questions for _, _, label in q.answers()], dtype=np.int64)
    seqs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
    spans = [(len(p.ids), len(p.ids) + len(c)) for p, c in zip(prompts, conts)]
    layers = sorted({int(L) for L in heads[:, 0]})
    raw = collect(model, seqs, [z_hook(L) for L in layers], position="all", spans=spans, batch_size=batch_size,
                  progress=progress)
    z = torch.cat([torch.stack([raw[z_hook(L)][a][:, h] for L, h in heads.tolist()], 1) for a in range(len(seqs))])
    lengths = [len(c) for c in conts]
    answer = np.repeat(np.arange(len(seqs)), lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])
    pieces = [model.tokenizer.decode([t]) for c in conts for t in c]
    return AnswerTokens(z.float(), labels[answer], pos, answer, heads, questions, pieces)



def fit_readout(name: str, base: HeadReadout, tokens: AnswerTokens) -> PrefixReadout | CalibratedReadout | None:
    """The readout ``name`` (``READOUTS``) for FASB's heads, fitted on ``tokens`` (the fit
    answers'); None for ``"plain"``, today's probes, which need no fit."""
    if name not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {name!r}")
    if not torch.equal(base.heads, tokens.heads):
        raise ValueError(f"the tokens were read from heads {tokens.heads.tolist()}, the readout's are "
                         f"{base.heads.tolist()}")
    if name == "plain":
        return None
    if name == "calibrated":
        return CalibratedReadout.fit(base, tokens.z, tokens.labels, tokens.pos)
    return PrefixReadout.fit(base.heads, tokens.z, tokens.labels, tokens.pos)


def lowest_p(p: torch.Tensor, tokens: AnswerTokens) -> np.ndarray:
    """Each answer's lowest P(true) over its tokens: it is flagged at threshold t iff this is below t."""
    out = np.full(int(tokens.answer.max()) + 1, np.inf)
    np.minimum.at(out, tokens.answer, p.double().numpy())
    return out


def choose_threshold(p: torch.Tensor, tokens: AnswerTokens) -> float:
    """The threshold that maximizes the share of false answers flagged minus the share of
    true answers flagged (an answer flagged when P(true) falls below it at any token, as
    MC mode flags), over 201 quantiles of the answers' lowest P(true). Pass validation
    tokens only: this is a hyperparameter."""
    low, y = lowest_p(p, tokens), tokens.answer_labels()
    seen = np.isfinite(low)
    low, y = low[seen], y[seen]
    if len(np.unique(y)) < 2:
        raise ValueError("choosing a threshold needs true and false answers")
    best, best_gap = 0.5, -2.0
    for t in np.unique(np.quantile(low, np.linspace(0, 1, 201))):
        gap = float((low[y == 0] < t).mean() - (low[y == 1] < t).mean())
        if gap > best_gap:  # first of equals: the lowest such threshold (flags least)
            best, best_gap = float(t), gap
    return best


def first_flags(p: torch.Tensor, tokens: AnswerTokens, threshold: float) -> np.ndarray:
    """Per answer, the position of its first token with P(true) below ``threshold`` (-1: none)."""
    out = np.full(int(tokens.answer.max()) + 1, -1)
    low = (p < threshold).numpy()
    # tokens run answer by answer, in order: the first index of each answer is its first flag
    answers, first = np.unique(tokens.answer[low], return_index=True)
    out[answers] = tokens.pos.numpy()[low][first]
    return out


AUC_AT = (0, 1, 3, 9)  # answer tokens where ``decision_table`` reports ROC-AUC (and at the last)


def decision_table(p: torch.Tensor, tokens: AnswerTokens, threshold: float) -> dict:
    """How well P(true) ``p`` (one per token of ``tokens``) decides: ROC-AUC between true and
    false answers at answer tokens ``AUC_AT`` and at each answer's last token; the share of
    true and of false answers flagged at ``threshold`` (P(true) below it at some token) and
    where the first flag falls."""
    from sklearn.metrics import roc_auc_score

    y = tokens.answer_labels()
    starts = np.searchsorted(tokens.answer, np.arange(len(y)))  # each answer's first token
    lengths = np.bincount(tokens.answer, minlength=len(y))
    pn = p.double().numpy()
    out: dict = {"threshold": float(threshold)}
    for at in (*AUC_AT, -1):  # -1: each answer's last token
        has = lengths > max(at, 0)
        idx = starts[has] + (lengths[has] - 1 if at < 0 else at)
        both = len(np.unique(y[has])) == 2
        out[f"auc@{'last' if at < 0 else at}"] = float(roc_auc_score(y[has], pn[idx])) if both else float("nan")
    first = first_flags(p, tokens, threshold)
    flagged = first >= 0
    out["flag_true"], out["flag_false"] = float(flagged[y == 1].mean()), float(flagged[y == 0].mean())
    out["false_over_true"] = out["flag_false"] / max(out["flag_true"], 1e-9)
    out["flags_at_token0"] = float((first[flagged] == 0).mean()) if flagged.any() else float("nan")
    out["median_first_flag"] = float(np.median(first[flagged])) if flagged.any() else float("nan")
    return out
