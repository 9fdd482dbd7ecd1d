import atexit
import os
import shutil
import tempfile

import pytest
import torch

import steerbench as sb
from steerbench.model import Model

# what notebooks write (figures, vectors: ``sb.output_path``) goes to a folder of this run
if "STEERBENCH_OUT" not in os.environ:
    os.environ["STEERBENCH_OUT"] = tempfile.mkdtemp(prefix="steerbench-out-")
    atexit.register(shutil.rmtree, os.environ["STEERBENCH_OUT"], ignore_errors=True)


@pytest.fixture(scope="session")
def model() -> Model:
    return sb.load_model("smollm2-135m-instruct", device="cpu")  # by name: $STEERBENCH_MODEL never changes it


@pytest.fixture(scope="session")
def gemma() -> Model:
    """The second model family: Gemma 3 270M (base, 1 KV head of d_head 256, sliding windows)."""
    return sb.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session", params=["smollm2", "gemma"])
def any_model(request) -> Model:
    """Each offline model family in turn, for the tests whose claims hold for any model."""
    return request.getfixturevalue("model" if request.param == "smollm2" else "gemma")


@pytest.fixture(scope="session")
def any_caa(any_model, tone):
    return sb.CAA.fit(any_model, tone[:6], read="answer", layer=12)


@pytest.fixture(scope="session")
def tiny_model(model) -> Model:
    """A second, genuinely different model: a small random Llama sharing the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=model.tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(cfg).eval()
    return Model.wrap(hf, model.tokenizer, "tiny-random-llama")


@pytest.fixture(scope="session")
def tone():
    return sb.behavior("tone", "train")


@pytest.fixture(scope="session")
def caa(model, tone):
    return sb.CAA.fit(model, tone[:6], read="answer", layer=12)


def hook_count(model: Model) -> int:
    """Hooks left anywhere: on the runner's modules (where steerbench hooks) and on the bridge's hook points."""
    from steerbench.runner import hook_count as runner_hooks

    return runner_hooks(model.runner) + sum(len(p.fwd_hooks) for p in set(model.bridge.hook_dict.values()))


@pytest.fixture(scope="session")
def plain_hf(model):
    """The same weights in a Hugging Face model that TransformerLens never touched."""
    from steerbench.model import plain_hf_model

    return plain_hf_model()


@pytest.fixture(scope="session")
def mc_questions():
    return sb.load_truthfulqa("misconceptions")[:14]


@pytest.fixture(scope="session")
def head_acts(model, mc_questions):
    from steerbench.steering.iti import TEMPLATE

    texts, _, _ = sb.qa_examples(mc_questions, TEMPLATE)
    return sb.collect_heads(model, texts)


@pytest.fixture(scope="session")
def head_probes(model, mc_questions, head_acts):
    return sb.HeadProbes.fit(model, mc_questions, acts=head_acts)


def pytest_collection_modifyitems(config, items):
    """Where the browser test runs (tests/test_browser.py: Chromium and Playwright present), it
    runs notebooks 01, 04 and 05 with Run All and fails on any error output or unrun cell, so
    nbmake does not run those notebooks a second time."""
    in_browser = {item.callspec.params["name"] for item in items
                  if item.nodeid.startswith("tests/test_browser.py") and hasattr(item, "callspec")}
    if not in_browser:
        return
    keep, twice = [], []
    for item in items:
        is_notebook = item.nodeid.startswith("notebooks/") and item.path.name in in_browser
        (twice if is_notebook else keep).append(item)
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = keep
