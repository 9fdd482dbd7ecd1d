"""The Steerer abstraction shared by every method.

A method is fitted from data into a ``Steerer``. ``generate``, the batched forward pass
and the evaluators accept any Steerer; none of them has a method-specific branch.

A Steerer
- names the hook points it touches (``sites``) and returns hook functions for a call
  (``hooks(ctx)``); the functions read the live :class:`StepContext`, which the token loop
  updates before every forward pass with the absolute positions that pass covers;
- may observe each generated token (``observe``) and answer with a :class:`Decision`
  (a score for the trace, a new strength, or a rollback of the last k tokens);
- has a strength, and ``scaled(s)`` returns a copy at strength ``s``; strength 0 must
  leave the model untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from steerbench.model import Model

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


@dataclass
class StepContext:
    """What hook functions may know about the forward pass that is running.

    ``positions[b, t]`` is the absolute position of column t of row b (-1 for left
    padding). ``steer_from[b]`` is the first absolute position that position-aware
    steerers touch in row b. ``state`` is per-call scratch space a Steerer may use (it is
    new for every ``generate`` call, so one Steerer can serve many calls).
    """

    steer_from: torch.Tensor
    positions: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def set_pass(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self._mask = None

    @property
    def mask(self) -> torch.Tensor:
        """Boolean [batch, pos]: the columns of this pass that are at or after ``steer_from``."""
        if self._mask is None:
            if self.positions is None:
                raise RuntimeError("StepContext.mask was read outside a forward pass")
            sf = self.steer_from.to(self.positions.device)
            self._mask = (self.positions >= sf[:, None]) & (self.positions >= 0)
        return self._mask

    @property
    def n_pass(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[1])


@dataclass
class StepState:
    """Handed to ``Steerer.observe`` after a forward pass that fed a generated token."""

    token_id: int  # the newest generated token (the last column of the pass)
    position: int  # its absolute position
    n_generated: int  # generated tokens kept so far, including this one
    is_final: bool  # no further token will be sampled unless the steerer rolls back
    ctx: StepContext


@dataclass
class Decision:
    """A Steerer's answer to an observation. Every field is optional."""

    score: float | None = None  # recorded in the trace for the observed token
    strength: float | None = None  # new effective strength from the next pass on
    rollback: int = 0  # drop this many of the newest generated tokens and regenerate
    note: str = ""


class Steerer:
    """Base class of all steering methods. Subclasses are dataclasses with a ``strength``."""

    strength: float
    observes: bool = False  # True for dynamic steerers: the loop calls observe()
    # True when the hooks leave every position before ``steer_from`` untouched; evaluators
    # then compute the shared unsteered prefix once for many steering settings
    prefix_invariant: bool = True

    # -- what a method must say ------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        """Hook names this steerer writes to."""
        raise NotImplementedError

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        """Hook functions for one call; they read ``ctx`` live at every pass."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------
    def observe(self, step: StepState) -> Decision | None:
        return None

    def current_strength(self, ctx: StepContext) -> float:
        """The strength in force now (dynamic steerers report their adaptive value)."""
        return float(self.strength)

    def scaled(self, strength: float) -> "Steerer":
        if not isinstance(strength, (int, float)) or strength != strength:
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        return dataclasses.replace(self, strength=float(strength))

    def when_acting(self) -> "Steerer":
        """The static steering this steerer applies once it acts, for off-task measures
        (KL on neutral text steers every position, so a dynamic steerer that never sees a
        generated token would otherwise look harmless). Static steerers are their own."""
        return self

    def check_model(self, model: "Model") -> None:
        """Refuse a model this steerer was not fitted on (subclasses add more checks)."""
        for name in self.sites:
            model.check_hook(name)

    def describe(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g})"
