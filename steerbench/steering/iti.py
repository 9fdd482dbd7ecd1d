"""ITI: Inference-Time Intervention (Li et al., NeurIPS 2023). METHODS.md section 2.

1. Read every attention head's output before W_O (``blocks.L.attn.hook_z``) at the last
   token of ``"Q: {question} A: {answer}"`` for each true and false answer of the
   training questions.
2. Split the training questions 80/20 (train/val, by question, seed 42); fit one logistic
   probe per head on train (``probes.fit_probes``); rank heads by val accuracy; keep the top K.
3. Direction per head: the mass-mean shift ``u = normalize(mean(true) - mean(false))``
   (default) or the probe weight; ``sigma`` = std of the activations projected on ``u``.
4. Apply ``z[L, h] += alpha * sigma * u`` on the K heads at every steered position (from the
   last prompt token on: every generated token, and every answer token in MC scoring).

:class:`HeadProbes` is the fitted ranking of all heads (what K and the direction are
chosen from without collecting again); :class:`ITI` is the Steerer on K of them. FASB
reuses both: it needs the selected heads' probes as well as their directions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from steerbench.activations import collect_heads
from steerbench.artifacts import check_fingerprint, load_artifact, save_artifact
from steerbench.datasets import MCQuestion, qa_examples
from steerbench.model import Model
from steerbench.probes import ProbeGrid, fit_probes
from steerbench.steerer import HookFn, StepContext, Steerer

TEMPLATE = "Q: {question} A: {answer}"
DIRECTIONS = ("mass_mean", "probe")
PROBE_FIELDS = ("probe_weight", "probe_bias", "probe_mean", "probe_std", "val_acc")


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


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
    ) -> "HeadProbes":
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

    def ranking(self) -> list[tuple[int, int]]:
        """All heads, best validation accuracy first."""
        return [site for site, _ in self.grid.top(self.grid.n_sites)]

    def select(self, k: int, alpha: float = 15.0, direction: str = "mass_mean") -> "ITI":
        """ITI on the top ``k`` heads by validation accuracy, at strength ``alpha``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if not 1 <= k <= self.grid.n_sites:
            raise ValueError(f"k must be between 1 and {self.grid.n_sites} heads, got {k}")
        heads = self.ranking()[:k]
        L = torch.tensor([l for l, _ in heads])
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


@dataclass
class ITI(Steerer):
    """``z[L, h] += strength * sigma * u`` on K attention heads, from ``steer_from`` on.

    Also keeps the K heads' probes (standardized weights, bias, training mean and std), so
    that dynamic methods (FASB) can read P(true) from the same heads.
    """

    heads: torch.Tensor  # [K, 2] int: (layer, head), best first
    directions: torch.Tensor  # [K, d_head]: unit vectors pointing to "true"
    sigma: torch.Tensor  # [K]
    strength: float = 15.0  # alpha
    direction: str = "mass_mean"
    probe_weight: torch.Tensor | None = None  # [K, d_head] float64, on standardized features
    probe_bias: torch.Tensor | None = None  # [K]
    probe_mean: torch.Tensor | None = None  # [K, d_head]
    probe_std: torch.Tensor | None = None  # [K, d_head]
    val_acc: torch.Tensor | None = None  # [K]
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = torch.as_tensor(self.heads, dtype=torch.long)
        if self.heads.ndim != 2 or self.heads.shape[1] != 2 or len(self.heads) == 0:
            raise ValueError(f"heads must be [K, 2] (layer, head) pairs with K >= 1, got shape {tuple(self.heads.shape)}")
        K = len(self.heads)
        if len({tuple(h) for h in self.heads.tolist()}) != K:
            raise ValueError("heads contains a (layer, head) pair twice")
        if self.directions.ndim != 2 or self.directions.shape[0] != K:
            raise ValueError(f"directions must be [K={K}, d_head], got shape {tuple(self.directions.shape)}")
        if tuple(self.sigma.shape) != (K,):
            raise ValueError(f"sigma must have shape [{K}], got {tuple(self.sigma.shape)}")
        for name in ("directions", "sigma", "probe_weight", "probe_bias", "probe_mean", "probe_std"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"ITI {name} contain NaN or inf; refit from clean data")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not isinstance(self.strength, (int, float)) or self.strength != self.strength:
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")

    @property
    def k(self) -> int:
        return len(self.heads)

    @property
    def d_head(self) -> int:
        return int(self.directions.shape[1])

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.heads[:, 0].tolist()))

    @property
    def has_probes(self) -> bool:
        return self.probe_weight is not None

    def head_list(self) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in self.heads.tolist()]

    # -- probes (for dynamic methods) ------------------------------------------------------
    def probe_proba(self, z: torch.Tensor) -> torch.Tensor:
        """P(true) under each selected head's probe: [..., K] for head activations [..., K, d_head]."""
        if not self.has_probes:
            raise ValueError("this ITI carries no probes (it was built from directions alone)")
        x = (z.detach().to("cpu", torch.float64) - self.probe_mean) / self.probe_std
        return torch.sigmoid((x * self.probe_weight).sum(-1) + self.probe_bias)

    # -- Steerer ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(z_hook(L) for L in self.layers)

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, "this ITI intervention")
        bad = [(l, h) for l, h in self.head_list() if not (0 <= l < model.n_layers and 0 <= h < model.n_heads)]
        if bad:
            raise ValueError(f"heads {bad} do not exist in a model with {model.n_layers} layers x {model.n_heads} heads")
        if self.d_head != model.d_head:
            raise ValueError(f"directions have d_head={self.d_head} but the model's heads have {model.d_head}")
        super().check_model(model)

    def layer_deltas(self, n_heads: int, scale: float = 1.0) -> dict[int, torch.Tensor]:
        """``{layer: [n_heads, d_head]}``: what is added to ``hook_z`` of each touched layer."""
        out: dict[int, torch.Tensor] = {}
        shift = scale * self.sigma[:, None] * self.directions  # [K, d_head]
        for (l, h), v in zip(self.head_list(), shift):
            out.setdefault(l, torch.zeros(n_heads, self.d_head))[h] += v
        return out

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        if self.strength == 0:
            return []  # strength 0 touches nothing: output is exactly the unsteered one
        return z_hooks(self, ctx, lambda: self.strength)

    def describe(self) -> str:
        return f"ITI(K={self.k}, alpha={self.strength:g}, {self.direction})"

    # -- artifacts -------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """What an artifact stores: heads, directions, sigma and the probes where present."""
        out = {"heads": self.heads, "directions": self.directions, "sigma": self.sigma}
        out.update({k: getattr(self, k) for k in PROBE_FIELDS if getattr(self, k) is not None})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], header: dict, strength: float = 15.0) -> "ITI":
        """Rebuild from ``tensors()`` and an artifact header (its params' direction, provenance)."""
        return cls(
            heads=tensors["heads"], directions=tensors["directions"], sigma=tensors["sigma"], strength=strength,
            direction=header["params"]["direction"], **{k: tensors.get(k) for k in PROBE_FIELDS},
            fitted_on=header.get("fitted_on", {}), info=header.get("info", {}),
        )

    def save(self, path: str | Path) -> Path:
        tensors = self.tensors()
        header = {
            "method": "ITI",
            "params": {"strength": self.strength, "direction": self.direction, "k": self.k},
            "hooks": list(self.sites),
            "positions": "from the last prompt token on",
            "fitted_on": self.fitted_on,
            "info": self.info,
        }
        return save_artifact(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> "ITI":
        """Load a saved ITI; with ``model``, refuse if it was fitted on another model."""
        tensors, header = load_artifact(path)
        if header.get("method") != "ITI":
            raise ValueError(f"{path} holds a {header.get('method')} artifact, not ITI")
        iti = cls.from_tensors(tensors, header, strength=header["params"]["strength"])
        if model is not None:
            iti.check_model(model)
        return iti


def z_hooks(heads: ITI, ctx: StepContext, strength, where=None) -> list[tuple[str, HookFn]]:
    """Hooks adding ``strength() * sigma * u`` to the selected heads' ``hook_z``.

    ``strength`` is called at every pass (dynamic methods change it during a generation);
    ``where(ctx)`` gives the boolean [batch, pos] mask of steered columns (default
    ``ctx.mask``: every column at or after ``steer_from``).
    """
    cache: dict = {}

    def make(layer: int) -> HookFn:
        def add(z: torch.Tensor, hook) -> torch.Tensor:
            s = strength()  # a number, or a tensor [batch] of per-row strengths
            if isinstance(s, torch.Tensor):
                s = s.to(device=z.device, dtype=z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
            elif s == 0:
                return z
            flat = z.ndim == 3  # [B, T, H * d_head] where the bridge does not split heads
            n_heads = z.shape[-1] // heads.d_head if flat else z.shape[-2]
            key = (layer, z.device, z.dtype, n_heads)
            if key not in cache:
                cache[key] = heads.layer_deltas(n_heads)[layer].to(device=z.device, dtype=z.dtype)
            delta = cache[key].reshape(-1) if flat else cache[key]
            m = (ctx.mask if where is None else where(ctx)).to(z.dtype)
            m = m[:, :, None] if flat else m[:, :, None, None]
            return z + (s * m) * delta

        return add

    return [(z_hook(L), make(L)) for L in heads.layers]
