"""CLAS and its baselines: identity at the start, where gradients go, training on a planted
target, the kept checkpoint, one pass for training and scoring, LoRA against peft, the
trace's per-layer strengths, artifacts, bad input, the few-label bench protocol."""

import copy
import dataclasses

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.benchmark import AnswerActivations, FitData, clas_data, few_label_splits, run_bench
from steerbench.evaluation import continuation_logprobs
from steerbench.model import Prompt
from steerbench.steering.clas import CLAS, Example, LoRA, directions, example_nll, examples, frozen
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def tone_examples(model, tone):
    prompts = [it.stem for it in tone[:8]]
    targets = [it.matching_text for it in tone[:8]]
    return examples(model, prompts, targets, chat=True)


@pytest.fixture(scope="module")
def tone_vectors(model, tone):
    pos = [list(e.prompt) + list(e.target) for e in examples(model, [i.stem for i in tone[:8]],
                                                             [i.matching_text for i in tone[:8]], chat=True)]
    neg = [list(e.prompt) + list(e.target) for e in examples(model, [i.stem for i in tone[:8]],
                                                             [i.not_matching_text for i in tone[:8]], chat=True)]
    return directions(model, pos, neg)


def _logits(model, ids, steer=None):
    from steerbench.passes import forward_batch

    out, _ = forward_batch(model, [ids], steer, [0])
    return out


def test_untrained_clas_is_the_identity_on_both_families(any_model):
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(any_model.n_layers, any_model.d_model, generator=g), dim=-1)
    steer = CLAS.identity(v, fitted_on=any_model.fingerprint())
    ids = any_model.encode("The weather today is")
    assert torch.equal(_logits(any_model, ids, steer), _logits(any_model, ids))
    a = sb.generate(any_model, "Tell me about rivers.", steer=steer, max_new_tokens=6)
    b = sb.generate(any_model, "Tell me about rivers.", max_new_tokens=6)
    assert a.tokens == b.tokens
    # and a trained-looking one changes the output on this family too (the hooks reach the model)
    moved = dataclasses.replace(steer, bias=torch.full((any_model.n_layers,), 3.0))
    assert not torch.allclose(_logits(any_model, ids, moved), _logits(any_model, ids))
    assert hook_count(any_model) == 0


def test_gradients_reach_w_and_b_only(model, tone_examples, tone_vectors):
    steer = CLAS.identity(tone_vectors, fitted_on=model.fingerprint())
    steer.weight.requires_grad_(True)
    steer.bias.requires_grad_(True)
    before = [p.requires_grad for p in model.bridge.parameters()]
    with frozen(model):
        example_nll(model, steer, tone_examples[:2], grad=True)
    assert [p.requires_grad for p in model.bridge.parameters()] == before  # restored
    assert all(p.grad is None for p in model.bridge.parameters())
    assert steer.weight.grad is not None and steer.weight.grad.abs().sum() > 0
    assert steer.bias.grad is not None and steer.bias.grad.abs().sum() > 0
    assert steer.vectors.grad is None


def test_training_learns_a_planted_vector_and_keeps_the_best_checkpoint(model, tone, tone_vectors):
    # the targets are what a known steerer (fixed strength 6 along the vectors) writes: a
    # vector explains them, so training from the identity must lower the validation loss
    teacher = CLAS.identity(tone_vectors, "fixed", fitted_on=model.fingerprint()).scaled(6.0)
    prompts = [it.stem for it in tone[10:18]]
    made = []
    for p in prompts:
        g = sb.generate(model, p, steer=teacher, max_new_tokens=6)
        made.append(Example(tuple(g.prompt.ids), tuple(g.tokens)))
    train_set, val_set = made[:4], made[4:]
    student = CLAS.fit(model, train_set, val_set, tone_vectors, "clas", epochs=4, accumulation=4)
    h = student.info["history"]
    assert h["val_loss"][h["best_epoch"]] == min(h["val_loss"]) == h["best_val_loss"]
    assert h["best_val_loss"] < 0.8 * h["val_loss"][0], h["val_loss"]
    # the tensors kept are the best epoch's: their validation loss is the recorded one
    with torch.no_grad():
        again = float(example_nll(model, student, val_set).mean())
    assert again == pytest.approx(h["best_val_loss"], rel=1e-5)
    assert not student.weight.requires_grad and student.weight.grad is None
    assert hook_count(model) == 0


def test_training_pass_and_scoring_pass_agree(model, tone_examples, tone_vectors):
    g = torch.Generator().manual_seed(1)
    steer = dataclasses.replace(CLAS.identity(tone_vectors, fitted_on=model.fingerprint()),
                                weight=torch.randn(model.n_layers, model.d_model, generator=g) * 1e-3,
                                bias=torch.randn(model.n_layers, generator=g))
    items = tone_examples[:3]
    with frozen(model):
        steer.weight.requires_grad_(True)
        trained = example_nll(model, steer, items, grad=True)
        steer.weight.requires_grad_(False)
    prompts = [Prompt(list(e.prompt), steer_from=len(e.prompt) - 1) for e in items]
    scored = continuation_logprobs(model, prompts, [list(e.target) for e in items], steer)
    mean = scored / torch.tensor([len(e.target) for e in items], dtype=torch.float64)
    assert torch.allclose(-trained, mean, atol=1e-4)


def test_lora_hooks_equal_peft_lora_on_the_down_projection(model, plain_hf):
    peft = pytest.importorskip("peft")
    lora = LoRA.init(model, rank=1, seed=3)
    lora.up.copy_(torch.randn(lora.up.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    hf = copy.deepcopy(plain_hf)
    hf = peft.inject_adapter_in_model(peft.LoraConfig(r=1, lora_alpha=2, target_modules=["down_proj"]), hf)
    with torch.no_grad():
        for L, layer in enumerate(hf.model.layers):
            layer.mlp.down_proj.lora_A["default"].weight.copy_(lora.down[L])
            layer.mlp.down_proj.lora_B["default"].weight.copy_(lora.up[L])
        ids = model.encode("Rivers carry water to the sea.")
        want = hf(torch.tensor([ids])).logits
    got = _logits(model, ids, lora)
    assert torch.allclose(got, want, atol=2e-3), float((got - want).abs().max())
    assert not torch.allclose(_logits(model, ids), want, atol=2e-3)  # the update matters
    assert hook_count(model) == 0


def test_trace_carries_each_layers_applied_strength(model, tone_vectors):
    g = torch.Generator().manual_seed(2)
    steer = dataclasses.replace(CLAS.identity(tone_vectors, fitted_on=model.fingerprint(), layers=[5, 12, 20]),
                                weight=torch.randn(model.n_layers, model.d_model, generator=g) * 0.01,
                                bias=torch.full((model.n_layers,), 0.5))
    cached = sb.generate(model, "Describe a quiet morning.", steer=steer, max_new_tokens=6)
    fresh = sb.generate(model, "Describe a quiet morning.", steer=steer, max_new_tokens=6, use_cache=False)
    assert cached.tokens == fresh.tokens
    ids = list(cached.prompt.ids) + cached.tokens
    gates = steer.gates(model, ids)  # [n_layers, T] from one steered pass over the whole text
    assert gates[[0, 6, 29]].abs().sum() == 0
    for s in cached.trace.steps:
        assert set(s.site_strengths) == {f"blocks.{L}.hook_resid_post" for L in (5, 12, 20)}
        # the token at position p was produced by the pass ending at column p - 1
        for L in (5, 12, 20):
            assert s.site_strengths[f"blocks.{L}.hook_resid_post"] == pytest.approx(float(gates[L, s.position - 1]), abs=1e-3)
        assert s.strength == pytest.approx(sum(s.site_strengths.values()) / 3)
    from steerbench import plots

    fig = plots.trace(cached, layer=12)
    assert len(fig.data) >= 2


def test_save_load_round_trip_and_refuse_another_model(model, tiny_model, tone_vectors, tmp_path):
    g = torch.Generator().manual_seed(5)
    steer = dataclasses.replace(CLAS.identity(tone_vectors, "rank1", fitted_on=model.fingerprint()),
                                weight=torch.randn(model.n_layers, model.d_model, generator=g), strength=0.5,
                                info={"history": {"best_epoch": 3}})
    back = CLAS.load(steer.save(tmp_path / "clas.safetensors"), model)
    assert torch.equal(back.weight, steer.weight) and torch.equal(back.bias, steer.bias)
    assert (back.variant, back.strength, back.layers, back.info) == ("rank1", 0.5, steer.layers, steer.info)
    with pytest.raises((ArtifactMismatch, ValueError)):
        CLAS.load(tmp_path / "clas.safetensors", tiny_model)
    lora = LoRA.init(model, seed=1)
    lback = LoRA.load(lora.save(tmp_path / "lora.safetensors"), model)
    assert torch.equal(lback.down, lora.down) and lback.alpha == lora.alpha == 2.0
    with pytest.raises((ArtifactMismatch, ValueError)):
        LoRA.load(tmp_path / "lora.safetensors", tiny_model)


def test_bad_input_is_refused(model, tone_vectors, tone_examples):
    v = tone_vectors
    n, d = v.shape
    with pytest.raises(ValueError, match="NaN or inf"):
        CLAS(v.clone().index_fill_(0, torch.tensor([3]), float("inf")), torch.zeros(n, d), torch.zeros(n))
    with pytest.raises(ValueError, match="must be"):
        CLAS(v, torch.zeros(n, d + 1), torch.zeros(n))
    with pytest.raises(ValueError, match="out of range"):
        CLAS.identity(v, layers=[n])
    with pytest.raises(ValueError, match="variant"):
        CLAS.identity(v, variant="huge")
    with pytest.raises(ValueError, match="at least one training"):
        CLAS.fit(model, [], tone_examples[:2], v)
    with pytest.raises(ValueError, match="vectors have shape"):
        CLAS.fit(model, tone_examples[:2], tone_examples[2:4], v[:, :10])
    with pytest.raises(ValueError, match="finite"):
        CLAS.identity(v).scaled(float("nan"))
    with pytest.raises(ValueError, match="prompt token"):
        Example((), (1,))
    with pytest.raises(ValueError, match="same mean"):
        ids = model.encode("same text")
        directions(model, [ids], [ids])
    with pytest.raises(ValueError, match="rank"):
        LoRA.init(model, rank=0)
    assert hook_count(model) == 0


def test_few_label_draws_keep_training_validation_and_test_apart(model):
    qs = sb.load_mc("copa")
    splits = few_label_splits(len(qs), 10, 10, 3, seed=7)
    assert len({tuple(f) for f, _, _ in splits}) == 3  # three different draws
    for fit, val, test in splits:
        assert len(fit) == len(val) == 10 and len(test) == len(qs) - 20
        assert not (set(fit) & set(val)) and not (set(fit) | set(val)) & set(test)
    # CLAS's training and validation examples come from the fold's fit and validation items only
    fit, val, test = splits[0]
    data = FitData(model, [qs[i] for i in fit], [qs[i] for i in val], AnswerActivations(model, qs, "{question} {answer}"),
                   prompt="copa")
    train_set, val_set, _ = clas_data(data)
    for items, rows in ((train_set, fit), (val_set, val)):
        assert sorted(model.decode(list(e.prompt)) for e in items) == sorted(model.decode(model.encode(qs[i].question))
                                                                              for i in rows)
        assert sorted(model.decode(list(e.target)).strip() for e in items) == sorted(qs[i].best for i in rows)


def test_bench_runs_clas_variants_in_the_few_label_protocol(model):
    qs = sb.load_mc("copa")[:30]
    res = run_bench(model, qs, methods=["baseline", "clas-fixed", "clas"], few_label=3, draws=2,
                    prompt="copa", template="{question} {answer}", grids={"clas": {"epochs": [1]}},
                    kl_texts=["A short neutral sentence about the weather."], log=lambda _: None)
    table = res.summary().set_index("method")
    assert set(table.index) == {"baseline", "clas-fixed", "clas"}
    assert (table["n"] == 2 * 24).all() and "mc1_sd" in table and "margin" in table
    rows = [r for r in res.folds if r["method"] == "clas"]
    assert [r["params"]["epochs"] for r in rows] == [1, 1]
    for sp in res.config["splits"]:
        assert not set(sp["train"]) & set(sp["test"])
    assert hook_count(model) == 0


def test_margin_is_the_raw_log_probability_gap_and_does_not_saturate():
    from steerbench.truthfulqa import mc_result

    qs = [sb.MCQuestion("q1", "a", ("a",), ("b",)), sb.MCQuestion("q2", "c", ("c",), ("d",))]
    res = mc_result(qs, [-1.0, -61.0, -5.0, -3.0])
    assert res.margin == pytest.approx((60.0 - 2.0) / 2)
    assert mc_result([sb.MCQuestion("q", "a", ("a", "b"), ("c",))], [-1.0, -2.0, -3.0]).margin is None


def test_training_a_steerer_that_touches_nothing_is_refused(model, tone_examples, tone_vectors):
    steer = CLAS.identity(tone_vectors, fitted_on=model.fingerprint()).scaled(0.0)
    with pytest.raises(ValueError, match="nothing to train"):
        from steerbench.steering.clas import train

        train(model, steer, {"bias": (steer.bias, 0.1)}, tone_examples[:2], tone_examples[2:4], epochs=1)
    assert not steer.bias.requires_grad and hook_count(model) == 0
