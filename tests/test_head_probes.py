"""Probes on real head activations of the default model."""

import pytest
import torch

import steerbench as sb
from steerbench.probes import fit_probes


@pytest.fixture(scope="module")
def qa(model):
    questions = sb.load_truthfulqa("misconceptions")[:24]
    texts, labels, groups = sb.qa_examples(questions)
    return texts, labels, groups, sb.collect_heads(model, texts)


def test_truthfulqa_loaders():
    tqa = sb.load_truthfulqa()
    assert len(tqa) == 817
    q = tqa[0]
    assert q.best in q.correct and q.incorrect and q.question.endswith("?")
    own = sb.load_truthfulqa("misconceptions")
    assert len(own) >= 60 and {x.question for x in own}.isdisjoint({x.question for x in tqa})
    texts, labels, groups = sb.qa_examples(own[:2])
    assert texts[0] == f"Q: {own[0].question} A: {own[0].correct[0]}"
    assert len(texts) == len(labels) == len(groups) and set(labels) == {0, 1}


def test_head_activations_are_exactly_the_heads_slice_of_hook_z(model, qa):
    texts, _, _, acts = qa
    assert acts.shape == (len(texts), model.n_layers, model.n_heads, model.d_head)
    for i in (0, 7):
        ids = torch.tensor([model.encode(texts[i])])
        _, cache = model.bridge.run_with_cache(ids, prepend_bos=False, names_filter=["blocks.11.attn.hook_z"])
        z = cache["blocks.11.attn.hook_z"][0, -1]  # [n_heads, d_head]
        for h in range(model.n_heads):
            assert torch.allclose(acts[i, 11, h], z[h], atol=1e-4)


def test_a_heads_probe_sees_only_its_slice(qa):
    _, labels, groups, acts = qa
    # a joint fit stops on one criterion for all sites: converge tightly to compare sites
    grid = fit_probes(acts, labels, groups, tol=1e-6)
    assert grid.sites_shape == (acts.shape[1], acts.shape[2])
    one = fit_probes(acts[:, 11, 4][:, None], labels, groups, tol=1e-6)
    assert torch.allclose(grid.weight[11, 4], one.weight[0], atol=1e-4)
    assert float(grid.val_acc[11, 4]) == float(one.val_acc[0])
    # changing another head's activations leaves this head's probe as it was
    other = acts.clone()
    other[:, 11, 5] = torch.randn_like(other[:, 11, 5])
    again = fit_probes(other, labels, groups, tol=1e-6)
    assert torch.allclose(again.weight[11, 4], grid.weight[11, 4], atol=1e-4)
