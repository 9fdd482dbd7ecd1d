"""Saving fitted things as safetensors with a JSON header of provenance. Never pickle.

The header records the model (name, weight fingerprint, compatibility mode), the hook
names, the method and its parameters, the dataset and the steerbench version. Loading
into a different model or mode refuses with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steerbench.errors import ArtifactError, ModelMismatch
from steerbench.memory import map_safetensors

if TYPE_CHECKING:
    from steerbench.model import Model

HEADER_KEY = "steerbench"


ArtifactMismatch = ModelMismatch  # the older name


def version() -> str:
    from steerbench import __version__

    return __version__


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    full = {**header, "steerbench_version": version()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(p),
              metadata={HEADER_KEY: json.dumps(full, sort_keys=True)})
    return p


def load_artifact(path: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of the artifact at ``path``; ArtifactError (naming the
    file) for a folder, a file that is not safetensors, or one without steerbench's header.
    ``mmap=True``: the tensors map the file (copy on write) instead of being read into RAM."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no artifact at {p}")
    if not p.is_file():
        raise ArtifactError(f"{p} is a folder, not an artifact file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = (map_safetensors(p) if mmap else None) or load_file(str(p))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
        raise ArtifactError(f"{p} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if HEADER_KEY not in meta:
        raise ArtifactError(f"{p} is not a steerbench artifact (no '{HEADER_KEY}' header)")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{p}: its '{HEADER_KEY}' header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{p}: its '{HEADER_KEY}' header is not a JSON object")
    return tensors, header


PROVENANCE_KEYS = ("model_name", "weights_sha256", "compatibility_mode", "d_model", "n_layers")


def check_provenance(fitted_on: object, where: object) -> dict:
    """``fitted_on`` if it names a model (every key the model check compares), else an
    ArtifactError: an artifact that does not say which model it was fitted on is refused,
    never used unchecked."""
    missing = [k for k in PROVENANCE_KEYS if not isinstance(fitted_on, dict) or k not in fitted_on]
    if missing:
        raise ArtifactError(f"{where} does not say which model it was fitted on (no {', '.join(missing)} in "
                            "'fitted_on'); refit and save it again")
    assert isinstance(fitted_on, dict)
    return fitted_on


def check_fingerprint(fitted_on: dict | None, model: Model, what: str = "this artifact") -> None:
    """Raise ModelMismatch unless ``model`` is the one ``fitted_on`` describes (an empty
    ``fitted_on``, a steerer built by hand rather than fitted, is not checked; a loaded
    artifact without provenance is refused when it loads: ``check_provenance``)."""
    if not fitted_on:
        return
    here = model.fingerprint()
    for key in PROVENANCE_KEYS:
        if key in fitted_on and fitted_on[key] != here.get(key):
            raise ModelMismatch(
                f"{what} was fitted on {fitted_on.get('model_name')} "
                f"({key}={fitted_on[key]!r}) but the model here has {key}={here.get(key)!r}; "
                "refit it on this model"
            )
