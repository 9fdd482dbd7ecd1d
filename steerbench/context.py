"""What a forward pass tells the hooks, and what a steerer answers: the loop's data types.

:class:`StepContext` is live during a call: the token loop and the batched passes set
the absolute positions of the pass now running, the strength in force and per-call
state; hook functions read it at every pass. :class:`StepState` is what a dynamic
steerer observes after a generated token, :class:`Decision` its answer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from steerbench.errors import ParameterError

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


def check_strength(value: Any, name: str = "strength") -> float:
    """``value`` as a float, or a ParameterError if it is not a finite real number.

    Refuses NaN and +-inf (which would turn every logit into NaN) and booleans (``True``
    is not a strength); accepts Python and NumPy numbers and 0-d tensors.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integers; not booleans, not 2.5), within
    ``[low, high]`` where given; else a ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}" if low is not None else f"at most {high}"
        raise ParameterError(f"{name} must be {span}, got {value}")
    return value


def check_fraction(value: Any, name: str = "fraction") -> float:
    """``value`` as a float in [0, 1]; else a ParameterError naming ``name``."""
    value = check_strength(value, name)
    if not 0.0 <= value <= 1.0:
        raise ParameterError(f"{name} must be between 0 and 1, got {value:g}")
    return value


def check_layer_index(layer: Any, n_layers: int, name: str = "layer") -> int:
    """``layer`` as an index into ``n_layers`` layers; negative counts from the end, as in
    Python (-1: the last). Anything else (a bool, 2.5, out of range) is a ParameterError."""
    layer = check_int(layer, name)
    if not -n_layers <= layer < n_layers:
        raise ParameterError(f"{name} {layer} is out of range: the model has {n_layers} layers "
                             f"(0 to {n_layers - 1}, or -{n_layers} to -1 from the end)")
    return layer % n_layers


@dataclass
class StepContext:
    """What hook functions may know about the forward pass that is running.

    ``positions[b, t]`` is the absolute position of column t of row b (-1 for left
    padding). ``steer_from[b]`` is the first absolute position that position-aware
    steerers touch in row b; ``gen_from[b]``, where generated tokens (or, in scoring, the
    continuation) start (None: ``steer_from + 1``). ``strength`` is the strength in force:
    a number, or a tensor with one per row (None until a steerer is installed; the loop
    sets it from ``Decision.strength``). ``state`` is per-call scratch space a Steerer may
    use (new for every ``generate`` call, so one Steerer can serve many calls).
    """

    steer_from: torch.Tensor
    positions: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    strength: float | torch.Tensor | None = None
    gen_from: torch.Tensor | None = None
    # operators that read the unsteered activation (SADI's reference reading): ``clean_mask``
    # (set by ``passes.steering``) gives the columns they steer; ``passes.forward_pass`` then
    # runs those columns once with the steering off (``capturing``), filling ``clean``
    # (hook name -> the activation of the pass's first columns), before the steered pass
    clean_mask: Callable[[StepContext], torch.Tensor] | None = None
    clean: dict = field(default_factory=dict)
    capturing: bool = False
    # hook name -> [batch, pos]: the strength an operator that computes its own (CLAS)
    # applied at each column of the pass, filled by the hooks of passes run without autograd
    applied: dict = field(default_factory=dict)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def set_pass(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self._mask = None
        self.applied = {}

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
