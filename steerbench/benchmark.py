"""Comparing steering methods on TruthfulQA-format data, with cross-validation by question.

``run_bench`` is what ``steerbench bench`` runs:

1. The questions are split into ``n_folds`` folds (seeded permutation). For each fold, the
   other folds are the training questions, which are split again ``1 - val_fraction`` /
   ``val_fraction`` (by question, seeded) into *fit* and *validation* questions.
2. Each method sees only the fit and validation questions of the fold: it fits on the
   fit questions and proposes candidate steerers (its hyperparameter grid); the candidate
   with the best validation score (``select``, MC2 by default) is chosen.
3. The chosen steerer is scored on the fold's test questions (MC1/MC2/MC3, same prompt for
   every method) and its off-task KL is measured on neutral text.

Test questions never reach a method's fitting or selection (``tests/test_benchmark.py``
checks the splits and what each method was given). Methods plug in with ``@register``:
a :class:`Method` names itself, declares a default grid and turns (fit, validation)
questions into candidates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steerbench.activations import collect_heads, collect_resid
from steerbench.artifacts import load_artifact, save_artifact
from steerbench.datasets import MCQuestion, neutral_texts, qa_examples
from steerbench.errors import ArtifactError, ParameterError
from steerbench.evaluation import kl_to_unsteered
from steerbench.memory import budget_bytes, result_tensor
from steerbench.model import Model, cache_dir
from steerbench.probes import group_split
from steerbench.steerer import Steerer
from steerbench.steering.caa import CAA
from steerbench.steering.clas import CLAS, FIXED_GRID, Example, LoRA, directions
from steerbench.steering.fasb import FASB
from steerbench.steering.iti import TEMPLATE, HeadProbes, questions_hash
from steerbench.steering.readouts import READOUTS, AnswerTokens, answer_tokens
from steerbench.steering.real import HeadRelevance
from steerbench.steering.sadi import SADI, contrast, element_activations, head_means
from steerbench.truthfulqa import PROMPTS, MCResult, mc_items, mc_mode_scores, mc_scores

METRICS = ("mc1", "mc2", "mc3")


# -------------------------------------------------------------------------------------
# splits


def question_folds(n: int, n_folds: int = 2, seed: int = 42) -> list[tuple[list[int], list[int]]]:
    """(train, test) question indices for each fold: a seeded permutation cut into ``n_folds``."""
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if n < 2 * n_folds:
        raise ValueError(f"{n} questions are too few for {n_folds} folds (need at least {2 * n_folds})")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    out = []
    for f in range(n_folds):
        test = sorted(int(i) for i in parts[f])
        train = sorted(int(i) for g, p in enumerate(parts) if g != f for i in p)
        out.append((train, test))
    return out


def few_label_splits(n: int, n_fit: int = 10, n_val: int = 10, draws: int = 3,
                     seed: int = 42) -> list[tuple[list[int], list[int], list[int]]]:
    """(fit, validation, test) item indices for each of ``draws`` seeded draws: ``n_fit``
    items to train on, ``n_val`` to validate on, every other item to test on (CLAS's
    few-label protocol: 10 + 10)."""
    if n_fit < 1 or n_val < 1 or draws < 1:
        raise ValueError(f"a few-label draw needs n_fit, n_val and draws >= 1, got {n_fit}, {n_val}, {draws}")
    if n < n_fit + n_val + 1:
        raise ValueError(f"{n} items are too few for {n_fit} fit + {n_val} validation items and a test set")
    out = []
    for d in range(draws):
        perm = np.random.default_rng([seed, d]).permutation(n)
        out.append((sorted(int(i) for i in perm[:n_fit]), sorted(int(i) for i in perm[n_fit:n_fit + n_val]),
                    sorted(int(i) for i in perm[n_fit + n_val:])))
    return out


def inner_split(train: Sequence[int], val_fraction: float = 0.2, seed: int = 42) -> tuple[list[int], list[int]]:
    """Fit and validation question indices out of a fold's training questions (by question)."""
    fit_rows, val_rows = group_split(list(train), val_fraction=val_fraction, seed=seed)
    return [int(train[i]) for i in fit_rows], [int(train[i]) for i in val_rows]


# -------------------------------------------------------------------------------------
# head activations, collected once for all folds and methods


KINDS = ("z", "neuron", "hidden", "resid")


class AnswerActivations:
    """One activation per answer of ``questions``, collected once (lazily) and sliced per
    fold; cached on disk by model fingerprint, questions, kind and template unless
    ``cache=False``. ``kind``:

    - ``"z"``: every head's ``hook_z`` at the last token of ``template`` (ITI, FASB, SADI-HEAD);
    - ``"neuron"`` / ``"hidden"``: SADI's MLP elements at that token (``sadi.element_activations``);
    - ``"resid"``: the residual stream after every block, averaged over the answer's tokens
      of the scored sequence (``prompt`` then the answer: what CAA reads).
    """

    def __init__(self, model: Model, questions: Sequence[MCQuestion], template: str = TEMPLATE,
                 cache: bool = True, batch_size: int = 16, progress: bool | None = None, kind: str = "z",
                 prompt: str = "instruction+primer"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.model, self.questions, self.template, self.kind, self.prompt = model, list(questions), template, kind, prompt
        self.cache, self.batch_size, self.progress = cache, batch_size, progress
        self._acts: torch.Tensor | None = None
        self._rows: dict[MCQuestion, range] = {}
        at = 0
        for q in self.questions:
            n = len(q.correct) + len(q.incorrect)
            self._rows.setdefault(q, range(at, at + n))
            at += n
        self._n = at  # rows: one per answer
        self.seconds = 0.0  # time spent collecting (0 when read from the disk cache)

    def path(self) -> Path:
        fp = self.model.fingerprint()
        what = self.template if self.kind != "resid" else PROMPTS.get(self.prompt, self.prompt)
        if self.kind == "resid" and self.prompt == "chat":  # formatted by the model's chat template
            what = f"chat:{what}"
        parts = [fp.get("weights_sha256"), fp.get("model_name"), questions_hash(self.questions), what]
        if self.kind != "z":  # (keys of "z" caches written before kinds existed stay valid)
            parts.append(self.kind)
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        return cache_dir() / "activations" / f"{'heads' if self.kind == 'z' else self.kind}-{key}.safetensors"

    def _collect(self) -> torch.Tensor:
        if self.kind == "resid":
            prompts, conts = mc_items(self.model, self.questions, self.prompt)
            seqs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
            spans = [(len(p.ids), len(p.ids) + len(c)) for p, c in zip(prompts, conts)]
            return collect_resid(self.model, seqs, position="mean", spans=spans, batch_size=self.batch_size,
                                 progress=self.progress)
        texts, _, _ = qa_examples(self.questions, self.template)
        if self.kind == "z":
            return collect_heads(self.model, texts, batch_size=self.batch_size, progress=self.progress)
        return element_activations(self.model, texts, self.kind, batch_size=self.batch_size, progress=self.progress)

    def all(self) -> torch.Tensor:
        if self._acts is None:
            p = self.path()
            if self.cache and p.exists():
                self._acts = self._load_cached(p)
            if self._acts is None:
                t0 = time.perf_counter()
                self._acts = self._collect()
                self.seconds = time.perf_counter() - t0
                if self.cache:
                    save_artifact(p, {"z": self._acts}, {"what": f"{self.kind} per answer", "template": self.template,
                                                         "fitted_on": self.model.fingerprint()})
        return self._acts

    def _load_cached(self, p: Path) -> torch.Tensor | None:
        """The cached activations, or None (with a warning) if the file is truncated,
        corrupt or holds another number of rows: they are then collected again."""
        n = self._n
        try:
            acts = load_artifact(p, mmap=budget_bytes() is not None)[0].get("z")
            if acts is None or acts.shape[0] != n:
                raise ArtifactError(f"{p} holds {None if acts is None else acts.shape[0]} rows, not {n}")
            return acts
        except (ArtifactError, OSError) as err:
            warnings.warn(f"activation cache {p} is unusable ({err}); collecting again", stacklevel=3)
            return None

    def rows(self, questions: Sequence[MCQuestion]) -> torch.Tensor:
        """Indices into ``all()`` of the answers of ``questions``, in ``qa_examples`` order."""
        missing = [q.question for q in questions if q not in self._rows]
        if missing:
            raise KeyError(f"no activations for question {missing[0]!r}")
        return torch.tensor([i for q in questions for i in self._rows[q]], dtype=torch.long)

    def of(self, questions: Sequence[MCQuestion]) -> torch.Tensor:
        """Rows of ``questions`` in ``qa_examples`` order: [N_answers, n_layers, ...]."""
        rows = self.rows(questions)
        acts = self.all()
        out = result_tensor((len(rows), *acts.shape[1:]), acts.dtype)  # within the RAM budget
        return torch.index_select(acts, 0, rows, out=out)


# -------------------------------------------------------------------------------------
# methods


@dataclass
class FitData:
    """What a method may see in one fold: never the fold's test questions."""

    model: Model
    fit: list[MCQuestion]
    val: list[MCQuestion]
    heads: AnswerActivations
    template: str = TEMPLATE  # the text activations are read from (ITI, SADI)
    prompt: str = "instruction+primer"  # the scoring prompt
    store: dict[str, AnswerActivations] = field(default_factory=dict)  # other kinds, shared by every fold
    _probes: HeadProbes | None = None
    _relevance: HeadRelevance | None = None
    _memo: dict = field(default_factory=dict)

    def memo(self, key: str, make: Callable[[], object]):
        """``make()`` once per fold, shared by the methods that need it (CLAS's directions)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def answers(self, kind: str) -> AnswerActivations:
        """Per-answer activations of ``kind`` (collected once for all folds; slice with ``.of``)."""
        if kind == "z":
            return self.heads
        if kind not in self.store:
            h = self.heads
            self.store[kind] = AnswerActivations(self.model, h.questions, self.template, cache=h.cache,
                                                 batch_size=h.batch_size, progress=h.progress, kind=kind,
                                                 prompt=self.prompt)
        return self.store[kind]

    def answer_tokens(self, heads: torch.Tensor, part: str) -> AnswerTokens:
        """``heads``' activations at every token of the ``part`` ("fit" or "val") answers,
        after the scoring prompt (what FASB's readouts are fitted and thresholded on)."""
        if part not in ("fit", "val"):
            raise ValueError(f"part must be 'fit' or 'val', got {part!r}")
        h = self.heads
        return self.memo(f"tokens:{part}:{heads.tolist()}", lambda: answer_tokens(
            self.model, self.fit if part == "fit" else self.val, heads, self.prompt, batch_size=h.batch_size,
            progress=h.progress))

    def probes(self) -> HeadProbes:
        """Head probes trained on the fit questions, heads ranked on validation (shared by methods)."""
        if self._probes is None:
            self._probes = HeadProbes.fit(self.model, self.fit, self.val, acts=self.heads.of(self.fit + self.val))
        return self._probes

    def relevance(self, scorer: str) -> HeadRelevance:
        """REAL's head relevance on the same split as ``probes``: the autoencoders are
        trained once per fold and shared by REAL's methods, each adding its scorer."""
        if self._relevance is None:
            self._relevance = HeadRelevance.fit(self.model, self.fit, self.val, acts=self.heads.of(self.fit + self.val),
                                                probes=self.probes(), scorers=[scorer])
        self._relevance.add_scorer(scorer)
        return self._relevance


# a head-count setting: a share of all heads below 1, a count from 1 on (never 0)
HEAD_COUNT = (1e-3, None)


def head_counts(model: Model, values: Sequence[float]) -> list[int]:
    """Head-count settings as distinct counts, in order: a value below 1 is a share of all
    the model's heads (``model.heads_at``), one of 1 or more a whole count (capped at the
    number of heads), so the default grid travels between models."""
    total = model.n_layers * model.n_heads
    out: list[int] = []
    for v in values:
        if v < 1:
            k = model.heads_at(v)
        elif float(v) != int(v):
            raise ParameterError(f"a head count of 1 or more must be whole, got {v:g}")
        else:
            k = min(int(v), total)
        if k not in out:
            out.append(k)
    return out


class Method:
    """A steering method as the benchmark runs it. Subclass, set ``name`` and ``grid``,
    implement ``candidates``, and decorate with ``@register``."""

    name: str = ""
    description: str = ""
    grid: dict[str, list] = {}
    # param -> (low, high) inclusive bounds a --set value must respect (None: unbounded);
    # whole-number parameters not listed must be at least 1
    limits: dict[str, tuple[float | None, float | None]] = {}
    # param -> how a --set value is read, where not by the type of the default grid's first value
    parsers: dict[str, Callable[[str], object]] = {}
    choices: dict[str, Sequence[str]] = {}  # param -> the names a --set value may take
    scoring: str = "uniform"  # how MC answers are scored: steered throughout, or the method's own mode

    def candidates(self, data: FitData, grid: dict[str, list]) -> list[tuple[dict, Steerer | None]]:
        """(hyperparameters, steerer) for every point of ``grid``, fitted on ``data.fit``
        (``data.val`` may be used to rank features, as ITI ranks heads)."""
        raise NotImplementedError

    def score(self, model: Model, questions: Sequence[MCQuestion], steers: Sequence[Steerer | None],
              prompt: str, batch_size: int) -> list[MCResult]:
        """MC results of each steerer (uniform steering of every answer token by default)."""
        return mc_scores(model, questions, steers, prompt=prompt, batch_size=batch_size)


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    METHODS[cls.name] = cls()
    return cls


@register
class Baseline(Method):
    name = "baseline"
    description = "no steering"

    def candidates(self, data, grid):  # noqa: ARG002 (the Method interface; nothing to fit)
        return [({}, None)]


@register
class ITIMethod(Method):
    name = "iti"
    description = "Inference-Time Intervention: top-K head probes, mass-mean directions, alpha * sigma"
    # K around 5% of the heads (docs/methods.md, ITI): 14 of SmolLM2-135M's 270; alpha 15 is the reference default
    # alpha 15 is the reference default, but on this small model alpha 30 with K=32 moved the
    # off-task KL by 10.7 nats/token (README), so the grid reaches down to alpha 2
    # k: shares of all heads (8/16/32 of SmolLM2's 270, 2/4/9 of Gemma 3's 72); a value of 1 or more is a count
    grid = {"k": [0.03, 0.06, 0.12], "alpha": [2.0, 5.0, 15.0], "direction": ["mass_mean"]}
    limits = {"k": HEAD_COUNT}

    def candidates(self, data, grid):
        probes = data.probes()
        return [
            ({"k": k, "alpha": float(a), "direction": d}, probes.select(k, float(a), d))
            for d in grid["direction"] for k in head_counts(data.model, grid["k"]) for a in grid["alpha"]
        ]


def threshold_setting(text: str) -> float | str:
    """A FASB threshold setting: a probability, or ``val`` (chosen on the validation answers)."""
    return "val" if text.strip().lower() == "val" else float(text)


@register
class FASBMethod(Method):
    name = "fasb"
    description = "FASB: head probes decide when and how strongly to steer; MC answers scored in FASB's MC mode"
    # reference run: K=24 (of 1,024 heads), alpha=60, threshold=0.6, backtrack=10; scaled to 270 heads
    # (k: 16 of 270). readout: what reads P(true) (steering/readouts.py; plain = the heads' probes).
    # threshold "val": the one that best tells the validation answers apart (flags the most false
    # minus true ones, readouts.choose_threshold), per readout; the fixed 0.5 / 0.6 of earlier grids
    # flagged 99 % of all answers (README, FASB readouts)
    grid = {"k": [0.06], "readout": list(READOUTS), "alpha": [15.0, 30.0, 60.0], "threshold": ["val"],
            "backtrack": [10]}
    limits = {"k": HEAD_COUNT, "threshold": (0.0, 1.0), "backtrack": (0, None)}
    parsers = {"threshold": threshold_setting}
    choices = {"readout": READOUTS}
    scoring = "fasb-mc"

    def candidates(self, data, grid):
        probes = data.probes()
        out = []
        for k in head_counts(data.model, grid["k"]):
            heads = probes.select(k)
            for name in grid["readout"]:
                # fitted on the fit answers' tokens (plain: today's probes, nothing to fit)
                base = FASB(heads).with_readout(name, None if name == "plain" else data.answer_tokens(heads.heads, "fit"))
                for t in grid["threshold"]:
                    # "val": read on the validation answers' tokens
                    f = base.with_readout(name, None, data.answer_tokens(heads.heads, "val")) if t == "val" else base
                    thr, chosen = (f.threshold, {"threshold_from": "val"}) if t == "val" else (float(t), {})
                    out += [({"k": k, "readout": name, "alpha": float(a), "threshold": thr, **chosen,
                              "backtrack": int(b)},
                             dataclasses.replace(f, strength=float(a), threshold=thr, backtrack=int(b)))
                            for b in grid["backtrack"] for a in grid["alpha"]]
        return out

    def score(self, model, questions, steers, prompt, batch_size):
        # each result's info holds MC mode's interventions (share re-scored, strengths, first flags)
        return [mc_mode_scores(model, questions, s, prompt=prompt, batch_size=batch_size).result for s in steers]


@register
class CAAMethod(Method):
    name = "caa"
    description = ("CAA fitted on each fold's training items: residual stream averaged over the answer tokens, "
                   "prompt + true answer minus prompt + false answer; one layer steered from the last prompt token")
    grid = {"layer": [0.25, 0.5, 0.75], "multiplier": [1.0, 2.0, 4.0, 8.0]}  # layer: a fraction of the depth
    limits = {"layer": (0.0, 1.0)}

    def candidates(self, data, grid):
        _, labels, groups = qa_examples(data.fit, data.template)
        vectors = contrast(data.answers("resid").of(data.fit), labels, groups)
        fp = data.model.fingerprint()
        out = []
        for frac in grid["layer"]:
            layer = data.model.layer_at(float(frac))
            for m in grid["multiplier"]:
                out.append(({"layer": layer, "multiplier": float(m)},
                            CAA(vectors, layer, strength=float(m), read="answer", fitted_on=fp,
                                info={"fitted": "benchmark fold", "n_items": len(data.fit), "prompt": data.prompt})))
        return out


class SADIMethod(Method):
    """SADI on one element type (reference reading: the clean activation scaled at the
    last prompt position, every layer's site reset); K and delta chosen on validation."""

    elements = "head"

    def candidates(self, data, grid):
        _, labels, groups = qa_examples(data.fit, data.template)
        if self.elements == "head":
            acts = head_means(data.heads.of(data.fit), data.model.n_heads)
        else:
            acts = data.answers(self.elements).of(data.fit)
        base = SADI(contrast(acts, labels, groups), k=1, elements=self.elements,
                    d_head=data.model.d_head if self.elements == "head" else 0, fitted_on=data.model.fingerprint(),
                    info={"fitted": "benchmark fold", "n_items": len(data.fit), "template": data.template})
        return [({"k": int(k), "delta": float(d)}, base.select(int(k), float(d)))
                for k in grid["k"] for d in grid["delta"]]


@register
class SADIHead(SADIMethod):
    name = "sadi"
    description = "SADI-HEAD: the K heads with the largest mean(true - false) scaled by 1 + delta at the last prompt token"
    elements = "head"
    grid = {"k": [1, 2, 4, 6, 8, 10], "delta": [2.0, 5.0, 10.0, 20.0, 40.0, 80.0]}  # the reference K; delta 5..80 and 2


@register
class SADINeuron(SADIMethod):
    name = "sadi-neuron"
    description = "SADI-NEURON: MLP neurons act(gate), scaled on mlp.hook_post"
    elements = "neuron"
    grid = {"k": [3, 10, 30, 100, 300, 500], "delta": [10.0, 30.0, 50.0, 90.0]}  # reference K 3..500, delta 10..90


@register
class SADIHidden(SADIMethod):
    name = "sadi-hidden"
    description = "SADI-HIDDEN: MLP output dimensions (hook_mlp_out)"
    elements = "hidden"
    grid = {"k": [1, 2, 4, 8, 12, 20], "delta": [5.0, 10.0, 20.0, 40.0, 80.0]}  # reference K 1..20, delta 5..80


class REALMethod(Method):
    """REAL with one relevance scorer: the top-K heads by relevance, ITI's directions and
    sigmas weighted by relevance / max; K and alpha chosen on validation (ITI's grid, so the
    two are compared on equal terms)."""

    scorer: str  # set by each registered subclass
    grid = {"k": [0.03, 0.06, 0.12], "alpha": [2.0, 5.0, 15.0], "weighting": ["auc"]}  # k as ITI's
    limits = {"k": HEAD_COUNT}

    def candidates(self, data, grid):
        rel = data.relevance(self.scorer)
        return [({"k": k, "alpha": float(a), "weighting": w}, rel.select(k, float(a), self.scorer, w))
                for w in grid["weighting"] for k in head_counts(data.model, grid["k"]) for a in grid["alpha"]]


@register
class REALGRU(REALMethod):
    name = "real"
    description = "REAL: heads ranked by VQ-autoencoder code relevance (two GRU priors, log-likelihood ratio AUC)"
    scorer = "gru"


@register
class REALProbe(REALMethod):
    name = "real-probe"
    description = "REAL with a logistic probe on the one-hot codes as the relevance scorer"
    scorer = "probe"


def clas_data(data: FitData) -> tuple[list, list, torch.Tensor]:
    """CLAS's inputs in one fold: (training examples, validation examples, directions).
    An example is the scoring prompt followed by the item's best answer; the directions
    contrast the prompt + each true answer with the prompt + each false one (fit items only)."""
    def make():
        def split(questions):
            prompts, conts = mc_items(data.model, questions, data.prompt)
            best: list[Example] = []
            pos: list[list[int]] = []
            neg: list[list[int]] = []
            at = 0
            for q in questions:
                rows = q.answers()  # true answers first, in q.correct's order
                for j, (_, _, label) in enumerate(rows):
                    (pos if label else neg).append(list(prompts[at + j].ids) + list(conts[at + j]))
                jb = at + q.correct.index(q.best)
                best.append(Example(tuple(prompts[jb].ids), tuple(conts[jb])))
                at += len(rows)
            return best, pos, neg

        train_set, pos, neg = split(data.fit)
        val_set, _, _ = split(data.val)
        return train_set, val_set, directions(data.model, pos, neg)

    return data.memo("clas", make)


class CLASMethod(Method):
    """A CLAS variant trained on the fold's fit items, its checkpoint chosen on the
    validation items' loss (the fixed coefficient: on the fit items' loss)."""

    variant = "clas"
    grid = {"epochs": [8]}

    def candidates(self, data, grid):
        train_set, val_set, vectors = clas_data(data)
        out = []
        for epochs in grid["epochs"]:  # several values: one trained steerer each, chosen on validation like any setting
            steer = CLAS.fit(data.model, train_set, val_set, vectors, self.variant, epochs=int(epochs))
            steer.info.update(n_fit=len(data.fit), n_val=len(data.val), prompt=data.prompt)
            out.append(({"epochs": int(epochs), "best_epoch": steer.info["history"]["best_epoch"]}, steer))
        return out


@register
class CLASGated(CLASMethod):
    name = "clas"
    description = "CLAS: strength w[L] . r + b[L] along a unit direction at every layer and token, trained on the fit items"
    variant = "clas"


@register
class CLASScalar(CLASMethod):
    name = "clas-scalar"
    description = "a learned strength b[L] per layer (CLAS with w = 0)"
    variant = "scalar"


@register
class CLASRank1(CLASMethod):
    name = "clas-rank1"
    description = "a rank-1 ReFT-like intervention: CLAS with the direction trained too"
    variant = "rank1"


@register
class CLASFixed(CLASMethod):
    name = "clas-fixed"
    description = "one fixed coefficient along every layer's direction, chosen by grid on the fit items' loss"
    variant = "fixed"
    grid = {"strength": list(FIXED_GRID)}

    def candidates(self, data, grid):
        train_set, val_set, vectors = clas_data(data)
        steer = CLAS.fit(data.model, train_set, val_set, vectors, "fixed", grid=[float(m) for m in grid["strength"]])
        steer.info.update(n_fit=len(data.fit), prompt=data.prompt)
        return [({"strength": steer.strength}, steer)]


@register
class LoRAMethod(Method):
    name = "lora"
    description = "LoRA rank 1 on every layer's MLP down projection, trained like CLAS (best validation checkpoint)"
    grid = {"lr": [1e-2], "epochs": [8]}
    limits = {"lr": (1e-12, None)}

    def candidates(self, data, grid):
        train_set, val_set, _ = clas_data(data)
        out = []
        for lr in grid["lr"]:
            for epochs in grid["epochs"]:
                steer = LoRA.fit(data.model, train_set, val_set, lr=float(lr), epochs=int(epochs))
                steer.info.update(n_fit=len(data.fit), n_val=len(data.val), prompt=data.prompt)
                out.append(({"lr": float(lr), "epochs": int(epochs), "best_epoch": steer.info["history"]["best_epoch"]},
                            steer))
        return out


def parse_grid(settings: Sequence[str]) -> dict[str, dict[str, list]]:
    """``["iti.k=8,16", "iti.alpha=15"]`` -> ``{"iti": {"k": [8, 16], "alpha": [15.0]}}``.

    Every value is checked here, before a model loads: its type (that of the default grid),
    finiteness, and the method's ``limits`` (whole-number parameters are at least 1 unless
    a limit says otherwise). Errors are ParameterErrors naming the setting."""
    out: dict[str, dict[str, list]] = {}
    for s in settings:
        try:
            key, values = s.split("=", 1)
            method, param = key.split(".", 1)
        except ValueError:
            raise ParameterError(f"a setting looks like method.param=v1,v2 (e.g. iti.alpha=5,15), got {s!r}") from None
        if method not in METHODS:
            raise ParameterError(f"unknown method {method!r} in {s!r}; known: {', '.join(METHODS)}")
        m = METHODS[method]
        if param not in m.grid:
            raise ParameterError(f"{method} has no parameter {param!r}; it has: {', '.join(m.grid) or 'none'}")
        kind = type(m.grid[param][0])
        parse = m.parsers.get(param, kind)
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not texts:
            raise ParameterError(f"{s!r} gives no value for {method}.{param}")
        try:
            parsed = [parse(v) for v in texts]
        except ValueError:
            what = "'val' or a number" if param in m.parsers else f"{kind.__name__} values"
            raise ParameterError(f"{s!r}: {param} takes {what}") from None
        bad = [v for v in parsed if param in m.choices and v not in m.choices[param]]
        if bad:
            raise ParameterError(f"{s!r}: {method}.{param} is one of {', '.join(m.choices[param])}, got {bad[0]!r}")
        low, high = m.limits.get(param, (1, None) if kind is int else (None, None))
        for v in parsed:
            if isinstance(v, float) and not math.isfinite(v):
                raise ParameterError(f"{s!r}: {param} must be finite, got {v}")
            if isinstance(v, int | float) and ((low is not None and v < low) or (high is not None and v > high)):
                span = (f"at least {low:g}" if high is None else f"at most {high:g}" if low is None
                        else f"between {low:g} and {high:g}")
                raise ParameterError(f"{s!r}: {method}.{param} must be {span}, got {v:g}")
            if m.limits.get(param) is HEAD_COUNT and v >= 1 and v != int(v):
                raise ParameterError(f"{s!r}: {method}.{param} is a share of the heads below 1 or a whole count "
                                     f"from 1 on, got {v:g}")
        out.setdefault(method, {})[param] = parsed
    return out


# -------------------------------------------------------------------------------------
# running


@dataclass
class BenchResult:
    folds: list[dict]  # one row per (method, fold)
    per_question: dict[str, dict[int, tuple[float, float, float]]]  # method -> question index -> MC1..3
    config: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per method: MC1/MC2/MC3 over all test questions, mean KL, times, choices per fold."""
        rows = []
        for method, per_q in self.per_question.items():
            vals = np.array(list(per_q.values()))
            fr = [f for f in self.folds if f["method"] == method]
            rows.append({
                "method": method,
                **{m: float(vals[:, j].mean()) for j, m in enumerate(METRICS)},
                "kl": float(np.mean([f["kl"] for f in fr])),
                "n": len(per_q),
                "fit_s": float(sum(f["fit_s"] for f in fr)),
                "score_s": float(sum(f["score_s"] for f in fr)),
                "scoring": fr[0]["scoring"],
                "chosen": "; ".join(_fmt_params(f["params"]) for f in fr),
            })
            if len(fr) > 1:  # the spread of the per-fold (per-draw) test scores
                rows[-1]["mc1_sd"] = float(np.std([f["mc1"] for f in fr], ddof=1))
            if "margin" in fr[0]:
                rows[-1]["margin"] = float(np.mean([f["margin"] for f in fr]))
            if "mc_rescored" in fr[0]:
                rows[-1]["mc_rescored"] = float(np.average([f["mc_rescored"] for f in fr], weights=[f["n_test"] for f in fr]))
            for key in ("gen_acc_rougeL", "gen_acc_embedding", "non_answers", "rollbacks_per_answer", "mean_strength"):
                if key in fr[0]:
                    n_gen = [f["gen_n"] for f in fr]
                    rows[-1][key] = float(np.average([f[key] for f in fr], weights=n_gen))
        return pd.DataFrame(rows)

    def to_json(self, path: str | Path) -> Path:
        p = Path(path)
        payload = {"config": self.config, "summary": self.summary().to_dict("records"), "folds": self.folds,
                   "per_question": {m: {str(i): v for i, v in d.items()} for m, d in self.per_question.items()}}
        p.write_text(json.dumps(payload, indent=1, default=float))
        return p

    def figure(self):
        from steerbench import plots

        return plots.bench_bars(self.summary(), title=self.config.get("title", "TruthfulQA MC, cross-validated"))


def _fmt_params(params: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def run_bench(
    model: Model,
    questions: Sequence[MCQuestion],
    methods: Sequence[str] = ("baseline", "iti"),
    n_folds: int = 2,
    seed: int = 42,
    val_fraction: float = 0.2,
    prompt: str = "instruction+primer",
    grids: dict[str, dict[str, list]] | None = None,
    select: str = "mc2",
    kl_texts: Sequence[str] | None = None,
    batch_size: int = 16,
    heads: AnswerActivations | None = None,
    template: str = TEMPLATE,
    generate: int = 0,
    max_new_tokens: int = 50,
    max_kl: float | None = None,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    few_label: int = 0,
    draws: int = 3,
) -> BenchResult:
    """Cross-validated MC1/MC2/MC3 and off-task KL of each of ``methods`` (see module doc).

    ``generate``: also generate greedy answers (``max_new_tokens``, one line) to the first
    ``generate`` test questions of each fold and score them with TruthfulQA's automatic
    truth metric (``generation_metrics``).
    ``max_kl``: only candidates whose KL to the unsteered model on the neutral text is at
    most this may be chosen (if none is, the best of the least-KL ones): without it, validation MC2
    alone can pick settings that wreck the model (see README).
    ``on_row``: called with each (method, fold) row as soon as it is done, so a long run
    keeps what it measured if it is stopped.
    ``few_label``: instead of cross-validation, ``draws`` seeded draws of ``few_label`` fit
    and ``few_label`` validation items, every other item a test item (CLAS's protocol); a
    "fold" is then a draw, and the summary gives the mean and spread over draws.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if select not in METRICS:
        raise ValueError(f"select must be one of {METRICS}, got {select!r}")
    questions = list(questions)
    if few_label:
        splits = few_label_splits(len(questions), few_label, few_label, draws, seed)
    else:
        splits = [(*inner_split(train, val_fraction, seed), test)
                  for train, test in question_folds(len(questions), n_folds, seed)]
    heads = heads or AnswerActivations(model, questions, template)
    if heads.template != template:
        raise ValueError(f"the head activations were read from {heads.template!r}, not from the template {template!r}")
    store: dict[str, AnswerActivations] = {}
    kl_texts = neutral_texts() if kl_texts is None else list(kl_texts)
    grids = grids or {}
    rows: list[dict] = []
    per_question: dict[str, dict[int, tuple[float, float, float]]] = {m: {} for m in methods}
    t_all = time.perf_counter()
    for f, (fit_idx, val_idx, test) in enumerate(splits):
        data = FitData(model, [questions[i] for i in fit_idx], [questions[i] for i in val_idx], heads, template, prompt,
                       store)
        test_q = [questions[i] for i in test]
        n_answers = sum(len(q.correct) + len(q.incorrect) for q in test_q)
        for name in methods:
            method = METHODS[name]
            grid = {**method.grid, **grids.get(name, {})}
            t0 = time.perf_counter()
            collected = heads.seconds + sum(a.seconds for a in store.values())
            cands = method.candidates(data, grid)
            val_scores: list[float] = []
            val_kl: list[float] = []
            if len(cands) > 1:
                res = method.score(model, data.val, [s for _, s in cands], prompt, batch_size)
                val_scores = [getattr(r, select) for r in res]
                allowed = np.ones(len(cands), dtype=bool)
                if max_kl is not None:
                    # neutral text is not a question: measuring KL on it uses no test data
                    val_kl = kl_to_unsteered(model, kl_texts, [s for _, s in cands])
                    allowed = np.array(val_kl) <= max_kl
                if not allowed.any():
                    # nothing within the budget: the least-KL settings (e.g. every threshold
                    # at the smallest alpha), and among those the best on validation
                    allowed = np.isclose(val_kl, np.min(val_kl), rtol=1e-9, atol=0.0)
                # first of equals: grids list the milder settings first
                best = int(np.argmax(np.where(allowed, val_scores, -np.inf)))
            else:
                best = 0
            params, steer = cands[best]
            for j, ((p, _), v) in enumerate(zip(cands, val_scores)):
                kl_txt = f"  KL {val_kl[j]:.3f}" if val_kl else ""
                mark = "  <- chosen" if j == best else ""
                log(f"  fold {f} {name} val {_fmt_params(p)}: {select.upper()} {v:.3f}{kl_txt}{mark}")
            # activation collection is shared by every method and fold: reported apart (config)
            fit_s = time.perf_counter() - t0 - (heads.seconds + sum(a.seconds for a in store.values()) - collected)
            t0 = time.perf_counter()
            test_res = method.score(model, test_q, [steer], prompt, batch_size)[0]
            score_s = time.perf_counter() - t0
            if steer is None:
                kl = 0.0
            elif val_kl:  # the chosen setting's KL on the same texts, measured above
                kl = val_kl[best]
            else:
                kl = kl_to_unsteered(model, kl_texts, [steer])[0]
            gen = generation_metrics(model, test_q[:generate], steer, prompt, max_new_tokens) if generate else {}
            for i, pq in zip(test, test_res.per_question):
                per_question[name][f * len(questions) + i if few_label else i] = pq
            margin = {"margin": test_res.margin} if test_res.margin is not None else {}
            rows.append({
                "method": name, "fold": f, "params": params, "describe": steer.describe() if steer else "none",
                "mc1": test_res.mc1, "mc2": test_res.mc2, "mc3": test_res.mc3, "kl": kl, "n_test": len(test),
                "n_fit": len(fit_idx), "n_val": len(val_idx), "fit_s": fit_s, "score_s": score_s,
                "answers_per_s": n_answers / score_s, "scoring": method.scoring, **margin, **test_res.info, **gen,
                "val": [{"params": p, select: v, **({"kl": k} if val_kl else {})}
                        for (p, _), v, k in zip(cands, val_scores, val_kl or [0.0] * len(cands))],
            })
            if on_row is not None:
                on_row(rows[-1])
            gen_txt = (f"  gen acc rougeL {gen['gen_acc_rougeL']:.3f} embedding {gen['gen_acc_embedding']:.3f}"
                       if gen else "")
            log(f"fold {f} {name:>10}: {_fmt_params(params)}  test MC1 {test_res.mc1:.3f} MC2 {test_res.mc2:.3f} "
                f"MC3 {test_res.mc3:.3f}  KL {kl:.4f}{gen_txt}  (fit+select {fit_s:.0f} s, score {score_s:.0f} s)")
    config = {
        "n_questions": len(questions), "n_folds": len(splits), "seed": seed, "val_fraction": val_fraction,
        "protocol": (f"{len(splits)} draws of {few_label} fit + {few_label} validation items, the rest test"
                     if few_label else f"{n_folds}-fold cross-validation by item"), "few_label": few_label,
        "prompt": prompt, "prompt_template": PROMPTS.get(prompt, prompt), "feature_template": template,
        "selection": f"hyperparameters chosen on validation items only (by {select.upper()}), never on the test fold",
        "select": select, "methods": list(methods), "model": model.name,
        "generate": generate, "max_new_tokens": max_new_tokens, "max_kl": max_kl,
        "grids": {m: {**METHODS[m].grid, **grids.get(m, {})} for m in methods},
        "head_collection_s": heads.seconds,
        "collection_s": {"z": heads.seconds, **{k: a.seconds for k, a in store.items()}},
        "total_s": time.perf_counter() - t_all,
        "splits": [{"train": sorted(fi + va), "fit": fi, "val": va, "test": te} for fi, va, te in splits],
    }
    return BenchResult(rows, per_question, config)


def generation_metrics(model: Model, questions: Sequence[MCQuestion], steer: Steerer | None,
                       prompt: str = "instruction+primer", max_new_tokens: int = 50) -> dict:
    """Greedy one-line answers to ``questions`` under ``steer``, scored offline with
    TruthfulQA's automatic truth metric (max similarity to a true reference minus max to a
    false one, > 0 = true) under ROUGE-L and MiniLM embeddings; for dynamic steerers also
    the rollbacks per answer and the strengths they chose."""
    from steerbench.textmetrics import answer_truth, is_non_answer, truth_summary
    from steerbench.truthfulqa import generate_answers

    t0 = time.perf_counter()
    answers, rollbacks, strengths = [], 0, []
    for g in generate_answers(model, questions, steer, prompt, max_new_tokens):
        answers.append(g.text.strip())
        rollbacks += len(g.trace.rollbacks)
        strengths += [e.detail["strength"] for e in g.trace.events if e.kind == "strength"]
    gen_s = time.perf_counter() - t0
    out = {"gen_n": len(questions), "gen_s": gen_s, "answers": answers,
           "non_answers": float(np.mean([is_non_answer(a) for a in answers])) if answers else 0.0}
    for metric in ("rougeL", "embedding"):
        out[f"gen_acc_{metric}"] = truth_summary(answer_truth(answers, questions, metric=metric))["acc"]
    if steer is not None and steer.observes:
        out["rollbacks_per_answer"] = rollbacks / len(questions)
        out["mean_strength"] = float(np.mean(strengths)) if strengths else 0.0
        out["strengths"] = strengths
    return out
