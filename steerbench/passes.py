"""Batched forward passes with steering: the passes evaluation, collection and training share.

``steering()`` installs a steerer's hooks for one pass or call and always removes them.
The hooks of a call act only on that call's own passes (``forward_pass`` marks the pass
it runs, per thread), so another call on the same model, nested in a callback or running
in another thread, is never steered by them.
``forward_batch`` runs left-padded sequences (explicit position ids), with autograd on
when asked (``grad=True``), so a trainable steerer trains on the path it is evaluated on.
``SharedPrefix`` holds the keys and values of a token prefix every sequence of an
evaluation starts with (an instruction and a few-shot primer), and ``steered_suffixes``
computes each batch's unsteered prefix once and runs only the steered tail for each of
several steerers. The token loop (``generation.generate``) uses ``steering`` and
``SharedPrefix`` too.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerbench.errors import ParameterError
from steerbench.kvcache import cache_length, forward_cached
from steerbench.model import Model
from steerbench.runner import forward as run_forward
from steerbench.runner import hooked
from steerbench.steerer import HookFn, Steerer, StepContext, refuse_observing

# -------------------------------------------------------------------------------------
# hooks

# Hooks sit on the shared model, but each belongs to one call (its StepContext holds that
# call's positions, mask and strength). ``forward_pass`` records, per thread, the context
# of the pass it is running; a hook acts only when that is its own. So a forward pass made
# from an ``on_step`` callback during a steered ``generate``, a nested ``generate``, or an
# unsteered call in another thread while a steered one runs sees none of the steered
# call's hooks (before this, the first came back steered, the second crashed on a shape
# mismatch, and 17 of 21 unsteered calls in a second thread were steered).
_running = threading.local()


def _owned(fn: HookFn, ctx: StepContext) -> HookFn:
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor | None:
        if getattr(_running, "ctx", None) is not ctx:
            return None  # another call's pass: leave it alone
        return fn(act, hook)

    return hook


@contextlib.contextmanager
def _own_pass(ctx: StepContext) -> Iterator[None]:
    prev = getattr(_running, "ctx", None)
    _running.ctx = ctx
    try:
        yield
    finally:
        _running.ctx = prev


@contextlib.contextmanager
def steering(
    model: Model,
    steer: Steerer | None,
    ctx: StepContext,
    extra: Iterable[tuple[str, HookFn]] = (),
) -> Iterator[StepContext]:
    """Install ``steer``'s hooks (and ``extra`` ones) for the body; always removes them.

    Extra hooks run after the steerer's at the same site, so they see steered values.
    """
    hooks: list[tuple[str, HookFn]] = []
    if steer is not None:
        steer.check_model(model)
        if ctx.strength is None:
            ctx.strength = steer.initial_strength()
        own = steer.hooks(ctx)
        hooks.extend(own)
        if own and steer.reads_clean(ctx):
            ctx.clean_mask = steer.steered  # forward_pass runs the clean pre-pass these columns need
    hooks.extend(extra)
    sites = [model.site(name) for name, _ in hooks]  # every name resolved (or refused) before any is installed
    with hooked([(site, _owned(fn, ctx)) for site, (_, fn) in zip(sites, hooks)]):
        yield ctx


def forward_pass(
    model: Model,
    ctx: StepContext,
    ids: torch.Tensor,
    cache: Any = None,
    *,
    cached: bool = False,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    stop_at_layer: int | None = None,
    last: int | None = None,
) -> tuple[torch.Tensor | None, Any]:
    """One forward pass under the hooks ``steering`` installed: ``(logits, cache)``.

    Every steered pass goes through here (the token loop, ``forward_batch`` and the
    steered suffixes). ``cached=True`` extends ``cache`` (None: a new one) through
    :func:`~steerbench.kvcache.forward_cached`; otherwise the cache returned is None,
    ``stop_at_layer`` may cut the pass short (logits None), and a ``cache`` given holds keys
    and values the pass attends to (a shared prefix's; the pass extends it: give a copy).
    ``last``: logits of the last
    ``last`` columns only ([batch, last, vocab]; the unembedding runs on those alone, which
    matters with Gemma's 262k vocabulary: 1 MB per position in fp32).

    When the installed steerer has operators that read the unsteered activation
    (``ctx.clean_mask`` set), the columns up to the last one it steers are first run with
    the steering off, recording its sites in ``ctx.clean``; the cache is then cropped back
    (or that pass ran on a copy, where a sliding window forbids the crop), so the steered
    pass sees the cache exactly as it was.
    """
    kw: dict[str, Any] = {}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    if position_ids is not None:
        kw["position_ids"] = position_ids
    if last is not None:
        kw["logits_to_keep"] = min(int(last), ids.shape[1])
    check_context_length(model, ids.shape[1] + (cache_length(cache) if cache is not None else 0))
    with _own_pass(ctx):
        if ctx.clean_mask is not None and (isinstance(ctx.strength, torch.Tensor) or ctx.strength):
            _clean_prepass(model, ctx, ids, cache, kw)
        if cached:
            return forward_cached(model, ids, cache, **kw)
        # stop after block stop_at_layer - 1 (from the last block on: no final norm, no unembedding)
        stop_after = model.block(min(stop_at_layer, model.n_layers) - 1) if stop_at_layer is not None else None
        logits, _ = run_forward(model.runner, ids, cache=cache, use_cache=cache is not None, stop_after=stop_after,
                                **kw)
    return logits, None


def check_context_length(model: Model, n: int, what: str = "the sequence") -> None:
    """Refuse ``n`` positions on a model whose context window is shorter, before any work."""
    limit = model.context_length
    if limit is not None and n > limit:
        raise ParameterError(f"{what} has {n} tokens but {model.name} has a context window of {limit}; "
                             "shorten the prompt (or generate fewer tokens)")


def _clean_prepass(model: Model, ctx: StepContext, ids: torch.Tensor, cache: Any, kw: dict) -> None:
    assert ctx.clean_mask is not None
    ctx.clean = {}
    cols = ctx.clean_mask(ctx).any(0).nonzero()
    if len(cols) == 0:
        return
    n = int(cols.max()) + 1
    part = dict(kw)
    part["logits_to_keep"] = 1  # its logits are never read
    if "attention_mask" in kw:  # it also spans the cached columns
        part["attention_mask"] = kw["attention_mask"][:, : kw["attention_mask"].shape[1] - ids.shape[1] + n]
    if "position_ids" in kw:
        part["position_ids"] = kw["position_ids"][:, :n]
    window = model.sliding_window
    crop = cache is not None and (window is None or cache_length(cache) + n < window)
    ctx.capturing = True
    try:
        with torch.no_grad():
            if cache is None:
                run_forward(model.runner, ids[:, :n], **part)
            else:
                forward_cached(model, ids[:, :n], cache if crop else copy.deepcopy(cache), **part)
    finally:
        ctx.capturing = False
        if crop:
            cache.crop(-n)


# -------------------------------------------------------------------------------------
# batched forward with left padding

# Rows x padded width a batch may hold. Memory grows with rows x width^2 (eager attention
# over every layer): sixteen 600-token BoolQ passages at once took the process past 24 GB,
# while the short texts of the other sets stay far below this (16 x 250 tokens).
MAX_BATCH_TOKENS = 4096


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices into ``lengths``, shortest first, cut into batches of at most ``batch_size``
    rows and at most ``max_tokens`` rows x longest row (one row always fits)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        cur = out[-1] if out else None
        if cur is not None and len(cur) < batch_size and (len(cur) + 1) * lengths[i] <= max_tokens:
            cur.append(i)
        else:
            out.append([i])
    return out


@dataclass
class Batch:
    """Left-padded token ids. Row b's token i sits in column ``offsets[b] + i``."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor  # absolute positions, -1 on padding
    offsets: list[int]
    lengths: list[int]

    @classmethod
    def pad(cls, seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
        if not seqs:
            raise ValueError("empty batch")
        lengths = [len(s) for s in seqs]
        if min(lengths) == 0:
            raise ValueError("a sequence in the batch has no tokens")
        width = max(lengths)
        offsets = [width - n for n in lengths]
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, offsets[b]:] = torch.as_tensor(list(s), dtype=torch.long)
            mask[b, offsets[b]:] = 1
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, -1)
        return cls(ids.to(device), mask.to(device), positions.to(device), offsets, lengths)


def forward_batch(
    model: Model,
    seqs: Sequence[Sequence[int]],
    steer: Steerer | None = None,
    steer_from: Sequence[int] | None = None,
    extra_hooks: Iterable[tuple[str, HookFn]] = (),
    stop_at_layer: int | None = None,
    grad: bool = False,
    row_strengths: torch.Tensor | None = None,
    last: int | None = None,
    head: SharedPrefix | None = None,
) -> tuple[torch.Tensor | None, Batch]:
    """One forward pass over left-padded ``seqs`` with ``steer`` applied.

    ``steer_from[b]`` is where steering starts in row b (default: nowhere, i.e. past
    the end). Returns the logits (None when ``stop_at_layer`` cuts the pass short) and
    the Batch for indexing. ``last``: logits of the last ``last`` columns only (the rows
    are left-padded, so those are every row's last tokens): column ``c`` of the batch is
    then ``logits[:, c - (width - last)]``. ``grad=True`` runs with autograd on, through the same hooks
    (the model's own weights stay as they are: freeze them to train only a steerer).

    ``head``: a :class:`SharedPrefix` that precedes every one of ``seqs`` (which then hold
    only what follows it): the pass attends to its keys and values instead of recomputing
    them, positions (``steer_from`` too) count from the head's first token, and hooks see
    the ``seqs`` columns only.
    """
    refuse_observing([steer], "a batched forward pass")
    batch = Batch.pad(seqs, model.pad_id, model.device)
    h = 0 if head is None else len(head)
    if steer_from is None:
        steer_from = [h + n for n in batch.lengths]
    positions, mask, past = batch.positions, batch.attention_mask, None
    if head is not None:  # left padding then sits between the head and each row's tokens, masked out
        positions = torch.where(positions >= 0, positions + h, positions)
        mask = torch.cat([mask.new_ones(len(seqs), h), mask], 1)
        past = head.expanded(len(seqs))
    ctx = StepContext(steer_from=torch.as_tensor(list(steer_from), device=model.device), strength=row_strengths)
    ctx.set_pass(positions)
    with torch.set_grad_enabled(grad), steering(model, steer, ctx, extra_hooks):
        out, _ = forward_pass(model, ctx, batch.ids, past, attention_mask=mask,
                              position_ids=positions.clamp(min=0), stop_at_layer=stop_at_layer, last=last)
    return out, batch


@dataclass
class SharedPrefix:
    """Keys and values of a token prefix that every sequence of an evaluation starts with
    (e.g. an instruction and a few-shot primer), computed once, unsteered."""

    ids: list[int]
    cache: Any  # a transformers Cache with batch size 1

    @classmethod
    def of(cls, model: Model, seqs: Sequence[Sequence[int]], limit: int) -> SharedPrefix | None:
        """The longest common prefix of ``seqs`` (at most ``limit`` tokens), or None if empty."""
        first = seqs[0]
        n = cls.common_length(seqs, limit)
        if n < 1:
            return None
        ids = torch.tensor([list(first[:n])], device=model.device)
        with torch.no_grad():
            _, cache = forward_cached(model, ids, logits_to_keep=1)  # only its keys and values are kept
        return cls(list(first[:n]), cache)

    @staticmethod
    def common_length(seqs: Sequence[Sequence[int]], limit: int) -> int:
        """How many first tokens all of ``seqs`` share (at most ``limit``)."""
        first = seqs[0]
        n = min(limit, *(len(s) for s in seqs))
        for s in seqs[1:]:
            j = 0
            while j < n and s[j] == first[j]:
                j += 1
            n = j
        return max(n, 0)

    def __len__(self) -> int:
        return len(self.ids)

    def expanded(self, rows: int):
        """A fresh copy of the cache with ``rows`` identical rows (the original stays as it is)."""
        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=self.cache_device()))
        return cache

    def cache_device(self) -> torch.device:
        return self.cache.layers[0].keys.device


def steered_suffixes(
    model: Model,
    seqs: Sequence[Sequence[int]],
    split_at: Sequence[int],
    steer_from: Sequence[int],
    steers: Sequence[Steerer | None],
    head: SharedPrefix | None = None,
    extra_hooks: Iterable[tuple[str, HookFn]] = (),
    row_strengths: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Logits of ``seqs[b][split_at[b]:]`` under each of ``steers``, computing the prefix once.

    Steering never touches positions before ``steer_from``, so with ``split_at <=
    steer_from`` the prefix's keys and values are the same for every steerer: they are
    computed once, unsteered, and each steerer runs only the suffix on top of them (the
    cache is cropped back after each). Yields ``(k, logits)`` with ``logits[b, j]`` the
    logits at absolute position ``split_at[b] + j`` (right-padded). A steerer that
    declares ``prefix_invariant = False`` gets a full pass instead.

    ``head``: a :class:`SharedPrefix` that every sequence starts with and that ends before
    every ``split_at``; its cache is reused instead of recomputing it for the batch.
    ``extra_hooks`` run in every steerer's pass (after its hooks), e.g. to read activations.
    ``row_strengths`` ([batch]): each row's strength, in place of each steerer's own.
    """
    refuse_observing(steers, "a batched forward pass")
    extra_hooks = list(extra_hooks)
    if any(a > f for a, f in zip(split_at, steer_from)):
        raise ValueError("split_at must not be after steer_from")
    if head is not None and (len(head) >= min(split_at) or any(list(s[: len(head)]) != head.ids for s in seqs)):
        raise ValueError("the shared head must be a prefix of every sequence that ends before split_at")
    device = model.device
    lengths = [len(s) for s in seqs]
    suffixes = [list(s[a:]) for s, a in zip(seqs, split_at)]
    width = max(len(x) for x in suffixes)
    shared = min(split_at) > 0 and any(st is None or st.prefix_invariant for st in steers)
    window = model.sliding_window
    if window is not None and head is not None and max(split_at) + width >= window:
        # once a sliding window no longer spans every column, left padding between the
        # shared head and the rest would sit inside it and shorten it for the padded rows:
        # compute the whole prefix per batch (padding then only precedes a row's tokens)
        head = None
    if shared:
        # each distinct prefix once (answers to one question share it), then one cache row per sequence
        h = 0 if head is None else len(head)
        prefixes = [tuple(s[h:a]) for s, a in zip(seqs, split_at)]
        distinct = {p: i for i, p in enumerate(dict.fromkeys(prefixes))}
        row_of = torch.tensor([distinct[p] for p in prefixes], device=device)
        pre = Batch.pad([list(p) for p in distinct], model.pad_id, device)
        pre_mask = pre.attention_mask
        past = None
        if head is not None:
            # the head's keys/values once per row, then each distinct rest of the prefix on top
            # (left padding sits between the head and the rest; it is masked out)
            past = head.expanded(len(distinct))
            pre_mask = torch.cat([torch.ones(len(distinct), h, dtype=pre_mask.dtype, device=device), pre_mask], 1)
        with torch.no_grad():
            _, cache = forward_cached(
                model, pre.ids, past, attention_mask=pre_mask, position_ids=pre.positions.clamp(min=0) + h
            )
        if len(distinct) < len(seqs):
            cache.reorder_cache(row_of)
        prefix_mask = pre_mask[row_of]
        ids = torch.full((len(seqs), width), model.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, x in enumerate(suffixes):
            ids[b, : len(x)] = torch.as_tensor(x)
            mask[b, : len(x)] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.as_tensor(list(split_at), device=device)[:, None] + torch.arange(width, device=device)
        full_mask = torch.cat([prefix_mask, mask], dim=1)
        ctx_positions = positions.masked_fill(mask == 0, -1)
        can_crop_after = window is None or cache_length(cache) + width < window
    for k, steer in enumerate(steers):
        if shared and (steer is None or steer.prefix_invariant):
            ctx = StepContext(steer_from=torch.as_tensor(list(steer_from), device=device), strength=row_strengths)
            ctx.set_pass(ctx_positions)
            # a sliding-window layer that fills up cannot be cropped back: run on a copy
            run = cache if can_crop_after else copy.deepcopy(cache)
            with torch.no_grad(), steering(model, steer, ctx, extra_hooks):
                logits, run = forward_pass(model, ctx, ids, run, cached=True, attention_mask=full_mask,
                                           position_ids=positions)
                assert logits is not None
            if can_crop_after:
                cache.crop(-width)
            yield k, logits
        else:
            # only the suffix columns' logits: the rest of the pass keeps no [rows, tokens, vocab]
            full, batch = forward_batch(model, seqs, steer, steer_from, extra_hooks, row_strengths=row_strengths,
                                        last=width)
            assert full is not None
            cut = max(lengths) - width  # the batch column that full's column 0 is
            out = full.new_zeros((len(seqs), width, full.shape[-1]))
            for b, a in enumerate(split_at):
                out[b, : lengths[b] - a] = full[b, batch.offsets[b] + a - cut :]
            yield k, out
