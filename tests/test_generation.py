from dataclasses import dataclass, field

import pytest
import torch

import steerbench as sb
from steerbench.steerer import Decision, Steerer, StepContext
from tests.conftest import hook_count

PROMPT = "How was your weekend?"


def test_strength_zero_reproduces_unsteered_output_exactly(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    plain = sb.generate(model, PROMPT, max_new_tokens=24)
    zero = sb.generate(model, PROMPT, steer=caa.scaled(0), max_new_tokens=24)
    assert zero.tokens == plain.tokens
    # the hook path itself adds exactly nothing when the vector is zero
    null = sb.CAA(torch.zeros_like(caa.vectors), layer=12, strength=3.0, fitted_on=caa.fitted_on)
    assert sb.generate(model, PROMPT, steer=null, max_new_tokens=24).tokens == plain.tokens
    assert not any(s.strength for s in zero.trace.steps)


def test_steering_changes_output(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    plain = sb.generate(model, PROMPT, max_new_tokens=16)
    steered = sb.generate(model, PROMPT, steer=caa.scaled(6), max_new_tokens=16)
    assert steered.tokens != plain.tokens
    assert all(s.steered and s.strength == 6 for s in steered.trace.steps)


@pytest.mark.parametrize("strength", [4.0, -4.0])
def test_cached_and_uncached_steered_generation_agree(any_model, any_caa, strength):
    model, caa = any_model, any_caa  # each model family in turn
    a = sb.generate(model, PROMPT, steer=caa.scaled(strength), max_new_tokens=20, use_cache=True)
    b = sb.generate(model, PROMPT, steer=caa.scaled(strength), max_new_tokens=20, use_cache=False)
    assert a.tokens == b.tokens


@dataclass
class Recorder(Steerer):
    """Records which absolute positions each pass steered (a trace oracle)."""

    strength: float = 1.0
    passes: list = field(default_factory=list)

    @property
    def sites(self):
        return ("blocks.3.hook_resid_post",)

    def hooks(self, ctx: StepContext):
        def rec(x, hook):
            self.passes.append((ctx.positions[0].tolist(), ctx.mask[0].tolist()))
        return [(self.sites[0], rec)]


def test_every_generated_token_is_steered_under_the_cache(any_model):
    model = any_model  # each model family in turn
    r = Recorder()
    p = model.prompt(PROMPT)
    sb.generate(model, p, steer=r, max_new_tokens=8)
    prefill_pos, prefill_mask = r.passes[0]
    assert prefill_pos == list(range(len(p)))
    assert prefill_mask == [i >= p.steer_from for i in range(len(p))]
    decode = r.passes[1:]
    assert len(decode) == 7  # the 8th token is sampled from the 7th decode pass
    for k, (pos, mask) in enumerate(decode):
        assert pos == [len(p) + k] and mask == [True]


@dataclass
class Boom(Steerer):
    strength: float = 1.0
    after: int = 2
    calls: int = 0

    @property
    def sites(self):
        return ("blocks.1.hook_resid_post",)

    def hooks(self, ctx):
        def hook(x, hook):
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError("boom inside a hook")
        return [(self.sites[0], hook)]


def test_hooks_are_removed_after_an_exception(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        sb.generate(model, PROMPT, steer=Boom(), max_new_tokens=8)
    assert hook_count(model) == before

    def interrupt(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sb.generate(model, PROMPT, steer=caa.scaled(2), max_new_tokens=8, on_step=interrupt)
    assert hook_count(model) == before
    assert sb.generate(model, PROMPT, max_new_tokens=6).tokens == sb.generate(model, PROMPT, max_new_tokens=6).tokens


@dataclass
class Scripted(Steerer):
    """Rolls back ``k`` tokens once, when ``at`` tokens exist, then steers from there on."""

    vector: torch.Tensor
    strength: float = 0.0
    at: int = 6
    k: int = 4
    layer: int = 10
    observes = True

    @property
    def sites(self):
        return (f"blocks.{self.layer}.hook_resid_post",)

    def hooks(self, ctx):
        def add(x, hook):
            start = ctx.state.get("from")
            if start is None:
                return x
            m = (ctx.positions >= start).unsqueeze(-1).to(x.dtype)
            return x + m * (ctx.state["s"] * self.vector)
        return [(self.sites[0], add)]

    def observe(self, step):
        if step.n_generated == self.at and "from" not in step.ctx.state:
            # regenerate from the (at-k)-th generated token; the kept token before it is re-fed
            step.ctx.state["from"] = step.position - self.k
            step.ctx.state["s"] = self.strength
            return Decision(score=0.1, strength=self.strength, rollback=self.k)
        return Decision(score=0.9)

    def current_strength(self, ctx):
        return ctx.state.get("s", 0.0)


def test_rollback_backs_off_exactly_k_tokens_and_is_traced(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    s = Scripted(vector=caa.vectors[10], strength=0.0)
    plain = sb.generate(model, PROMPT, max_new_tokens=12)
    g = sb.generate(model, PROMPT, steer=s, max_new_tokens=12)
    (event,) = g.trace.rollbacks
    assert event.detail["tokens"] == 4
    discarded = [t for t in g.trace.steps if t.discarded]
    assert len(discarded) == 4 and [t.token_id for t in discarded] == plain.tokens[2:6]
    assert len(g.tokens) == 12
    # unsteered regeneration after a crop reproduces the same tokens
    assert g.tokens == plain.tokens
    assert all(t.score == 0.9 for t in g.trace.kept)  # every generated token is observed
    assert not any(t.steered for t in g.trace.steps)  # strength 0 is recorded as unsteered


def test_cache_cropped_rollback_equals_recomputing_from_scratch(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    s = Scripted(vector=caa.vectors[10], strength=8.0)
    cached = sb.generate(model, PROMPT, steer=s, max_new_tokens=14, use_cache=True)
    fresh = sb.generate(model, PROMPT, steer=s, max_new_tokens=14, use_cache=False)
    plain = sb.generate(model, PROMPT, max_new_tokens=14)
    assert cached.tokens == fresh.tokens
    assert cached.tokens != plain.tokens  # the regenerated part was really steered
    assert cached.tokens[:2] == plain.tokens[:2]


def test_rollback_past_the_start_stops_at_the_question_and_is_bounded(model, caa):
    s = Scripted(vector=caa.vectors[10], strength=0.0, at=2, k=10)
    g = sb.generate(model, PROMPT, steer=s, max_new_tokens=5)
    assert g.trace.rollbacks[0].detail["tokens"] == 2
    assert len(g.tokens) == 5


def test_bad_generate_input(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        sb.generate(model, PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        sb.generate(model, "   ")
