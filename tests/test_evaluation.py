import pytest
import torch

import steerbench as sb
from steerbench.evaluation import ab_score, ab_sweep, continuation_logprobs, letter_scores, likelihood_margins


def test_letter_score_matches_a_plain_forward(model, tone):
    items = sb.behavior("tone", "test")[:5]
    batched = letter_scores(model, items, batch_size=5)
    single = letter_scores(model, items, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    it = items[0]
    p = model.prompt(it.question, answer_prefix="(")
    with torch.no_grad():
        probs = torch.softmax(model.hf_model(torch.tensor([p.ids])).logits[0, -1], -1)
    a, b = (model.encode(f"({x}", bos=False)[-1] for x in (it.matching, it.not_matching))
    assert abs(float(probs[a] / (probs[a] + probs[b])) - float(single[0])) < 1e-5


def test_likelihood_margin_matches_a_plain_forward(model):
    items = sb.behavior("tone", "test")[:4]
    margins = likelihood_margins(model, items, batch_size=8)
    it = items[1]
    p = model.prompt(it.stem)

    def lp(text):
        ids = model.encode(text, bos=False)
        with torch.no_grad():
            logits = model.hf_model(torch.tensor([p.ids + ids])).logits[0]
        ls = torch.log_softmax(logits[len(p) - 1 : -1], -1)
        return float(ls.gather(-1, torch.tensor(ids)[:, None]).sum())

    assert abs(float(margins[1]) - (lp(it.matching_text) - lp(it.not_matching_text))) < 1e-3


def test_steering_moves_scores_and_strength_zero_does_not(model, caa):
    items = sb.behavior("tone", "test")[:6]
    prompts = [model.prompt(it.stem) for it in items]
    conts = [model.encode(it.matching_text, bos=False) for it in items]
    base = continuation_logprobs(model, prompts, conts)
    assert torch.equal(continuation_logprobs(model, prompts, conts, caa.scaled(0)), base)
    # large steering lowers every likelihood; the behaviour shows in the margin
    up, mid, down = (likelihood_margins(model, items, caa.scaled(m)).mean() for m in (4, 0, -4))
    assert up > mid > down


def test_sweep_is_tidy_and_scores_multiplier_zero_once(model, caa):
    items = sb.behavior("tone", "test")[:3]
    df = ab_sweep(model, lambda L, m: caa.at(L).scaled(m), items, [6, 12], [-2, 0, 2], progress=False)
    assert list(df.columns) == ["layer", "multiplier", "unit", "letter", "win_rate", "margin", "n"]
    assert set(df.unit) == {"m (x v[L])"}  # what the multiplier counts, for the plot's axis
    assert len(df) == 6
    zero = df[df.multiplier == 0]
    assert zero.margin.nunique() == 1
    s = ab_score(model, items, caa.at(12).scaled(2))
    row = df[(df.layer == 12) & (df.multiplier == 2)].iloc[0]
    assert abs(row.margin - s.margin) < 1e-9


def test_shared_prefix_scoring_equals_full_passes(model, caa):
    from steerbench.evaluation import continuation_logprobs_many, letter_scores_many

    items = sb.behavior("tone", "test")[:5]
    shared = caa.scaled(3)
    full = caa.scaled(3)
    full.prefix_invariant = False  # forces a full forward for this steerer
    letters = letter_scores_many(model, items, [None, shared, full], batch_size=3)
    assert torch.allclose(letters[1], letters[2], atol=1e-4)
    assert torch.allclose(letters[0], letter_scores(model, items, batch_size=5), atol=1e-4)
    prompts = [model.prompt(it.stem) for it in items]
    conts = [model.encode(it.matching_text, bos=False) for it in items]
    lp = continuation_logprobs_many(model, prompts, conts, [shared, full, None], batch_size=2)
    assert torch.allclose(lp[0], lp[1], atol=1e-3)
    assert not torch.allclose(lp[0], lp[2], atol=1e-1)


def test_kl_to_unsteered_is_zero_unsteered_and_grows_with_strength(model, caa):
    from steerbench.datasets import neutral_texts
    from steerbench.evaluation import kl_to_unsteered

    texts = neutral_texts()[:3]
    assert len(neutral_texts()) >= 10
    none, zero, small, big = kl_to_unsteered(model, texts, [None, caa.scaled(0), caa.scaled(2), caa.scaled(8)])
    assert none == 0.0 and zero == pytest.approx(0.0, abs=1e-9)
    assert 0 < small < big
    with pytest.raises(ValueError, match="no texts"):
        kl_to_unsteered(model, [], [caa])


def test_kl_reuses_the_unsteered_pass_only_for_the_same_texts_and_weights(model, caa):
    from steerbench.datasets import neutral_texts
    from steerbench.evaluation import kl_to_unsteered

    texts = neutral_texts()[:3]
    model._kl_reference = None
    first = kl_to_unsteered(model, texts, [caa.scaled(4)])
    assert model._kl_reference is not None
    assert kl_to_unsteered(model, texts, [caa.scaled(4)]) == first  # from the kept pass: the same float
    assert kl_to_unsteered(model, texts[:2], [caa.scaled(4)]) != first  # other texts: measured anew
    assert kl_to_unsteered(model, texts, [caa.scaled(4)]) == first  # back to the first texts, measured again
    kept = model._kl_reference[0]
    w = model.hf_model.get_input_embeddings().weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.01)  # an in-place edit bumps the version counter: the kept pass is stale
    try:
        kl_to_unsteered(model, texts, [None])
        now = model._kl_reference[0]
        assert now[1:] == kept[1:] and now[0] != kept[0]  # the same texts, measured anew on the edited weights
    finally:
        with torch.no_grad():
            w.copy_(saved)  # the same bytes: the fingerprint (and the CAA vector's check) as before
    assert kl_to_unsteered(model, texts, [caa.scaled(4)]) == pytest.approx(first, abs=1e-9)
