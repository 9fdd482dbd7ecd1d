"""Batched activation collection at chosen hook points and token positions.

``collect`` pads batches on the left, runs each batch once with capture hooks on the
requested hook points only, reduces each activation to the requested position inside the
hook and moves it to the CPU at once, so device memory holds one batch of one site at a
time. The pass stops after the deepest requested block. Inputs are sorted by length
before batching (less padding), and results come back in input order. A prefix every input
starts with (an instruction and few-shot primer before each answer) is run once when no
position read lies in it: each batch then runs only what follows, on its keys and values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm  # text, not a widget: a closed widget bar reads "model not found" after a reload

from steerbench.memory import result_tensor
from steerbench.model import Model, Prompt
from steerbench.passes import SharedPrefix, forward_batch, length_batches
from steerbench.steerer import Steerer

Position = str | int
Input = str | Sequence[int] | Prompt

# the shortest common prefix worth a pass of its own (its keys and values are then copied
# into every batch): TruthfulQA's instruction + primer is 219 tokens of ~250 per text
MIN_SHARED_PREFIX = 16


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
    share_prefix: bool = True,
) -> dict[str, Any]:
    """Activations of ``inputs`` at ``hooks``, reduced to ``position``.

    inputs: texts (encoded without chat formatting; use ``model.chat_text`` first for chat),
        token id lists, or Prompts.
    position: ``"last"`` token, a negative index from the end (``-2`` = one before last),
        ``"mean"`` over the tokens (or over ``spans[i] = (start, end)`` of item i), or
        ``"all"`` (a list of [len_i, ...] tensors; with ``spans``, of each span's tokens).
    steer: collect under steering (Prompts carry where it starts; other inputs are unsteered).
    norms: with ``position="mean"``, also the mean over the same tokens of each token's L2
        norm, under ``f"{hook}#norm"`` ([N]; the norm of the mean is smaller), in the same pass.
    share_prefix: run a prefix all inputs share once, unsteered, when every position read
        lies after it (``"last"``, an int, or ``"mean"`` / ``"all"`` over spans that start after it);
        activations then match a full pass to float rounding (~1e-6).
    Returns {hook name: tensor [N, ...]} on the CPU (a list for ``"all"``). Large results
    follow the RAM budget (:func:`steerbench.memory.ram_budget`).
    """
    return _collect(model, inputs, hooks, position, spans, batch_size, steer, progress, norms, share_prefix)


def collect_stacked(model: Model, inputs: Sequence[Input], hooks: Sequence[str], position: Position = "last",
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``collect``'s results as one tensor ``[N, len(hooks), ...]`` in the order of
    ``hooks`` (every hook's activations of one shape), filled in place: no second copy of
    the set is ever made. With ``norms=True``, also the norms ``[N, len(hooks)]`` (else None)."""
    if position == "all":
        raise ValueError("position='all' gives one tensor per input; use collect")
    if len(set(hooks)) != len(hooks):
        raise ValueError("collect_stacked needs distinct hook names")
    acts = _collect(model, inputs, list(hooks), position, stack=True, **kwargs)
    norms = acts.get("#norm")
    return acts["#stack"], norms


def _collect(model: Model, inputs: Sequence[Input], hooks: str | Sequence[str], position: Position = "last",
             spans: Sequence[tuple[int, int | None]] | None = None, batch_size: int = 16, steer: Steerer | None = None,
             progress: bool | None = None, norms: bool = False, share_prefix: bool = True,
             stack: bool = False) -> dict[str, Any]:
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
        if position not in ("mean", "all"):
            raise ValueError("spans only apply to position='mean' or 'all'")
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
    head = _shared_head(model, encoded, position, spans, steer) if share_prefix else None
    h = 0 if head is None else len(head)
    if h:
        spans = None if spans is None else [(s - h, None if e is None else e - h) for s, e in spans]
    n = len(encoded)
    blocks = (_Block(n, len(hooks)), _Block(n, len(hooks))) if stack else (None, None)
    out: dict[str, Any] = {h: [None] * n if position == "all" else _Rows(n, blocks[0], k) for k, h in enumerate(hooks)}
    norm_out: dict[str, _Rows] = {h: _Rows(n, blocks[1], k) for k, h in enumerate(hooks)} if norms else {}
    # requested names by hook point: two names may alias one point (hook_z = attn.o.hook_in)
    names_at: dict[tuple[int, str], list[str]] = {}
    for name in hooks:
        names_at.setdefault(model.site(name).key, []).append(name)
    sites = [names[0] for names in names_at.values()]
    batches = length_batches([len(ids) for ids, _ in encoded], batch_size)
    show = progress if progress is not None else len(batches) > 4
    for idx in tqdm(batches, desc="collect", disable=not show, leave=False):
        seqs = [encoded[i][0][h:] for i in idx]
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
            head=head,
        )
    if position == "all":
        return dict(out)
    if stack:
        assert blocks[0] is not None and blocks[1] is not None
        return {"#stack": blocks[0].tensor, **({"#norm": blocks[1].tensor} if norms else {})}
    result = {h: v.tensor for h, v in out.items()}
    result.update({f"{h}#norm": v.tensor for h, v in norm_out.items()})
    return result


def _shared_head(model: Model, encoded, position: Position, spans, steer: Steerer | None) -> SharedPrefix | None:
    """The prefix every input starts with, run once, or None where sharing it would change
    a result or save too little: a position read inside it, steering, too short a prefix,
    or a sliding window the padded rows would overrun (padding between the prefix and a
    row's tokens would take window slots)."""
    if steer is not None or len(encoded) < 2 or (position in ("mean", "all") and spans is None):
        return None
    seqs = [ids for ids, _ in encoded]
    if position in ("mean", "all"):
        limit = min(s for s, _ in spans)
    else:
        limit = min(len(s) for s in seqs) - (1 if position == "last" else -int(position))
    window = model.sliding_window
    if SharedPrefix.common_length(seqs, limit) < MIN_SHARED_PREFIX or (
            window is not None and max(len(s) for s in seqs) >= window):
        return None
    return SharedPrefix.of(model, seqs, limit)


class _Rows:
    """One preallocated CPU tensor of results, filled a batch at a time. (Keeping one small
    tensor per item instead pinned the heap between the batches' large transient
    activations: collecting TruthfulQA's 5,880 answers peaked at 23 GB resident for a
    406 MB result; 904 answers at 6.5 GB.) In a :class:`_Block`, slot ``slot`` of its tensor."""

    def __init__(self, n: int, block: _Block | None = None, slot: int = 0) -> None:
        self.n, self.block, self.slot = n, block, slot
        self._t: torch.Tensor | None = None

    def put(self, idx: list[int], vals: torch.Tensor) -> None:
        if self._t is None:
            if self.block is not None:
                self._t = self.block.slot(self.slot, vals)
            else:
                self._t = result_tensor((self.n, *vals.shape[1:]), vals.dtype)
        self._t[torch.as_tensor(idx)] = vals.to("cpu")

    @property
    def tensor(self) -> torch.Tensor:
        assert self._t is not None, "every item is stored before the result is read"
        return self._t


class _Block:
    """One ``[N, k, ...]`` result tensor that the rows of k hook points fill in place
    (``collect_stacked``: stacking k tensors afterwards held the set twice)."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self._t: torch.Tensor | None = None

    def slot(self, k: int, vals: torch.Tensor) -> torch.Tensor:
        if self._t is None:
            self._t = result_tensor((self.n, self.k, *vals.shape[1:]), vals.dtype)
        elif self._t.shape[2:] != vals.shape[1:] or self._t.dtype != vals.dtype:
            raise ValueError(f"collect_stacked needs one shape for every hook, got {tuple(self._t.shape[2:])} "
                             f"and {tuple(vals.shape[1:])}")
        return self._t[:, k]

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
            s, e = (0, None) if spans is None else spans[i]
            off = offsets[row]
            dest[i] = act[row, off + s : width if e is None else off + e].to("cpu", copy=True)
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
    return collect_stacked(model, inputs, hooks, position=position, **kwargs)[0]


def collect_resid(model: Model, inputs: Sequence[Input], position: Position = "last", **kwargs) -> torch.Tensor:
    """The residual stream after every block (``blocks.L.hook_resid_post``): [N, n_layers, d_model]."""
    return collect_resid_norms(model, inputs, position, **kwargs)[0]


def collect_resid_norms(model: Model, inputs: Sequence[Input], position: Position = "last",
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``collect_resid``'s tensor and, with ``norms=True`` (position "mean"), each item's
    mean token norm per layer ([N, n_layers]; else None), from one pass."""
    hooks = [f"blocks.{L}.hook_resid_post" for L in range(model.n_layers)]
    return collect_stacked(model, inputs, hooks, position=position, **kwargs)
