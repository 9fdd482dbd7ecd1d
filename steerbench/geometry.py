"""The geometry of a behaviour in activation space: 2-D PCA views with the steering direction.

``pca_projection`` fits a 2-component PCA to activations [N, d] of labelled examples and
expresses a steering direction (e.g. a CAA vector or a probe direction) in the same plane,
so that a scatter shows whether the two classes separate and whether the direction points
from one to the other. ``pca_by_layer`` does it for every layer. Figures are in
``steerbench.plots.pca_scatter``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from steerbench.probes import _check_labels


def _to_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a torch tensor or a numeric array, got {type(x).__name__} ({e})") from None


@dataclass
class PCAProjection:
    """Examples placed on the first two principal components of their activations.

    coords [N, 2]: each example's (PC1, PC2) coordinates, centred on the mean of all examples.
    labels [N]: 0/1, named by ``label_names``. explained [2]: the share of the total variance
    each PC explains. direction [2] or None: the steering direction's component in the PC plane,
    scaled for drawing (its length is 0.8 times the largest |coordinate|, its sign kept);
    ``direction_share`` is the fraction of the direction's norm that lies in the plane (1: it
    lies in the plane, 0: it is orthogonal to it); ``pc1_cosine`` the cosine between the
    direction and PC1 in the full space. The PCs are oriented so that the class-1
    mean has the larger coordinate on each, so that views of several layers read alike.
    """

    coords: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, str] = ("negative", "positive")
    texts: list[str] = field(default_factory=list)
    explained: np.ndarray = field(default_factory=lambda: np.full(2, np.nan))
    direction: np.ndarray | None = None
    title: str = ""
    direction_share: float = math.nan
    pc1_cosine: float = math.nan  # cosine between the (full-space) direction and PC1

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float64)
        if self.coords.ndim != 2 or self.coords.shape[1] != 2:
            raise ValueError(f"coords must have shape [N, 2], got {self.coords.shape}")
        n = len(self.coords)
        self.labels = np.asarray(self.labels).astype(int)
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be one 0/1 label per example ({n}), got shape {self.labels.shape}")
        if len(self.label_names) != 2:
            raise ValueError(f"label_names must name the two classes (label 0, label 1), got {self.label_names!r}")
        self.label_names = (str(self.label_names[0]), str(self.label_names[1]))
        self.texts = [f"example {i}" for i in range(n)] if not self.texts else [str(t) for t in self.texts]
        if len(self.texts) != n:
            raise ValueError(f"got {len(self.texts)} texts for {n} examples")
        self.explained = np.asarray(self.explained, dtype=np.float64)
        if self.direction is not None:
            self.direction = np.asarray(self.direction, dtype=np.float64)
            if self.direction.shape != (2,):
                raise ValueError(f"direction must be a point in the PC plane (shape [2]), got {self.direction.shape}")

    def __len__(self) -> int:
        return len(self.coords)

    def class_means(self) -> np.ndarray:
        """The mean (PC1, PC2) of each class, [2, 2]; a row is NaN where a class has no examples."""
        out = np.full((2, 2), np.nan)
        for k in (0, 1):
            if (self.labels == k).any():
                out[k] = self.coords[self.labels == k].mean(0)
        return out

    def separation(self) -> float:
        """Cosine between the drawn direction and the line from the class-0 mean to the class-1 mean.

        Near +1: in this plane the direction points from class 0 to class 1; near -1: the other
        way; near 0: across the gap. NaN without a direction, with one class only, or when the
        direction has no component in the plane.
        """
        if self.direction is None:
            return math.nan
        gap = self.class_means()
        gap = gap[1] - gap[0]
        nd, ng = float(np.linalg.norm(self.direction)), float(np.linalg.norm(gap))
        if not (nd > 0 and ng > 0):  # also False for NaN
            return math.nan
        return float(np.dot(self.direction, gap) / (nd * ng))


def pca_projection(
    acts,
    labels,
    texts: Sequence[str] | None = None,
    direction=None,
    label_names: tuple[str, str] = ("negative", "positive"),
    title: str = "",
) -> PCAProjection:
    """Project activations [N, d] (torch or numpy) onto their first two principal components.

    labels: N labels, 0/1 or bool. texts: one string per example (shown on hover).
    direction: a steering direction [d] in the same space as ``acts`` (e.g. ``caa.vectors[L]``
        or ``grid.directions[L]``), expressed in the PC plane and scaled for drawing.
    The PCA is fitted on all N rows.
    """
    from sklearn.decomposition import PCA

    x = _to_numpy(acts, "acts")
    if x.ndim != 2:
        raise ValueError(
            f"acts must be [N examples, d features], got shape {x.shape}; "
            "for [N, layers, d] use pca_by_layer, or index one site first"
        )
    n, d = x.shape
    if n < 3:
        raise ValueError(f"a PCA view needs at least 3 examples, got {n}")
    if d < 2:
        raise ValueError(f"a 2-D PCA needs at least 2 features per example, got d={d}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"acts contain NaN or inf in {int(bad.sum())} of {n} examples; drop or recollect them")
    y = _check_labels(labels, n).astype(int)
    if texts is not None and len(texts) != n:
        raise ValueError(f"got {len(texts)} texts for {n} examples in acts")
    if len(label_names) != 2:
        raise ValueError(f"label_names must name the two classes (label 0, label 1), got {label_names!r}")
    if x.var(0).sum() <= 1e-24 * (1 + np.abs(x).max() ** 2):
        raise ValueError("all examples have the same activations: there is no variance to project")

    pca = PCA(n_components=2, svd_solver="full").fit(x)
    components = pca.components_.copy()  # [2, d]
    coords = (x - pca.mean_) @ components.T
    # PCs have an arbitrary sign: point each one from the class-0 mean towards the class-1 mean
    if (y == 0).any() and (y == 1).any():
        gap = coords[y == 1].mean(0) - coords[y == 0].mean(0)
        flip = np.where(gap < 0, -1.0, 1.0)
        components *= flip[:, None]
        coords *= flip

    proj_dir, share, pc1 = None, math.nan, math.nan
    if direction is not None:
        v = _to_numpy(direction, "direction")
        if v.shape != (d,):
            raise ValueError(
                f"direction must be one vector of d={d} features like the rows of acts, got shape {v.shape}"
            )
        if not np.isfinite(v).all():
            raise ValueError("direction contains NaN or inf")
        norm = float(np.linalg.norm(v))
        if norm == 0:
            raise ValueError("direction is the zero vector: there is no direction to draw")
        p = components @ v  # [2]
        pn = float(np.linalg.norm(p))
        share = pn / norm
        pc1 = float(p[0]) / norm  # the components are unit vectors
        scale = 0.8 * float(np.abs(coords).max())
        proj_dir = p * (scale / pn) if pn > 1e-12 * norm else np.zeros(2)

    return PCAProjection(
        coords=coords,
        labels=y,
        label_names=(str(label_names[0]), str(label_names[1])),
        texts=list(texts) if texts is not None else [],
        explained=pca.explained_variance_ratio_.copy(),
        direction=proj_dir,
        title=title,
        direction_share=share,
        pc1_cosine=pc1,
    )


def direction_accuracy(acts, labels, groups=None, folds: int = 5) -> np.ndarray:
    """Held-out accuracy of telling the two classes apart along their mean-difference
    direction (what CAA steers along), per layer: in each of ``folds`` folds the direction
    and the midpoint between the class means come from the other folds, and a held-out
    example is called class 1 when it lies past the midpoint along the direction.

    acts: [N, n_layers, d] or [N, d]. groups: examples that must stay in one fold (the two
    answers of one item); default: each example alone. Returns [n_layers] (or [1]).
    Unlike the cosine between a mean-difference vector and the class means (1 by
    construction), this varies: it says where the direction generalizes.
    """
    from sklearn.model_selection import GroupKFold

    x = _to_numpy(acts, "acts")
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3:
        raise ValueError(f"acts must be [N, n_layers, d] or [N, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("acts contain NaN or inf")
    n = len(x)
    y = _check_labels(labels, n).astype(int)
    g = np.arange(n) if groups is None else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must give one group per example ({n}), got shape {g.shape}")
    if not 2 <= folds <= len(np.unique(g)):
        raise ValueError(f"folds must be between 2 and the number of groups ({len(np.unique(g))}), got {folds}")
    correct = np.zeros(x.shape[1])
    for train, test in GroupKFold(n_splits=folds).split(x[:, 0], y, g):
        yt = y[train]
        if not ((yt == 0).any() and (yt == 1).any()):
            raise ValueError("a fold's training part holds one class only: use fewer folds or more examples")
        mu1, mu0 = x[train][yt == 1].mean(0), x[train][yt == 0].mean(0)  # [L, d]
        score = np.einsum("nld,ld->nl", x[test] - (mu1 + mu0) / 2, mu1 - mu0)
        correct += ((score > 0) == (y[test] == 1)[:, None]).sum(0)
    return correct / n


def pca_by_layer(
    acts,
    labels,
    texts: Sequence[str] | None = None,
    directions=None,
    label_names: tuple[str, str] = ("negative", "positive"),
    title: str = "",
    layers: Sequence[int] | None = None,
) -> dict[int, PCAProjection]:
    """One :func:`pca_projection` per layer, keyed by layer.

    acts: a tensor [N, n_layers, d] (layer L is ``acts[:, L]``) or a dict {layer: [N, d]}.
    directions: None, a tensor [n_layers, d] indexed by layer (e.g. ``caa.vectors``), or a dict
        {layer: [d]}. layers: the layers to project (default: all of them).
    Each projection's title is "layer L", after ``title`` when one is given.
    """
    if isinstance(acts, Mapping):
        per_layer = {int(k): v for k, v in acts.items()}
    else:
        a = acts if isinstance(acts, torch.Tensor) else _to_numpy(acts, "acts")
        if a.ndim != 3:
            raise ValueError(
                f"acts must be [N, n_layers, d] or a dict {{layer: [N, d]}}, got shape {tuple(a.shape)}"
            )
        per_layer = {L: a[:, L] for L in range(a.shape[1])}
    if not per_layer:
        raise ValueError("acts has no layers")
    chosen = sorted(per_layer) if layers is None else [int(L) for L in layers]
    missing = [L for L in chosen if L not in per_layer]
    if missing:
        raise ValueError(f"layers {missing} are not in acts (it has {sorted(per_layer)})")
    out: dict[int, PCAProjection] = {}
    for L in chosen:
        v = None
        if directions is not None:
            if isinstance(directions, Mapping):
                if L not in directions:
                    raise ValueError(f"directions has no entry for layer {L} (it has {sorted(directions)})")
                v = directions[L]
            else:
                if L >= len(directions):
                    raise ValueError(f"directions has {len(directions)} rows, too few for layer {L}")
                v = directions[L]
        name = f"{title} — layer {L}" if title else f"layer {L}"
        out[L] = pca_projection(per_layer[L], labels, texts, v, label_names, name)
    return out
