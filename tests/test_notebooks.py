"""The quickstart notebook on the second model family: every cell runs unchanged on Gemma 3
270M when ``$STEERBENCH_MODEL`` names it (the default model's run is ``pytest --nbmake``)."""

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def test_the_quickstart_runs_on_gemma(gemma, tmp_path, monkeypatch):  # gemma: its cache is warm
    monkeypatch.setenv("STEERBENCH_MODEL", "gemma-3-270m")  # the kernel inherits it
    monkeypatch.setenv("STEERBENCH_OUT", str(tmp_path))  # where the notebook saves (sb.output_path)
    path = tmp_path / "01_quickstart.ipynb"
    shutil.copy(NOTEBOOKS / "01_quickstart.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "gemma-3-270m" in text  # the model cell's repr: it really ran on Gemma
    assert "CAA(layer=11" in text  # 62% of Gemma's 18 layers
    assert (tmp_path / "tone_caa.safetensors").exists() and (tmp_path / "quickstart_ab_sweep.html").exists()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
