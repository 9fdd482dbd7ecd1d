"""The Steerer abstraction shared by every method.

A method is fitted from data into a ``Steerer``. ``generate``, the batched forward pass
and the evaluators accept any Steerer; none of them has a method-specific branch.

A Steerer
- says *where, when and how* it steers as a list of (site, rule, operator) triples
  (``interventions()``, from :mod:`steerbench.blocks`); ``sites``, ``hooks(ctx)``
  and the trace's per-token "steered" flag are derived from them. (A one-off steerer may
  instead override ``sites`` and ``hooks`` directly.) The hook functions read the live
  :class:`StepContext`, which the token loop updates before every forward pass with the
  absolute positions that pass covers and the strength in force;
- may observe each generated token (``observe``) and answer with a :class:`Decision`
  (a score for the trace, a new strength, or a rollback of the last k tokens); the loop
  applies the new strength to the context;
- has a strength, and ``scaled(s)`` returns a copy at strength ``s``; strength 0 leaves
  the model untouched;
- saves and loads through one function driven by its dataclass fields (safetensors and a
  JSON header with provenance; never pickle): ``save(path)``, ``Cls.load(path, model)``.

Method notes (what each computes, defaults, reference results, where steerbench differs
from the reference code): docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from steerbench.artifacts import check_fingerprint, check_provenance, load_artifact, save_artifact
from steerbench.blocks import intervention_hooks, steered_mask
from steerbench.context import Decision, HookFn, StepContext, StepState, check_strength
from steerbench.errors import ArtifactError

if TYPE_CHECKING:
    from steerbench.model import Model

__all__ = ["Decision", "Flagger", "HookFn", "STEERERS", "StepContext", "StepState", "Steerer", "check_strength",
           "load_steerer", "refuse_observing", "save_steerer"]


S = TypeVar("S", bound="Steerer")


def refuse_observing(steers: Iterable[Steerer | None], where: str) -> None:
    """Raise if a dynamic steerer reaches a pass that has no token loop to observe.

    A batched pass never calls ``observe``, so a dynamic steerer would score exactly as
    unsteered (its strength is set only by observing). It is refused, never silently run.
    """
    for st in steers:
        if st is not None and st.observes:
            raise ValueError(
                f"{st.describe()} is a dynamic steerer: it decides while generating, and {where} has no "
                "token loop to watch, so it would score exactly as unsteered. Pass steer.when_acting() for "
                "the static steering it applies once it acts, or use its own scorer (FASB: "
                "steerbench.truthfulqa.mc_mode_scores)."
            )


class Steerer:
    """Base class of all steering methods. Subclasses are dataclasses with a ``strength``.

    Subclasses register by class name when defined, so an artifact names its class and
    ``load_steerer`` rebuilds it.
    """

    strength: float
    observes: bool = False  # True for dynamic steerers: the loop calls observe()
    # True when the hooks leave every position before ``steer_from`` untouched; evaluators
    # then compute the shared unsteered prefix once for many steering settings
    prefix_invariant: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        STEERERS[cls.__name__] = cls

    # -- what a method says ----------------------------------------------------------
    def interventions(self) -> list:
        """The (site, rule, operator) triples this steerer applies (blocks.Intervention)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither interventions() nor hooks()")

    @property
    def sites(self) -> tuple[str, ...]:
        """Hook names this steerer writes to."""
        return tuple(dict.fromkeys(iv.site.hook for iv in self.interventions()))

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        """Hook functions for one call; they read ``ctx`` live at every pass."""
        if not self.observes and not isinstance(ctx.strength, torch.Tensor) and not ctx.strength:
            return []  # static at strength 0 touches nothing: output is exactly the unsteered one
        return intervention_hooks(self._call_interventions(ctx), ctx)

    def steered(self, ctx: StepContext) -> torch.Tensor:
        """Boolean [batch, pos]: the columns of the running pass that this steerer's rules
        steer (a steerer with hand-written hooks: every column from ``steer_from`` on)."""
        try:
            interventions = self._call_interventions(ctx)
        except NotImplementedError:
            return ctx.mask
        return steered_mask(interventions, ctx)

    def reads_clean(self, ctx: StepContext) -> bool:
        """Whether an operator reads the unsteered activation (then every pass first runs
        the steered columns clean: ``passes.forward_pass``)."""
        try:
            return any(iv.op.reads_clean for iv in self._call_interventions(ctx))
        except NotImplementedError:
            return False

    def _call_interventions(self, ctx: StepContext) -> list:
        """The interventions, built once per call (kept in the call's ``ctx.state``), so the
        loop's per-token steered flag does not rebuild them at every step."""
        if "_interventions" not in ctx.state:
            ctx.state["_interventions"] = self.interventions()
        return ctx.state["_interventions"]

    # -- optional ----------------------------------------------------------------------
    def observe(self, step: StepState) -> Decision | None:  # noqa: ARG002 (static steerers ignore it)
        return None

    def initial_strength(self) -> float:
        """The strength in force when a call starts (a dynamic steerer may start at 0)."""
        return float(self.strength)

    def scaled(self: S, strength: float) -> S:
        return dataclasses.replace(self, strength=check_strength(strength))  # type: ignore[type-var]

    def when_acting(self) -> Steerer:
        """The static steering this steerer applies once it acts, for off-task measures
        (KL on neutral text steers every position, so a dynamic steerer that never sees a
        generated token would otherwise look harmless). Static steerers are their own."""
        return self

    def check_model(self, model: Model) -> None:
        """Refuse a model this steerer was not fitted on (subclasses add more checks)."""
        check_fingerprint(self.provenance(), model, f"this {type(self).__name__}")
        for name in self.sites:
            model.check_hook(name)

    def provenance(self) -> dict:
        """The fingerprint of the model this was fitted on: its own ``fitted_on``, else that
        of the first steerer it is built from (FASB: its heads')."""
        own = getattr(self, "fitted_on", None)
        if own:
            return dict(own)
        if dataclasses.is_dataclass(self):
            for f in dataclasses.fields(self):
                v = getattr(self, f.name, None)
                if isinstance(v, Steerer):
                    return v.provenance()
        return {}

    @property
    def strength_unit(self) -> str:
        """What ``strength`` counts, for axis titles and reports (e.g. CAA: "m (x v[L])")."""
        return "strength"

    def describe(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g})"

    # -- artifacts -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """safetensors + JSON provenance, from the dataclass fields; never pickle."""
        return save_steerer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None):
        """Load a saved steerer of this class; with ``model``, refuse one fitted on another model."""
        return load_steerer(path, model, expect=cls)


# class name -> Steerer subclass, filled as subclasses are defined (for load_steerer)
STEERERS: dict[str, type[Steerer]] = {}
# class name -> a dataclass that is part of a steerer without steering itself (a readout):
# saved and loaded nested in its steerer, like a nested Steerer (``register_part``)
PARTS: dict[str, type] = {}


def register_part(cls: type) -> type:
    """Class decorator: instances of the dataclass ``cls`` may be fields of a saved Steerer."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    PARTS[cls.__name__] = cls
    return cls


@dataclass
class Flagger:
    """How a dynamic steerer takes part in two-pass scoring (score, flag, re-score), e.g.
    FASB's multiple-choice mode. The scorer runs each continuation unsteered with
    ``read_hooks(store)`` installed (they may fill ``store`` from any column); then
    ``flag(store, lengths)`` says, for each row, which continuation token first triggers
    an intervention and at what strength (or None); flagged rows are scored again with
    ``rescore`` at those strengths, steered from ``backtrack`` tokens before the flag.
    Column convention: column 0 is the last prompt token, column j + 1 continuation token j.
    """

    read_hooks: Callable[[dict], list[tuple[str, HookFn]]]
    flag: Callable[[dict, list[int]], list[tuple[int, float] | None]]
    rescore: Steerer
    backtrack: int


# ----------------------------------------------------------------------------------------
# one save/load for every Steerer, driven by its dataclass fields

_PROVENANCE = ("fitted_on", "info")


def _flatten(steerer: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """The header entry of ``steerer``; its tensors go into ``tensors`` under ``prefix``."""
    if not dataclasses.is_dataclass(steerer):
        raise TypeError(f"{type(steerer).__name__} is not a dataclass: steerbench saves a Steerer from its fields")
    params, nested = {}, {}
    for f in dataclasses.fields(steerer):
        if not f.init or f.name in _PROVENANCE:
            continue
        v = getattr(steerer, f.name)
        if isinstance(v, torch.Tensor):
            tensors[prefix + f.name] = v
        elif isinstance(v, Steerer) or type(v).__name__ in PARTS:
            nested[f.name] = _flatten(v, f"{prefix}{f.name}.", tensors)
        else:
            try:
                json.dumps(v)
            except TypeError:
                raise TypeError(f"cannot save {type(steerer).__name__}.{f.name}: a {type(v).__name__} is neither a "
                                "tensor, a Steerer nor JSON") from None
            params[f.name] = v
    entry = {"method": type(steerer).__name__, "params": params, "nested": nested}
    for name in _PROVENANCE:
        if hasattr(steerer, name):
            entry[name] = getattr(steerer, name)
    return entry


def save_steerer(steerer: Steerer, path: str | os.PathLike) -> Path:
    """Write ``steerer``; refused (ArtifactError, nothing written) when it does not say
    which model it was fitted on (``fitted_on``, e.g. ``model.fingerprint()``): such a file
    could never be checked against a model, so it could never be loaded."""
    tensors: dict[str, torch.Tensor] = {}
    header = _flatten(steerer, "", tensors)
    # parts may share a tensor with their steerer (FASB's calibrated readout holds the heads'
    # own probes): safetensors writes each storage once, so a repeat is written as a copy
    seen: set[int] = set()
    for key, t in tensors.items():
        if t.untyped_storage().data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(t.untyped_storage().data_ptr())
    header["fitted_on"] = check_provenance(steerer.provenance(), f"this {type(steerer).__name__}")
    header["hooks"] = list(steerer.sites)
    try:
        header["positions"] = sorted({iv.rule.describe() for iv in steerer.interventions()})
    except NotImplementedError:
        pass
    return save_artifact(path, tensors, header)


def _finite_json(value: Any) -> bool:
    """Whether a header value holds no NaN or +-inf (JSON headers may spell them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite_json(v) for v in value)
    return True


def _rebuild(entry: dict, prefix: str, tensors: dict[str, torch.Tensor], path) -> Steerer:
    name = str(entry.get("method"))
    cls: Any = STEERERS.get(name) or PARTS.get(name)
    if cls is None:
        raise ArtifactError(f"{path} holds a {name!r} artifact, which no Steerer class here knows "
                            f"(known: {', '.join(sorted(STEERERS))})")
    params, nested = entry.get("params"), entry.get("nested", {})
    if not isinstance(params, dict) or not isinstance(nested, dict):
        raise ArtifactError(f"{path}: the {name} entry of its header has no 'params' object; it was not written "
                            "by steerbench's save()")
    bad = [k for k, v in params.items() if not _finite_json(v)]
    if bad:
        raise ArtifactError(f"{path}: the {name} parameter(s) {', '.join(bad)} are NaN or infinite")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            kwargs[f.name] = _rebuild(nested[f.name], f"{prefix}{f.name}.", tensors, path)
        elif prefix + f.name in tensors:
            kwargs[f.name] = tensors[prefix + f.name]
        elif f.name in params:
            kwargs[f.name] = params[f.name]
        elif f.name in _PROVENANCE and f.name in entry:
            kwargs[f.name] = entry[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ArtifactError(f"{path}: the {name} artifact has no value for its field {f.name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: its {name} values are invalid ({err})") from None


def load_steerer(path: str | os.PathLike, model: Model | None = None, expect: type | None = None) -> Steerer:
    """The Steerer saved at ``path``; with ``model``, refuse one fitted on another model.

    ``expect``: the class the caller asked for (``CAA.load``); another is refused. An
    artifact whose header does not name the model it was fitted on is refused
    (ArtifactError), with or without ``model``.
    """
    tensors, header = load_artifact(path)
    name = header.get("method")
    if expect is not None and name != expect.__name__:
        if not (name in STEERERS and issubclass(STEERERS[name], expect)):
            raise ArtifactError(f"{path} holds a {name} artifact, not {expect.__name__}")
    check_provenance(header.get("fitted_on"), path)
    for key, t in tensors.items():  # a steerer's tensors are small: check them all
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor {key!r} holds NaN or inf")
    steerer = _rebuild(header, "", tensors, path)
    if model is not None:
        steerer.check_model(model)
    return steerer
