"""Bad input and faults: each case gives its kind's error type, before any work, and
changes nothing (no hook left on the model, no file written or altered, the weights as
they were). Then call isolation: steering never reaches another call on the same model."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import steerbench as sb
from steerbench.artifacts import HEADER_KEY
from steerbench.benchmark import parse_grid
from steerbench.datasets import MCQuestion, load_ab, load_mc, load_open_ended, load_truthfulqa, neutral_texts
from steerbench.errors import ArtifactError, DatasetError, ModelMismatch, ParameterError
from steerbench.evaluation import ab_score, ab_scores, ab_sweep
from steerbench.passes import forward_batch
from tests.conftest import hook_count

AB = {"question": "Pick one.\n\nChoices:\n (A) yes\n (B) no", "answer_matching_behavior": "(A)",
      "answer_not_matching_behavior": "(B)"}
CSV_HEAD = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n"


@pytest.fixture(scope="module")
def fasb_heads(head_probes):
    return head_probes.select(4, alpha=5)


def write(tmp_path, name: str, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def artifact(tmp_path, caa, edit) -> object:
    """``caa`` saved, then its JSON header rewritten by ``edit(header)``."""
    from safetensors import safe_open

    p = caa.save(tmp_path / "a.safetensors")
    with safe_open(str(p), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header)
    save_file(tensors, str(p), metadata={HEADER_KEY: json.dumps(header)})
    return p


# (id, kind, what to call: f(model, caa, head_probes, tmp_path)) -- each must raise ``kind``
CASES = [
    # strengths and other numbers
    ("scaled-inf", ParameterError, lambda m, c, h, t: c.scaled(float("inf"))),
    ("scaled-minus-inf", ParameterError, lambda m, c, h, t: c.scaled(float("-inf"))),
    ("scaled-nan", ParameterError, lambda m, c, h, t: c.scaled(float("nan"))),
    ("scaled-bool", ParameterError, lambda m, c, h, t: c.scaled(True)),
    ("scaled-string", ParameterError, lambda m, c, h, t: c.scaled("4")),
    ("constructor-inf", ParameterError, lambda m, c, h, t: sb.CAA(c.vectors, 3, strength=float("inf"))),
    ("iti-alpha-inf", ParameterError, lambda m, c, h, t: h.select(4).scaled(float("inf"))),
    ("fasb-alpha-nan", ParameterError, lambda m, c, h, t: sb.FASB(h.select(4), alpha=float("nan"))),
    # layers
    ("at-bool", ParameterError, lambda m, c, h, t: c.at(True)),
    ("at-float", ParameterError, lambda m, c, h, t: c.at(2.5)),
    ("at-out-of-range", ParameterError, lambda m, c, h, t: c.at(40)),
    ("at-below-minus-n", ParameterError, lambda m, c, h, t: c.at(-31)),
    ("fit-layer-40", ParameterError, lambda m, c, h, t: sb.CAA.fit(m, sb.behavior("tone")[:2], layer=40)),
    ("sweep-layer-bool", ParameterError, lambda m, c, h, t: ab_sweep(m, lambda L, x: c.at(L).scaled(x),
                                                                     sb.behavior("tone", "test")[:2], [True], [1])),
    ("sweep-multiplier-inf", ParameterError, lambda m, c, h, t: ab_sweep(m, lambda L, x: c.at(L).scaled(x),
                                                                         sb.behavior("tone", "test")[:2], [3],
                                                                         [float("inf")])),
    # generation
    ("max-new-tokens-2.5", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", max_new_tokens=2.5)),
    ("max-new-tokens-0", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", max_new_tokens=0)),
    ("top-p-0", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", temperature=1.0, top_p=0)),
    ("top-p-above-1", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", temperature=1.0, top_p=1.5)),
    ("temperature-negative", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", temperature=-1.0)),
    ("temperature-nan", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", temperature=float("nan"))),
    ("stop-empty-string", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", stop=("",))),
    ("max-rollbacks-negative", ParameterError, lambda m, c, h, t: sb.generate(m, "Hi", max_rollbacks=-1)),
    ("prompt-past-context", ParameterError,
     lambda m, c, h, t: sb.generate(m, sb.Prompt([1] * (m.context_length + 1), steer_from=0), steer=c.scaled(4))),
    ("prompt-plus-tokens-past-context", ParameterError,
     lambda m, c, h, t: sb.generate(m, sb.Prompt([1] * (m.context_length - 2), steer_from=0), max_new_tokens=8)),
    ("batch-past-context", ParameterError, lambda m, c, h, t: forward_batch(m, [[1] * (m.context_length + 5)])),
    # selections and readouts
    ("select-k-8.5", ParameterError, lambda m, c, h, t: h.select(8.5)),
    ("select-k-0", ParameterError, lambda m, c, h, t: h.select(0)),
    ("readout-unknown", ParameterError, lambda m, c, h, t: ab_scores(m, sb.behavior("tone", "test")[:2], [None],
                                                                     readouts=("bogus",))),
    # --set grids (the CLI's, checked before a model loads)
    ("set-empty", ParameterError, lambda m, c, h, t: parse_grid(["iti.k="])),
    ("set-negative-k", ParameterError, lambda m, c, h, t: parse_grid(["iti.k=-8"])),
    ("set-fractional-k", ParameterError, lambda m, c, h, t: parse_grid(["iti.k=8.5"])),
    ("set-inf-alpha", ParameterError, lambda m, c, h, t: parse_grid(["iti.alpha=inf"])),
    ("set-threshold-1.5", ParameterError, lambda m, c, h, t: parse_grid(["fasb.threshold=1.5"])),
    ("set-unknown-param", ParameterError, lambda m, c, h, t: parse_grid(["iti.beta=1"])),
    # datasets
    ("ab-missing", DatasetError, lambda m, c, h, t: load_ab(t / "none.json")),
    ("ab-folder", DatasetError, lambda m, c, h, t: load_ab(t)),
    ("ab-not-utf8", DatasetError, lambda m, c, h, t: load_ab(write(t, "latin.json", "[\"caf\xe9\"]".encode("latin-1")))),
    ("ab-bad-json", DatasetError, lambda m, c, h, t: load_ab(write(t, "bad.json", "[{"))),
    ("ab-letter-twice", DatasetError, lambda m, c, h, t: load_ab(write(t, "twice.json", json.dumps(
        [{**AB, "question": "Pick one.\n\nChoices:\n (A) yes\n (A) no\n (B) maybe"}])))),
    ("ab-empty-list", DatasetError, lambda m, c, h, t: load_ab(write(t, "empty.json", "[]"))),
    ("open-ended-bad-json", DatasetError, lambda m, c, h, t: load_open_ended(write(t, "open.json", "{oops"))),
    ("csv-too-few-cells", DatasetError, lambda m, c, h, t: load_truthfulqa(write(t, "short.csv",
                                                                                CSV_HEAD + "Adversarial,Misc,Why?,Because\n"))),
    ("csv-not-utf8", DatasetError, lambda m, c, h, t: load_truthfulqa(write(t, "latin.csv", (
        CSV_HEAD + "A,B,Caf\xe9?,Yes,Yes,No\n").encode("latin-1")))),
    ("csv-answer-true-and-false", DatasetError, lambda m, c, h, t: load_truthfulqa(write(t, "both.csv", (
        CSV_HEAD + "A,B,Is it?,Yes,Yes,Yes; No\n")))),
    ("mc-answer-true-and-false", DatasetError, lambda m, c, h, t: MCQuestion("Q?", "yes", ("yes",), ("yes", "no"))),
    ("mc-jsonl-bad-record", DatasetError, lambda m, c, h, t: load_mc(write(t, "r.jsonl", '{"query": "x"}\n'))),
    ("mc-jsonl-not-utf8", DatasetError, lambda m, c, h, t: load_mc(write(t, "l.jsonl", b'{"query": "caf\xe9"}\n'))),
    ("neutral-folder", DatasetError, lambda m, c, h, t: neutral_texts(t)),
    # artifacts
    ("artifact-no-params", ArtifactError, lambda m, c, h, t: sb.CAA.load(artifact(t, c, lambda hd: hd.pop("params")), m)),
    ("artifact-strength-inf", ArtifactError, lambda m, c, h, t: sb.CAA.load(
        artifact(t, c, lambda hd: hd["params"].update(strength=float("inf"))), m)),
    ("artifact-empty-fitted-on", ArtifactError, lambda m, c, h, t: sb.CAA.load(
        artifact(t, c, lambda hd: hd.update(fitted_on={})), m)),
    ("artifact-no-fitted-on-no-model", ArtifactError, lambda m, c, h, t: sb.CAA.load(
        artifact(t, c, lambda hd: hd.pop("fitted_on")))),
    ("artifact-other-model", ModelMismatch, lambda m, c, h, t: sb.CAA.load(
        artifact(t, c, lambda hd: hd["fitted_on"].update(weights_sha256="0" * 32)), m)),
    ("artifact-pickle", ArtifactError, lambda m, c, h, t: sb.CAA.load(write(t, "p.safetensors", b"\x80\x04K\x01."), m)),
    ("artifact-folder", ArtifactError, lambda m, c, h, t: sb.CAA.load(t, m)),
    ("artifact-nan-tensor", ArtifactError, lambda m, c, h, t: sb.CAA.load(nan_artifact(t, c), m)),
    ("artifact-other-class", ArtifactError, lambda m, c, h, t: sb.ITI.load(c.save(t / "caa.safetensors"), m)),
    ("probes-other-model", ModelMismatch, lambda m, c, h, t: sb.HeadProbes.load(probes_artifact(t, h), m)),
]

def nan_artifact(tmp_path, caa):
    bad = caa.vectors.clone()
    bad[0, 0] = float("nan")
    p = caa.save(tmp_path / "n.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    save_file({"vectors": bad}, str(p), metadata=meta)
    return p


def probes_artifact(tmp_path, probes):
    """``probes`` saved with another model's fingerprint in the header."""
    from safetensors import safe_open

    p = probes.save(tmp_path / "probes.safetensors")
    with safe_open(str(p), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["fitted_on"]["weights_sha256"] = "f" * 32
    save_file(tensors, str(p), metadata={HEADER_KEY: json.dumps(header)})
    return p


def test_the_table_is_long_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,kind,call", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(name, kind, call, model, caa, head_probes, tmp_path):
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    strength = caa.strength
    t0 = time.perf_counter()
    with pytest.raises(kind) as err:
        call(model, caa, head_probes, tmp_path)
    took = time.perf_counter() - t0
    assert isinstance(err.value, ValueError)  # every kind is still a ValueError for older callers
    assert str(err.value)  # a message, never a bare type
    assert hook_count(model) == 0
    assert caa.strength == strength
    assert took < 30, f"{name} took {took:.0f} s before refusing"
    if not name.startswith(("artifact", "probes", "ab-", "csv", "open", "mc-", "neutral")):
        after = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
        assert after == before  # nothing written


def test_dataset_errors_name_the_file(tmp_path):
    p = write(tmp_path, "latin.json", "[\"caf\xe9\"]".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin.json.*not UTF-8"):
        load_ab(p)
    with pytest.raises(DatasetError, match="short.csv row 2: too few cells"):
        load_truthfulqa(write(tmp_path, "short.csv", CSV_HEAD + "Adversarial,Misc,Why?,Because\n"))


def test_odd_values_that_are_meant_are_accepted(model, caa, tmp_path):
    assert caa.scaled(np.float32(4)).strength == 4.0
    assert caa.scaled(torch.tensor(2.0)).strength == 2.0
    assert caa.at(-1).layer == model.n_layers - 1 and model.check_layer(-2) == model.n_layers - 2
    # a CSV saved with a byte-order mark reads as without one
    rows = CSV_HEAD + "A,B,Is water wet?,Yes,Yes,No\n"
    plain = load_truthfulqa(write(tmp_path, "plain.csv", rows))
    assert load_truthfulqa(write(tmp_path, "bom.csv", "\ufeff" + rows)) == plain
    # one readout by name
    items = sb.behavior("tone", "test")[:2]
    assert ab_score(model, items, caa.scaled(2), readouts="letter") == ab_score(model, items, caa.scaled(2),
                                                                                  readouts=("letter",))


def test_fasb_takes_alpha_by_name(fasb_heads):
    assert sb.FASB(fasb_heads, alpha=10).strength == 10
    assert sb.FASB(fasb_heads, alpha=10).scaled(3).strength == 3


def test_truthfulqa_drops_answers_listed_true_and_false(tmp_path):
    rows = CSV_HEAD + "A,B,How many?,About ten,About ten; Unknown,Unknown; None\n"
    with pytest.warns(UserWarning, match="both true and false"):
        (q,) = load_truthfulqa(write(tmp_path, "u.csv", rows))
    assert q.correct == ("About ten",) and q.incorrect == ("None",)


def test_head_probes_save_and_load(model, head_probes, tmp_path):
    p = head_probes.save(tmp_path / "probes.safetensors")
    back = sb.HeadProbes.load(p, model)
    assert back.ranking() == head_probes.ranking()
    assert torch.equal(back.select(3).directions, head_probes.select(3).directions)
    assert back.fitted_on == head_probes.fitted_on
    # a head whose validation split has one class has a NaN AUC: such probes still save and load
    import dataclasses

    auc = head_probes.grid.val_auc.clone()
    auc[0, 0] = float("nan")
    odd = dataclasses.replace(head_probes, grid=dataclasses.replace(head_probes.grid, val_auc=auc))
    assert sb.HeadProbes.load(odd.save(tmp_path / "nan_auc.safetensors"), model).grid.val_auc[0, 0].isnan()


def test_the_fingerprint_covers_every_weight_and_follows_edits(model, tone):
    caa = sb.CAA.fit(model, tone[:2], read="answer", layer=3)
    fp = model.fingerprint()
    # one element the old sampled fingerprint never read: the middle of a large matrix
    w = model.hf_model.model.layers[7].mlp.up_proj.weight
    i, j = w.shape[0] // 2 + 3, w.shape[1] // 2 + 5
    old = float(w[i, j].detach())
    try:
        with torch.no_grad():
            w[i, j] += 1e-3
        assert model.fingerprint()["weights_sha256"] != fp["weights_sha256"]
        with pytest.raises(ModelMismatch, match="weights_sha256"):
            caa.check_model(model)
    finally:
        with torch.no_grad():
            w[i, j] = old
    assert model.fingerprint() == fp
    caa.check_model(model)


def test_a_truncated_activation_cache_is_collected_again(model, mc_questions, tmp_path, monkeypatch):
    from steerbench.benchmark import AnswerActivations

    monkeypatch.setenv("STEERBENCH_CACHE", str(tmp_path))
    qs = mc_questions[:2]
    first = AnswerActivations(model, qs, progress=False).all()
    path = AnswerActivations(model, qs, progress=False).path()
    path.write_bytes(path.read_bytes()[:1000])
    again = AnswerActivations(model, qs, progress=False)
    with pytest.warns(UserWarning, match="unusable"):
        acts = again.all()
    assert torch.allclose(acts, first, atol=1e-5) and again.seconds > 0


# -- the command line: refused before the model loads ---------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sb, "load_model", refuse)


@pytest.mark.parametrize("argv", [
    ["bench", "--set", "iti.k="],
    ["bench", "--set", "iti.k=-8"],
    ["bench", "--limit", "0"],
    ["bench", "--val-fraction", "1.5"],
    ["bench", "--max-kl", "nan"],
    ["bench", "--data", "/nonexistent/file.jsonl"],
    ["demo", "--multipliers", "inf"],
    ["demo", "--behaviour", "sarcasm"],
], ids=lambda a: " ".join(a))
def test_cli_refuses_bad_values_before_loading(argv, no_model, tmp_path, capsys):
    from steerbench.cli import main

    with pytest.raises(SystemExit) as err:
        main([*argv, "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or argv[0] == "demo"


def test_cli_refuses_an_unwritable_out_before_loading(no_model, tmp_path, capsys):
    from steerbench.cli import main

    f = write(tmp_path, "file", "x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit):
            main(["bench", "--data", "copa", "--out", str(out)])
        assert "--out" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_cli_checks_layers_before_fitting(model, monkeypatch, tmp_path, capsys):
    from steerbench.cli import main

    monkeypatch.setattr(sb, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(sb.CAA, "fit", classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("fitted"))))
    with pytest.raises(SystemExit):
        main(["demo", "--sweep-layers", "40", "--out", str(tmp_path / "o")])
    assert "--sweep-layers: layer 40 is out of range" in capsys.readouterr().err


# -- call isolation ---------------------------------------------------------------------


def _probe_seqs(model):
    return [model.encode("The capital of France is"), model.encode("Water boils at")]


def test_a_pass_from_a_callback_is_not_steered(model, caa):
    seqs = _probe_seqs(model)
    ref, _ = forward_batch(model, seqs)
    seen = []

    def on_step(event):
        if isinstance(event, sb.generation.TokenStep):
            seen.append(forward_batch(model, seqs)[0])

    steered = sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=5)
    with_cb = sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=5, on_step=on_step)
    assert len(seen) == 5 and all(torch.equal(s, ref) for s in seen)
    assert with_cb.tokens == steered.tokens  # and the steered call is untouched by the inner passes
    assert hook_count(model) == 0


def test_a_nested_generate_is_its_own_call(model, caa):
    plain = sb.generate(model, "Name a colour.", max_new_tokens=6)
    nested = []

    def on_step(event):
        if isinstance(event, sb.generation.TokenStep) and not nested:
            nested.append(sb.generate(model, "Name a colour.", max_new_tokens=6))

    outer = sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=4, on_step=on_step)
    assert nested[0].tokens == plain.tokens
    assert outer.tokens == sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=4).tokens


def test_threads_do_not_share_steering(model, caa):
    seqs = _probe_seqs(model)
    ref, _ = forward_batch(model, seqs)
    steered_ref = sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=12).tokens
    results, steered, errors = [], [], []
    stop = threading.Event()

    def steered_loop():
        try:
            while True:  # at least two steered calls, so the unsteered ones overlap them
                steered.append(sb.generate(model, "How was your weekend?", steer=caa.scaled(8), max_new_tokens=12).tokens)
                if stop.is_set() and len(steered) >= 2:
                    break
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=steered_loop)
    t.start()
    try:
        while len(results) < 12 or (len(steered) < 2 and not errors and len(results) < 400):
            results.append(forward_batch(model, seqs)[0])
    finally:
        stop.set()
        t.join()
    assert not errors
    assert steered and all(s == steered_ref for s in steered)
    assert all(torch.allclose(r, ref, atol=1e-4) for r in results)
    assert hook_count(model) == 0
