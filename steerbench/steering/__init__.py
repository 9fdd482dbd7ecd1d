"""Steering methods. Each file fits one method into a :class:`Steerer`."""

from steerbench.steerer import Decision, StepContext, StepState, Steerer
from steerbench.steering.caa import CAA
from steerbench.steering.iti import ITI, HeadProbes

__all__ = ["CAA", "HeadProbes", "ITI", "Decision", "StepContext", "StepState", "Steerer"]
