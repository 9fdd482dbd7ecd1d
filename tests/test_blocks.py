"""The steering building blocks: rules steer exactly the positions they name, operators are
the identity at strength 0, every Steerer saves and loads, and a new method is a few lines."""

from dataclasses import dataclass, field

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.blocks import (
    FROM_INSTRUCTION,
    GENERATED,
    LAST_PROMPT_TOKEN,
    Add,
    AddGated,
    FromState,
    Intervention,
    Rule,
    ScaleMasked,
    Site,
)
from steerbench.passes import forward_batch
from steerbench.steerer import Steerer
from tests.conftest import hook_count

PROMPT = "Name three colours."


@dataclass(frozen=True)
class Recorded(Rule):
    """A rule that records the absolute positions it names at every pass."""

    rule: Rule
    seen: set = field(default_factory=set, compare=False)

    def mask(self, ctx):
        m = self.rule.mask(ctx)
        self.seen.update(ctx.positions[m].tolist())
        return m


@dataclass
class OneRule(Steerer):
    """A zero vector added under ``rule`` (the output stays unsteered; the rule is what is tested)."""

    rule: Rule
    strength: float = 1.0
    start: int | None = None  # for FromState: the state value set at the first pass

    def interventions(self):
        return [Intervention(Site.resid(3), self.rule, Add(torch.zeros(576)))]

    def hooks(self, ctx):
        if self.start is not None:
            ctx.state.setdefault("at", self.start)
        return super().hooks(ctx)


@pytest.mark.parametrize("name", ["from_instruction", "last_prompt_token", "generated", "from_state"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_rule_steers_exactly_the_positions_it_names(model, name, use_cache):
    p = model.prompt(PROMPT)
    n, sf, new = len(p.ids), p.steer_from, 6
    start = n + 2
    rule, want = {
        "from_instruction": (FROM_INSTRUCTION, set(range(sf, n + new - 1))),
        "last_prompt_token": (LAST_PROMPT_TOKEN, {sf}),
        "generated": (GENERATED, set(range(n, n + new - 1))),
        "from_state": (FromState("at"), set(range(start, n + new - 1))),
    }[name]
    rec = Recorded(rule)
    g = sb.generate(model, p, steer=OneRule(rec, start=start if name == "from_state" else None),
                    max_new_tokens=new, stop_at_eos=False, use_cache=use_cache)
    assert rec.seen == want  # the last token is never fed: nothing reads its column
    # the trace's steered flag comes from the rule: the column whose logits chose each token
    assert [s.steered for s in g.trace.steps] == [s.position - 1 in want for s in g.trace.steps]


def test_newest_only_names_only_the_last_column_of_each_pass(model):
    p = model.prompt(PROMPT)
    rec = Recorded(FromState("at", newest_only=True))
    sb.generate(model, p, steer=OneRule(rec, start=0), max_new_tokens=4, stop_at_eos=False, use_cache=False)
    n = len(p.ids)
    assert rec.seen == {n - 1, n, n + 1, n + 2}  # each recompute steers only its newest position


@pytest.mark.parametrize("op", [
    Add(torch.randn(8)),
    Add(torch.randn(2, 4), heads=(0, 1)),
    ScaleMasked(torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])),
    AddGated(torch.randn(8), torch.randn(8), torch.tensor(0.3)),
])
def test_every_operator_is_the_identity_at_strength_zero_or_outside_the_mask(op):
    a = torch.randn(2, 5, 8)
    site = Site("x", d_head=4) if getattr(op, "heads", None) else Site("x")
    v = site.view(a)
    ones = torch.ones(2, 5, *([1] * (v.ndim - 2)))
    assert torch.equal(op.apply(v, ones, 0.0), v)
    assert torch.equal(op.apply(v, 0 * ones, 3.0), v)
    assert torch.equal(op.apply(v, ones, torch.zeros(2, *([1] * (v.ndim - 1)))), v)
    assert not torch.equal(op.apply(v, ones, 2.0), v)  # and it does act otherwise


def test_head_view_is_the_same_whatever_layout_the_bridge_hands_over():
    split = torch.randn(2, 3, 4, 5)
    flat = split.reshape(2, 3, 20)
    op = Add(torch.ones(1, 5), heads=(2,))
    m = torch.ones(2, 3, 1, 1)
    site = Site("z", d_head=5)
    out_flat = op.apply(site.view(flat), m, 1.0).reshape(flat.shape)
    assert torch.equal(out_flat.reshape(2, 3, 4, 5), op.apply(site.view(split), m, 1.0))
    assert torch.equal(out_flat.reshape(2, 3, 4, 5)[:, :, 2], split[:, :, 2] + 1)
    assert torch.equal(out_flat.reshape(2, 3, 4, 5)[:, :, :2], split[:, :, :2])


# -- a new method is one small file: here, in a few lines --------------------------------


@dataclass
class RandomDirection(Steerer):
    """Add a random unit vector to the residual stream at ``layer``."""

    vector: torch.Tensor
    layer: int = 12
    strength: float = 4.0
    fitted_on: dict = field(default_factory=dict)  # the model it was made for: save() records it

    @classmethod
    def draw(cls, model, layer=12, seed=0):
        v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))
        return cls(v / v.norm(), layer, fitted_on=model.fingerprint())

    def interventions(self):
        return [Intervention(Site.resid(self.layer), FROM_INSTRUCTION, Add(self.vector))]


def test_a_new_method_in_a_few_lines_steers_saves_and_loads(model, tmp_path):
    st = RandomDirection.draw(model).scaled(30.0)
    assert st.sites == ("blocks.12.hook_resid_post",)
    plain = sb.generate(model, PROMPT, max_new_tokens=8)
    steered = sb.generate(model, PROMPT, steer=st, max_new_tokens=8)
    assert steered.tokens != plain.tokens and all(s.steered and s.strength == 30.0 for s in steered.trace.steps)
    assert sb.generate(model, PROMPT, steer=st.scaled(0), max_new_tokens=8).tokens == plain.tokens
    uncached = sb.generate(model, PROMPT, steer=st, max_new_tokens=8, use_cache=False)
    assert uncached.tokens == steered.tokens
    back = RandomDirection.load(st.save(tmp_path / "rd"), model)
    assert torch.equal(back.vector, st.vector) and (back.layer, back.strength) == (12, 30.0)
    assert sb.generate(model, PROMPT, steer=back, max_new_tokens=8).tokens == steered.tokens
    with pytest.raises(sb.ArtifactError, match="which model"):  # one that does not say its model is not saved
        RandomDirection(st.vector).save(tmp_path / "anonymous")
    assert not list(tmp_path.glob("anonymous*"))


def test_every_steerer_round_trips_through_save_and_load(model, caa, head_probes, tmp_path):
    from steerbench.steerer import load_steerer

    iti = head_probes.select(6, alpha=5.0)
    shift = sb.HeadShift(iti.heads, iti.directions, iti.sigma, strength=3.0, fitted_on=iti.fitted_on)
    steerers = [caa.scaled(2.5), iti, shift, sb.FASB(iti, strength=9.0, threshold=0.55, backtrack=4),
                sb.FASB(iti, strength=7.0, reading="paper", repeat=True, newest_only=True),
                RandomDirection.draw(model, layer=5)]
    for k, st in enumerate(steerers):
        back = load_steerer(st.save(tmp_path / f"s{k}"), model)
        assert type(back) is type(st) and back.describe() == st.describe()
        for name, v in vars(st).items():
            w = getattr(back, name)
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), name
            elif isinstance(v, Steerer):
                assert v.describe() == w.describe()
            elif name not in ("probes", "shift"):  # FASB's derived halves are rebuilt
                assert v == w, name
        assert type(st).load(tmp_path / f"s{k}.safetensors").describe() == st.describe()
    with pytest.raises(ValueError, match="holds a CAA artifact, not ITI"):
        sb.ITI.load(tmp_path / "s0.safetensors")


def test_a_loaded_steerer_refuses_another_model(tiny_model, caa, tmp_path):
    path = caa.save(tmp_path / "caa")
    with pytest.raises(ArtifactMismatch):
        sb.CAA.load(path, tiny_model)


def test_forward_batch_with_grad_trains_through_the_same_hooks(model):
    w = torch.zeros(model.d_model, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    v = torch.randn(model.d_model)

    @dataclass
    class Gated(Steerer):
        strength: float = 1.0

        def interventions(self):
            return [Intervention(Site.resid(8), FROM_INSTRUCTION, AddGated(v, w, b))]

    p = model.prompt(PROMPT)
    before = hook_count(model)
    plain, _ = forward_batch(model, [p.ids])
    logits, _ = forward_batch(model, [p.ids], Gated(), steer_from=[p.steer_from], grad=True)
    assert torch.equal(logits.detach(), plain)  # c = 0, b = 0: no steering at the start
    gw, gb = torch.autograd.grad(logits[0, -1].log_softmax(-1)[42], [w, b])
    assert gw.abs().sum() > 0 and gb.abs() > 0
    nograd, _ = forward_batch(model, [p.ids], Gated(), steer_from=[p.steer_from])
    assert not nograd.requires_grad
    assert hook_count(model) == before
