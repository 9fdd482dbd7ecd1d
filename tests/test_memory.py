import math

import pytest
import torch

import steerbench as sb
from steerbench.memory import is_file_backed, map_safetensors, ram_budget, result_tensor


@pytest.fixture(autouse=True)
def spill(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERBENCH_SPILL_DIR", str(tmp_path / "spill"))
    return tmp_path / "spill"


def test_past_the_budget_results_are_file_backed_and_leave_no_file(spill):
    assert not is_file_backed(result_tensor((4, 3), torch.float32))  # no budget: RAM
    with ram_budget(1e6):  # a petabyte: still RAM
        assert not is_file_backed(result_tensor((4, 3), torch.float32))
    with ram_budget(0):
        t = result_tensor((4, 3), torch.float16)
        assert is_file_backed(t) and t.shape == (4, 3) and t.dtype == torch.float16
        t[:] = 2
        assert float(t.float().sum()) == 24
    assert list(spill.iterdir()) == []


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
def test_a_budget_must_be_a_finite_number_of_gb(bad):
    with pytest.raises(ValueError, match="RAM budget"):
        with ram_budget(bad):
            pass


def test_collection_under_a_zero_budget_equals_the_in_memory_one(model):
    texts = ["The cat sat on the mat.", "Hi there", "Why?"]
    hooks = [f"blocks.{L}.attn.hook_z" for L in range(3)]
    in_ram = sb.collect_heads(model, texts)
    with ram_budget(0):
        on_disk = sb.collect_heads(model, texts)
        acts = sb.collect(model, texts, hooks, position="mean")
    assert is_file_backed(on_disk) and torch.equal(on_disk, in_ram)
    assert all(is_file_backed(acts[h]) for h in hooks)
    alone = [sb.collect(model, texts, [h], position="mean")[h] for h in hooks]  # in RAM
    assert all(torch.equal(acts[h], a) for h, a in zip(hooks, alone))


def test_a_mapped_safetensors_file_reads_as_it_was_saved(tmp_path):
    from safetensors.torch import save_file

    want = {"a": torch.randn(5, 3), "b": torch.arange(6, dtype=torch.int64).view(2, 3), "c": torch.randn(4).half()}
    save_file(want, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    got = map_safetensors(tmp_path / "x.safetensors")
    assert got is not None and set(got) == set(want)
    for k in want:
        assert is_file_backed(got[k]) and torch.equal(got[k], want[k])
    got["a"] += 1  # copy on write: the file keeps its values
    assert torch.equal(map_safetensors(tmp_path / "x.safetensors")["a"], want["a"])
