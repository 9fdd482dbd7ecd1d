"""steerbench: a notebook-first workbench for activation steering on TransformerLens."""

__version__ = "0.1.0"

from steerbench.activations import collect, collect_heads, collect_resid, collect_stacked
from steerbench.datasets import (
    ABItem,
    MCQuestion,
    behavior,
    load_ab,
    load_mc,
    load_open_ended,
    load_truthfulqa,
    qa_examples,
)
from steerbench.errors import ArtifactError, DatasetError, ModelMismatch, ParameterError, SteerbenchError
from steerbench.generation import Generation, Trace, generate, generate_many
from steerbench.memory import ram_budget
from steerbench.model import Model, Prompt, load_model, output_path
from steerbench.passes import SharedPrefix, forward_batch
from steerbench.steering import (
    CAA,
    CLAS,
    FASB,
    ITI,
    READOUTS,
    REAL,
    SADI,
    AnswerTokens,
    Decision,
    HeadProbes,
    HeadReadout,
    HeadRelevance,
    HeadShift,
    LoRA,
    Steerer,
    StepContext,
    StepState,
    answer_tokens,
    decision_table,
)

__all__ = [
    "ABItem",
    "ArtifactError",
    "DatasetError",
    "ModelMismatch",
    "ParameterError",
    "SteerbenchError",
    "CAA",
    "CLAS",
    "FASB",
    "READOUTS",
    "AnswerTokens",
    "answer_tokens",
    "decision_table",
    "HeadProbes",
    "HeadReadout",
    "HeadRelevance",
    "HeadShift",
    "ITI",
    "LoRA",
    "REAL",
    "SADI",
    "Decision",
    "Generation",
    "Model",
    "Prompt",
    "SharedPrefix",
    "StepContext",
    "StepState",
    "Steerer",
    "Trace",
    "behavior",
    "collect",
    "collect_heads",
    "collect_stacked",
    "ram_budget",
    "collect_resid",
    "forward_batch",
    "generate",
    "generate_many",
    "load_ab",
    "load_mc",
    "load_model",
    "output_path",
    "load_open_ended",
    "load_truthfulqa",
    "MCQuestion",
    "qa_examples",
]


def __getattr__(name: str):
    """``sb.plots`` and ``sb.widgets`` on first use (plotly and ipywidgets load only then)."""
    if name in ("plots", "widgets", "geometry", "evaluation", "truthfulqa", "benchmark"):
        import importlib

        return importlib.import_module(f"steerbench.{name}")
    raise AttributeError(f"module 'steerbench' has no attribute {name!r}")
