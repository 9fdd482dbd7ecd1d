"""Steering methods. Each file fits one method into a :class:`Steerer`."""

from steerbench.steerer import Decision, StepContext, StepState, Steerer
from steerbench.steering.caa import CAA

__all__ = ["CAA", "Decision", "StepContext", "StepState", "Steerer"]
