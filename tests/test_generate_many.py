"""Batched generation (``generate_many``) against one prompt at a time, for every registered method."""

import pytest
import torch

import steerbench as sb
from steerbench.steerer import STEERERS
from steerbench.steering.clas import CLAS, LoRA
from steerbench.steering.real import REAL
from steerbench.steering.sadi import SADI
from tests.conftest import hook_count

PROMPTS = ["Hi!", "What is the tallest mountain on Earth, and how high is it?", "Name a colour.",
           "Tell me something surprising about octopuses."]
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def steerers(model, caa, head_probes):
    iti = head_probes.select(6, alpha=5.0)
    g = torch.Generator().manual_seed(0)
    n, d = model.n_layers, model.d_model
    v = torch.randn(n, d, generator=g)
    lora = LoRA.init(model, rank=1, seed=3)
    fp = model.fingerprint()
    return {
        "CAA": caa.scaled(4.0),
        "ITI": iti,
        "HeadShift": sb.HeadShift(iti.heads, iti.directions, iti.sigma, strength=4.0, fitted_on=iti.fitted_on),
        "REAL": REAL(iti.heads, iti.directions, iti.sigma, strength=6.0, weight=torch.rand(iti.k, generator=g),
                     fitted_on=iti.fitted_on),
        "SADI": SADI.fit(model, sb.load_truthfulqa("misconceptions")[:6], elements="head", k=4, strength=10.0),
        "CLAS": CLAS(v / v.norm(dim=-1, keepdim=True), torch.randn(n, d, generator=g) * 1e-3,
                     torch.full((n,), 2.0), layers=(10, 14), strength=1.0, fitted_on=fp),
        "LoRA": LoRA(lora.down, torch.randn(lora.up.shape, generator=g) * 0.05, layers=(8, 12), fitted_on=fp),
        "FASB": sb.FASB(iti, strength=9.0, threshold=0.55, backtrack=4),
    }


def test_every_registered_method_is_covered(steerers):
    library = {name for name, cls in STEERERS.items() if cls.__module__.startswith("steerbench.")}
    assert library <= set(steerers), f"add {library - set(steerers)} to this test"


def _agree(single: sb.Generation, batched: sb.Generation) -> None:
    """Logits within 1e-4 and the same tokens up to the first step where the unbatched
    choice was a near tie (its top-2 gap under NEAR_TIE), after which they may part."""
    a, b = single.trace.steps, batched.trace.steps
    for x, y in zip(a, b):
        if x.token_id != y.token_id:
            assert x.margin < NEAR_TIE, f"step {x.step}: {x.text!r} vs {y.text!r} at a gap of {x.margin:.2e}"
            return
        assert abs(x.logit - y.logit) < 1e-4 and abs(x.margin - y.margin) < 2e-4
        assert (x.steered, x.discarded) == (y.steered, y.discarded)
        assert abs(x.strength - y.strength) < 1e-4 * max(1.0, abs(x.strength))
    assert len(a) == len(b) and single.text == batched.text


@pytest.mark.parametrize("name", ["none", "CAA", "ITI", "HeadShift", "REAL", "SADI", "CLAS", "LoRA", "FASB"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_one_at_a_time(model, steerers, name, use_cache):
    steer = None if name == "none" else steerers[name]
    kw = dict(steer=steer, max_new_tokens=8, use_cache=use_cache)
    singles = [sb.generate(model, p, **kw) for p in PROMPTS]
    together = sb.generate_many(model, PROMPTS, batch_size=4, **kw)
    for s, t in zip(singles, together):
        _agree(s, t)
    if use_cache and name != "FASB":  # other company: reversed order, batches of two (FASB: one at a time anyway)
        for s, u in zip(singles, sb.generate_many(model, PROMPTS[::-1], batch_size=2, **kw)[::-1]):
            _agree(s, u)
    assert hook_count(model) == 0
    unbatched = [g for g in together if any(e.kind == "unbatched" for e in g.trace.events)]
    assert len(unbatched) == (len(PROMPTS) if name == "FASB" else 0)
    if steer is not None and name != "FASB":
        assert any(st.steered for g in together for st in g.trace.steps)


REFILL_PROMPTS = ["Hi!", "Name a colour.", "What is two plus two?", "Describe the sea.",
                  "What is the tallest mountain on Earth, and how high is it?", "Say yes."]


# cached: the joining rows' keys and values are stacked onto the batch's (SADI: a clean pre-pass
# on the joining rows; CLAS: per-pass state); uncached, rows are only appended
@pytest.mark.parametrize(("name", "use_cache"), [("none", True), ("CAA", True), ("SADI", True), ("CLAS", True),
                                                 ("CAA", False)])
def test_finished_rows_make_room_for_waiting_prompts(model, steerers, name, use_cache, monkeypatch):
    """Rows that stop early leave, and waiting prompts join the running batch (their keys and
    values added to its cache, padded to its width): each answer is still its own."""
    import steerbench.generation as gen
    from steerbench.kvcache import stack_rows

    joins = []
    monkeypatch.setattr(gen, "stack_rows", lambda *a: joins.append(a[3].shape[0]) or stack_rows(*a))
    kw = dict(steer=None if name == "none" else steerers[name], max_new_tokens=12, stop=(".", "!"), use_cache=use_cache)
    singles = [sb.generate(model, p, **kw) for p in REFILL_PROMPTS]
    assert len({len(g.tokens) for g in singles}) > 1  # the rows do finish at different steps
    for s, t in zip(singles, sb.generate_many(model, REFILL_PROMPTS, batch_size=3, **kw)):
        _agree(s, t)
    assert (sum(joins) > 0) == use_cache  # prompts did join a running batch's cache
    assert hook_count(model) == 0


def test_rows_stop_on_their_own(model):
    """A per-row stop: the short answers leave the batch while the long one goes on."""
    prompts = ["Say just the word yes.", "Write a long story about a dragon who learns to cook."]
    gens = sb.generate_many(model, prompts, max_new_tokens=24, stop="\n")
    alone = [sb.generate(model, p, max_new_tokens=24, stop="\n") for p in prompts]
    assert [g.tokens for g in gens] == [g.tokens for g in alone]
    assert [g.text for g in gens] == [g.text for g in alone]
    assert all("\n" not in g.text for g in gens)


def test_a_shared_prefix_serves_every_row(model, caa):
    head = "You answer in one short sentence.\n\n"
    prompts = [model.prompt(head + q, chat=False) for q in ("Q: What is ice?\nA:", "Q: Why is the sky blue?\nA:")]
    prompts = [sb.Prompt(p.ids, steer_from=len(p.ids) - 1, text=p.text) for p in prompts]
    prefix = sb.SharedPrefix.of(model, [p.ids for p in prompts], limit=len(model.encode(head)))
    with_prefix = sb.generate_many(model, prompts, steer=caa, max_new_tokens=6, prefix=prefix, stop="\n")
    without = [sb.generate(model, p, steer=caa, max_new_tokens=6, stop="\n") for p in prompts]
    for s, t in zip(without, with_prefix):
        _agree(s, t)


def test_gemma_batches_too(gemma):
    prompts = ["The capital of France is", "Water boils at a temperature of", "One, two,"]
    singles = [sb.generate(gemma, p, chat=False, max_new_tokens=6, stop=()) for p in prompts]
    for s, t in zip(singles, sb.generate_many(gemma, prompts, chat=False, max_new_tokens=6, stop=())):
        _agree(s, t)


@pytest.mark.parametrize("bad", [[], "one prompt", [""], 0])
def test_bad_input_is_refused(model, bad):
    with pytest.raises((ValueError, TypeError)):
        sb.generate_many(model, bad)
    with pytest.raises(sb.ParameterError):
        sb.generate_many(model, ["hi"], batch_size=0)
