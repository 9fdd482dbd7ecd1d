"""Steering methods. Each file fits one method into a :class:`Steerer`."""

from steerbench.steerer import Decision, StepContext, StepState, Steerer
from steerbench.steering.caa import CAA
from steerbench.steering.iti import ITI, HeadProbes
from steerbench.steering.fasb import FASB

__all__ = ["CAA", "FASB", "HeadProbes", "ITI", "Decision", "StepContext", "StepState", "Steerer"]
