"""CAA: Contrastive Activation Addition (Rimsky et al., ACL 2024). Notes: docs/methods.md, CAA.

1. For each A/B pair, read the residual stream r[L] (``blocks.L.hook_resid_post``) for the
   chat-formatted question followed by the matching answer, and again for the
   non-matching answer, at every layer in one pass:
   - read="letter" (reference): at the answer letter token ("A" of "(A)");
   - read="answer": the mean over the tokens of the answer's own text, following the
     question stem without its choice lines (what moves a small model; see README).
2. v[L] = mean over pairs of (pos - neg).
3. Apply r[L] += m * v[L] at every position from the end of the user instruction on:
   the last prompt token, any answer prefix and every generated token. In blocks:
   (Site.resid(L), FROM_INSTRUCTION, Add(v[L])).

Units of the strength. ``unit="multiplier"`` (the paper's): m times v[L], whose norm
follows the residual stream's, which differs 50x across layers and models (SmolLM2:
about 45 at layer 0 to 740 at layer 29; Gemma 3 270M: 200 to 38,000). ``unit="resid"``:
s times the mean residual norm at L over the fitting data's read tokens, along v[L]'s
direction, so s = 0.5 means "half the typical residual norm" on any layer of any model
(m = 4 at SmolLM2's layer 18 is s = 0.48 there). The norms are measured in the fitting
pass and stored in the artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steerbench.activations import collect_resid, collect_resid_norms
from steerbench.artifacts import check_fingerprint
from steerbench.blocks import FROM_INSTRUCTION, Add, Intervention, Site
from steerbench.context import check_layer_index
from steerbench.datasets import ABItem, items_hash
from steerbench.model import Model
from steerbench.steerer import Steerer, check_strength

READS = ("letter", "answer")
UNITS = {"multiplier": "m (x v[L])", "resid": "s (x mean |r[L]|)"}


def caa_inputs(model: Model, items: Sequence[ABItem], read: str, system: str | None = None):
    """Token ids and one read span per item, for the matching then the non-matching answers."""
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    seqs, spans = [], []
    for side in (0, 1):
        for it in items:
            letter = (it.matching, it.not_matching)[side]
            if read == "letter":
                prompt = model.encode(model.chat_text(it.question, system))
                answer = model.encode(f"({letter})", bos=False)
                # the token that carries the letter (reference: position -2 of "(A)")
                j = next(i for i, t in enumerate(answer) if letter in model.decode([t]))
                span = (len(prompt) + j, len(prompt) + j + 1)
            else:
                prompt = model.encode(model.chat_text(it.stem, system))
                text = it.matching_text if side == 0 else it.not_matching_text
                answer = model.encode(text, bos=False)
                span = (len(prompt), len(prompt) + len(answer))
            seqs.append(prompt + answer)
            spans.append(span)
    return seqs, spans


def caa_activations(
    model: Model, items: Sequence[ABItem], read: str = "letter", system: str | None = None, batch_size: int = 16
) -> tuple[torch.Tensor, list[int], list[str]]:
    """The residual streams CAA reads: [2N, n_layers, d_model], matching answers first.

    Returns (activations, labels with 1 = matching, the answer texts) — what PCA plots of
    the behaviour show.
    """
    seqs, spans = caa_inputs(model, items, read, system)
    acts = collect_resid(model, seqs, position="mean", spans=spans, batch_size=batch_size)
    labels = [1] * len(items) + [0] * len(items)
    texts = [it.matching_text for it in items] + [it.not_matching_text for it in items]
    return acts, labels, texts


@dataclass
class CAA(Steerer):
    """A CAA steering vector per layer; steers one layer at multiplier ``strength``."""

    vectors: torch.Tensor  # [n_layers, d_model]: v[L] = mean(pos - neg)
    layer: int
    strength: float = 1.0
    read: str = "letter"
    unit: str = "multiplier"  # or "resid": strength in units of the mean residual norm (module docstring)
    resid_norms: torch.Tensor | None = None  # [n_layers]: per item, mean |r[L]| over its read tokens; mean over items
    fitted_on: dict = field(default_factory=dict)  # model fingerprint
    info: dict = field(default_factory=dict)  # dataset name/hash, pair count

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"CAA vectors must be [n_layers, d_model], got shape {tuple(self.vectors.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise ValueError("CAA vectors contain NaN or inf; refit from clean data")
        self.layer = check_layer_index(self.layer, self.vectors.shape[0])
        if self.read not in READS:
            raise ValueError(f"read must be one of {READS}, got {self.read!r}")
        self.strength = check_strength(self.strength)
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {tuple(UNITS)}, got {self.unit!r}")
        if self.resid_norms is not None:
            if self.resid_norms.shape != (self.vectors.shape[0],):
                raise ValueError(f"resid_norms must be [n_layers] = [{self.vectors.shape[0]}], "
                                 f"got shape {tuple(self.resid_norms.shape)}")
            if not (torch.isfinite(self.resid_norms).all() and (self.resid_norms > 0).all()):
                raise ValueError("resid_norms must be finite and positive")
        if self.unit == "resid" and self.resid_norms is None:
            raise ValueError("unit='resid' needs the residual norms measured when fitting (CAA.fit stores them)")

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: Model,
        items: Sequence[ABItem],
        read: str = "answer",
        layer: int | None = None,
        strength: float = 1.0,
        system: str | None = None,
        batch_size: int = 16,
        dataset: str = "",
        unit: str = "multiplier",
    ) -> CAA:
        """Fit vectors for every layer from A/B items (one forward pass per text).

        ``read="answer"`` (the default) reads the mean over the answer's tokens;
        ``"letter"``, the reference's reading at the answer letter, barely moves this
        135M model (README, "CAA readouts"). ``unit``: what ``strength`` counts
        (module docstring); the residual norms for ``"resid"`` are measured either way.
        ``layer``: default the middle one (``n_layers // 2``)."""
        if not items:
            raise ValueError("CAA needs at least one A/B item to fit")
        layer = model.n_layers // 2 if layer is None else model.check_layer(layer)
        seqs, spans = caa_inputs(model, items, read, system)
        acts, norms = collect_resid_norms(model, seqs, position="mean", spans=spans, batch_size=batch_size, norms=True)
        assert norms is not None
        n = len(items)
        vectors = (acts[:n] - acts[n:]).mean(0).float()  # v[L] = mean(pos - neg)
        return cls(
            vectors=vectors,
            layer=layer,
            strength=strength,
            read=read,
            unit=unit,
            resid_norms=norms.mean(0).float(),  # both sides' read tokens
            fitted_on=model.fingerprint(),
            info={"dataset": dataset, "dataset_hash": items_hash(items), "n_pairs": n, "system": system},
        )

    # -- variants -----------------------------------------------------------------------
    def at(self, layer: int) -> CAA:
        """The same vectors, steering ``layer`` (negative: from the last layer)."""
        return dataclasses.replace(self, layer=layer)

    def in_units(self, unit: str) -> CAA:
        """The same vectors with ``strength`` counted in ``unit`` ("multiplier" or "resid")."""
        return dataclasses.replace(self, unit=unit)

    @property
    def strength_unit(self) -> str:
        return UNITS[self.unit]

    @property
    def vector(self) -> torch.Tensor:
        """What strength 1 adds at the steered layer: v[L], or in unit "resid" v[L]'s
        direction at the mean residual norm there."""
        v = self.vectors[self.layer]
        if self.unit == "resid":
            assert self.resid_norms is not None
            v = v / v.norm().clamp_min(1e-12) * self.resid_norms[self.layer]
        return v

    # -- Steerer -------------------------------------------------------------------------
    def interventions(self) -> list[Intervention]:
        return [Intervention(Site.resid(self.layer), FROM_INSTRUCTION, Add(self.vector))]

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, "this CAA vector")
        if self.vectors.shape != (model.n_layers, model.d_model):
            raise ValueError(
                f"CAA vectors have shape {tuple(self.vectors.shape)} but the model needs "
                f"({model.n_layers}, {model.d_model})"
            )
        super().check_model(model)

    def describe(self) -> str:
        if self.unit == "resid":
            return f"CAA(layer={self.layer}, s={self.strength:g} x mean |r|, read={self.read})"
        return f"CAA(layer={self.layer}, m={self.strength:g}, read={self.read})"
