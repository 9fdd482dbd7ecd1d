"""ITI: Inference-Time Intervention (Li et al., NeurIPS 2023). Notes: docs/methods.md, ITI.

1. Read every attention head's output before W_O (``blocks.L.attn.hook_z``) at the last
   token of ``"Q: {question} A: {answer}"`` for each true and false answer of the
   training questions.
2. Split the training questions 80/20 (train/val, by question, seed 42); fit one logistic
   probe per head on train (``probes.fit_probes``); rank heads by val accuracy; keep the top K.
3. Direction per head: the mass-mean shift ``u = normalize(mean(true) - mean(false))``
   (default) or the probe weight; ``sigma`` = std of the activations projected on ``u``.
4. Apply ``z[L, h] += alpha * sigma * u`` on the K heads at every steered position (from the
   last prompt token on: every generated token, and every answer token in MC scoring).

Heads come in two pieces that other methods compose: a :class:`HeadShift` (the Steerer:
K heads, a direction and a scale per head, added from the end of the instruction on) and
a :class:`HeadReadout` (the K heads' probes, giving P(true)). :class:`HeadProbes` is the
fitted ranking of all heads (what K and the direction are chosen from without collecting
again); :class:`ITI` is the head shift on K of them with sigma as the scale, carrying the
same heads' probes so FASB can read P(true) where ITI steers (``ITI.readout``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerbench.activations import collect_heads
from steerbench.artifacts import check_fingerprint, check_provenance, load_artifact, save_artifact
from steerbench.blocks import FROM_INSTRUCTION, Add, Intervention, Rule, Site, head_view, z_hook
from steerbench.context import check_int
from steerbench.datasets import MCQuestion, qa_examples
from steerbench.errors import ArtifactError, ModelMismatch, ParameterError
from steerbench.model import Model
from steerbench.probes import ProbeGrid, fit_probes
from steerbench.steerer import HookFn, Steerer, check_strength, register_part

TEMPLATE = "Q: {question} A: {answer}"
DIRECTIONS = ("mass_mean", "probe")
PROBE_FIELDS = ("probe_weight", "probe_bias", "probe_mean", "probe_std", "val_acc")


def questions_hash(questions: Sequence[MCQuestion]) -> str:
    import hashlib

    h = hashlib.sha256()
    for q in questions:
        h.update(repr((q.question, q.best, q.correct, q.incorrect)).encode())
    return h.hexdigest()[:16]


@dataclass
class HeadProbes:
    """A probe on every attention head, fitted on training questions, with each head's
    steering directions and their sigmas. ``select`` turns it into an ITI steerer."""

    grid: ProbeGrid  # sites [n_layers, n_heads]
    sigma_mass_mean: torch.Tensor  # [n_layers, n_heads]: std of the activations projected on mass_mean
    sigma_probe: torch.Tensor  # [n_layers, n_heads]: the same for the probe direction
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        model: Model,
        questions: Sequence[MCQuestion],
        val_questions: Sequence[MCQuestion] | None = None,
        template: str = TEMPLATE,
        val_fraction: float = 0.2,
        seed: int = 42,
        batch_size: int = 16,
        acts: torch.Tensor | None = None,
        progress: bool | None = None,
    ) -> HeadProbes:
        """Collect head activations (or take ``acts`` [N, L, H, d_head] in ``qa_examples``
        order of ``questions`` then ``val_questions``) and fit one probe per head.

        With ``val_questions`` the probes train on ``questions`` and heads are ranked on
        ``val_questions``; without, ``questions`` are split ``val_fraction`` by question.
        Directions and sigmas use every example given.
        """
        if not questions:
            raise ValueError("ITI needs at least one training question")
        every = list(questions) + list(val_questions or [])
        texts, labels, groups = qa_examples(every, template)
        split = None
        if val_questions:
            n_fit = sum(len(q.correct) + len(q.incorrect) for q in questions)
            split = (range(n_fit), range(n_fit, len(texts)))
        if acts is None:
            acts = collect_heads(model, texts, batch_size=batch_size, progress=progress)
        elif acts.shape[0] != len(texts):
            raise ValueError(f"acts has {acts.shape[0]} rows but the questions have {len(texts)} answers")
        if tuple(acts.shape[1:3]) != (model.n_layers, model.n_heads):
            raise ValueError(
                f"acts must be [N, {model.n_layers}, {model.n_heads}, d_head] head activations, got {tuple(acts.shape)}"
            )
        grid = fit_probes(acts, labels, groups, val_fraction=val_fraction, seed=seed, split=split)
        x = acts.to(torch.float64)

        def sigma(directions: torch.Tensor) -> torch.Tensor:
            # std over every fitting example of its activation projected on the head's direction
            return torch.einsum("nlhd,lhd->nlh", x, directions.to(torch.float64)).std(0).float()

        return cls(
            grid=grid,
            sigma_mass_mean=sigma(grid.mass_mean),
            sigma_probe=sigma(grid.directions),
            fitted_on=model.fingerprint(),
            info={
                "template": template, "n_questions": len(every), "n_answers": len(texts),
                "questions_hash": questions_hash(every), "n_val_questions": len(val_questions or []),
                "val_fraction": val_fraction, "seed": seed,
            },
        )

    # -- artifacts: the fit takes minutes on TruthfulQA; keep it -------------------------
    _TENSORS = ("train_acc", "val_acc", "val_auc", "directions", "mass_mean", "weight", "bias", "mean", "std")

    def save(self, path: str | os.PathLike) -> Path:
        """safetensors + JSON provenance (as every steerbench artifact); never pickle."""
        g = self.grid
        tensors = {f"grid.{n}": getattr(g, n) for n in self._TENSORS}
        tensors.update(sigma_mass_mean=self.sigma_mass_mean, sigma_probe=self.sigma_probe,
                       **{"grid.train_idx": torch.as_tensor(g.train_idx), "grid.val_idx": torch.as_tensor(g.val_idx)})
        header = {"method": "HeadProbes", "fitted_on": self.fitted_on, "info": self.info,
                  "sites_shape": list(g.sites_shape), "backend": g.backend}
        return save_artifact(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None) -> HeadProbes:
        """Probes saved by ``save``; with ``model``, refused unless fitted on it (ModelMismatch)."""
        tensors, header = load_artifact(path)
        if header.get("method") != "HeadProbes":
            raise ArtifactError(f"{path} holds a {header.get('method')!r} artifact, not HeadProbes")
        fitted_on = check_provenance(header.get("fitted_on"), path)
        missing = [n for n in (*(f"grid.{t}" for t in (*cls._TENSORS, "train_idx", "val_idx")), "sigma_mass_mean",
                               "sigma_probe") if n not in tensors]
        if missing:
            raise ArtifactError(f"{path}: the HeadProbes artifact lacks {', '.join(missing)}")
        grid = ProbeGrid(sites_shape=tuple(header["sites_shape"]),
                         **{n: tensors[f"grid.{n}"] for n in cls._TENSORS},
                         train_idx=tensors["grid.train_idx"].numpy(), val_idx=tensors["grid.val_idx"].numpy(),
                         backend=str(header.get("backend", "")))
        out = cls(grid=grid, sigma_mass_mean=tensors["sigma_mass_mean"], sigma_probe=tensors["sigma_probe"],
                  fitted_on=fitted_on, info=header.get("info", {}))
        if model is not None:
            check_fingerprint(fitted_on, model, "these head probes")
            if tuple(grid.sites_shape) != (model.n_layers, model.n_heads):
                raise ModelMismatch(f"{path}: probes for {tuple(grid.sites_shape)} heads, the model has "
                                    f"({model.n_layers}, {model.n_heads})")
        return out

    def ranking(self) -> list[tuple[int, int]]:
        """All heads, best validation accuracy first."""
        return [(int(site[0]), int(site[1])) for site, _ in self.grid.top(self.grid.n_sites)]

    def select(self, k: int, alpha: float = 15.0, direction: str = "mass_mean") -> ITI:
        """ITI on the top ``k`` heads by validation accuracy, at strength ``alpha``."""
        if direction not in DIRECTIONS:
            raise ParameterError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        k = check_int(k, "k", low=1, high=self.grid.n_sites)
        return self.on(self.ranking()[:k], alpha, direction)

    def on(self, heads: Sequence[tuple[int, int]], alpha: float = 15.0, direction: str = "mass_mean") -> ITI:
        """ITI on the given (layer, head) pairs, at strength ``alpha`` (a head sweep steers one at a time)."""
        if direction not in DIRECTIONS:
            raise ParameterError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        alpha = check_strength(alpha, "alpha")
        n_layers, n_heads = self.grid.sites_shape
        heads = [(int(layer), int(h)) for layer, h in heads]
        bad = [x for x in heads if not (0 <= x[0] < n_layers and 0 <= x[1] < n_heads)]
        if bad or not heads:
            raise ParameterError(f"heads must be (layer, head) pairs within {n_layers} layers x {n_heads} heads; "
                                 f"got {bad or 'none'}")
        L = torch.tensor([layer for layer, _ in heads])
        H = torch.tensor([h for _, h in heads])
        g = self.grid
        dirs = (g.mass_mean if direction == "mass_mean" else g.directions)[L, H].float()
        sig = (self.sigma_mass_mean if direction == "mass_mean" else self.sigma_probe)[L, H]
        return ITI(
            heads=torch.stack([L, H], 1),
            directions=dirs,
            sigma=sig,
            strength=float(alpha),
            direction=direction,
            probe_weight=g.weight[L, H],
            probe_bias=g.bias[L, H],
            probe_mean=g.mean[L, H],
            probe_std=g.std[L, H],
            val_acc=g.val_acc[L, H].float(),
            fitted_on=self.fitted_on,
            info=dict(self.info),
        )


def _heads_tensor(heads) -> torch.Tensor:
    heads = torch.as_tensor(heads, dtype=torch.long)
    if heads.ndim != 2 or heads.shape[1] != 2 or len(heads) == 0:
        raise ValueError(f"heads must be [K, 2] (layer, head) pairs with K >= 1, got shape {tuple(heads.shape)}")
    if len({tuple(h) for h in heads.tolist()}) != len(heads):
        raise ValueError("heads contains a (layer, head) pair twice")
    return heads


def _by_layer(heads: torch.Tensor) -> dict[int, list[tuple[int, int]]]:
    """``{layer: [(k, head), ...]}``: each selected head's index k among the K, by layer."""
    out: dict[int, list[tuple[int, int]]] = {}
    for k, (layer, head) in enumerate(heads.tolist()):
        out.setdefault(int(layer), []).append((k, int(head)))
    return dict(sorted(out.items()))


@register_part
@dataclass
class HeadReadout:
    """P(true) from the probes of K heads: a logistic probe per head on its standardized
    output before W_O (``hook_z``), averaged over the K heads by dynamic methods."""

    heads: torch.Tensor  # [K, 2] int: (layer, head)
    weight: torch.Tensor  # [K, d_head] float64, on standardized features
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [K, d_head]: the probes' training mean
    std: torch.Tensor  # [K, d_head]: and standard deviation

    def __post_init__(self) -> None:
        self.heads = _heads_tensor(self.heads)

    @property
    def k(self) -> int:
        return len(self.heads)

    @property
    def strength_unit(self) -> str:
        return "alpha (x each head's scale)"

    @property
    def d_head(self) -> int:
        return int(self.weight.shape[-1])

    def proba(self, z: torch.Tensor) -> torch.Tensor:
        """P(true) under each head's probe: [..., K] for head activations [..., K, d_head]."""
        x = (z.detach().to("cpu", torch.float64) - self.mean) / self.std
        return torch.sigmoid((x * self.weight).sum(-1) + self.bias)

    def p_true(self, z: torch.Tensor) -> torch.Tensor:
        """Mean P(true) over the K probes for head activations [..., K, d_head]."""
        return self.proba(z).mean(-1)

    def read_newest(self, store: dict) -> list[tuple[str, HookFn]]:
        """Hooks that put each head's output at the pass's newest column (row 0) in
        ``store[k]`` ([d_head]); installed before a steerer's own hooks at the same site,
        they read the heads before the shift is added."""
        def make(pairs: list[tuple[int, int]]) -> HookFn:
            def read(z: torch.Tensor, hook) -> None:
                newest = head_view(z, self.d_head)[0, -1]
                for k, head in pairs:
                    store[k] = newest[head].detach()
            return read

        return [(z_hook(L), make(pairs)) for L, pairs in _by_layer(self.heads).items()]

    def read_all(self, store: dict) -> list[tuple[str, HookFn]]:
        """Hooks that keep every column of the K heads' layers in ``store[layer]``
        ([batch, pos, n_heads, d_head], on the CPU); ``gather(store)`` picks the K heads."""
        def make(layer: int) -> HookFn:
            def read(z: torch.Tensor, hook) -> None:
                store[layer] = head_view(z.detach(), self.d_head).cpu()
            return read

        return [(z_hook(L), make(L)) for L in _by_layer(self.heads)]

    def gather(self, store: dict) -> torch.Tensor:
        """[batch, pos, K, d_head] from what ``read_all`` stored."""
        return torch.stack([store[int(layer)][:, :, int(h)] for layer, h in self.heads.tolist()], dim=2)


@dataclass
class HeadShift(Steerer):
    """``z[L, h] += strength * scale_h * u_h`` on K attention heads, from ``steer_from`` on.

    The steering half of ITI, FASB and REAL: K heads, a unit direction and a scale per head
    (ITI: sigma, the std of the activations along u; REAL: sigma times a relevance weight).
    """

    heads: torch.Tensor  # [K, 2] int: (layer, head), best first
    directions: torch.Tensor  # [K, d_head]: unit vectors pointing to "true"
    sigma: torch.Tensor  # [K]: the scale of each head's shift
    strength: float = 15.0  # alpha
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = _heads_tensor(self.heads)
        K = len(self.heads)
        if self.directions.ndim != 2 or self.directions.shape[0] != K:
            raise ValueError(f"directions must be [K={K}, d_head], got shape {tuple(self.directions.shape)}")
        if tuple(self.sigma.shape) != (K,):
            raise ValueError(f"sigma must have shape [{K}], got {tuple(self.sigma.shape)}")
        for name in ("directions", "sigma"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{type(self).__name__} {name} contain NaN or inf; refit from clean data")
        self.strength = check_strength(self.strength)

    @property
    def k(self) -> int:
        return len(self.heads)

    @property
    def d_head(self) -> int:
        return int(self.directions.shape[1])

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.heads[:, 0].tolist()))

    def head_list(self) -> list[tuple[int, int]]:
        return [(int(layer), int(h)) for layer, h in self.heads.tolist()]

    def shift(self) -> torch.Tensor:
        """[K, d_head]: what is added to each head at strength 1 (scale * u)."""
        return self.sigma[:, None] * self.directions

    def layer_deltas(self, n_heads: int, scale: float = 1.0) -> dict[int, torch.Tensor]:
        """``{layer: [n_heads, d_head]}``: what is added to ``hook_z`` of each touched layer."""
        out: dict[int, torch.Tensor] = {}
        for (layer, h), v in zip(self.head_list(), scale * self.shift()):
            out.setdefault(layer, torch.zeros(n_heads, self.d_head))[h] += v
        return out

    # -- Steerer ---------------------------------------------------------------------------
    def interventions(self, rule: Rule = FROM_INSTRUCTION) -> list[Intervention]:
        """One Add per touched layer on its heads' view of ``hook_z``, at the columns ``rule`` names."""
        shift = self.shift()
        return [
            Intervention(Site.heads(L, self.d_head), rule,
                         Add(shift[[k for k, _ in pairs]], heads=tuple(h for _, h in pairs)))
            for L, pairs in _by_layer(self.heads).items()
        ]

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, f"this {type(self).__name__} intervention")
        bad = [(layer, h) for layer, h in self.head_list()
               if not (0 <= layer < model.n_layers and 0 <= h < model.n_heads)]
        if bad:
            raise ValueError(f"heads {bad} do not exist in a model with {model.n_layers} layers x {model.n_heads} heads")
        if self.d_head != model.d_head:
            raise ValueError(f"directions have d_head={self.d_head} but the model's heads have {model.d_head}")
        super().check_model(model)

    def describe(self) -> str:
        return f"{type(self).__name__}(K={self.k}, alpha={self.strength:g})"


@dataclass
class ITI(HeadShift):
    """ITI: a :class:`HeadShift` on the top K heads with sigma as each head's scale.

    Also keeps the K heads' probes (standardized weights, bias, training mean and std), so
    that dynamic methods (FASB) can read P(true) from the same heads (``readout``).
    """

    direction: str = "mass_mean"
    probe_weight: torch.Tensor | None = None  # [K, d_head] float64, on standardized features
    probe_bias: torch.Tensor | None = None  # [K]
    probe_mean: torch.Tensor | None = None  # [K, d_head]
    probe_std: torch.Tensor | None = None  # [K, d_head]
    val_acc: torch.Tensor | None = None  # [K]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in PROBE_FIELDS[:-1]:
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"ITI {name} contain NaN or inf; refit from clean data")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def has_probes(self) -> bool:
        return self.probe_weight is not None

    @property
    def readout(self) -> HeadReadout:
        """The K heads' probes as a :class:`HeadReadout`."""
        w, b, mean, std = self.probe_weight, self.probe_bias, self.probe_mean, self.probe_std
        if w is None or b is None or mean is None or std is None:
            raise ValueError("this ITI carries no probes (it was built from directions alone)")
        return HeadReadout(self.heads, w, b, mean, std)

    def probe_proba(self, z: torch.Tensor) -> torch.Tensor:
        """P(true) under each selected head's probe: [..., K] for head activations [..., K, d_head]."""
        return self.readout.proba(z)

    def describe(self) -> str:
        return f"ITI(K={self.k}, alpha={self.strength:g}, {self.direction})"
