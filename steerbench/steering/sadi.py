"""SADI: Semantics-Adaptive Dynamic Intervention (Wang et al., ICLR 2025). Notes: docs/methods.md, SADI.

Training-free: contrastive pairs pick *which* elements matter, and at inference the
input's *own* activation of those elements is scaled, so the intervention adapts to
each input.

1. For each training item read, at the last token of ``template`` (``"{question} {answer}"``:
   the reference's ``f'{q} {a}'``) for its true and its false answers, one value per
   element:
   - ``head``: each attention head's ``hook_z`` averaged over d_head (one scalar per head);
   - ``neuron``: the MLP's activation function on the gate, act(gate) (``mlp.hook_pre``
     through the activation function; TransformerLens' ``mlp.hook_post`` is act(gate) * up
     on gated MLPs). The scaling is applied on ``mlp.hook_post``: act(gate) * up is linear
     in act(gate), so scaling element i of one scales element i of the other by the same
     factor;
   - ``hidden``: the MLP output, ``hook_mlp_out``.
2. ``D = mean over items of (mean over true answers - mean over false answers)``, signed;
   the mask M keeps the K largest positive values of D across all layers.
3. At the last prompt position (``positions="last"``; ``"last+generated"`` also every
   generated token, and in scoring every answer token) the masked elements are
   multiplied by ``1 + delta`` (``strength`` = delta; the reference multiplies by delta
   itself, steering.py:120, which is delta - 1 here):
   - ``reading="reference"`` (default): the elements take the *clean* activation (the same
     pass with the steering off) scaled, and the unmasked elements of every layer's site are
     reset to their clean values, so one layer's change does not compound into the next
     layer's site at that position (the reference runs the question alone, then writes the
     edited activations into the scoring pass at that position in all 32 layers,
     steering.py:116-131). In blocks: ``(site(L), rule, ScaleClean(M[L]))`` for every layer;
   - ``reading="in_place"``: scale the activation as the pass computes it
     (``ScaleMasked(M[L])``, only in layers with masked elements); earlier layers' changes
     then reach later layers' sites.

What the reference selects on the test set, steerbench selects on validation
(``benchmark``); the reference scores by exact match of greedy output, steerbench by the
summed log-probabilities of the choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steerbench.activations import collect_stacked
from steerbench.artifacts import check_fingerprint
from steerbench.blocks import (
    FROM_INSTRUCTION,
    GENERATED,
    LAST_PROMPT_TOKEN,
    AnyOf,
    Intervention,
    Rule,
    ScaleClean,
    ScaleMasked,
    Site,
)
from steerbench.datasets import MCQuestion, qa_examples
from steerbench.model import Model
from steerbench.steerer import Steerer, check_strength

ELEMENTS = ("head", "neuron", "hidden")
READINGS = ("reference", "in_place")
POSITIONS = {
    "last": LAST_PROMPT_TOKEN,
    "last+generated": AnyOf((LAST_PROMPT_TOKEN, GENERATED)),
    "all": FROM_INSTRUCTION,  # what the off-task KL measures (when_acting)
}
TEMPLATE = "{question} {answer}"


def n_units(model: Model, elements: str) -> int:
    """Elements per layer: heads, MLP neurons or MLP output dimensions."""
    if elements == "head":
        return model.n_heads
    if elements == "neuron":
        return int(model.cfg.d_mlp)
    if elements == "hidden":
        return model.d_model
    raise ValueError(f"elements must be one of {ELEMENTS}, got {elements!r}")


def _gated(model: Model) -> bool:
    return "blocks.0.mlp.hook_pre_linear" in model.bridge.hook_dict


def element_activations(model: Model, texts: Sequence[str], elements: str, batch_size: int = 16,
                        progress: bool | None = None) -> torch.Tensor:
    """What SADI reads at the last token of each text: [N, n_layers, n_units] (see module doc)."""
    n_units(model, elements)
    L = range(model.n_layers)
    if elements == "head":
        hooks = [f"blocks.{i}.attn.hook_z" for i in L]
    elif elements == "neuron":
        hooks = [f"blocks.{i}.mlp.hook_pre" if _gated(model) else f"blocks.{i}.mlp.hook_post" for i in L]
    else:
        hooks = [f"blocks.{i}.hook_mlp_out" for i in L]
    x, _ = collect_stacked(model, list(texts), hooks, position="last", batch_size=batch_size, progress=progress)
    x = x.float()
    if elements == "head":
        return head_means(x, model.n_heads)
    if elements == "neuron" and _gated(model):
        from transformer_lens.model_bridge.generalized_components.gated_mlp import resolve_activation_fn

        return resolve_activation_fn(model.bridge.blocks[0].mlp.config)(x)
    return x


def head_means(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """SADI's head elements from ``hook_z`` activations ``[N, n_layers, ...]`` (heads split
    or flat): each head's output averaged over d_head, ``[N, n_layers, n_heads]``."""
    return z.reshape(*z.shape[:2], n_heads, -1).float().mean(-1)


def contrast(acts: torch.Tensor, labels: Sequence[int], groups: Sequence[int]) -> torch.Tensor:
    """D: the mean over items (groups) of mean(true rows) - mean(false rows), signed.

    Items lacking a true or a false row are skipped; none left is an error."""
    labels_t, groups_t = torch.as_tensor(list(labels)), torch.as_tensor(list(groups))
    if len(labels_t) != acts.shape[0]:
        raise ValueError(f"{acts.shape[0]} activation rows but {len(labels_t)} labels")
    diffs = []
    for g in torch.unique(groups_t):
        rows = groups_t == g
        t, f = acts[rows & (labels_t == 1)], acts[rows & (labels_t == 0)]
        if len(t) and len(f):
            diffs.append(t.double().mean(0) - f.double().mean(0))
    if not diffs:
        raise ValueError("SADI needs items with at least one true and one false answer")
    return torch.stack(diffs).mean(0).float()


@dataclass
class SADI(Steerer):
    """Scale the input's own activation of the K elements with the largest positive
    contrast ``scores`` by ``1 + strength`` at the last prompt position."""

    scores: torch.Tensor  # [n_layers, n_units]: D = mean(true - false)
    k: int
    strength: float = 10.0  # delta
    elements: str = "head"
    d_head: int = 0  # head elements: the model's d_head (the view of hook_z)
    reading: str = "reference"
    positions: str = "last"
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.elements not in ELEMENTS:
            raise ValueError(f"elements must be one of {ELEMENTS}, got {self.elements!r}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {tuple(POSITIONS)}, got {self.positions!r}")
        if self.scores.ndim != 2 or self.scores.numel() == 0:
            raise ValueError(f"SADI scores must be [n_layers, n_units], got shape {tuple(self.scores.shape)}")
        if not torch.isfinite(self.scores).all():
            raise ValueError("SADI scores contain NaN or inf; refit from clean data")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.scores.numel():
            raise ValueError(f"k must be an int between 1 and {self.scores.numel()} elements, got {self.k!r}")
        if not (self.scores > 0).any():
            raise ValueError("no element has a positive contrast (true - false): SADI has nothing to scale")
        if self.elements == "head" and self.d_head < 1:
            raise ValueError("head elements need d_head (the model's head size)")
        self.strength = check_strength(self.strength)

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: Model,
        questions: Sequence[MCQuestion],
        elements: str = "head",
        k: int = 4,
        strength: float = 10.0,
        template: str = TEMPLATE,
        acts: torch.Tensor | None = None,
        reading: str = "reference",
        positions: str = "last",
        batch_size: int = 16,
        dataset: str = "",
    ) -> SADI:
        """The contrast of ``questions``' true and false answers (``acts``: [N_answers,
        n_layers, n_units] element activations in ``qa_examples`` order, collected if None)."""
        if not questions:
            raise ValueError("SADI needs at least one training item")
        texts, labels, groups = qa_examples(questions, template)
        if acts is None:
            acts = element_activations(model, texts, elements, batch_size)
        want = (len(texts), model.n_layers, n_units(model, elements))
        if tuple(acts.shape) != want:
            raise ValueError(f"acts must have shape {want} ({elements} activations of every answer), got {tuple(acts.shape)}")
        return cls(
            scores=contrast(acts, labels, groups), k=int(k), strength=strength, elements=elements,
            d_head=model.d_head if elements == "head" else 0, reading=reading, positions=positions,
            fitted_on=model.fingerprint(),
            info={"dataset": dataset, "template": template, "n_items": len(questions), "n_answers": len(texts)},
        )

    # -- variants ----------------------------------------------------------------------------
    def select(self, k: int, strength: float | None = None) -> SADI:
        """The same contrast, keeping the top ``k`` elements (and a new delta if given)."""
        return dataclasses.replace(self, k=int(k), strength=self.strength if strength is None else strength)

    def when_acting(self) -> SADI:
        """For the off-task KL: the same scaling at every position of the text, as if each
        were a last prompt token."""
        return dataclasses.replace(self, positions="all")

    @property
    def mask(self) -> torch.Tensor:
        """[n_layers, n_units] 0/1: the K largest positive values of ``scores``."""
        flat = self.scores.flatten()
        top = torch.topk(flat, self.k).indices
        m = torch.zeros_like(flat)
        m[top] = 1.0
        return (m * (flat > 0)).reshape(self.scores.shape)

    def selected(self) -> list[tuple[int, int]]:
        """(layer, element) of the masked elements, largest contrast first."""
        m, flat = self.mask.flatten(), self.scores.flatten()
        order = torch.argsort(flat, descending=True)
        n = self.scores.shape[1]
        return [(int(i) // n, int(i) % n) for i in order if m[i] > 0]

    # -- Steerer -------------------------------------------------------------------------------
    def site(self, layer: int) -> Site:
        if self.elements == "head":
            return Site.heads(layer, self.d_head)
        return Site.mlp_post(layer) if self.elements == "neuron" else Site.mlp_out(layer)

    def rule(self) -> Rule:
        return POSITIONS[self.positions]

    def interventions(self) -> list[Intervention]:
        mask, rule = self.mask, self.rule()
        if self.elements == "head":
            mask = mask[..., None]  # [n_layers, n_heads, 1]: a whole head scales
        if self.reading == "reference":  # every layer's site: the unmasked elements reset to clean
            return [Intervention(self.site(L), rule, ScaleClean(mask[L])) for L in range(len(mask))]
        return [Intervention(self.site(L), rule, ScaleMasked(mask[L])) for L in range(len(mask)) if mask[L].any()]

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, "this SADI mask")
        want = (model.n_layers, n_units(model, self.elements))
        if tuple(self.scores.shape) != want:
            raise ValueError(f"SADI {self.elements} scores have shape {tuple(self.scores.shape)} but the model needs {want}")
        if self.elements == "head" and self.d_head != model.d_head:
            raise ValueError(f"SADI was fitted on heads of size {self.d_head}; the model's are {model.d_head}")
        super().check_model(model)

    def describe(self) -> str:
        extra = "" if self.reading == "reference" else ", in place"
        extra += "" if self.positions == "last" else f", {self.positions}"
        return f"SADI-{self.elements.upper()}(K={self.k}, delta={self.strength:g}{extra})"
