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
positions ``pos [...]`` (0 = the answer's first token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from steerbench.steering.iti import HeadReadout, _heads_tensor

BUCKETS = (0, 1, 3, 9)  # bucket b holds answer positions [BUCKETS[b], BUCKETS[b + 1])


def bucket_of(pos: torch.Tensor | int) -> torch.Tensor:
    """The bucket of each answer position (0-based token index in the answer)."""
    pos = torch.as_tensor(pos)
    if (pos < 0).any():
        raise ValueError("answer positions count from 0")
    return torch.bucketize(pos, torch.tensor(BUCKETS[1:]), right=True)


def _logistic(x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        raise ValueError("a readout bucket holds answers of one label only: use more questions")
    clf = LogisticRegression(C=C, max_iter=1000).fit(x, y)
    return clf.coef_[0], float(clf.intercept_[0])


def _bucket_rows(b: torch.Tensor):
    """(bucket, indices of its tokens) for every bucket; refuses an empty one."""
    for bk in range(len(BUCKETS)):
        rows = (b == bk).nonzero().flatten()
        if len(rows) == 0:
            raise ValueError(f"no answer token falls in bucket {bk} (positions from {BUCKETS[bk]})")
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


@dataclass
class PrefixReadout:
    """Per head and answer-position bucket, a logistic probe on standardized ``hook_z``."""

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
        for bk, rows in _bucket_rows(b):
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


@dataclass
class CalibratedReadout:
    """Today's readout with its mean P(true) recalibrated per answer-position bucket:
    ``sigmoid(a_b * logit(p) + c_b)``."""

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
        for bk, rows in _bucket_rows(b):
            w, c = _logistic(logit[rows].numpy()[:, None], y[rows.numpy()], C)
            scale[bk], shift[bk] = float(w[0]), c
        return cls(base, scale, shift)

    def p_true(self, z: torch.Tensor, pos) -> torch.Tensor:
        b = bucket_of(pos)
        logit = torch.logit(self.base.p_true(z), eps=1e-6)
        return torch.sigmoid(self.scale[b] * logit + self.shift[b])


class PlainReadout:
    """Today's readout behind the same ``p_true(z, pos)`` (``pos`` unused)."""

    def __init__(self, base: HeadReadout) -> None:
        self.base = base
        self.heads = base.heads

    def p_true(self, z: torch.Tensor, pos=None) -> torch.Tensor:  # noqa: ARG002 (one signature for all three)
        return self.base.p_true(z)
