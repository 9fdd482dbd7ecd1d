import json

from steerbench.cli import main


def test_demo_writes_a_report(model, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--n-train", "8", "--n-test", "3", "--n-prompts", "1",
               "--max-new-tokens", "6", "--sweep-layers", "12", "--multipliers", "-2", "0", "2"])
    assert rc == 0
    page = (out / "report.html").read_text()
    assert "plotly" in page and "A/B score against multiplier" in page
    rows = json.loads((out / "generations.json").read_text())
    assert [r["multiplier"] for r in rows] == [-2, 0, 2]
    assert (out / "ab_sweep.csv").read_text().count("\n") == 4
    assert list(out.glob("caa_tone_answer.safetensors"))
    assert "wrote" in capsys.readouterr().out


def test_bench_writes_results_and_refuses_a_bad_grid_before_loading(model, tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as err:  # argparse's exit: a message, no traceback
        main(["bench", "--set", "iti.beta=1"])
    assert err.value.code == 2 and "has no parameter" in capsys.readouterr().err
    out = tmp_path / "bench"
    rc = main(["bench", "--data", "misconceptions", "--limit", "10", "--prompt", "plain", "--no-cache",
               "--set", "iti.k=2", "--set", "iti.alpha=5", "--set", "fasb.k=2", "--set", "fasb.alpha=5",
               "--set", "fasb.readout=prefix", "--set", "fasb.threshold=val", "--set", "fasb.backtrack=2",
               "--generate", "1", "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [s["method"] for s in data["summary"]] == ["baseline", "iti", "fasb"]
    fasb = data["summary"][2]
    assert fasb["scoring"] == "fasb-mc" and "rollbacks_per_answer" in fasb
    assert 0 <= fasb["mc_rescored"] <= 1  # how often MC mode intervened on the test answers
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["fold"]) for r in rows] == [(m, f) for f in (0, 1) for m in ("baseline", "iti", "fasb")]
    assert all(0 <= s["gen_acc_rougeL"] <= 1 and 0 <= s["gen_acc_embedding"] <= 1 for s in data["summary"])
    assert data["config"]["grids"]["iti"]["k"] == [2]
    assert "plotly" in (out / "report.html").read_text() and (out / "folds.csv").exists()
    printed = capsys.readouterr().out
    assert "mc2" in printed and "baseline" in printed


def test_bench_on_an_accuracy_set_with_caa_and_sadi(model, tmp_path):
    out = tmp_path / "copa"
    rc = main(["bench", "--data", "copa", "--limit", "12", "--methods", "baseline", "caa", "sadi", "--no-cache",
               "--set", "caa.layer=0.5", "--set", "caa.multiplier=1", "--set", "sadi.k=1,2", "--set", "sadi.delta=5",
               "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [s["method"] for s in data["summary"]] == ["baseline", "caa", "sadi"]
    cfg = data["config"]
    assert cfg["prompt"] == "copa" and cfg["prompt_template"] == "{question}" and cfg["n_questions"] == 12
    assert "accuracy" in cfg["title"] and "validation" in cfg["title"]
    assert data["folds"][2]["describe"].startswith("SADI-HEAD(K=")


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def test_bench_under_a_zero_ram_budget_gives_the_in_memory_results(model, tmp_path, monkeypatch):
    # (collection into file-backed tensors: tests/test_memory.py)
    import steerbench.benchmark

    monkeypatch.setattr(steerbench.benchmark, "cache_dir", lambda: tmp_path / "cache")  # activation caches
    monkeypatch.setenv("STEERBENCH_SPILL_DIR", str(tmp_path / "spill"))
    common = ["bench", "--data", "misconceptions", "--limit", "6", "--prompt", "plain", "--methods", "iti", "caa",
              "--set", "iti.k=2", "--set", "iti.alpha=5", "--set", "caa.layer=0.5", "--set", "caa.multiplier=1"]
    runs = {}
    for name, extra in (("ram", []), ("mapped", ["--max-ram-gb", "0"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert len(list((tmp_path / "cache" / "activations").glob("*.safetensors"))) == 2  # heads and resid
    assert runs["mapped"]["config"]["collection_s"] == {"z": 0, "resid": 0}  # mapped from those files
    assert runs["mapped"]["config"]["max_ram_gb"] == 0
    assert _without_timings(runs["mapped"]["folds"]) == _without_timings(runs["ram"]["folds"])
    assert _without_timings(runs["mapped"]["summary"]) == _without_timings(runs["ram"]["summary"])
    assert runs["ram"]["config"]["peak_rss_gb"] > 0.3
    assert not list((tmp_path / "spill").iterdir())  # every fold's slice was spilled, its file unlinked once mapped
