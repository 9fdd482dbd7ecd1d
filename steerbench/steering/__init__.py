"""Steering methods. Each file fits one method into a :class:`Steerer`, built from the
shared pieces in :mod:`steerbench.blocks` (where, when and how to steer)."""

from steerbench.blocks import (
    EVERYWHERE,
    FROM_INSTRUCTION,
    GENERATED,
    LAST_PROMPT_TOKEN,
    Add,
    AddGated,
    AnyOf,
    Everywhere,
    FromState,
    Intervention,
    ScaleClean,
    ScaleMasked,
    Site,
)
from steerbench.steerer import Decision, Flagger, Steerer, StepContext, StepState
from steerbench.steering.caa import CAA
from steerbench.steering.clas import CLAS, LoRA
from steerbench.steering.fasb import FASB
from steerbench.steering.iti import ITI, HeadProbes, HeadReadout, HeadShift
from steerbench.steering.readouts import READOUTS, AnswerTokens, answer_tokens, decision_table
from steerbench.steering.real import REAL, HeadRelevance
from steerbench.steering.sadi import SADI

__all__ = [
    "CAA", "CLAS", "FASB", "LoRA", "REAL", "SADI", "HeadProbes", "HeadRelevance",
    "HeadReadout", "HeadShift", "ITI", "Decision", "Flagger", "StepContext",
    "StepState", "Steerer", "Site", "Intervention", "Add", "ScaleMasked", "ScaleClean", "AddGated", "AnyOf",
    "Everywhere", "FromState", "READOUTS", "AnswerTokens", "answer_tokens", "decision_table",
    "FROM_INSTRUCTION", "LAST_PROMPT_TOKEN", "GENERATED", "EVERYWHERE",
]
