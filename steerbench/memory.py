"""A resident-memory budget for activation sets: past it, they live in files the OS pages.

Activation sets grow with the data (every head at every token of TruthfulQA's answers is
several GB in fp32), while the rest of a run stays small. ``ram_budget(gb)`` sets a limit
on the process's resident memory for the body of a ``with``; every large result a
collection or the benchmark allocates (``result_tensor``) then goes to RAM only while the
process's resident set plus the new tensor stays within it, and otherwise into a file in
``spill_dir()`` that is mapped and unlinked at once: the OS writes its pages to disk as
memory runs short and frees the space when the tensor is gone (also after a crash). Values
are the same either way, so results do not depend on the budget. Cached activation files
are memory-mapped instead of read (``map_safetensors``) under a budget.

No budget (the default) keeps everything in RAM.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch

_state = threading.local()


def budget_bytes() -> float | None:
    """The resident-memory budget in force here (bytes), or None for none."""
    return getattr(_state, "budget", None)


@contextlib.contextmanager
def ram_budget(gb: float | None) -> Iterator[None]:
    """Keep the process's resident memory within ``gb`` GiB for the body, as far as
    activation sets go: those that would pass it are file-backed (``None``: no budget;
    ``0``: every one on disk)."""
    if gb is not None and (not math.isfinite(gb) or gb < 0):
        raise ValueError(f"a RAM budget is a finite number of GiB >= 0, got {gb}")
    prev = budget_bytes()
    _state.budget = None if gb is None else gb * 2**30
    try:
        yield
    finally:
        _state.budget = prev


def resident_bytes() -> int:
    """This process's resident set now."""
    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int:
    """The most this process has held resident so far (Linux and macOS report it)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)


def spill_dir() -> Path:
    """Where over-budget tensors are backed: ``$STEERBENCH_SPILL_DIR``, else the cache
    folder (on disk; ``/tmp`` is often RAM itself)."""
    env = os.environ.get("STEERBENCH_SPILL_DIR")
    if env:
        return Path(env)
    from steerbench.model import cache_dir

    return cache_dir() / "spill"


def over_budget(nbytes: int) -> bool:
    budget = budget_bytes()
    return budget is not None and resident_bytes() + nbytes > budget


def result_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a large result: in RAM within the budget, else
    backed by an unlinked file in ``spill_dir()``."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not over_budget(nbytes) or numel == 0:
        return torch.empty(shape, dtype=dtype)
    d = spill_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=d)
    os.close(fd)
    try:
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)  # the file grows to fit
    finally:
        os.unlink(path)  # the mapping keeps the pages; the name goes now
    return t.view(shape)


def is_file_backed(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is not torch's own allocation: here, a file mapping
    (``result_tensor`` past the budget, ``map_safetensors``)."""
    return not t.untyped_storage().resizable()


_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file, memory-mapped read-only-on-disk (copy on write),
    or None if one has a dtype numpy cannot map (then load it normally)."""
    p = Path(path)
    with p.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        np_dtype = _NUMPY.get(info["dtype"])
        if np_dtype is None:
            return None
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, np_dtype)).dtype)
            continue
        out[name] = torch.from_numpy(np.memmap(p, dtype=np_dtype, mode="c", offset=8 + n + begin, shape=shape))
    return out
