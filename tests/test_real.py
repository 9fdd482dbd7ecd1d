"""REAL: the batched autoencoders and priors, the relevance they give, the steerer, artifacts, bad input."""

import dataclasses

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.steering.real import (
    REAL,
    SCORERS,
    HeadRelevance,
    VQAutoencoders,
    module_relevance,
    supervised_contrastive,
    train_priors,
    train_vqae,
)
from tests.conftest import hook_count


def _planted(n=1200, d=16, seed=0):
    """Three modules: 0 codes the label (two clusters), 1 the same clusters on shuffled
    labels, 2 noise."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.45).long()
    shuffled = y[torch.randperm(n, generator=g)]
    centre = torch.randn(2, d, generator=g) * 1.5
    x = torch.randn(n, 3, d, generator=g)
    x[:, 0] += centre[y]
    x[:, 1] += centre[shuffled]
    return x, y


@pytest.fixture(scope="module")
def planted_relevance():
    x, y = _planted()
    return module_relevance(x, y, torch.arange(900), torch.arange(900, 1200), epochs=8, gru_epochs=4)


def test_planted_module_ranks_first_and_shuffled_labels_sit_at_chance(planted_relevance):
    relevance, vq, codes, seconds = planted_relevance
    for scorer in ("gru", "probe"):
        rel = relevance[scorer]
        assert rel[0] > 0.95, (scorer, rel)
        assert abs(float(rel[1]) - 0.5) < 0.08 and abs(float(rel[2]) - 0.5) < 0.08, (scorer, rel)
    assert set(seconds) == {"autoencoders", "codes", "gru", "probe"}
    assert vq.perplexity.shape == (3,) and (vq.perplexity >= 1).all()


def test_ema_update_moves_codes_to_the_mean_of_their_units():
    vq = VQAutoencoders([0], d=4, units=1, code_dim=1, codebook=3, decay=0.5)
    vq.embed.copy_(torch.tensor([[[0.0], [10.0], [-7.0]]]))
    z1 = torch.tensor([1.0, 2.0, 9.0]).view(1, 3, 1, 1)
    idx = vq.nearest(z1)
    assert idx.view(-1).tolist() == [0, 0, 1]
    vq.ema_update(z1, idx)
    # first update from zero averages: each used code becomes the mean of its units, code 2 is untouched
    assert vq.embed.view(-1).tolist() == pytest.approx([1.5, 9.0, -7.0], abs=1e-4)
    z2 = torch.tensor([4.0, 11.0]).view(1, 2, 1, 1)
    idx2 = vq.nearest(z2)
    assert idx2.view(-1).tolist() == [0, 1]
    vq.ema_update(z2, idx2)
    # count_k and sum_k are EMAs: code = (decay * s1 + s2) / (decay * n1 + n2)
    assert vq.embed[0, 0, 0].item() == pytest.approx((0.5 * 3.0 + 4.0) / (0.5 * 2 + 1), abs=1e-4)
    assert vq.embed[0, 1, 0].item() == pytest.approx((0.5 * 9.0 + 11.0) / (0.5 * 1 + 1), abs=1e-4)
    assert vq.ema_count[0].tolist() == pytest.approx([0.5 * 0.5 * 2 + 0.5 * 1, 0.5 * 0.5 * 1 + 0.5 * 1, 0.0])
    # evaluation (and nearest/quantize) never move the codebook
    before = vq.embed.clone()
    vq.eval()
    vq(torch.randn(1, 5, 4))
    assert torch.equal(vq.embed, before)


def test_straight_through_passes_the_gradient_to_the_encoder_unchanged():
    torch.manual_seed(0)
    vq = VQAutoencoders([3], d=6, units=2, code_dim=3, codebook=4).eval()
    x = torch.randn(1, 5, 6)
    _, q_st, idx, commitment = vq(x)
    z = vq.encode(x)
    # forward: the codebook vectors; backward: the identity to the encoder's output
    assert torch.allclose(q_st, vq.quantize(idx))
    w = torch.randn_like(z)
    g_st = torch.autograd.grad((w * q_st).sum(), vq.enc2.weight)[0]
    g_z = torch.autograd.grad((w * vq.encode(x)).sum(), vq.enc2.weight)[0]
    assert torch.allclose(g_st, g_z)
    # the commitment term is |q - z|^2 per module, pulling z (not the codebook) toward q
    assert commitment.item() == pytest.approx(((vq.quantize(idx) - z) ** 2).mean().item(), rel=1e-5)


def test_supervised_contrastive_by_hand():
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    tau = 0.5
    loss = supervised_contrastive(z, torch.tensor([1, 1, 0]), tau)
    # anchors 0 and 1 each have one positive (cos 1) and one negative (cos 0); anchor 2 has none
    expected = -torch.log(torch.exp(torch.tensor(1 / tau)) / (torch.exp(torch.tensor(1 / tau)) + 1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert supervised_contrastive(z[:, :2], torch.tensor([1, 0])).item() == 0.0  # no positive pairs at all


def test_batched_training_equals_training_each_module_alone():
    x, y = _planted(n=300)
    together = train_vqae(x, y, epochs=3)
    codes = together.codes(x)
    for m in (0, 2):
        alone = train_vqae(x[:, [m]], y, epochs=3, module_ids=[m])
        assert torch.allclose(alone.model.enc1.weight[0], together.model.enc1.weight[m], atol=1e-5)
        assert torch.allclose(alone.model.embed[0], together.model.embed[m], atol=1e-4)
        assert (alone.codes(x[:, [m]])[0] == codes[m]).float().mean() > 0.99
        assert alone.recon[0].item() == pytest.approx(together.recon[m].item(), rel=1e-4)
    priors = train_priors(codes, codebook=32, epochs=2)
    one = train_priors(codes[[1]], codebook=32, epochs=2, module_ids=[1])
    assert torch.allclose(one.log_prob(codes[[1]]), priors.log_prob(codes)[[1]], atol=1e-4)


def test_relevance_split_option_and_bad_input():
    x, y = _planted(n=200)
    with torch.no_grad():  # trains with gradients on whatever the caller's mode
        fit = train_vqae(x, y, epochs=1, relevant_units=2)
    assert fit.codes(x).shape == (3, 200, 8)
    with pytest.raises(ValueError, match="relevant_units"):
        train_vqae(x, y, relevant_units=9)
    with pytest.raises(ValueError, match="NaN or inf"):
        train_vqae(torch.where(torch.arange(16) == 3, float("nan"), x), y)
    with pytest.raises(ValueError, match="labels"):
        train_vqae(x, y[:-1])
    with pytest.raises(ValueError, match="scorers"):
        module_relevance(x, y, range(100), range(100, 200), scorers=["knn"])
    with pytest.raises(ValueError, match="both true and false"):
        module_relevance(x, torch.ones(200, dtype=torch.long), range(100), range(100, 200))


@pytest.fixture(scope="module")
def relevance(model, mc_questions, head_acts, head_probes):
    return HeadRelevance.fit(model, mc_questions, acts=head_acts, probes=head_probes, scorers=SCORERS, epochs=4,
                             gru_epochs=2)


def test_real_steers_iti_directions_weighted_by_relevance(model, relevance, head_probes):
    assert set(relevance.scorers) == {"gru", "probe"}
    assert relevance.relevance["gru"].shape == (model.n_layers, model.n_heads)
    real = relevance.select(k=6, alpha=10.0, scorer="probe")
    rel = relevance.relevance["probe"]
    assert real.head_list() == relevance.ranking("probe")[:6]
    assert all(float(rel[layer, h]) <= float(real.relevance[0]) for layer, h in relevance.ranking("probe")[6:])
    assert real.weight[0].item() == 1.0 and (real.weight <= 1).all()
    # each head: ITI's direction and sigma for it, times its weight
    iti = head_probes.select(model.n_layers * model.n_heads, 10.0)
    where = {h: i for i, h in enumerate(iti.head_list())}
    for k, head in enumerate(real.head_list()):
        i = where[head]
        assert torch.allclose(real.shift()[k], real.weight[k] * iti.sigma[i] * iti.directions[i])
    # a scorer added later, from the stored codes, gives what fitting with it gave
    probe_only = dataclasses.replace(relevance, relevance={"probe": relevance.relevance["probe"]}, seconds={})
    assert probe_only.scorers == ["probe"] and probe_only.resolve_scorer() == "probe"
    assert torch.equal(probe_only.add_scorer("gru"), relevance.relevance["gru"])
    assert relevance.codes.shape[:2] == (model.n_layers, model.n_heads) and relevance.codes.shape[-1] == 8
    flat = relevance.select(k=6, alpha=10.0, scorer="probe", weighting="none")
    assert (flat.weight == 1).all()
    assert -1 <= relevance.rank_correlation("probe") <= 1 and 0 <= relevance.overlap(6, "probe") <= 1


def test_relevance_grids_draw_both_rankings(relevance):
    from steerbench import plots

    fig = plots.relevance_grids(relevance, k=6, scorer="probe")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2 and heat[0].z.shape == (30, 9)
    rings = [t for t in fig.data if t.type == "scatter"]
    assert sum(len(t.x) for t in rings) == 12  # each side's top 6
    assert "overlap" in fig.layout.title.text and "Spearman" in fig.layout.title.text


def test_alpha_zero_is_unsteered_cache_agrees_and_hooks_are_removed(model, relevance):
    real = relevance.select(k=8, alpha=15.0)
    prompt = "Q: What happens if you crack your knuckles a lot?\nA:"
    base = sb.generate(model, prompt, max_new_tokens=10, chat=False)
    assert sb.generate(model, prompt, steer=real.scaled(0), max_new_tokens=10, chat=False).tokens == base.tokens
    cached = sb.generate(model, prompt, steer=real.scaled(60), max_new_tokens=10, chat=False)
    uncached = sb.generate(model, prompt, steer=real.scaled(60), max_new_tokens=10, chat=False, use_cache=False)
    assert cached.tokens == uncached.tokens != base.tokens
    assert hook_count(model) == 0


def test_save_load_keeps_weights_and_refuses_another_model(model, tiny_model, relevance, tmp_path):
    real = relevance.select(k=5, alpha=7.0, scorer="gru")
    back = REAL.load(real.save(tmp_path / "real"), model)
    assert back.head_list() == real.head_list() and back.scorer == "gru" and back.strength == 7.0
    assert torch.equal(back.weight, real.weight) and torch.equal(back.shift(), real.shift())
    with pytest.raises(ArtifactMismatch):
        REAL.load(tmp_path / "real.safetensors", tiny_model)
    with pytest.raises(ValueError, match="not REAL"):
        REAL.load(relevance.probes.select(3).save(tmp_path / "iti"))


def test_bad_selection_and_fit_input(model, mc_questions, head_acts, relevance):
    with pytest.raises(ValueError, match="k must be between 1 and 270"):
        relevance.select(k=0)
    with pytest.raises(ValueError, match="no relevance from scorer"):
        relevance.select(k=3, scorer="lstm")
    with pytest.raises(ValueError, match="weighting"):
        relevance.select(k=3, weighting="rank")
    real = relevance.select(k=3)
    with pytest.raises(ValueError, match="weight must have shape"):
        REAL(real.heads, real.directions, real.sigma, weight=torch.ones(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        REAL(real.heads, real.directions, real.sigma, weight=torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="scorers"):
        HeadRelevance.fit(model, mc_questions, acts=head_acts, scorers=[])
    with pytest.raises(ValueError, match="at least one training question"):
        HeadRelevance.fit(model, [], acts=head_acts)
    with pytest.raises(ValueError, match="rows but the questions have"):
        HeadRelevance.fit(model, mc_questions, acts=head_acts[:5])


def test_real_on_gemma(gemma):
    questions = sb.load_truthfulqa("misconceptions")[:8]
    rel = HeadRelevance.fit(gemma, questions, scorers=["probe"], epochs=2)
    real = rel.select(k=4, alpha=5.0)
    real.check_model(gemma)
    prompt = "Q: Can you see the Great Wall of China from space?\nA:"
    base = sb.generate(gemma, prompt, max_new_tokens=6, chat=False)
    assert sb.generate(gemma, prompt, steer=real.scaled(0), max_new_tokens=6, chat=False).tokens == base.tokens
    assert sb.generate(gemma, prompt, steer=real.scaled(200), max_new_tokens=6, chat=False).tokens != base.tokens


def test_code_probes_match_scikit_learn():
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression

    from steerbench.steering.real import code_probe_logits, fit_code_probes

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 6, (2, 300, 3), generator=g)
    y = (torch.rand(300, generator=g) < 0.4).long()
    codes[0, :, 1] = torch.where(y == 1, 2, codes[0, :, 1])
    W, b = fit_code_probes(codes, y, codebook=6, tol=1e-8)
    for m in range(2):
        X = F.one_hot(codes[m], 6).reshape(300, -1).numpy()
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(X, y.numpy())
        assert torch.allclose(W[m].reshape(-1), torch.from_numpy(ref.coef_[0]), atol=1e-4)
        assert b[m].item() == pytest.approx(ref.intercept_[0], abs=1e-4)
        assert torch.allclose(code_probe_logits(W, b, codes)[m], torch.from_numpy(ref.decision_function(X)), atol=1e-4)
