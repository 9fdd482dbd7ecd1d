import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.passes import forward_batch
from tests.conftest import hook_count


@pytest.fixture
def questions(mc_questions):
    return mc_questions


@pytest.fixture
def probes(head_probes):
    return head_probes


def test_selection_ranks_heads_by_validation_accuracy(model, probes):
    iti = probes.select(k=6, alpha=10.0)
    acc = probes.grid.val_acc
    chosen = [float(acc[layer, h]) for layer, h in iti.head_list()]
    assert chosen == sorted(chosen, reverse=True)
    assert min(chosen) >= float(acc.flatten().sort(descending=True).values[5])
    assert torch.allclose(iti.directions.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert (iti.sigma > 0).all()
    assert iti.sites == tuple(f"blocks.{L}.attn.hook_z" for L in iti.layers)
    probe = probes.select(k=6, direction="probe")
    assert probe.head_list() == iti.head_list() and not torch.allclose(probe.directions, iti.directions)


def test_sigma_is_the_std_of_the_projection(probes, head_acts):
    iti = probes.select(k=3)
    for (layer, h), u, s in zip(iti.head_list(), iti.directions, iti.sigma):
        proj = head_acts[:, layer, h].double() @ u.double()
        assert float(s) == pytest.approx(float(proj.std()), rel=1e-4)


def test_head_probes_reproduce_their_fitted_predictions(probes, head_acts):
    iti = probes.select(k=4)
    L, H = iti.heads[:, 0], iti.heads[:, 1]
    ours = iti.probe_proba(head_acts[:, L, H])
    grid = probes.grid.predict_proba(head_acts)[:, L, H]
    assert torch.allclose(ours, grid, atol=1e-9)


def test_steering_equals_a_plain_hook_on_the_output_projection(model, plain_hf, probes):
    """ITI through the bridge's hook_z == adding alpha*sigma*u to the o_proj input of a pristine HF model."""
    iti = probes.select(k=5, alpha=20.0)
    ids = model.encode("Q: Do we only use ten percent of our brains? A:")
    steer_from = len(ids) - 3
    logits, _ = forward_batch(model, [ids], iti, [steer_from])
    handles = []
    for layer, delta in iti.layer_deltas(model.n_heads, iti.strength).items():
        flat = delta.reshape(-1)

        def pre(mod, args, flat=flat):
            x = args[0].clone()
            x[:, steer_from:] += flat
            return (x,)

        handles.append(plain_hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            ref = plain_hf(torch.tensor([ids])).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        base = plain_hf(torch.tensor([ids])).logits
    assert (ref - base).abs().max() > 0.1  # the intervention does something
    assert torch.allclose(logits, ref, atol=2e-3), (logits - ref).abs().max()


def test_strength_zero_is_unsteered_and_cache_agrees(model, probes):
    iti = probes.select(k=8, alpha=15.0)
    prompt = "Q: What happens if you crack your knuckles a lot?\nA:"
    base = sb.generate(model, prompt, max_new_tokens=12, chat=False)
    zero = sb.generate(model, prompt, steer=iti.scaled(0), max_new_tokens=12, chat=False)
    assert zero.tokens == base.tokens
    cached = sb.generate(model, prompt, steer=iti.scaled(40), max_new_tokens=12, chat=False)
    uncached = sb.generate(model, prompt, steer=iti.scaled(40), max_new_tokens=12, chat=False, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.tokens != base.tokens


def test_save_load_roundtrip_and_refusal(model, tiny_model, probes, tmp_path):
    iti = probes.select(k=5, alpha=7.0)
    path = iti.save(tmp_path / "iti")
    back = sb.ITI.load(path, model)
    assert back.head_list() == iti.head_list() and back.strength == 7.0
    assert torch.equal(back.directions, iti.directions) and torch.equal(back.probe_weight, iti.probe_weight)
    with pytest.raises(ArtifactMismatch):
        sb.ITI.load(path, tiny_model)
    with pytest.raises(ValueError, match="not ITI"):
        sb.ITI.load(sb.CAA(torch.zeros(30, 576), layer=1, fitted_on=iti.fitted_on).save(tmp_path / "caa"))


def test_bad_input_is_refused_and_changes_nothing(model, questions, probes, head_acts):
    with pytest.raises(ValueError, match="k must be between 1 and 270"):
        probes.select(k=0)
    with pytest.raises(ValueError, match="direction must be"):
        probes.select(k=3, direction="pca")
    with pytest.raises(ValueError, match="at least one training question"):
        sb.HeadProbes.fit(model, [])
    with pytest.raises(ValueError, match="rows but the questions have"):
        sb.HeadProbes.fit(model, questions, acts=head_acts[:5])
    nan = head_acts.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sb.HeadProbes.fit(model, questions, acts=nan)
    iti = probes.select(k=3)
    with pytest.raises(ValueError, match="NaN"):
        sb.ITI(iti.heads, iti.directions * float("nan"), iti.sigma)
    with pytest.raises(ValueError, match="twice"):
        sb.ITI(torch.tensor([[1, 2], [1, 2]]), iti.directions[:2], iti.sigma[:2])
    wrong = sb.ITI(torch.tensor([[40, 0]]), iti.directions[:1], iti.sigma[:1])
    before = hook_count(model)
    with pytest.raises(ValueError, match="do not exist"):
        sb.generate(model, "Hi", steer=wrong, max_new_tokens=2)
    assert hook_count(model) == before
