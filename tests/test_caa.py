import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from tests.conftest import hook_count


def reference_vectors(hf, tokenizer, items, read):
    """CAA as the reference computes it, with plain torch forward hooks on each decoder layer."""
    layers = hf.model.layers
    diffs = torch.zeros(len(layers), hf.config.hidden_size)
    for it in items:
        for sign, letter, text in ((1, it.matching, it.matching_text), (-1, it.not_matching, it.not_matching_text)):
            msgs = [{"role": "user", "content": it.question if read == "letter" else it.stem}]
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            a_ids = tokenizer(f"({letter})" if read == "letter" else text, add_special_tokens=False).input_ids
            ids = torch.tensor([p_ids + a_ids])
            store = {}
            handles = [
                layer.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[0]))
                for k, layer in enumerate(layers)
            ]
            try:
                with torch.no_grad():
                    hf(ids)
            finally:
                for h in handles:
                    h.remove()
            for k in range(len(layers)):
                acts = store[k]
                v = acts[-2] if read == "letter" else acts[len(p_ids):].mean(0)
                diffs[k] += sign * v
    return diffs / len(items)


@pytest.mark.parametrize("read", ["letter", "answer"])
def test_vectors_match_the_reference_formula(model, plain_hf, read):
    items = sb.behavior("refusal", "train", source="caa")[:4]
    ours = sb.CAA.fit(model, items, read=read).vectors
    ref = reference_vectors(plain_hf, model.tokenizer, items, read)
    assert torch.allclose(ours, ref, atol=1e-3, rtol=1e-4), (ours - ref).abs().max()


def test_default_layer_is_the_middle_and_at_validates(model, caa):
    assert sb.CAA.fit(model, sb.behavior("tone")[:2]).layer == model.n_layers // 2
    with pytest.raises(ValueError, match="layer 40 is out of range"):
        caa.at(40)
    with pytest.raises(ValueError, match="layer 40 is out of range: the model has 30 layers"):
        sb.CAA.fit(model, sb.behavior("tone")[:2], layer=40)


def test_save_load_roundtrip_and_refusal_on_another_model(model, tiny_model, caa, tmp_path):
    path = caa.scaled(2.5).save(tmp_path / "tone")
    back = sb.CAA.load(path, model)
    assert torch.equal(back.vectors, caa.vectors) and back.strength == 2.5 and back.layer == caa.layer
    assert back.fitted_on == model.fingerprint()
    with pytest.raises(ArtifactMismatch, match="fitted on HuggingFaceTB/SmolLM2-135M-Instruct"):
        sb.CAA.load(path, tiny_model)
    before = hook_count(tiny_model)
    with pytest.raises(ArtifactMismatch):
        sb.generate(tiny_model, "Hi", steer=back, max_new_tokens=2)
    assert hook_count(tiny_model) == before


def test_same_architecture_different_weights_is_refused(model, caa):
    other = dict(caa.fitted_on, weights_sha256="0" * 32)
    forged = sb.CAA(caa.vectors, caa.layer, 1.0, fitted_on=other)
    with pytest.raises(ArtifactMismatch, match="weights_sha256"):
        forged.check_model(model)


def test_bad_vectors_and_data_are_refused_and_change_nothing(model, caa):
    bad = caa.vectors.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sb.CAA(bad, layer=3)
    with pytest.raises(ValueError, match="must be \\[n_layers, d_model\\]"):
        sb.CAA(caa.vectors[0], layer=0)
    with pytest.raises(ValueError, match="at least one"):
        sb.CAA.fit(model, [])
    with pytest.raises(ValueError, match="read must be"):
        sb.CAA.fit(model, sb.behavior("tone")[:2], read="middle")
    with pytest.raises(ValueError, match="finite"):
        caa.scaled(float("nan"))
    wrong = sb.CAA(torch.zeros(30, 100), layer=3)
    before = hook_count(model)
    with pytest.raises(ValueError, match="shape"):
        sb.generate(model, "Hi", steer=wrong, max_new_tokens=2)
    assert hook_count(model) == before


def test_unknown_hook_name_is_refused_before_anything_runs(model):
    from dataclasses import dataclass

    from steerbench.steerer import Steerer

    @dataclass
    class Typo(Steerer):
        strength: float = 1.0

        @property
        def sites(self):
            return ("blocks.3.hook_resid_psot",)

        def hooks(self, ctx):
            return [(self.sites[0], lambda x, hook: x)]

    before = hook_count(model)
    with pytest.raises(ValueError, match="unknown hook name 'blocks.3.hook_resid_psot'"):
        sb.generate(model, "Hi", steer=Typo(), max_new_tokens=2)
    assert hook_count(model) == before
