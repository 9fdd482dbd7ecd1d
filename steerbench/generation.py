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

from steerbench.context import check_int
from steerbench.errors import ParameterError
from steerbench.kvcache import can_crop
from steerbench.model import Model, Prompt
from steerbench.passes import SharedPrefix, check_context_length, forward_pass, steering
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
    """
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
    if stop is not None and not all(isinstance(x, str) and x for x in stop):
        raise ParameterError(f"stop must be non-empty strings, got {stop!r}")
    p = _as_prompt(model, prompt, chat)
    check_context_length(model, len(p.ids) + max_new_tokens,
                         f"the prompt ({len(p.ids)} tokens) plus max_new_tokens ({max_new_tokens})")
    if stop is None:  # a base model given a plain chat prompt goes on to write the next turn itself
        stop = ("\nUser:",) if p.format == "plain" else ()
    device = model.device
    eos = model.eos_ids if stop_at_eos else set()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    observes = steer is not None and steer.observes

    seq: list[int] = list(p.ids)  # every kept token, prompt first
    n_prompt = len(p.ids)
    trace = Trace(prompt_format=p.format)
    ctx = StepContext(steer_from=torch.tensor([p.steer_from], device=device),
                      gen_from=torch.tensor([len(p.ids)], device=device))
    cache = None
    n_cached = 0  # tokens whose keys/values are in the cache
    if prefix is not None:
        if list(p.ids[: len(prefix)]) != prefix.ids or len(prefix) >= len(p.ids):
            raise ValueError("the shared prefix must be a proper prefix of the prompt's tokens")
        if len(prefix) > p.steer_from or (steer is not None and not steer.prefix_invariant):
            raise ValueError("the shared prefix must end at or before steer_from (it was computed unsteered)")
        if use_cache:
            cache, n_cached = prefix.expanded(1), len(prefix)
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
            # only the newest position's logits (the prompt's would be [prompt, vocab] each pass)
            logits, cache = forward_pass(model, ctx, ids, cache, cached=use_cache, last=1)
            assert logits is not None
            if use_cache:
                n_cached = len(seq)
            n_gen = len(seq) - n_prompt

            decision: Decision | None = None
            if observes and n_gen > 0:
                assert steer is not None
                decision = steer.observe(
                    StepState(seq[-1], len(seq) - 1, n_gen, finished, ctx)
                )
            if decision is not None:
                kept = trace.kept
                if decision.score is not None and kept:
                    kept[-1].score = float(decision.score)
                if decision.strength is not None:
                    # the loop applies the new strength: hooks read it from the context
                    ctx.strength = check_strength(decision.strength, "Decision.strength")
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
                    if use_cache and can_crop(cache, k + 1):
                        assert cache is not None
                        # drop the k tokens and the one before them, which is fed again so
                        # its logits (under the new steering) give the next token
                        cache.crop(-(k + 1))
                        n_cached = len(seq) - 1
                    elif use_cache:
                        # sliding-window layers past their window have dropped the keys a crop
                        # would need: recompute the kept tokens instead (exact, one pass; their
                        # keys and values then see the steering in force now)
                        cache, n_cached = (prefix.expanded(1), len(prefix)) if prefix is not None else (None, 0)
                        ev = TraceEvent(step_no, "recompute", {"reason": "sliding-window cache past its window",
                                                               "tokens": len(seq) - n_cached})
                        trace.events.append(ev)
                        emit(ev)
                    finished = False
                    continue
            if finished:
                break

            token = _pick(logits[0, -1], temperature, top_p, gen)
            # the column whose logits chose this token: steered if a rule named it and the
            # strength in force was not 0; the strength recorded is the one applied
            col_steered = steer is not None and bool(steer.steered(ctx)[0, -1])
            strength = float(ctx.strength) if col_steered and ctx.strength is not None else 0.0
            per_site = None
            if col_steered and ctx.applied:
                last = torch.stack([v[0, -1] for v in ctx.applied.values()]).tolist()  # one device sync per token
                per_site = dict(zip(ctx.applied, last))
                strength = sum(per_site.values()) / len(per_site)
            col_steered = col_steered and strength != 0
            ts = TokenStep(step_no, len(seq), token, model.decode([token]), strength, col_steered, site_strengths=per_site)
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
