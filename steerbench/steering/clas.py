"""CLAS: Contextual Linear Activation Steering (arXiv 2604.24693), and the baselines it is
compared with. Notes: docs/methods.md, CLAS.

1. Direction per layer: a unit vector v[L], the difference of means of the residual stream
   (``hook_resid_post``) at the last token of positive minus negative texts (the
   reference fits an RFM probe; difference of means is what steerbench uses).
2. At every layer and every position: ``r' = r + s * (w[L] . r + b[L]) * v[L]``, with
   w[L] in R^d and a scalar b[L], both 0 at the start, so CLAS starts as the identity
   (reference: ``add_dynamic`` in _controller.py:66-68, applied to the whole block output
   at every position, _controller.py:115-130). ``s`` is the steerer's strength (1 as
   trained). In blocks: (Site.resid(L), EVERYWHERE, AddGated(v[L], w[L], b[L])).
3. w and b are trained with next-token cross-entropy on the target completion only (the
   prompt is masked), from few examples: AdamW (no weight decay, as Hugging Face's Trainer),
   lr 3e-3 for w and 0.1 for b, 10 examples per optimizer step (the reference's batch 1
   with 10-step accumulation), 8 epochs, constant schedule; the checkpoint with the lowest
   validation loss is kept, the untrained identity included. Training runs through
   ``passes.forward_batch(grad=True)``: the same hooks and pass as scoring, the model frozen.

Variants (``variant``), all one class on the same operator:

- ``"clas"``: w and b trained;
- ``"scalar"``: b trained, w = 0 (a learned strength per layer, the same for every token);
- ``"rank1"``: w, b and v trained (a rank-1 ReFT-like intervention, initialised at v);
- ``"fixed"``: w = 0, b = 1 and one strength shared by every layer, chosen by grid on the
  training examples' loss (the paper's fixed-coefficient baseline).

:class:`LoRA` is the paper's other baseline: a rank-1 LoRA update of each layer's MLP down
projection (the reference's default target, _peft.py:11-19: r=1, alpha=2r), trained by the
same loop. It runs as hooks on the down projection's input and output (``mlp.out.hook_in``
/ ``hook_out``) instead of peft's module swap, so it is installed and always removed by
``passes.steering`` like every steerer; a test checks it equals peft's LoRA layer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from steerbench.activations import collect_resid
from steerbench.artifacts import check_fingerprint
from steerbench.blocks import EVERYWHERE, AddGated, Intervention, Site
from steerbench.context import HookFn, StepContext
from steerbench.model import Model
from steerbench.passes import MAX_BATCH_TOKENS, forward_batch, forward_pass, length_batches, steering
from steerbench.steerer import Steerer, check_strength

VARIANTS = {"clas": ("weight", "bias"), "scalar": ("bias",), "rank1": ("weight", "bias", "vectors"), "fixed": ()}
LRS = {"weight": 3e-3, "bias": 0.1, "vectors": 3e-3}  # the reference's lrs for w and b; v as w
# The identity first: it wins ties. Every layer adds the same b * v, so the total shift is
# n_layers * b; +-0.25 and +-0.5 were added after +-1 hurt on tone and 0 won 2 draws of 3.
FIXED_GRID = (0.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Rows x width of one training micro-batch: backward keeps every layer's activations, so
# this is smaller than the scoring passes' budget (10 BoolQ passages of 400 tokens: ~6 GB).
TRAIN_BATCH_TOKENS = MAX_BATCH_TOKENS // 2


@dataclass(frozen=True)
class Example:
    """A prompt and the completion to train towards (its tokens alone are scored)."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt or not self.target:
            raise ValueError("an example needs at least one prompt token and one target token")


def examples(model: Model, prompts: Sequence[str], targets: Sequence[str], chat: bool = False) -> list[Example]:
    """Examples from texts: each target follows its prompt (after a space, unless the prompt
    ends a line, as a chat prompt does); ``chat`` formats the prompts as a user turn."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = []
    for p, t in zip(prompts, targets):
        text = model.chat_text(p) if chat else p
        lead = "" if text.endswith("\n") else " "
        out.append(Example(tuple(model.encode(text)), tuple(model.encode(lead + t.strip(), bos=False))))
    return out


def directions(model: Model, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
               batch_size: int = 16) -> torch.Tensor:
    """Unit difference-of-means directions ``[n_layers, d_model]`` of the residual stream
    after every block at the last token, positive minus negative token sequences."""
    if not positive or not negative:
        raise ValueError("directions need at least one positive and one negative sequence")
    acts = collect_resid(model, [list(s) for s in positive] + [list(s) for s in negative], position="last",
                         batch_size=batch_size).float()
    diff = acts[: len(positive)].mean(0) - acts[len(positive):].mean(0)
    norm = diff.norm(dim=-1, keepdim=True)
    if not torch.isfinite(diff).all() or bool((norm == 0).any()):
        raise ValueError("the positive and negative texts have the same mean activation at some layer: "
                         "no direction to steer along")
    return diff / norm


# -------------------------------------------------------------------------------------
# training through the evaluation pass


@contextlib.contextmanager
def frozen(model: Model) -> Iterator[None]:
    """The model's parameters with ``requires_grad`` off for the body (restored after), so
    gradients reach only a steerer's own tensors."""
    params = list(model.bridge.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)


def example_nll(model: Model, steer: Steerer | None, items: Sequence[Example], grad: bool = False,
                scale: float = 1.0, max_tokens: int = TRAIN_BATCH_TOKENS) -> torch.Tensor:
    """Each example's mean cross-entropy over its target tokens under ``steer``: ``[N]``.
    With ``grad``, ``scale * sum(losses)`` is back-propagated micro-batch by micro-batch
    (so a batch of long texts never holds every layer's activations at once) and the
    returned losses are detached."""
    out = torch.empty(len(items), dtype=torch.float64)
    seqs = [list(e.prompt) + list(e.target) for e in items]
    for idx in length_batches([len(s) for s in seqs], len(seqs), max_tokens):
        # logits only for the columns that predict a target token (the last target + 1 of each row)
        keep = max(len(items[i].target) + 1 for i in idx)
        logits, batch = forward_batch(model, [seqs[i] for i in idx], steer, [len(items[i].prompt) - 1 for i in idx],
                                      grad=grad, last=keep)
        assert logits is not None
        if grad and not logits.requires_grad:
            raise ValueError(f"nothing to train: {steer.describe() if steer else 'no steerer'} does not touch the "
                             "pass (strength 0?) or none of its tensors requires grad")
        losses = []
        for row, i in enumerate(idx):
            e = items[i]
            # the logits that predict the first target token (batch column offset + prompt - 1)
            start = batch.offsets[row] + len(e.prompt) - 1 - (max(batch.lengths) - keep)
            lp = torch.log_softmax(logits[row, start: start + len(e.target)].float(), dim=-1)
            tgt = torch.as_tensor(e.target, device=lp.device)
            losses.append(-lp.gather(-1, tgt[:, None]).mean())
        stacked = torch.stack(losses)
        if grad:
            with torch.enable_grad():  # (called inside no_grad too: forward_batch turned it on for the pass)
                (scale * stacked.sum()).backward()
        out[torch.as_tensor(idx)] = stacked.detach().double().cpu()
    return out


def train(model: Model, steer: Steerer, params: dict[str, tuple[torch.Tensor, float]], train_set: Sequence[Example],
          val_set: Sequence[Example], epochs: int = 8, accumulation: int = 10, seed: int = 0) -> dict:
    """Train ``params`` (name -> (tensor the steerer uses, lr)) in place with AdamW on the
    targets' cross-entropy; the model stays frozen. ``accumulation`` examples per optimizer
    step (the loss is their mean), reshuffled each epoch (seeded). After each epoch the
    validation loss is measured and the tensors of the best epoch (epoch 0: as given) are
    restored at the end. Returns the history: train/val loss per epoch, best epoch, seconds."""
    if not train_set or not val_set:
        raise ValueError("training needs at least one training and one validation example")
    if epochs < 1 or accumulation < 1:
        raise ValueError(f"epochs and accumulation must be at least 1, got {epochs} and {accumulation}")
    t0 = time.perf_counter()
    tensors = [t for t, _ in params.values()]
    best, best_epoch = [t.detach().clone() for t in tensors], 0  # epoch 0: as given
    for t in tensors:
        t.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [t], "lr": lr} for t, lr in params.values()], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history: dict = {"train_loss": [], "val_loss": [], "epochs": epochs, "accumulation": accumulation,
                     "lr": {k: lr for k, (_, lr) in params.items()}}
    try:
        with frozen(model):
            with torch.no_grad():
                best_val = float(example_nll(model, steer, val_set).mean())
            history["train_loss"].append(None)  # nothing trained at epoch 0 (None: the artifact header stays JSON)
            history["val_loss"].append(best_val)
            for epoch in range(1, epochs + 1):
                order = torch.randperm(len(train_set), generator=gen).tolist()
                seen = []
                for i in range(0, len(order), accumulation):
                    group = [train_set[j] for j in order[i: i + accumulation]]
                    opt.zero_grad(set_to_none=True)
                    seen.append(example_nll(model, steer, group, grad=True, scale=1.0 / len(group)))
                    opt.step()
                with torch.no_grad():
                    val = float(example_nll(model, steer, val_set).mean())
                if not math.isfinite(val):
                    raise FloatingPointError(f"validation loss became {val} at epoch {epoch}; lower the learning rate")
                history["train_loss"].append(float(torch.cat(seen).mean()))
                history["val_loss"].append(val)
                if val < best_val:
                    best_val, best_epoch = val, epoch
                    best = [t.detach().clone() for t in tensors]
    finally:
        with torch.no_grad():
            for t, b in zip(tensors, best):
                t.copy_(b)
        for t in tensors:
            t.requires_grad_(False)
            t.grad = None
    history.update(best_epoch=best_epoch, best_val_loss=best_val, seconds=time.perf_counter() - t0,
                   n_train=len(train_set), n_val=len(val_set))
    return history


# -------------------------------------------------------------------------------------
# CLAS and its linear baselines


@dataclass
class CLAS(Steerer):
    """Per-layer, per-token strength ``s * (w[L] . r + b[L])`` along v[L] at the ``layers``."""

    vectors: torch.Tensor  # [n_layers, d_model]: v[L] (unit at fitting; trained in "rank1")
    weight: torch.Tensor  # [n_layers, d_model]: w[L]
    bias: torch.Tensor  # [n_layers]: b[L]
    layers: tuple[int, ...] = ()  # () = every layer
    strength: float = 1.0
    variant: str = "clas"
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # training history, data sizes
    prefix_invariant = False  # it steers every position, the prompt included

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.vectors.ndim != 2:
            raise ValueError(f"CLAS vectors must be [n_layers, d_model], got shape {tuple(self.vectors.shape)}")
        n, d = self.vectors.shape
        if self.weight.shape != (n, d) or self.bias.shape != (n,):
            raise ValueError(f"CLAS weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)} must be "
                             f"({n}, {d}) and ({n},), as the vectors")
        for name in ("vectors", "weight", "bias"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"CLAS {name} contain NaN or inf")
        self.layers = tuple(int(x) for x in self.layers) or tuple(range(n))
        bad = [x for x in self.layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the vectors cover {n} layers (0-{n - 1})")
        self.strength = check_strength(self.strength)

    @classmethod
    def identity(cls, vectors: torch.Tensor, variant: str = "clas", layers: Sequence[int] = (), fitted_on=None,
                 info=None) -> CLAS:
        """w = 0 and b = 0 (b = 1 for "fixed", whose strength is then the coefficient)."""
        n, d = vectors.shape
        bias = torch.ones(n) if variant == "fixed" else torch.zeros(n)
        return cls(vectors.detach().clone().float(), torch.zeros(n, d), bias, tuple(layers),
                   strength=0.0 if variant == "fixed" else 1.0, variant=variant, fitted_on=dict(fitted_on or {}),
                   info=dict(info or {}))

    @classmethod
    def fit(cls, model: Model, train_set: Sequence[Example], val_set: Sequence[Example], vectors: torch.Tensor,
            variant: str = "clas", layers: Sequence[int] = (), epochs: int = 8, accumulation: int = 10,
            lr: dict | None = None, seed: int = 0, grid: Sequence[float] = FIXED_GRID) -> CLAS:
        """Train a variant from ``train_set``, keeping the best checkpoint on ``val_set``
        ("fixed": the grid value with the lowest training loss; ``val_set`` unused)."""
        if vectors.shape != (model.n_layers, model.d_model):
            raise ValueError(f"vectors have shape {tuple(vectors.shape)}; the model needs "
                             f"({model.n_layers}, {model.d_model})")
        steer = cls.identity(vectors, variant, layers, model.fingerprint())
        if variant == "fixed":
            return steer.fit_fixed(model, train_set, grid)
        rates = {**LRS, **(lr or {})}
        params = {k: (getattr(steer, k), rates[k]) for k in VARIANTS[variant]}
        history = train(model, steer, params, train_set, val_set, epochs, accumulation, seed)
        steer.info = {"history": history}
        return steer

    def fit_fixed(self, model: Model, train_set: Sequence[Example], grid: Sequence[float] = FIXED_GRID) -> CLAS:
        """This steerer (b = 1, w = 0) at the grid strength with the lowest training loss."""
        if not train_set:
            raise ValueError("the fixed coefficient needs training examples to choose it on")
        t0 = time.perf_counter()
        losses = []
        with torch.no_grad():
            for m in grid:
                losses.append(float(example_nll(model, self.scaled(float(m)), train_set).mean()))
        best = int(min(range(len(grid)), key=lambda i: losses[i]))
        out = self.scaled(float(grid[best]))
        out.info = {"history": {"grid": [float(m) for m in grid], "train_loss": losses, "chosen": float(grid[best]),
                                "seconds": time.perf_counter() - t0, "n_train": len(train_set)}}
        return out

    # -- Steerer ----------------------------------------------------------------------------
    def interventions(self) -> list[Intervention]:
        return [Intervention(Site.resid(L), EVERYWHERE, AddGated(self.vectors[L], self.weight[L], self.bias[L]))
                for L in self.layers]

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, "this CLAS steerer")
        if self.vectors.shape != (model.n_layers, model.d_model):
            raise ValueError(f"CLAS vectors have shape {tuple(self.vectors.shape)} but the model needs "
                             f"({model.n_layers}, {model.d_model})")
        super().check_model(model)

    def gates(self, model: Model, ids: Sequence[int]) -> torch.Tensor:
        """``[n_layers, T]``: the strength applied at each layer and position of one token
        sequence (0 at layers it does not steer), as the steered pass itself computed it."""
        ids = list(ids)
        if not ids:
            raise ValueError("no tokens to read gates from")
        ctx = StepContext(steer_from=torch.tensor([0], device=model.device))
        ctx.set_pass(torch.arange(len(ids), device=model.device)[None, :])
        with torch.no_grad(), steering(model, self, ctx):
            forward_pass(model, ctx, torch.tensor([ids], device=model.device))
        out = torch.zeros(model.n_layers, len(ids))
        for L in self.layers:
            g = ctx.applied.get(Site.resid(L).hook)
            if g is not None:
                out[L] = g[0].float().cpu()
        return out

    def describe(self) -> str:
        n = len(self.layers)
        where = "every layer" if n == self.vectors.shape[0] else f"layers {list(self.layers)}"
        return f"CLAS({self.variant}, {where}, s={self.strength:g})"


# -------------------------------------------------------------------------------------
# LoRA rank 1 on the MLP down projection


@dataclass
class LoRA(Steerer):
    """``down_proj(x) + s * (alpha / r) * B (A x)`` at every layer in ``layers``, every position."""

    down: torch.Tensor  # A: [n_layers, r, d_mlp] (peft's lora_A)
    up: torch.Tensor  # B: [n_layers, d_model, r] (peft's lora_B), 0 at the start
    layers: tuple[int, ...] = ()
    strength: float = 1.0
    alpha: float = 2.0  # the reference's lora_alpha = 2r with r = 1
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    prefix_invariant = False

    def __post_init__(self) -> None:
        if self.down.ndim != 3 or self.up.ndim != 3 or self.down.shape[:2] != (self.up.shape[0], self.up.shape[2]):
            raise ValueError(f"LoRA factors must be [n_layers, r, d_mlp] and [n_layers, d_model, r], got "
                             f"{tuple(self.down.shape)} and {tuple(self.up.shape)}")
        for name in ("down", "up"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"LoRA {name} contains NaN or inf")
        n = self.down.shape[0]
        self.layers = tuple(int(x) for x in self.layers) or tuple(range(n))
        bad = [x for x in self.layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the factors cover {n} layers (0-{n - 1})")
        self.strength = check_strength(self.strength)
        self.alpha = check_strength(self.alpha, "alpha")

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])

    @classmethod
    def init(cls, model: Model, rank: int = 1, alpha: float | None = None, layers: Sequence[int] = (),
             seed: int = 0) -> LoRA:
        """A as peft initialises it (Kaiming-uniform, a = sqrt(5)), B = 0: the identity."""
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        d_mlp = int(model.cfg.d_mlp)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_mlp)  # kaiming_uniform_(a=sqrt(5)) on a [rank, d_mlp] weight
        down = (torch.rand(model.n_layers, rank, d_mlp, generator=gen) * 2 - 1) * bound
        up = torch.zeros(model.n_layers, model.d_model, rank)
        return cls(down, up, tuple(layers), alpha=2.0 * rank if alpha is None else alpha,
                   fitted_on=model.fingerprint())

    @classmethod
    def fit(cls, model: Model, train_set: Sequence[Example], val_set: Sequence[Example], rank: int = 1,
            lr: float = 1e-2, epochs: int = 8, accumulation: int = 10, seed: int = 0,
            layers: Sequence[int] = ()) -> LoRA:
        steer = cls.init(model, rank, layers=layers, seed=seed)
        history = train(model, steer, {"down": (steer.down, lr), "up": (steer.up, lr)}, train_set, val_set, epochs,
                        accumulation, seed)
        steer.info = {"history": history}
        return steer

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(h for L in self.layers for h in (f"blocks.{L}.mlp.out.hook_in", f"blocks.{L}.mlp.out.hook_out"))

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        if not isinstance(ctx.strength, torch.Tensor) and not ctx.strength:
            return []
        scale = self.alpha / self.rank
        out: list[tuple[str, HookFn]] = []
        for L in self.layers:
            key = ("lora_in", L)

            def read(act: torch.Tensor, hook, key=key) -> torch.Tensor:
                ctx.state[key] = act
                return act

            def write(act: torch.Tensor, hook, key=key, L=L) -> torch.Tensor:
                x = ctx.state.pop(key)
                a, b = self.down[L].to(x), self.up[L].to(x)
                s = ctx.strength
                s = s.to(x).reshape(-1, *([1] * (act.ndim - 1))) if isinstance(s, torch.Tensor) else float(s or 0.0)
                return act + (s * scale) * ((x @ a.T) @ b.T)

            out += [(f"blocks.{L}.mlp.out.hook_in", read), (f"blocks.{L}.mlp.out.hook_out", write)]
        return out

    def check_model(self, model: Model) -> None:
        check_fingerprint(self.fitted_on, model, "this LoRA")
        if self.down.shape[0] != model.n_layers or self.down.shape[2] != int(model.cfg.d_mlp) \
                or self.up.shape[1] != model.d_model:
            raise ValueError(f"LoRA factors {tuple(self.down.shape)} / {tuple(self.up.shape)} do not fit this "
                             f"model ({model.n_layers} layers, d_mlp {model.cfg.d_mlp}, d_model {model.d_model})")
        super().check_model(model)

    def describe(self) -> str:
        return f"LoRA(rank {self.rank}, down_proj of {len(self.layers)} layers, s={self.strength:g})"
