"""The one token loop and its trace. (Batched passes: ``steerbench.passes``.)

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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # text, not a widget: a closed widget bar reads "model not found" after a reload

from steerbench.context import check_int
from steerbench.errors import ParameterError
from steerbench.kvcache import can_crop, drop_left, stack_rows
from steerbench.model import Model, Prompt
from steerbench.passes import (
    MAX_BATCH_TOKENS,
    Batch,
    SharedPrefix,
    check_context_length,
    forward_pass,
    length_batches,
    steering,
)
from steerbench.steerer import Decision, Steerer, StepContext, StepState, check_strength

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
    # site -> strength applied there, for steerers that compute their own per token and layer
    # (CLAS: s * (c . r + b) at each layer); ``strength`` is then their mean over sites
    site_strengths: dict[str, float] | None = None
    logit: float | None = None  # the chosen token's logit
    margin: float | None = None  # the top logit minus the runner-up's: how near a tie the choice was


@dataclass
class TraceEvent:
    step: int
    kind: str  # "rollback", "strength", "rollback_refused"
    detail: dict = field(default_factory=dict)


@dataclass
class Trace:
    steps: list[TokenStep] = field(default_factory=list)
    events: list[TraceEvent] = field(default_factory=list)
    prompt_format: str = ""  # how the prompt was formatted: "chat", "plain" or "raw" (Prompt.format)

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


@dataclass
class _Options:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    use_cache: bool
    stop_at_eos: bool
    max_rollbacks: int
    stop: tuple[str, ...] | None


def _options(max_new_tokens, temperature, top_p, seed, use_cache, stop_at_eos, max_rollbacks, stop) -> _Options:
    """The generation settings checked, before any pass (a ParameterError names the bad one)."""
    if isinstance(stop, str):
        stop = (stop,)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
    max_rollbacks = check_int(max_rollbacks, "max_rollbacks", low=0)
    temperature = check_strength(temperature, "temperature")
    top_p = check_strength(top_p, "top_p")
    if temperature < 0:
        raise ParameterError(f"temperature must be 0 (greedy) or more, got {temperature:g}")
    if not 0 < top_p <= 1:
        raise ParameterError(f"top_p must be in (0, 1], got {top_p:g}")
    if seed is not None:
        seed = check_int(seed, "seed", low=0)
    if stop is not None:
        stop = tuple(stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise ParameterError(f"stop must be non-empty strings, got {stop!r}")
    return _Options(max_new_tokens, temperature, top_p, seed, bool(use_cache), bool(stop_at_eos), max_rollbacks, stop)


def _checked_prompt(model: Model, prompt: str | Prompt, chat: bool, o: _Options, steer: Steerer | None,
                    prefix: SharedPrefix | None) -> Prompt:
    p = _as_prompt(model, prompt, chat)
    check_context_length(model, len(p.ids) + o.max_new_tokens,
                         f"the prompt ({len(p.ids)} tokens) plus max_new_tokens ({o.max_new_tokens})")
    if prefix is not None:
        if list(p.ids[: len(prefix)]) != prefix.ids or len(prefix) >= len(p.ids):
            raise ValueError("the shared prefix must be a proper prefix of the prompt's tokens")
        if len(prefix) > p.steer_from or (steer is not None and not steer.prefix_invariant):
            raise ValueError("the shared prefix must end at or before steer_from (it was computed unsteered)")
    return p


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
    stop: str | Sequence[str] | None = None,
    prefix: SharedPrefix | None = None,
) -> Generation:
    """Generate from ``prompt`` with ``steer`` applied; greedy unless ``temperature > 0``.

    A string prompt is chat-formatted (``chat=False`` feeds it raw); with no system
    message, a chat template may add its own (SmolLM2's: "You are a helpful AI assistant
    named SmolLM, trained by Hugging Face"): pass ``model.prompt(text, system=...)`` to
    choose it. Bad values (``max_new_tokens=2.5``, ``top_p=0``, a prompt that does not fit
    the context window with ``max_new_tokens`` more) are refused with a ParameterError
    before any pass. ``on_step(event)``
    is called with every TokenStep and TraceEvent as it happens (live views use it).
    ``use_cache=False`` recomputes the whole sequence every step (for checking).
    ``stop``: strings that end the generation once the text contains one (the text is cut
    before it; the tokens are kept), e.g. ``("\n",)`` for one-line answers. A plain chat
    prompt (a model without a chat template) stops at the next ``"\nUser:"`` unless ``stop``
    says otherwise (``stop=()``: never).
    ``prefix``: a :class:`~steerbench.passes.SharedPrefix` the prompt starts with (e.g. TruthfulQA's instruction
    and primer, shared by many questions) that ends at or before ``steer_from``: its
    keys and values are reused instead of being recomputed for every prompt.
    Many prompts at once: :func:`generate_many` (the same loop, batched).
    """
    o = _options(max_new_tokens, temperature, top_p, seed, use_cache, stop_at_eos, max_rollbacks, stop)
    p = _checked_prompt(model, prompt, chat, o, steer, prefix)
    return _token_loop(model, [p], steer, o, prefix, on_step)[0]


# Rows a batch of generate_many holds by default: 64 one-line TruthfulQA answers came 4.8x as fast
# as one at a time at 16 rows (refilled), 3.1x at 8 and 6.2x at 32 (bench/batched_generation.py, 2 cores)
BATCH_SIZE = 16
# free rows are refilled once a quarter of the batch is free (each refill is a pass of its own)
REFILL_FRACTION = 4


def _unwindowed(model: Model, longest_prompt: int, o: _Options) -> bool:
    """No sliding-window layer fills: padding may be added and dropped on the left of the cache."""
    window = model.sliding_window
    return window is None or longest_prompt + o.max_new_tokens < window


def generate_many(
    model: Model,
    prompts: Sequence[str | Prompt],
    steer: Steerer | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    chat: bool = True,
    max_rollbacks: int = 16,
    stop: str | Sequence[str] | None = None,
    prefix: SharedPrefix | None = None,
    batch_size: int = BATCH_SIZE,
    progress: bool | None = None,
) -> list[Generation]:
    """:func:`generate` for many prompts, ``batch_size`` rows at a time: one Generation per
    prompt, in order, each with its own trace, stop and (with ``seed``) random stream.

    The rows are left-padded (prompts of like length share a batch) and every column
    carries its absolute position, so a steerer's position rule holds in every row as it
    does alone; a row that has finished (EOS, a stop string, ``max_new_tokens``) leaves the
    batch, and once a quarter of the rows are free the next prompts take their places (their
    prompts are run in a pass of their own and their keys and values joined to the batch's;
    not on a model whose sliding window the prompts would fill: there each batch runs to its
    end). Steerers whose strength is computed in their hooks batch exactly; a steerer that
    observes and rolls back (FASB) decides per answer, so its prompts run one at a time
    through the same loop, and each trace says so (a ``"unbatched"`` event). Batched and
    one-at-a-time runs agree to float rounding (tests/test_generate_many.py).
    """
    o = _options(max_new_tokens, temperature, top_p, seed, use_cache, stop_at_eos, max_rollbacks, stop)
    batch_size = check_int(batch_size, "batch_size", low=1)
    if isinstance(prompts, (str, Prompt)):
        raise ParameterError("generate_many takes a list of prompts; for one prompt use generate")
    ps = [_checked_prompt(model, x, chat, o, steer, prefix) for x in prompts]
    if not ps:
        raise ParameterError("generate_many needs at least one prompt")
    one_at_a_time = steer is not None and steer.observes
    out: list[Generation | None] = [None] * len(ps)
    bar = tqdm(total=len(ps), desc="generate", disable=not (progress if progress is not None else len(ps) > 1),
               leave=False)
    with bar:
        if one_at_a_time:
            for i, p in enumerate(ps):
                g = _token_loop(model, [p], steer, o, prefix)[0]
                g.trace.events.insert(0, TraceEvent(0, "unbatched", {
                    "reason": f"{g.steer} observes each answer and may roll it back: generated one at a time"}))
                out[i] = g
                bar.update(1)
            return [g for g in out if g is not None]
        # prompts of like length side by side; a finished row's place goes to the next prompt,
        # unless a sliding window would fill (its layers then hold no padding to line rows up)
        if not o.use_cache or _unwindowed(model, max(len(p) for p in ps), o):
            groups = [sorted(range(len(ps)), key=lambda i: len(ps[i]))]
        else:
            groups = length_batches([len(p) for p in ps], batch_size)
        for idx in groups:
            gens = _token_loop(model, [ps[i] for i in idx], steer, o, prefix, width=batch_size,
                               on_done=lambda _: bar.update(1))
            for i, g in zip(idx, gens):
                out[i] = g
    return [g for g in out if g is not None]


def _token_loop(model: Model, ps: list[Prompt], steer: Steerer | None, o: _Options,
                prefix: SharedPrefix | None, on_step=None, width: int | None = None,
                on_done=None) -> list[Generation]:
    """The one token loop, over the rows ``ps`` (a steerer that observes: one row).

    ``width``: at most this many rows at once; the others wait in ``ps``'s order and take
    the place of rows that finished (their prompt, but for its last token, is run in a
    pass of its own and its keys and values joined to the batch's). ``on_done(i)`` is
    called when ``ps[i]`` has finished.
    """
    observes = steer is not None and steer.observes
    assert not observes or len(ps) == 1, "an observing steerer decides per row: one row at a time"
    width = len(ps) if width is None else width
    device = model.device
    eos = model.eos_ids if o.stop_at_eos else set()
    # a base model given a plain chat prompt goes on to write the next turn itself
    stops = [o.stop if o.stop is not None else ("\nUser:",) if p.format == "plain" else () for p in ps]
    gens = [torch.Generator().manual_seed(o.seed) if o.seed is not None else None for _ in ps]
    seqs: list[list[int]] = [list(p.ids) for p in ps]  # every kept token, prompt first
    n_prompt = [len(p.ids) for p in ps]
    traces = [Trace(prompt_format=p.format) for p in ps]
    step_no = [0] * len(ps)
    batched = len(ps) > 1  # one row runs without a mask, exactly as it always has
    queue = list(range(len(ps)))  # prompts not started yet

    def take(free: int) -> list[int]:
        """The next waiting prompts, at most ``free``, whose first pass stays within MAX_BATCH_TOKENS."""
        new = [queue.pop(0)]
        while queue and len(new) < free and (len(new) + 1) * n_prompt[queue[0]] <= MAX_BATCH_TOKENS:
            new.append(queue.pop(0))
        return new

    live = take(width)  # the prompt each batch row is

    def row_context(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([ps[r].steer_from for r in rows], device=device),
                torch.tensor([n_prompt[r] for r in rows], device=device))

    steer_from, gen_from = row_context(live)
    ctx = StepContext(steer_from=steer_from, gen_from=gen_from)

    def append_rows(rows: list[int]) -> None:
        live.extend(rows)
        steer_from, gen_from = row_context(rows)
        assert ctx.gen_from is not None
        ctx.steer_from, ctx.gen_from = torch.cat([ctx.steer_from, steer_from]), torch.cat([ctx.gen_from, gen_from])
    # a shared prefix's keys and values once per row; with a sliding window the left padding
    # after it would sit inside the window of the padded rows, so then each batch computes it
    unwindowed = _unwindowed(model, max(n_prompt), o)
    head = prefix if o.use_cache and prefix is not None and (not batched or unwindowed) else None
    if queue and o.use_cache and not unwindowed:
        raise ValueError("rows can join a batch only while no sliding window is full")

    def start_cache():
        if head is None:
            return None, [0] * len(live), torch.zeros(len(live), 0, dtype=torch.long, device=device)
        return (head.expanded(len(live)), [len(head)] * len(live),
                torch.ones(len(live), len(head), dtype=torch.long, device=device))

    cache, n_cached, mask = start_cache()  # n_cached[i]: tokens of row i whose keys/values are cached

    def admit(new: list[int]) -> None:
        """Rows ``new`` join the batch: every token of their prompts but the last (which the
        next step feeds, as for every row) is run now, steered as in the batch, and its keys
        and values are added to the cache."""
        nonlocal cache, mask, n_cached
        skip = len(head) if head is not None else 0
        for group in ([r for r in new if n_prompt[r] - 1 > skip], [r for r in new if n_prompt[r] - 1 <= skip]):
            if not group:
                continue
            c = head.expanded(len(group)) if head is not None else None
            m = torch.ones(len(group), skip, dtype=torch.long, device=device)
            if n_prompt[group[0]] - 1 > skip:
                body = Batch.pad([seqs[r][skip:-1] for r in group], model.pad_id, device)
                pos = body.positions + skip * body.attention_mask
                m = torch.cat([m, body.attention_mask], 1)
                rows = ctx.steer_from, ctx.gen_from
                ctx.steer_from, ctx.gen_from = row_context(group)
                ctx.set_pass(pos)
                _, c = forward_pass(model, ctx, body.ids, c, cached=True, last=1, attention_mask=m,
                                    position_ids=pos.clamp(min=0))
                ctx.steer_from, ctx.gen_from = rows
            cache, mask = stack_rows(cache, mask, c, m)
            n_cached = n_cached + [n_prompt[r] - 1 if n_prompt[r] - 1 > skip else skip for r in group]
            append_rows(group)
    n_rollbacks = 0
    finished = [False] * len(ps)

    def emit(item):
        if on_step is not None:
            on_step(item)

    with torch.no_grad(), steering(model, steer, ctx):
        while live:
            # each row's tokens not yet cached, left-padded; positions count on from the cached ones
            firsts = n_cached if o.use_cache else [0] * len(live)
            step = Batch.pad([seqs[r][f:] for f, r in zip(firsts, live)], model.pad_id, device)
            ids, new_mask = step.ids, step.attention_mask
            pos = step.positions + torch.tensor(firsts, device=device)[:, None] * new_mask
            full_mask = torch.cat([mask, new_mask], 1) if o.use_cache else new_mask
            ctx.set_pass(pos)
            # only the newest position's logits (the prompt's would be [prompt, vocab] each pass)
            logits, cache = forward_pass(model, ctx, ids, cache, cached=o.use_cache, last=1,
                                         attention_mask=full_mask if batched else None,
                                         position_ids=pos.clamp(min=0) if batched else None)
            assert logits is not None
            if o.use_cache:
                mask = full_mask
                n_cached = [len(seqs[r]) for r in live]

            if observes:  # one row: the steerer may change the strength or roll back
                r = live[0]
                seq, trace = seqs[r], traces[r]
                n_gen = len(seq) - n_prompt[r]
                decision: Decision | None = None
                if n_gen > 0:
                    assert steer is not None
                    decision = steer.observe(StepState(seq[-1], len(seq) - 1, n_gen, finished[r], ctx))
                if decision is not None:
                    kept = trace.kept
                    if decision.score is not None and kept:
                        kept[-1].score = float(decision.score)
                    if decision.strength is not None:
                        # the loop applies the new strength: hooks read it from the context
                        ctx.strength = check_strength(decision.strength, "Decision.strength")
                        ev = TraceEvent(step_no[r], "strength", {"strength": float(decision.strength)})
                        trace.events.append(ev)
                        emit(ev)
                    k = min(int(decision.rollback), n_gen)
                    if k > 0 and n_rollbacks >= o.max_rollbacks:
                        ev = TraceEvent(step_no[r], "rollback_refused", {"tokens": k, "limit": o.max_rollbacks})
                        trace.events.append(ev)
                        emit(ev)
                    elif k > 0:
                        n_rollbacks += 1
                        dropped = kept[-k:]
                        for s in dropped:
                            s.discarded = True
                        ev = TraceEvent(
                            step_no[r],
                            "rollback",
                            {"tokens": k, "from_position": len(seq) - k,
                             "text": model.decode([s.token_id for s in dropped]), "note": decision.note},
                        )
                        trace.events.append(ev)
                        emit(ev)
                        del seq[-k:]
                        if o.use_cache and can_crop(cache, k + 1):
                            assert cache is not None
                            # drop the k tokens and the one before them, which is fed again so
                            # its logits (under the new steering) give the next token
                            cache.crop(-(k + 1))
                            n_cached = [len(seq) - 1]
                            mask = mask[:, : len(seq) - 1]
                        elif o.use_cache:
                            # sliding-window layers past their window have dropped the keys a crop
                            # would need: recompute the kept tokens instead (exact, one pass; their
                            # keys and values then see the steering in force now)
                            cache, n_cached, mask = start_cache()
                            ev = TraceEvent(step_no[r], "recompute", {"reason": "sliding-window cache past its window",
                                                                      "tokens": len(seq) - n_cached[0]})
                            trace.events.append(ev)
                            emit(ev)
                        finished[r] = False
                        continue
                if finished[r]:
                    break

            steered = steer.steered(ctx)[:, -1].tolist() if steer is not None else [False] * len(live)
            per_site_rows = None
            if steer is not None and ctx.applied:  # one device sync per token
                per_site_rows = torch.stack([v[:, -1] for v in ctx.applied.values()], 1).tolist()
            last_logits = logits[:, -1]
            tokens = [_pick(last_logits[i], o.temperature, o.top_p, gens[r]) for i, r in enumerate(live)]
            top2 = last_logits.topk(2, dim=-1).values
            chosen = last_logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
            facts = torch.stack([chosen, top2[:, 0] - top2[:, 1]], 1).tolist()  # one device sync per step
            done: list[int] = []
            for i, r in enumerate(live):
                seq, token = seqs[r], tokens[i]
                # the column whose logits chose this token: steered if a rule named it and the
                # strength in force was not 0; the strength recorded is the one applied
                col_steered = bool(steered[i])
                row_strength = ctx.strength[i] if isinstance(ctx.strength, torch.Tensor) else ctx.strength
                strength = float(row_strength) if col_steered and row_strength is not None else 0.0
                per_site = None
                if col_steered and per_site_rows is not None:
                    per_site = dict(zip(ctx.applied, per_site_rows[i]))
                    strength = sum(per_site.values()) / len(per_site)
                col_steered = col_steered and strength != 0
                ts = TokenStep(step_no[r], len(seq), token, model.decode([token]), strength, col_steered,
                               site_strengths=per_site, logit=facts[i][0], margin=facts[i][1])
                step_no[r] += 1
                traces[r].steps.append(ts)
                emit(ts)
                seq.append(token)
                hit_stop = bool(stops[r]) and any(x in model.decode(seq[n_prompt[r]:]) for x in stops[r])
                if token in eos or hit_stop or len(seq) - n_prompt[r] >= o.max_new_tokens:
                    finished[r] = True
                    if on_done is not None:
                        on_done(r)
                    if not observes:
                        done.append(i)
            if done:  # finished rows leave the batch: their cache rows, mask rows and positions go
                keep = [i for i in range(len(live)) if i not in done]
                live = [live[i] for i in keep]
                if live:
                    sel = torch.tensor(keep, device=device)
                    if o.use_cache:
                        assert cache is not None
                        cache.batch_select_indices(sel)
                        mask = mask[sel]
                        n_cached = [n_cached[i] for i in keep]
                        # columns that are padding in every row left (rows that joined late are
                        # padded to the batch's width): drop them
                        n_empty = int(mask.any(0).int().argmax()) if unwindowed else 0
                        drop_left(cache, n_empty)
                        mask = mask[:, n_empty:]
                    assert ctx.gen_from is not None
                    ctx.steer_from, ctx.gen_from = ctx.steer_from[sel], ctx.gen_from[sel]
                # waiting prompts take the free rows once enough are free (each joining costs a pass)
                if queue and (not live or width - len(live) >= max(1, width // REFILL_FRACTION)):
                    new = take(width - len(live))
                    if not live:  # an empty batch starts over, as the first one did
                        live = new
                        ctx.steer_from, ctx.gen_from = row_context(live)
                        cache, n_cached, mask = start_cache()
                    elif o.use_cache:
                        admit(new)
                    else:  # without a cache every step feeds every row's whole sequence
                        append_rows(new)
                if not live:
                    break

    out = []
    for r, p in enumerate(ps):
        tokens = seqs[r][n_prompt[r]:]
        text = model.decode([t for t in tokens if t not in eos])
        for x in stops[r]:
            text = text.split(x)[0]
        out.append(Generation(prompt=p, tokens=tokens, text=text, trace=traces[r],
                              steer=steer.describe() if steer is not None else "none"))
    return out
