"""Notebook apps, driven without a browser through their plain-Python methods (no model loaded)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.callbacks import Points

from steerbench import geometry, widgets
from steerbench.probes import fit_probes

N = 40


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.arange(N) % 2


@pytest.fixture(scope="module")
def projections(labels):
    rng = np.random.default_rng(0)
    acts = torch.tensor(rng.normal(size=(N, 3, 6)))
    acts[:, 1, 0] += 4.0 * torch.tensor(labels)
    dirs = torch.zeros(3, 6)
    dirs[:, 0] = 1.0
    return geometry.pca_by_layer(acts, labels, [f"text {i}" for i in range(N)], directions=dirs)


@pytest.fixture(scope="module")
def heads(labels):
    rng = np.random.default_rng(1)
    acts = torch.tensor(rng.normal(size=(N, 2, 3, 4)), dtype=torch.float32)
    acts[:, 1, 2, 0] += 3.0 * torch.tensor(labels, dtype=torch.float32)
    return fit_probes(acts, labels), acts


# -------------------------------------------------------------------------------------


def test_pca_explorer_show_layer(projections):
    app = widgets.PCAExplorer(projections)
    assert isinstance(app.figure, go.FigureWidget) and app.figure in app.widget.children
    assert app.layer == 0 and app.slider.value == 0
    assert (app.slider.min, app.slider.max) == (0, 2)
    before = np.array(app.figure.data[0].x)
    app.show_layer(1)
    assert app.layer == 1 and app.slider.value == 1
    np.testing.assert_allclose(app.figure.data[0].x, projections[1].coords[projections[1].labels == 0, 0])
    assert not np.allclose(app.figure.data[0].x, before)
    arrow = next(a for a in app.figure.layout.annotations if a.showarrow)
    assert (arrow.x, arrow.y) == pytest.approx(tuple(projections[1].direction))
    assert "layer 1" in app.figure.layout.title.text
    assert app.figure.layout.xaxis.title.text.startswith("PC1 (")


def test_pca_explorer_slider_drives_the_figure(projections):
    app = widgets.PCAExplorer(projections, layer=2)
    assert app.layer == 2
    app.slider.value = 1  # what dragging the slider does
    assert app.layer == 1 and "layer 1" in app.figure.layout.title.text
    with pytest.raises(ValueError, match="available layers: \\[0, 1, 2\\]"):
        app.show_layer(7)
    with pytest.raises(ValueError, match="no projections"):
        widgets.PCAExplorer({})


def test_pca_explorer_uneven_layers(projections):
    app = widgets.PCAExplorer({0: projections[0], 5: projections[1], 6: projections[2]})
    assert list(app.slider.options) == [0, 5, 6]
    app.show_layer(6)
    assert app.slider.value == 6


# -------------------------------------------------------------------------------------


class FakeGenerate:
    def __init__(self):
        self.calls = []

    def __call__(self, prompt, layer, multiplier):
        self.calls.append((prompt, layer, multiplier))
        return f"[{prompt} L{layer} m{multiplier:g}] <ok>"


def test_sweep_explorer_updates_and_caches():
    fake = FakeGenerate()
    app = widgets.SweepExplorer(fake, ["Tell me a story.", "Describe a cat."], layers=[3, 5], multipliers=[-2, 0, 4])
    # built on the first prompt, first layer, largest positive multiplier: baseline + steered
    assert fake.calls == [("Tell me a story.", 3, 0.0), ("Tell me a story.", 3, 4.0)]
    assert "[Tell me a story. L3 m0] &lt;ok&gt;" in app.output.value  # texts are escaped
    assert "layer 3, m = 4" in app.output.value

    base, steered = app.update(layer=5)
    assert base == "[Tell me a story. L3 m0] <ok>"  # the baseline does not depend on the layer
    assert steered == "[Tell me a story. L5 m4] <ok>"
    assert len(fake.calls) == 3 and app.layer_box.value == 5

    app.update(layer=3)  # seen before: nothing regenerated
    app.update(multiplier=0)  # the baseline, already cached
    assert len(fake.calls) == 3 and app.multiplier_box.value == 0

    base, steered = app.update(prompt=1, multiplier=-2)
    assert fake.calls[-2:] == [("Describe a cat.", 3, 0.0), ("Describe a cat.", 3, -2.0)]
    assert app.prompt_box.value == 1
    assert app.update(prompt="Describe a cat.") == (base, steered) and len(fake.calls) == 5


def test_sweep_explorer_controls_call_update():
    fake = FakeGenerate()
    app = widgets.SweepExplorer(fake, ["p"], layers=[3, 5], multipliers=[0, 1, 2])
    app.layer_box.value = 5
    assert fake.calls[-1] == ("p", 5, 2.0) and "layer 5" in app.output.value
    app.multiplier_box.value = 1.0
    assert fake.calls[-1] == ("p", 5, 1.0)
    n = len(fake.calls)
    app.layer_box.value = 3
    app.layer_box.value = 5
    assert len(fake.calls) == n + 1  # only (3, 1.0) is new


def test_sweep_explorer_errors():
    fake = FakeGenerate()
    app = widgets.SweepExplorer(fake, ["p"], layers=[3], multipliers=[1])
    with pytest.raises(ValueError, match="not one of this explorer's layers"):
        app.update(layer=4)
    with pytest.raises(ValueError, match="multipliers"):
        app.update(multiplier=3)
    with pytest.raises(ValueError, match="not one of this explorer's prompts"):
        app.update(prompt="q")
    with pytest.raises(ValueError, match="at least one prompt"):
        widgets.SweepExplorer(fake, [], layers=[3], multipliers=[1])


def test_sweep_explorer_for_steerer_wires_generate(monkeypatch):
    from steerbench import generation

    seen = []

    class Out:
        def __init__(self, text):
            self.text = text

    def fake_generate(model, prompt, steer=None, max_new_tokens=64, **kw):
        seen.append((model, prompt, steer, max_new_tokens))
        return Out(f"{prompt}:{steer}")

    monkeypatch.setattr(generation, "generate", fake_generate)
    app = widgets.SweepExplorer.for_steerer("MODEL", lambda L, m: f"S{L}x{m:g}", ["hi"], [2], [0, 3],
                                            max_new_tokens=7)
    assert seen == [("MODEL", "hi", None, 7), ("MODEL", "hi", "S2x3", 7)]
    assert app.update() == ("hi:None", "hi:S2x3")


# -------------------------------------------------------------------------------------


def test_head_grid_explorer_select_and_click(heads, labels):
    grid, acts = heads
    texts = [f"example {i}" for i in range(N)]
    app = widgets.HeadGridExplorer(grid, acts, labels, texts)
    best = grid.top(1)[0][0]
    assert app.selected == best and "rank 1 of 6" in app.summary.value
    assert isinstance(app.grid_figure, go.FigureWidget) and isinstance(app.scatter, go.FigureWidget)

    before = np.array(app.scatter.data[0].x)
    proj = app.select(0, 1)
    assert app.selected == (0, 1)
    assert "Layer 0, head 1" in app.summary.value
    assert f"{float(grid.val_acc[0, 1]):.3f}" in app.summary.value
    np.testing.assert_allclose(app.scatter.data[0].x, proj.coords[proj.labels == 0, 0])
    assert not np.allclose(app.scatter.data[0].x, before)
    assert "Layer 0, head 1" in app.scatter.layout.title.text
    assert any(a.showarrow for a in app.scatter.layout.annotations)  # the probe direction
    rect = app.grid_figure.layout.shapes[0]
    assert (rect.x0, rect.y0) == (0.5, -0.5)

    # a click on cell (layer 1, head 0), as the browser would report it
    heat = app.grid_figure.data[0]
    heat._dispatch_on_click(Points(point_inds=[[1, 0]], xs=[0], ys=[1], trace_index=0), None)
    assert app.selected == (1, 0) and "Layer 1, head 0" in app.summary.value

    with pytest.raises(ValueError, match="2 layers x 3 heads"):
        app.select(2, 0)


def test_head_grid_explorer_checks_shapes(heads, labels):
    grid, acts = heads
    with pytest.raises(ValueError, match="head_acts must be"):
        widgets.HeadGridExplorer(grid, acts[:, :, :2], labels)
