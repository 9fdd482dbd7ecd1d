"""Defaults and units that travel between models: layers and head counts as fractions,
CAA's strength in units of the residual norm, and passes that keep only the logits asked for."""

import pytest
import torch

import steerbench as sb
from steerbench.activations import collect
from steerbench.benchmark import head_counts, parse_grid
from steerbench.errors import ParameterError
from steerbench.passes import forward_batch
from steerbench.steering.caa import caa_inputs


def test_layer_and_head_fractions_travel(model, gemma):
    assert [model.layer_at(f) for f in (0, 0.2, 0.4, 0.62, 0.83, 1)] == [0, 6, 12, 18, 24, 29]
    assert [gemma.layer_at(f) for f in (0, 0.5, 0.62, 1)] == [0, 8, 11, 17]
    # the bench's default head counts: 8/16/32 of SmolLM2's 270 heads, 2/4/9 of Gemma's 72
    assert head_counts(model, [0.03, 0.06, 0.12]) == [8, 16, 32]
    assert head_counts(gemma, [0.03, 0.06, 0.12]) == [2, 4, 9]
    assert head_counts(gemma, [8, 16, 500]) == [8, 16, 72]  # counts stay counts, capped at every head
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ParameterError):
            model.layer_at(bad)
    with pytest.raises(ParameterError, match="whole count"):
        parse_grid(["iti.k=8.5"])
    with pytest.raises(ParameterError):
        parse_grid(["iti.k=0"])
    assert parse_grid(["iti.k=0.05,16"]) == {"iti": {"k": [0.05, 16.0]}}


def test_caa_strength_in_residual_norm_units(any_model, tone, tmp_path):
    model = any_model
    caa = sb.CAA.fit(model, tone[:4], layer=model.layer_at(0.5))
    # the stored norms are the mean token norm over the read tokens of both answers, per layer
    seqs, spans = caa_inputs(model, tone[:4], "answer")
    hook = f"blocks.{caa.layer}.hook_resid_post"
    acts = collect(model, seqs, hook, position="all")[hook]
    naive = torch.cat([a[s:e].norm(dim=-1) for a, (s, e) in zip(acts, spans)]).mean()
    # per item then over items, as the pass computes it: equal when every read span is one length
    per_item = torch.stack([a[s:e].norm(dim=-1).mean() for a, (s, e) in zip(acts, spans)]).mean()
    assert float(caa.resid_norms[caa.layer]) == pytest.approx(float(per_item), rel=1e-5)
    assert float(caa.resid_norms[caa.layer]) == pytest.approx(float(naive), rel=0.1)

    rel = caa.in_units("resid")
    assert float(rel.vector.norm()) == pytest.approx(float(caa.resid_norms[caa.layer]), rel=1e-5)
    assert torch.allclose(rel.vector / rel.vector.norm(), caa.vector / caa.vector.norm(), atol=1e-6)
    assert rel.strength_unit != caa.strength_unit and "mean |r" in rel.describe()
    # s = 0 is unsteered, token for token; s != 0 steers; the unit survives save/load
    prompt = "How was your weekend?"
    plain = sb.generate(model, prompt, max_new_tokens=8)
    assert sb.generate(model, prompt, steer=rel.scaled(0.0), max_new_tokens=8).tokens == plain.tokens
    assert sb.generate(model, prompt, steer=rel.scaled(0.6), max_new_tokens=8).tokens != plain.tokens
    back = sb.CAA.load(rel.scaled(0.6).save(tmp_path / "rel"), model)
    assert back.unit == "resid" and torch.equal(back.resid_norms, caa.resid_norms)
    assert torch.equal(back.vector, rel.vector)


def test_caa_units_refuse_bad_values(caa):
    with pytest.raises(ValueError, match="unit must be one of"):
        caa.in_units("sigma")
    with pytest.raises(ValueError, match="needs the residual norms"):
        sb.CAA(caa.vectors, caa.layer, unit="resid")
    with pytest.raises(ValueError, match="finite and positive"):
        sb.CAA(caa.vectors, caa.layer, resid_norms=torch.full((caa.vectors.shape[0],), float("nan")))
    with pytest.raises(ValueError, match="n_layers"):
        sb.CAA(caa.vectors, caa.layer, resid_norms=torch.ones(3))


def test_a_pass_keeps_only_the_logits_asked_for(any_model, any_caa):
    model = any_model
    seqs = [model.encode("The capital of France is"), model.encode("One, two, three, four, five, six")]
    st = any_caa.scaled(2.0)
    full, batch = forward_batch(model, seqs, st, steer_from=[1, 1])
    part, _ = forward_batch(model, seqs, st, steer_from=[1, 1], last=3)
    assert part.shape == (2, 3, model.d_vocab)
    # the unembedding of fewer columns multiplies differently-shaped matrices: equal to float rounding
    torch.testing.assert_close(part, full[:, -3:], atol=1e-4, rtol=1e-4)


def test_kl_splits_batches_whose_logits_exceed_the_budget(model, caa, monkeypatch):
    from steerbench import evaluation

    texts = sb.datasets.neutral_texts()[:4]
    whole = evaluation.kl_to_unsteered(model, texts, [caa.scaled(3.0)], batch_size=4)
    seen = []
    real = evaluation.forward_batch

    def spy(model, batch, *a, **k):
        seen.append(len(batch))
        return real(model, batch, *a, **k)

    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 1)  # one row at a time
    monkeypatch.setattr(evaluation, "forward_batch", spy)
    split = evaluation.kl_to_unsteered(model, texts, [caa.scaled(3.0)], batch_size=4)
    assert set(seen) == {1}
    assert split[0] == pytest.approx(whole[0], rel=1e-4)
