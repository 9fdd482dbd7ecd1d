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
