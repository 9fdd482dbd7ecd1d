"""The one token loop, and the batched forward pass it shares with evaluation.

``generate`` keeps a Hugging Face KV cache, feeds one token per decode step, and tells
the Steerer the absolute position of every column through :class:`StepContext`, so a
position rule ("steer from the end of the user instruction on") holds under the cache
as it does without it. A dynamic Steerer observes each generated token and may ask for a
rollback: the loop crops the cache by the dropped tokens and regenerates from there,
never recomputing the kept prefix.

Rollback semantics: keys and values of kept tokens stay as they were computed. If the
steering strength changed at the rollback, earlier tokens keep their earlier steering
(ITI semantics); only positions fed after the rollback see the new strength.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from steerbench.kvcache import forward_cached
from steerbench.model import Model, Prompt
from steerbench.steerer import Decision, HookFn, StepContext, StepState, Steerer


# -------------------------------------------------------------------------------------
# hooks


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
        hooks.extend(steer.hooks(ctx))
    hooks.extend(extra)
    for name, _ in hooks:
        model.check_hook(name)
    with model.bridge.hooks(fwd_hooks=hooks):
        yield ctx


# -------------------------------------------------------------------------------------
# batched forward with left padding


@dataclass
class Batch:
    """Left-padded token ids. Row b's token i sits in column ``offsets[b] + i``."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor  # absolute positions, -1 on padding
    offsets: list[int]
    lengths: list[int]

    @classmethod
    def pad(cls, seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> "Batch":
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
) -> tuple[torch.Tensor | None, Batch]:
    """One forward pass over left-padded ``seqs`` with ``steer`` applied.

    ``steer_from[b]`` is where steering starts in row b (default: nowhere, i.e. past
    the end). Returns the logits (None when ``stop_at_layer`` cuts the pass short) and
    the Batch for indexing.
    """
    batch = Batch.pad(seqs, model.pad_id, model.device)
    if steer_from is None:
        steer_from = batch.lengths
    ctx = StepContext(steer_from=torch.as_tensor(list(steer_from), device=model.device))
    ctx.set_pass(batch.positions)
    with torch.no_grad(), steering(model, steer, ctx, extra_hooks):
        out = model.bridge.forward(
            batch.ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp(min=0),
            prepend_bos=False,
            stop_at_layer=stop_at_layer,
            return_type=None if stop_at_layer is not None else "logits",
        )
    return (out if stop_at_layer is None else None), batch


@dataclass
class SharedHead:
    """Keys and values of a token prefix that every sequence of an evaluation starts with
    (e.g. an instruction and a few-shot primer), computed once, unsteered."""

    ids: list[int]
    cache: object  # a transformers Cache with batch size 1

    @classmethod
    def of(cls, model: Model, seqs: Sequence[Sequence[int]], limit: int) -> "SharedHead | None":
        """The longest common prefix of ``seqs`` (at most ``limit`` tokens), or None if empty."""
        first = seqs[0]
        n = min(limit, *(len(s) for s in seqs))
        for s in seqs[1:]:
            j = 0
            while j < n and s[j] == first[j]:
                j += 1
            n = j
        if n < 1:
            return None
        ids = torch.tensor([list(first[:n])], device=model.device)
        with torch.no_grad():
            _, cache = forward_cached(model, ids)
        return cls(list(first[:n]), cache)

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
    head: SharedHead | None = None,
    extra_hooks: Iterable[tuple[str, HookFn]] = (),
) -> Iterator[tuple[int, torch.Tensor]]:
    """Logits of ``seqs[b][split_at[b]:]`` under each of ``steers``, computing the prefix once.

    Steering never touches positions before ``steer_from``, so with ``split_at <=
    steer_from`` the prefix's keys and values are the same for every steerer: they are
    computed once, unsteered, and each steerer runs only the suffix on top of them (the
    cache is cropped back after each). Yields ``(k, logits)`` with ``logits[b, j]`` the
    logits at absolute position ``split_at[b] + j`` (right-padded). A steerer that
    declares ``prefix_invariant = False`` gets a full pass instead.

    ``head``: a :class:`SharedHead` that every sequence starts with and that ends before
    every ``split_at``; its cache is reused instead of recomputing it for the batch.
    ``extra_hooks`` run in every steerer's pass (after its hooks), e.g. to read activations.
    """
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
    for k, steer in enumerate(steers):
        if shared and (steer is None or steer.prefix_invariant):
            ctx = StepContext(steer_from=torch.as_tensor(list(steer_from), device=device))
            ctx.set_pass(ctx_positions)
            with torch.no_grad(), steering(model, steer, ctx, extra_hooks):
                logits, cache = forward_cached(model, ids, cache, attention_mask=full_mask, position_ids=positions)
            cache.crop(-width)
            yield k, logits
        else:
            logits, batch = forward_batch(model, seqs, steer, steer_from, extra_hooks)
            out = logits.new_zeros((len(seqs), width, logits.shape[-1]))
            for b, a in enumerate(split_at):
                out[b, : lengths[b] - a] = logits[b, batch.offsets[b] + a :]
            yield k, out


# -------------------------------------------------------------------------------------
# the token loop


@dataclass
class TokenStep:
    """One generated token as the loop saw it."""

    step: int  # order in which tokens were produced, counting discarded ones
    position: int  # absolute position in the sequence
    token_id: int
    text: str
    strength: float  # effective strength of the pass that produced it (0 if unsteered)
    steered: bool  # whether the producing pass steered this column
    score: float | None = None  # what the steerer observed at this token (e.g. P(true))
    discarded: bool = False  # dropped by a rollback


@dataclass
class TraceEvent:
    step: int
    kind: str  # "rollback", "strength", "rollback_refused"
    detail: dict = field(default_factory=dict)


@dataclass
class Trace:
    steps: list[TokenStep] = field(default_factory=list)
    events: list[TraceEvent] = field(default_factory=list)

    @property
    def kept(self) -> list[TokenStep]:
        return [s for s in self.steps if not s.discarded]

    @property
    def rollbacks(self) -> list[TraceEvent]:
        return [e for e in self.events if e.kind == "rollback"]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([s.__dict__ for s in self.steps])


@dataclass
class Generation:
    prompt: Prompt
    tokens: list[int]
    text: str
    trace: Trace
    steer: str = "none"

    def __str__(self) -> str:
        return self.text


def _as_prompt(model: Model, prompt: str | Prompt, chat: bool) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string or a Prompt")
    return model.prompt(prompt, chat=chat)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def generate(
    model: Model,
    prompt: str | Prompt,
    steer: Steerer | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    chat: bool = True,
    max_rollbacks: int = 16,
    on_step=None,
    stop: Sequence[str] = (),
    head: SharedHead | None = None,
) -> Generation:
    """Generate from ``prompt`` with ``steer`` applied; greedy unless ``temperature > 0``.

    A string prompt is chat-formatted (``chat=False`` feeds it raw). ``on_step(event)``
    is called with every TokenStep and TraceEvent as it happens (live views use it).
    ``use_cache=False`` recomputes the whole sequence every step (for checking).
    ``stop``: strings that end the generation once the text contains one (the text is cut
    before it; the tokens are kept), e.g. ``("\n",)`` for one-line answers.
    ``head``: a :class:`SharedHead` the prompt starts with (e.g. TruthfulQA's instruction
    and primer, shared by many questions) that ends at or before ``steer_from``: its
    keys and values are reused instead of being recomputed for every prompt.
    """
    if isinstance(stop, str):
        stop = (stop,)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    p = _as_prompt(model, prompt, chat)
    device = model.device
    eos = model.eos_ids if stop_at_eos else set()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    observes = steer is not None and steer.observes

    seq: list[int] = list(p.ids)  # every kept token, prompt first
    n_prompt = len(p.ids)
    trace = Trace()
    ctx = StepContext(steer_from=torch.tensor([p.steer_from], device=device))
    cache = None
    n_cached = 0  # tokens whose keys/values are in the cache
    if head is not None:
        if list(p.ids[: len(head)]) != head.ids or len(head) >= len(p.ids):
            raise ValueError("head must be a proper prefix of the prompt's tokens")
        if len(head) > p.steer_from or (steer is not None and not steer.prefix_invariant):
            raise ValueError("head must end at or before steer_from (it was computed unsteered)")
        if use_cache:
            cache, n_cached = head.expanded(1), len(head)
    n_rollbacks = 0
    step_no = 0
    finished = False

    def emit(item):
        if on_step is not None:
            on_step(item)

    with torch.no_grad(), steering(model, steer, ctx):
        while True:
            start = n_cached if use_cache else 0
            feed = seq[start:]
            ctx.set_pass(torch.arange(start, len(seq), device=device)[None, :])
            ids = torch.tensor([feed], device=device)
            if use_cache:
                logits, cache = forward_cached(model, ids, cache)
                n_cached = len(seq)
            else:
                logits = model.bridge.forward(ids, prepend_bos=False)
            n_gen = len(seq) - n_prompt

            decision: Decision | None = None
            if observes and n_gen > 0:
                decision = steer.observe(
                    StepState(seq[-1], len(seq) - 1, n_gen, finished, ctx)
                )
            if decision is not None:
                kept = trace.kept
                if decision.score is not None and kept:
                    kept[-1].score = float(decision.score)
                if decision.strength is not None:
                    ev = TraceEvent(step_no, "strength", {"strength": float(decision.strength)})
                    trace.events.append(ev)
                    emit(ev)
                k = min(int(decision.rollback), n_gen)
                if k > 0 and n_rollbacks >= max_rollbacks:
                    ev = TraceEvent(step_no, "rollback_refused", {"tokens": k, "limit": max_rollbacks})
                    trace.events.append(ev)
                    emit(ev)
                elif k > 0:
                    n_rollbacks += 1
                    dropped = kept[-k:]
                    for s in dropped:
                        s.discarded = True
                    ev = TraceEvent(
                        step_no,
                        "rollback",
                        {"tokens": k, "from_position": len(seq) - k, "text": model.decode([s.token_id for s in dropped]),
                         "note": decision.note},
                    )
                    trace.events.append(ev)
                    emit(ev)
                    del seq[-k:]
                    if use_cache:
                        # drop the k tokens and the one before them, which is fed again so
                        # its logits (under the new steering) give the next token
                        cache.crop(-(k + 1))
                        n_cached = len(seq) - 1
                    finished = False
                    continue
            if finished:
                break

            token = _pick(logits[0, -1], temperature, top_p, gen)
            col_steered = bool(ctx.mask[0, -1]) if steer is not None else False
            strength = steer.current_strength(ctx) if (steer is not None and col_steered) else 0.0
            col_steered = col_steered and strength != 0
            ts = TokenStep(step_no, len(seq), token, model.decode([token]), strength, col_steered)
            step_no += 1
            trace.steps.append(ts)
            emit(ts)
            seq.append(token)
            hit_stop = bool(stop) and any(x in model.decode(seq[n_prompt:]) for x in stop)
            if token in eos or hit_stop or len(seq) - n_prompt >= max_new_tokens:
                finished = True
                if not observes:
                    break

    tokens = seq[n_prompt:]
    text = model.decode([t for t in tokens if t not in eos])
    for x in stop:
        text = text.split(x)[0]
    return Generation(
        prompt=p,
        tokens=tokens,
        text=text,
        trace=trace,
        steer=steer.describe() if steer is not None else "none",
    )
