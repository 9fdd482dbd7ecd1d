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

if TYPE_CHECKING:
    from steerbench.model import Model

HEADER_KEY = "steerbench"


class ArtifactMismatch(ValueError):
    """An artifact was fitted on another model (or mode) than the one it is used with."""


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


def load_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no artifact at {p}")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if HEADER_KEY not in meta:
        raise ValueError(f"{p} is not a steerbench artifact (no '{HEADER_KEY}' header)")
    return load_file(str(p)), json.loads(meta[HEADER_KEY])


def check_fingerprint(fitted_on: dict | None, model: Model, what: str = "this artifact") -> None:
    """Raise ArtifactMismatch unless ``model`` is the one ``fitted_on`` describes."""
    if not fitted_on:
        return
    here = model.fingerprint()
    for key in ("model_name", "weights_sha256", "compatibility_mode", "d_model", "n_layers"):
        if key in fitted_on and fitted_on[key] != here.get(key):
            raise ArtifactMismatch(
                f"{what} was fitted on {fitted_on.get('model_name')} "
                f"({key}={fitted_on[key]!r}) but the model here has {key}={here.get(key)!r}; "
                "refit it on this model"
            )
