"""Steering methods. Each file fits one method into a :class:`Steerer`, built from the
shared pieces in :mod:`steerbench.blocks` (where, when and how to steer)."""

from steerbench.blocks import (
    FROM_INSTRUCTION,
    GENERATED,
    LAST_PROMPT_TOKEN,
    Add,
    AddGated,
    AnyOf,
    FromState,
    Intervention,
    ScaleClean,
    ScaleMasked,
    Site,
)
from steerbench.steerer import Decision, Flagger, Steerer, StepContext, StepState
from steerbench.steering.caa import CAA
from steerbench.steering.fasb import FASB
from steerbench.steering.iti import ITI, HeadProbes, HeadReadout, HeadShift
from steerbench.steering.real import REAL, HeadRelevance
from steerbench.steering.sadi import SADI

__all__ = [
    "CAA", "FASB", "REAL", "SADI", "HeadProbes", "HeadRelevance",
    "HeadReadout", "HeadShift", "ITI", "Decision", "Flagger", "StepContext",
    "StepState", "Steerer", "Site", "Intervention", "Add", "ScaleMasked", "ScaleClean", "AddGated", "AnyOf", "FromState",
    "FROM_INSTRUCTION", "LAST_PROMPT_TOKEN", "GENERATED",
]
