"""SADI: the mask, the two readings, the positions it touches, artifacts and bad input."""

import dataclasses

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.blocks import LAST_PROMPT_TOKEN, ScaleClean, ScaleMasked
from steerbench.passes import forward_batch
from steerbench.steering.sadi import ELEMENTS, SADI, contrast, element_activations, n_units
from steerbench.truthfulqa import mc_scores
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def items():
    return sb.load_truthfulqa("misconceptions")[:10]


@pytest.fixture(scope="module")
def fitted(model, items):
    """One SADI per element type, fitted on 6 items."""
    return {el: SADI.fit(model, items[:6], elements=el, k=4, strength=10.0) for el in ELEMENTS}


def _planted(n_items=20, layers=3, units=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts, labels, groups = [], [], []
    plant = torch.zeros(layers, units)
    plant[2, 3], plant[1, 0], plant[0, 4], plant[0, 1] = 5.0, 3.0, 1.0, -8.0
    for i in range(n_items):
        base = torch.randn(layers, units, generator=g) * 0.1
        acts += [base + plant / 2, base - plant / 2]
        labels += [1, 0]
        groups += [i, i]
    return torch.stack(acts), labels, groups


def test_mask_is_the_k_largest_positive_signed_contrasts():
    acts, labels, groups = _planted()
    d = contrast(acts, labels, groups)
    assert torch.allclose(d[2, 3], torch.tensor(5.0), atol=0.1) and torch.allclose(d[0, 1], torch.tensor(-8.0), atol=0.1)
    s = SADI(d, k=2, elements="hidden")
    assert s.selected() == [(2, 3), (1, 0)]  # signed: the -8 element is not "large"
    assert s.mask.sum() == 2
    assert SADI(d, k=3, elements="hidden").selected() == [(2, 3), (1, 0), (0, 4)]
    # asking for more than the positive elements keeps only positive ones
    only_pos = SADI(d, k=15, elements="hidden")
    assert all(d[L, u] > 0 for L, u in only_pos.selected())
    assert len(only_pos.selected()) == int((d > 0).sum())
    # with several true and false answers per item: mean over true minus mean over false, per item
    acts2 = torch.tensor([[[1.0]], [[3.0]], [[0.0]], [[10.0]], [[4.0]]])
    assert contrast(acts2, [1, 1, 0, 1, 0], [0, 0, 0, 1, 1]).item() == pytest.approx(((2 - 0) + (10 - 4)) / 2)


def test_bad_input_is_refused(model, items):
    d = torch.randn(model.n_layers, model.n_heads)
    with pytest.raises(ValueError, match="k must be"):
        SADI(d, k=0, elements="head", d_head=model.d_head)
    with pytest.raises(ValueError, match="k must be"):
        SADI(d, k=d.numel() + 1, elements="head", d_head=model.d_head)
    with pytest.raises(ValueError, match="NaN or inf"):
        SADI(torch.full_like(d, float("nan")), k=1, elements="head", d_head=model.d_head)
    with pytest.raises(ValueError, match="elements must be"):
        SADI(d, k=1, elements="heads", d_head=model.d_head)
    with pytest.raises(ValueError, match="reading must be"):
        SADI(d, k=1, elements="head", d_head=model.d_head, reading="inplace")
    with pytest.raises(ValueError, match="nothing to scale"):
        SADI(-d.abs() - 1, k=1, elements="head", d_head=model.d_head)
    with pytest.raises(ValueError, match="finite number"):
        SADI(d.abs(), k=1, elements="head", d_head=model.d_head, strength=float("inf"))
    with pytest.raises(ValueError, match="at least one training item"):
        SADI.fit(model, [], elements="head")
    with pytest.raises(ValueError, match="must have shape"):
        SADI.fit(model, items[:2], elements="neuron", acts=torch.zeros(3, model.n_layers, 7))
    with pytest.raises(ValueError, match="true and one false"):
        contrast(torch.zeros(2, 1, 1), [1, 1], [0, 1])


def test_element_activations_have_the_documented_shapes(model, items):
    texts, _, _ = sb.qa_examples(items[:1], "{question} {answer}")
    for el in ELEMENTS:
        acts = element_activations(model, texts, el)
        assert acts.shape == (len(texts), model.n_layers, n_units(model, el))
    # neuron = act(gate): SiLU's output is never below its minimum, -0.2785
    assert element_activations(model, texts, "neuron").min() > -0.28


def test_delta_zero_is_unsteered_exactly_and_every_element_type_moves_scores(model, items, fitted):
    steers = [None] + [s.scaled(0) for s in fitted.values()] + list(fitted.values())
    res = mc_scores(model, items[6:], steers, prompt="plain")
    base = res[0].per_question
    for r in res[1:4]:
        assert r.per_question == base  # exactly
    for r in res[4:]:
        assert r.per_question != base


def test_only_the_last_prompt_token_is_changed_at_the_first_steered_site(model):
    # heads of layer 0 only: their z at later positions reads layer-0 keys and values, which
    # steering never touches, so any change there would be a rule leaking
    scores = torch.zeros(model.n_layers, model.n_heads)
    scores[0, :3] = 1.0
    ids = model.encode("The capital of France is Paris, and the capital of Italy is")
    p = 8
    for reading in ("reference", "in_place"):
        s = SADI(scores, k=3, elements="head", d_head=model.d_head, reading=reading, strength=5.0)
        got = {}

        def grab(z, hook, got=got):
            got["z"] = z.detach().clone()

        forward_batch(model, [ids], extra_hooks=[("blocks.0.attn.hook_z", grab)])
        clean = got["z"]
        forward_batch(model, [ids], s, steer_from=[p], extra_hooks=[("blocks.0.attn.hook_z", grab)])
        changed = (got["z"] - clean).reshape(1, len(ids), -1).abs().amax(-1)[0]
        assert changed[p] > 0
        assert (changed[torch.arange(len(ids)) != p] == 0).all()
        # whole heads scale by 1 + delta, the others stay
        z_s, z_c = sb.blocks.head_view(got["z"], model.d_head)[0, p], sb.blocks.head_view(clean, model.d_head)[0, p]
        assert torch.allclose(z_s[:3], 6.0 * z_c[:3], atol=1e-5)
        if reading == "in_place":
            assert torch.equal(z_s[3:], z_c[3:])
        else:  # reset to the clean pre-pass's values: the same sums over fewer columns, so equal to rounding
            torch.testing.assert_close(z_s[3:], z_c[3:], atol=1e-6, rtol=1e-5)


def test_reference_and_in_place_differ_only_where_they_should(model, items):
    ids = model.encode("Q: Does cracking your knuckles cause arthritis?\nA:")
    p = len(ids) - 3

    def logits(scores, reading):
        s = SADI(scores, k=int((scores > 0).sum()), elements="head", d_head=model.d_head, reading=reading, strength=8.0)
        out, _ = forward_batch(model, [ids], s, steer_from=[p])
        return out[0]

    base, _ = forward_batch(model, [ids])
    last = torch.zeros(model.n_layers, model.n_heads)
    last[-1, 2] = 1.0  # only the last layer: nothing above it to reset, so both readings agree
    a, b = logits(last, "reference"), logits(last, "in_place")
    assert torch.allclose(a, b, atol=1e-4)
    first = torch.zeros(model.n_layers, model.n_heads)
    first[0, 2] = 1.0  # layer 0: the reference resets every later layer's heads at that position to clean
    a, b = logits(first, "reference"), logits(first, "in_place")
    assert not torch.allclose(a[p:], b[p:], atol=1e-3)
    for x in (a, b):  # before the last prompt token nothing changes, exactly
        assert torch.equal(x[:p], base[0, :p])
    # how the steerer is built: every layer's site for the reference, masked layers in place
    ref = SADI(first, k=1, elements="head", d_head=model.d_head)
    assert len(ref.interventions()) == model.n_layers and all(isinstance(iv.op, ScaleClean) for iv in ref.interventions())
    inp = dataclasses.replace(ref, reading="in_place")
    assert [iv.site.hook for iv in inp.interventions()] == ["blocks.0.attn.hook_z"]
    assert isinstance(inp.interventions()[0].op, ScaleMasked) and inp.interventions()[0].rule is LAST_PROMPT_TOKEN


@pytest.mark.parametrize("positions", ["last", "last+generated"])
def test_cached_and_uncached_generation_agree_and_the_trace_says_what_was_steered(model, fitted, positions):
    s = dataclasses.replace(fitted["head"], positions=positions, strength=5.0)
    n_hooks = hook_count(model)
    a = sb.generate(model, "Does cracking your knuckles cause arthritis?", steer=s, max_new_tokens=8)
    b = sb.generate(model, "Does cracking your knuckles cause arthritis?", steer=s, max_new_tokens=8, use_cache=False)
    assert a.tokens == b.tokens
    flags = [st.steered for st in a.trace.steps]
    # the first token is chosen by the last prompt token's logits: steered; later ones only with the option
    assert flags[0] and all(flags[1:]) == (positions == "last+generated") and any(flags[1:]) == (positions != "last")
    assert hook_count(model) == n_hooks


def test_hooks_are_removed_after_an_exception_in_the_clean_pass(model, fitted):
    n_hooks = hook_count(model)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_batch(model, [model.encode("Hello there")], fitted["head"], steer_from=[1],
                      extra_hooks=[("blocks.3.hook_resid_post", boom)])
    assert hook_count(model) == n_hooks


def test_save_load_keeps_mask_settings_and_provenance_and_refuses_another_model(model, tiny_model, items, fitted, tmp_path):
    for el, s in fitted.items():
        s = dataclasses.replace(s, reading="in_place", positions="last+generated")
        path = s.save(tmp_path / f"sadi-{el}.safetensors")
        back = SADI.load(path, model)
        assert torch.equal(back.scores, s.scores) and torch.equal(back.mask, s.mask)
        assert (back.k, back.strength, back.elements, back.reading, back.positions) == \
               (s.k, s.strength, s.elements, s.reading, s.positions)
        assert back.fitted_on == model.fingerprint() and back.info["n_items"] == 6
        assert back.describe() == s.describe()
        with pytest.raises(ArtifactMismatch):
            SADI.load(path, tiny_model)
    a, b = mc_scores(model, items[6:8], [fitted["neuron"], SADI.load(fitted["neuron"].save(tmp_path / "n"), model)],
                     prompt="plain")
    assert a.per_question == b.per_question


def test_off_task_kl_steers_every_position(model, fitted):
    from steerbench.evaluation import kl_to_unsteered

    s = fitted["head"]
    assert s.when_acting().positions == "all" and s.positions == "last"
    kl, kl0 = kl_to_unsteered(model, ["The river runs past the old mill and into the valley."], [s, s.scaled(0)])
    assert kl > 0 and kl0 == 0


def test_under_the_kv_cache_only_the_last_prompt_token_is_changed(model):
    """The same oracle through the cached path scoring uses: a shared prefix, then the suffix."""
    from steerbench.passes import steered_suffixes

    scores = torch.zeros(model.n_layers, model.n_heads)
    scores[0, :2] = 1.0
    s = SADI(scores, k=2, elements="head", d_head=model.d_head, strength=5.0)
    seqs = [model.encode("Q: Is the sun a star?\nA: Yes, it is."), model.encode("Q: Is the moon a planet?\nA: No.")]
    split = [len(x) - 5 for x in seqs]
    got = []

    def grab(z, hook):
        got.append(z.detach().clone())

    out = list(steered_suffixes(model, seqs, split, split, [None, s], extra_hooks=[("blocks.0.attn.hook_z", grab)]))
    clean, steered = got[0], got[-1]  # (between them: the clean pre-pass of column 0)
    changed = (steered - clean).reshape(*clean.shape[:2], -1).abs().amax(-1)  # [rows, suffix columns]
    assert (changed[:, 0] > 0).all() and (changed[:, 1:] == 0).all()
    assert not torch.equal(out[0][1], out[1][1])


def test_sadi_on_the_second_model_family(gemma):
    items = sb.load_truthfulqa("misconceptions")[:6]
    s = SADI.fit(gemma, items[:4], elements="head", k=3, strength=5.0)
    assert s.scores.shape == (gemma.n_layers, gemma.n_heads) and s.d_head == gemma.d_head
    base, zero, steered = mc_scores(gemma, items[4:], [None, s.scaled(0), s], prompt="plain")
    assert zero.per_question == base.per_question and steered.per_question != base.per_question
    a = sb.generate(gemma, "Does cracking your knuckles cause arthritis?", steer=s, max_new_tokens=6)
    b = sb.generate(gemma, "Does cracking your knuckles cause arthritis?", steer=s, max_new_tokens=6, use_cache=False)
    assert a.tokens == b.tokens
    n = SADI.fit(gemma, items[:4], elements="neuron", k=10, strength=10.0)
    assert n.scores.shape == (gemma.n_layers, gemma.cfg.d_mlp)
