"""Batched activation collection at chosen hook points and token positions.

``collect`` pads batches on the left, runs each batch once with capture hooks on the
requested hook points only, reduces each activation to the requested position inside the
hook and moves it to the CPU at once, so device memory holds one batch of one site at a
time. The pass stops after the deepest requested block. Inputs are sorted by length
before batching (less padding), and results come back in input order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steerbench.model import Model, Prompt
from steerbench.passes import forward_batch, length_batches
from steerbench.steerer import Steerer

Position = str | int
Input = str | Sequence[int] | Prompt


def _check_position(position: Position) -> None:
    if isinstance(position, bool):
        raise TypeError("position must be 'last', 'mean', 'all' or a negative int")
    if isinstance(position, int):
        if position >= 0:
            raise ValueError(f"an int position counts from the end and must be negative (-1 = last), got {position}")
    elif position not in ("last", "mean", "all"):
        raise ValueError(f"position must be 'last', 'mean', 'all' or a negative int, got {position!r}")


def _encode(model: Model, item: Input) -> tuple[list[int], int]:
    if isinstance(item, Prompt):
        return list(item.ids), item.steer_from
    if isinstance(item, str):
        if not item:
            raise ValueError("cannot collect activations of an empty text")
        ids = model.encode(item)
    else:
        ids = [int(t) for t in item]
    if not ids:
        raise ValueError("cannot collect activations of an empty token sequence")
    return ids, len(ids)


def _stop_layer(hooks: Sequence[str]) -> int | None:
    deepest = -1
    for name in hooks:
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None:
            return None  # a site outside the blocks needs the full pass
        deepest = max(deepest, int(m.group(1)))
    return deepest + 1  # also after the last block: skips ln_final and the unembedding (~8% of a pass)


def collect(
    model: Model,
    inputs: Sequence[Input],
    hooks: str | Sequence[str],
    position: Position = "last",
    spans: Sequence[tuple[int, int | None]] | None = None,
    batch_size: int = 16,
    steer: Steerer | None = None,
    progress: bool | None = None,
    norms: bool = False,
) -> dict[str, Any]:
    """Activations of ``inputs`` at ``hooks``, reduced to ``position``.

    inputs: texts (encoded without chat formatting; use ``model.chat_text`` first for chat),
        token id lists, or Prompts.
    position: ``"last"`` token, a negative index from the end (``-2`` = one before last),
        ``"mean"`` over the tokens (or over ``spans[i] = (start, end)`` of item i), or
        ``"all"`` (a list of [len_i, ...] tensors).
    steer: collect under steering (Prompts carry where it starts; other inputs are unsteered).
    norms: with ``position="mean"``, also the mean over the same tokens of each token's L2
        norm, under ``f"{hook}#norm"`` ([N]; the norm of the mean is smaller), in the same pass.
    Returns {hook name: tensor [N, ...]} on the CPU (a list for ``"all"``).
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("name at least one hook point to collect")
    for name in hooks:
        model.check_hook(name)
    _check_position(position)
    if len(inputs) == 0:
        raise ValueError("no inputs to collect activations from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [_encode(model, x) for x in inputs]
    if spans is not None:
        if position != "mean":
            raise ValueError("spans only apply to position='mean'")
        if len(spans) != len(encoded):
            raise ValueError(f"got {len(spans)} spans for {len(encoded)} inputs")
        for i, ((s, e), (ids, _)) in enumerate(zip(spans, encoded)):
            e = len(ids) if e is None else e
            if not 0 <= s < e <= len(ids):
                raise ValueError(f"span {(s, e)} of input {i} is empty or outside its {len(ids)} tokens")
    if norms and position != "mean":
        raise ValueError("norms=True needs position='mean' (the mean token norm over the same tokens)")
    if isinstance(position, int):
        short = [i for i, (ids, _) in enumerate(encoded) if len(ids) < -position]
        if short:
            raise ValueError(f"position {position} is before the start of input {short[0]}")

    stop = _stop_layer(hooks)
    out: dict[str, Any] = {h: [None] * len(encoded) if position == "all" else _Rows(len(encoded)) for h in hooks}
    norm_out: dict[str, _Rows] = {h: _Rows(len(encoded)) for h in hooks} if norms else {}
    # requested names by hook point: two names may alias one point (hook_z = attn.o.hook_in)
    names_at: dict[tuple[int, str], list[str]] = {}
    for name in hooks:
        names_at.setdefault(model.site(name).key, []).append(name)
    sites = [names[0] for names in names_at.values()]
    batches = length_batches([len(ids) for ids, _ in encoded], batch_size)
    show = progress if progress is not None else len(batches) > 4
    for idx in tqdm(batches, desc="collect", disable=not show, leave=False):
        seqs = [encoded[i][0] for i in idx]
        width = max(len(s) for s in seqs)
        offsets = [width - len(s) for s in seqs]

        def capture(act: torch.Tensor, hook, idx=idx, offsets=offsets) -> None:
            for name in names_at[hook.key]:
                _store(out[name], act, idx, offsets, position, spans, norm_out.get(name))

        forward_batch(
            model,
            seqs,
            steer=steer,
            steer_from=[encoded[i][1] for i in idx] if steer is not None else None,
            extra_hooks=[(name, capture) for name in sites],
            stop_at_layer=stop,
        )
    if position == "all":
        return dict(out)
    result = {h: v.tensor for h, v in out.items()}
    result.update({f"{h}#norm": v.tensor for h, v in norm_out.items()})
    return result


class _Rows:
    """One preallocated CPU tensor of results, filled a batch at a time. (Keeping one small
    tensor per item instead pinned the heap between the batches' large transient
    activations: collecting TruthfulQA's 5,880 answers peaked at 23 GB resident for a
    406 MB result; 904 answers at 6.5 GB.)"""

    def __init__(self, n: int) -> None:
        self.n = n
        self._t: torch.Tensor | None = None

    def put(self, idx: list[int], vals: torch.Tensor) -> None:
        if self._t is None:
            self._t = torch.empty((self.n, *vals.shape[1:]), dtype=vals.dtype)
        self._t[torch.as_tensor(idx)] = vals.to("cpu")

    @property
    def tensor(self) -> torch.Tensor:
        assert self._t is not None, "every item is stored before the result is read"
        return self._t


def _store(dest, act, idx, offsets, position, spans, norm_dest=None) -> None:
    act = act.detach()
    width = act.shape[1]
    if position == "last":
        dest.put(idx, act[:, width - 1])
        return
    if isinstance(position, int):
        dest.put(idx, act[:, width + position])
        return
    if position == "all":
        for row, i in enumerate(idx):
            dest[i] = act[row, offsets[row]:].to("cpu", copy=True)
        return
    means, norms = [], []
    for row, i in enumerate(idx):  # mean over each row's own tokens (or span)
        off = offsets[row]
        if spans is not None:
            s, e = spans[i]
            e = width - off if e is None else e
            tokens = act[row, off + s : off + e]
        else:
            tokens = act[row, off:]
        means.append(tokens.mean(0))
        if norm_dest is not None:
            norms.append(tokens.float().norm(dim=-1).mean())
    dest.put(idx, torch.stack(means))
    if norm_dest is not None:
        norm_dest.put(idx, torch.stack(norms))


def collect_heads(model: Model, inputs: Sequence[Input], position: Position = "last", **kwargs) -> torch.Tensor:
    """Every attention head's output before W_O (``blocks.L.attn.hook_z``): [N, n_layers, n_heads, d_head]."""
    hooks = [f"blocks.{L}.attn.hook_z" for L in range(model.n_layers)]
    acts = collect(model, inputs, hooks, position=position, **kwargs)
    return torch.stack([acts[h] for h in hooks], dim=1)


def collect_resid(model: Model, inputs: Sequence[Input], position: Position = "last", **kwargs) -> torch.Tensor:
    """The residual stream after every block (``blocks.L.hook_resid_post``): [N, n_layers, d_model]."""
    return collect_resid_norms(model, inputs, position, **kwargs)[0]


def collect_resid_norms(model: Model, inputs: Sequence[Input], position: Position = "last",
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``collect_resid``'s tensor and, with ``norms=True`` (position "mean"), each item's
    mean token norm per layer ([N, n_layers]; else None), from one pass."""
    hooks = [f"blocks.{L}.hook_resid_post" for L in range(model.n_layers)]
    acts = collect(model, inputs, hooks, position=position, **kwargs)
    norms = torch.stack([acts[f"{h}#norm"] for h in hooks], dim=1) if kwargs.get("norms") else None
    return torch.stack([acts[h] for h in hooks], dim=1), norms
