"""Steering building blocks: *where* (a site), *when* (a rule) and *how* (an operator).

A static Steerer is a list of :class:`Intervention` triples; ``Steerer.hooks`` turns them
into hook functions, ``Steerer.sites`` is derived from them, and the trace's per-token
"steered" flag comes from their rules. What the methods differ in is small:

- **where**: :class:`Site`, a hook name; for ``hook_z`` the operator sees the head view
  ``[batch, pos, n_heads, d_head]`` whatever layout the bridge hands the hook;
- **when**: a :class:`Rule` gives the boolean ``[batch, pos]`` mask of the columns to
  steer in the pass now running, from absolute positions (so it holds under a KV cache);
- **how**: an :class:`Operator` maps the activation, the mask and the strength in force to
  the new activation. Every operator is the identity at strength 0.

The strength is read from the live :class:`~steerbench.context.StepContext` at every
pass (``ctx.strength``: a number, or one per batch row), so a dynamic steerer changes it
through ``Decision.strength`` and the trace records the strength actually applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from steerbench.context import HookFn, StepContext

# -------------------------------------------------------------------------------------
# where


@dataclass(frozen=True)
class Site:
    """A hook point. ``d_head`` set means a head site: operators see ``[B, T, n_heads, d_head]``."""

    hook: str
    d_head: int | None = None

    @classmethod
    def resid(cls, layer: int) -> Site:
        """The residual stream after block ``layer``."""
        return cls(f"blocks.{layer}.hook_resid_post")

    @classmethod
    def heads(cls, layer: int, d_head: int) -> Site:
        """Every attention head's output before W_O in ``layer`` (``hook_z``), as heads."""
        return cls(f"blocks.{layer}.attn.hook_z", d_head)

    @classmethod
    def mlp_post(cls, layer: int) -> Site:
        """The MLP's hidden activation (after the activation function) in ``layer``."""
        return cls(f"blocks.{layer}.mlp.hook_post")

    @classmethod
    def mlp_out(cls, layer: int) -> Site:
        """The MLP's output in ``layer``."""
        return cls(f"blocks.{layer}.hook_mlp_out")

    def view(self, act: torch.Tensor) -> torch.Tensor:
        return head_view(act, self.d_head) if self.d_head is not None else act


def head_view(act: torch.Tensor, d_head: int) -> torch.Tensor:
    """``hook_z`` as ``[batch, pos, n_heads, d_head]``: the bridge hands some models' heads
    split and others' flat (``[batch, pos, n_heads * d_head]``); this is the one place that
    knows. The result is a view: writing through it writes the activation."""
    return act.reshape(*act.shape[:2], -1, d_head) if act.ndim == 3 else act


def z_hook(layer: int) -> str:
    return Site.heads(layer, 1).hook


# -------------------------------------------------------------------------------------
# when


class Rule:
    """Which columns of the running pass to steer: ``mask(ctx)`` is boolean ``[batch, pos]``."""

    def mask(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class FromInstruction(Rule):
    """Every position from ``steer_from`` on: the end of the user instruction, any answer
    prefix and every generated token (CAA, ITI)."""

    def mask(self, ctx: StepContext) -> torch.Tensor:
        return ctx.mask

    def describe(self) -> str:
        return "from the end of the user instruction on"


@dataclass(frozen=True)
class LastPromptToken(Rule):
    """Only the position ``steer_from``: the last token of the prompt (of the user
    instruction, when an answer prefix follows). Under a KV cache its steered keys and
    values reach every later token (SADI)."""

    def mask(self, ctx: StepContext) -> torch.Tensor:
        pos = _positions(ctx)
        return pos == ctx.steer_from.to(pos.device)[:, None]

    def describe(self) -> str:
        return "the last prompt token only"


@dataclass(frozen=True)
class Generated(Rule):
    """Only the columns of generated tokens (and, in scoring, of the continuation):
    positions from ``ctx.gen_from`` on (default ``steer_from + 1``)."""

    def mask(self, ctx: StepContext) -> torch.Tensor:
        pos = _positions(ctx)
        start = ctx.gen_from if ctx.gen_from is not None else ctx.steer_from + 1
        return pos >= start.to(pos.device)[:, None]

    def describe(self) -> str:
        return "generated tokens only"


@dataclass(frozen=True)
class FromState(Rule):
    """Positions from ``ctx.state[key]`` on, nowhere while it is None (a dynamic steerer
    sets it when it acts: FASB steers from where it backed off to). ``newest_only`` keeps
    only the pass's last column (the reference's recompute-every-step semantics)."""

    key: str
    newest_only: bool = False

    def mask(self, ctx: StepContext) -> torch.Tensor:
        pos = _positions(ctx)
        start = ctx.state.get(self.key)
        m = pos >= (start if start is not None else 1 << 62)
        if self.newest_only:
            m = m & (torch.arange(m.shape[1], device=m.device) == m.shape[1] - 1)
        return m

    def describe(self) -> str:
        return f"from state[{self.key!r}] on" + (", newest position only" if self.newest_only else "")


@dataclass(frozen=True)
class Everywhere(Rule):
    """Every position of the sequence, prompt included (padding excluded): CLAS and LoRA
    change the model wherever it runs (reference CLAS: _controller.py:115-130 steers the
    whole block output). Such a steerer is not ``prefix_invariant``."""

    def mask(self, ctx: StepContext) -> torch.Tensor:
        return _positions(ctx) >= 0

    def describe(self) -> str:
        return "every position"


@dataclass(frozen=True)
class AnyOf(Rule):
    """The columns any of ``rules`` names (SADI with its generated-token option: the last
    prompt token and every generated token)."""

    rules: tuple[Rule, ...]

    def mask(self, ctx: StepContext) -> torch.Tensor:
        out = self.rules[0].mask(ctx)
        for r in self.rules[1:]:
            out = out | r.mask(ctx)
        return out

    def describe(self) -> str:
        return " and ".join(r.describe() for r in self.rules)


def _positions(ctx: StepContext) -> torch.Tensor:
    if ctx.positions is None:
        raise RuntimeError("a steering rule was evaluated outside a forward pass")
    return ctx.positions


FROM_INSTRUCTION = FromInstruction()
LAST_PROMPT_TOKEN = LastPromptToken()
GENERATED = Generated()
EVERYWHERE = Everywhere()


# -------------------------------------------------------------------------------------
# how


@dataclass(frozen=True, eq=False)
class Operator:
    """``apply(a, m, s)``: ``a`` the site's view of the activation, ``m`` the rule's mask as
    ``a``'s dtype broadcast over its trailing dims, ``s`` the strength (a number, or one
    per row broadcast likewise). Each operator leaves ``a`` unchanged where ``m`` is 0 or
    ``s`` is 0.

    An operator with ``reads_clean`` also gets ``clean``: the same site's activation in the
    same pass with the steering off (the loop runs that pass first, over the steered
    columns only; see ``passes.forward_pass``)."""

    reads_clean: ClassVar[bool] = False
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def apply(self, a: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        raise NotImplementedError

    def apply_clean(self, a: torch.Tensor, clean: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        """``apply`` for an operator with ``reads_clean``: ``clean`` is the site's unsteered view."""
        raise NotImplementedError

    def applied(self, a: torch.Tensor, s: Any) -> torch.Tensor | None:  # noqa: ARG002 (the default: none)
        """``[B, T]``: the strength this operator applies at each column when it computes
        one from the activation (CLAS), for the trace; None: the strength in force."""
        return None

    def _like(self, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``t`` (one of this operator's own tensors) on ``a``'s device and dtype, converted
        once per (tensor, device, dtype)."""
        if t.requires_grad:  # trainable tensors stay in the autograd graph, never cached
            return t.to(device=a.device, dtype=a.dtype)
        k = (id(t), a.device, a.dtype)
        if k not in self._cache:
            self._cache[k] = t.to(device=a.device, dtype=a.dtype)
        return self._cache[k]


@dataclass(frozen=True, eq=False)
class Add(Operator):
    """``a += s * v`` (CAA on the residual stream; ITI with ``heads``).

    ``vector``: ``[d]`` for a flat site; for a head site ``[k, d_head]`` with ``heads`` the
    k head indices it is added to (other heads untouched).
    """

    vector: torch.Tensor
    heads: tuple[int, ...] | None = None

    def apply(self, a: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        if self.heads is None:
            delta = self._like(self.vector, a)
        else:
            key = ("heads", a.shape[-2])
            if (a.device, a.dtype, key) not in self._cache:
                full = torch.zeros(a.shape[-2], a.shape[-1])
                for h, v in zip(self.heads, self.vector.float()):
                    full[h] += v
                self._cache[(a.device, a.dtype, key)] = full.to(device=a.device, dtype=a.dtype)
            delta = self._cache[(a.device, a.dtype, key)]
        return a + (s * m) * delta


@dataclass(frozen=True, eq=False)
class ScaleMasked(Operator):
    """``a' = a + s * (M * a)``: the masked elements of the input's own activation are
    multiplied by ``1 + s`` (SADI, with ``s`` = delta). ``elements``: a 0/1 mask over the
    view's trailing dims (``[d]``; ``[n_heads, 1]`` scales whole heads)."""

    elements: torch.Tensor

    def apply(self, a: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        return a + (s * m) * (self._like(self.elements, a) * a)


@dataclass(frozen=True, eq=False)
class ScaleClean(Operator):
    """``a' = c + s * (M * c)`` where the rule steers, ``c`` the site's *unsteered*
    activation: the masked elements of the input's clean activation are multiplied by
    ``1 + s`` and the other elements are reset to their clean values, so a change at one
    layer does not compound into the next layer's site at that position (SADI's reference
    reading: its steering.py runs the question alone, scales that activation and writes it
    into the scoring pass at the last prompt position of every layer). Rows at strength 0
    are left exactly as they are."""

    elements: torch.Tensor
    reads_clean: ClassVar[bool] = True

    def apply_clean(self, a: torch.Tensor, clean: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        on = m * (s != 0) if isinstance(s, torch.Tensor) else m
        target = clean + s * (self._like(self.elements, a) * clean)
        return a + on * (target - a)


@dataclass(frozen=True, eq=False)
class AddGated(Operator):
    """``a' = a + s * (c . a + b) * v``: a strength computed from the activation itself,
    per token (CLAS). ``weight`` (c) ``[d]``, ``bias`` (b) a scalar tensor, ``vector`` (v)
    ``[d]``; c and b may require grad (they are trained through the same hooks)."""

    vector: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def gate(self, a: torch.Tensor) -> torch.Tensor:
        """``c . a + b`` at every column: ``[B, T]``, in float32 whatever the model's dtype
        (as the reference steers: a bf16 bias would round in steps of 0.01-0.03)."""
        a32 = a.float()
        return a32 @ self._like(self.weight, a32) + self._like(self.bias, a32)

    def apply(self, a: torch.Tensor, m: torch.Tensor, s: Any) -> torch.Tensor:
        a32 = a.float()
        out = a32 + (s * m.float()) * self.gate(a32).unsqueeze(-1) * self._like(self.vector, a32)
        return out.to(a.dtype)

    def applied(self, a: torch.Tensor, s: Any) -> torch.Tensor:
        s = s.reshape(-1, 1) if isinstance(s, torch.Tensor) else s
        return s * self.gate(a)


# -------------------------------------------------------------------------------------
# the triple, and its hooks


@dataclass(frozen=True, eq=False)
class Intervention:
    """Steer ``site`` at the columns ``rule`` names with ``op``, at the strength in force."""

    site: Site
    rule: Rule
    op: Operator


def _as_rows(s: Any, like: torch.Tensor) -> Any:
    """A per-row strength tensor as ``[B, 1, ...]`` in ``like``'s dtype; a number as is."""
    if isinstance(s, torch.Tensor):
        return s.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return s


def intervention_hooks(interventions: list[Intervention], ctx: StepContext) -> list[tuple[str, HookFn]]:
    """One hook function per intervention, reading ``ctx`` (positions, strength) at every pass."""

    def make(iv: Intervention) -> HookFn:
        def steer(act: torch.Tensor, hook) -> torch.Tensor:
            if ctx.capturing:  # the clean pre-pass: record, change nothing
                if iv.op.reads_clean:
                    ctx.clean[iv.site.hook] = act.detach()
                return act
            s = ctx.strength
            if not isinstance(s, torch.Tensor) and (s is None or s == 0):
                return act
            a = iv.site.view(act)
            m = iv.rule.mask(ctx).to(a.dtype).reshape(*a.shape[:2], *([1] * (a.ndim - 2)))
            if not iv.op.reads_clean:
                if not torch.is_grad_enabled():  # what the trace shows: the strength applied per column
                    g = iv.op.applied(a, s if not isinstance(s, torch.Tensor) else s.to(a))
                    if g is not None and g.ndim == 2:  # [B, T]: one strength per column (a flat site)
                        ctx.applied[iv.site.hook] = (g * m.reshape(g.shape)).detach()
                return iv.op.apply(a, m, _as_rows(s, a)).reshape(act.shape)
            if not bool(m.any()):  # nothing steered in this pass (a decode step): no clean pre-pass ran
                return act
            return iv.op.apply_clean(a, _clean_view(iv.site, ctx, a), m, _as_rows(s, a)).reshape(act.shape)

        return steer

    return [(iv.site.hook, make(iv)) for iv in interventions]


def _clean_view(site: Site, ctx: StepContext, a: torch.Tensor) -> torch.Tensor:
    """The clean pre-pass's activation at ``site`` as ``a``'s view, padded to ``a``'s columns
    (it covers only the columns up to the last steered one; the rest is never read)."""
    c = ctx.clean.get(site.hook)
    if c is None:
        raise RuntimeError(f"no clean activation of {site.hook} for this pass: an operator that reads the unsteered "
                           "activation ran in a pass that did not go through passes.forward_pass")
    c = site.view(c)
    if c.shape[1] < a.shape[1]:
        c = torch.cat([c, c.new_zeros(c.shape[0], a.shape[1] - c.shape[1], *c.shape[2:])], 1)
    return c


def steered_mask(interventions: list[Intervention], ctx: StepContext) -> torch.Tensor:
    """Boolean ``[batch, pos]``: the columns of this pass that some intervention's rule steers."""
    masks = [iv.rule.mask(ctx) for iv in interventions]
    if not masks:
        return torch.zeros_like(ctx.mask)
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out
