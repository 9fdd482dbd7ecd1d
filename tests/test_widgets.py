"""Notebook apps, driven without a browser through their plain-Python methods.

Only the LiveTrace tests load the default model; the others use synthetic data.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.callbacks import Points

import steerbench as sb
from steerbench import geometry, widgets
from steerbench.generation import TokenStep, Trace, TraceEvent
from steerbench.probes import fit_probes
from steerbench.steering.fasb import FASB
from steerbench.steering.iti import ITI

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


def test_what_python_changes_in_a_figure_is_in_the_widget_state_a_reloaded_page_draws(projections):
    """Issue 16: after a reload, a view starts from the widget's synced state, not from the
    messages the old view got; that state must show the layer the slider reads."""
    app = widgets.PCAExplorer(projections, layer=0)
    app.slider.value = 2
    state = app.figure.get_state()
    assert "layer 2" in state["_widget_layout"]["title"]["text"]
    x = app.figure._widget_data[0]["x"]  # (get_state sends arrays as binary buffers)
    np.testing.assert_allclose(x, projections[2].coords[projections[2].labels == 0, 0])


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


# -------------------------------------------------------------------------------------
# LiveTrace: a generation as it happens, driven headless on the default model


LIVE_PROMPT = "Does cracking your knuckles cause arthritis?"
LIVE_TOKENS = 6


@dataclass
class ScriptedFASB(FASB):
    """FASB whose probes read from a script: P(true) of the i-th observed token is ``script[i]``."""

    script: tuple = (0.9, 0.9, 0.9, 0.2)

    def p_true(self, z, pos=None):
        self._n = getattr(self, "_n", 0) + 1
        return torch.tensor(self.script[self._n - 1] if self._n <= len(self.script) else 0.9, dtype=torch.float64)


def scripted_fasb(model, **kw) -> ScriptedFASB:
    gen = torch.Generator().manual_seed(0)
    k, d = 2, model.d_head
    dirs = torch.randn(k, d, generator=gen)
    heads = ITI(
        heads=torch.tensor([[5, 0], [9, 2]]), directions=dirs / dirs.norm(dim=-1, keepdim=True), sigma=torch.ones(k),
        probe_weight=torch.zeros(k, d, dtype=torch.float64), probe_bias=torch.zeros(k, dtype=torch.float64),
        probe_mean=torch.zeros(k, d, dtype=torch.float64), probe_std=torch.ones(k, d, dtype=torch.float64),
        val_acc=torch.ones(k), fitted_on=model.fingerprint(),
    )
    return ScriptedFASB(heads, **{"strength": 8.0, "threshold": 0.6, "backtrack": 2, **kw})


@pytest.fixture(scope="module")
def live(model):
    app = widgets.LiveTrace(model, LIVE_PROMPT, scripted_fasb(model), max_new_tokens=LIVE_TOKENS, refresh=0)
    steered, unsteered = app.run(show=False)
    return app, steered, unsteered


def test_live_trace_rolls_back_and_strikes_through(live):
    app, g, _ = live
    assert app.generation is g and app.threshold == 0.6
    steps = g.trace.steps
    (rb,) = g.trace.rollbacks
    assert rb.detail["tokens"] == 2 and rb.step == 4  # the 4th token reads 0.2 < 0.6: back 2
    gone = [s for s in steps if s.discarded]
    assert [s.step for s in gone] == [2, 3]
    assert len(g.trace.kept) == LIVE_TOKENS and len(steps) == LIVE_TOKENS + 2

    page = app.steered_html.value
    assert page == widgets.trace_html(g, 0.6, None, app._title("steered"), False)  # the pure renderer
    assert page.count("class='sb-discarded'") == 2 and "<s " in page
    assert page.count("class='sb-token'") == LIVE_TOKENS
    assert "⟲ back 2" in page and html.escape(rb.detail["note"], quote=True) in page  # the note is the marker's tooltip
    # discarded tokens come first, then the marker, then the regenerated ones
    assert page.rindex("sb-discarded") < page.index("⟲ back 2") < page.rindex("sb-token")
    # every kept token is coloured by its score: 0.9 is on the blue side of the 0.6 threshold
    assert f"background:{widgets.score_colour(0.9, 0.6)}" in page and "sb-cursor" not in page


def test_live_trace_chart_has_a_point_per_observed_token_and_the_strength_jumps(live):
    app, g, _ = live
    score, strength = app.chart.data[0], app.chart.data[1]
    observed = [s for s in g.trace.steps if s.score is not None]
    assert len(observed) == len(g.trace.steps)  # FASB reads every token, discarded ones included
    assert list(score.x) == [s.step for s in observed] and list(score.y) == pytest.approx([s.score for s in observed])
    assert list(score.y)[3] == pytest.approx(0.2)
    assert list(strength.x) == [s.step for s in g.trace.steps]
    s = list(strength.y)
    assert s[:4] == [0.0] * 4  # unsteered until the rollback
    assert s[4:] == pytest.approx([8.0 * (1 - 0.2)] * (len(s) - 4))  # steered at alpha * (1 - p) after it
    shapes = app.chart.layout.shapes
    assert any(sh.yref == "y" and sh.y0 == 0.6 for sh in shapes)  # the threshold line
    assert any(sh.xref == "x" and sh.x0 == 3.5 for sh in shapes)  # the rollback
    assert any(a.text == "⟲ back 2" for a in app.chart.layout.annotations)
    assert app.n_events >= len(g.trace.steps) + 2 and app.n_redraws > app.n_events  # refresh=0: every event
    # what a view drawn after a page reload starts from: the chart as it is now, not empty
    assert list(app.chart._widget_data[0]["x"]) == list(score.x)
    assert any(a["text"] == "⟲ back 2" for a in app.chart._widget_layout["annotations"])


def test_live_trace_unsteered_side_is_plain_generate(live, model):
    app, _, unsteered = live
    plain = sb.generate(model, LIVE_PROMPT, max_new_tokens=LIVE_TOKENS)
    assert app.unsteered is unsteered and unsteered.tokens == plain.tokens and unsteered.text == plain.text
    assert not unsteered.trace.rollbacks and all(s.strength == 0 for s in unsteered.trace.steps)
    assert all(s.score is not None for s in unsteered.trace.steps)  # the monitor still reads P(true)
    assert "threshold=0" in unsteered.steer
    assert list(app.chart.data[2].y) == pytest.approx([s.score for s in unsteered.trace.steps])
    assert "unsteered" in app.unsteered_html.value and app.unsteered_html.value.count("class='sb-token'") == LIVE_TOKENS
    fig = app.figure()
    assert isinstance(fig, go.Figure) and "2 discarded in 1 rollback" in fig.layout.title.text


def test_live_trace_redraws_while_generating(model):
    app = widgets.LiveTrace(model, LIVE_PROMPT, scripted_fasb(model), max_new_tokens=3, compare=False, refresh=0)
    seen = []
    app.steered_html.observe(lambda change: seen.append(change["new"]), names="value")
    g = app.run(show=False)
    assert app.unsteered is None and app.generation is g
    assert any("sb-cursor" in v for v in seen)  # drawn while running
    counts = [v.count("class='sb-token'") for v in seen]
    assert counts == [1, 2, 3, 3]  # one token at a time, then the last token's score
    assert "sb-cursor" not in seen[-1] and seen[-1].count("P(true) 0.900") == 3


def test_live_trace_stops_where_generate_stops(model):
    app = widgets.LiveTrace(model, LIVE_PROMPT, None, max_new_tokens=8, stop="'s", refresh=1.0)
    g = app.run(show=False)
    plain = sb.generate(model, LIVE_PROMPT, max_new_tokens=8, stop="'s")
    assert not app.compare and app.threshold is None
    assert g.tokens == plain.tokens and g.text == plain.text and len(g.tokens) < 8
    assert f"answer (cut at the stop string):</b> {html.escape(plain.text.strip())}<" in app.steered_html.value
    assert app.steered_html.value.count("class='sb-token'") == len(g.tokens)


def test_trace_html_is_pure():
    steps = [TokenStep(0, 10, 5, " Yes", 0.0, False, 0.9), TokenStep(1, 11, 6, "<b>", 0.0, False, 0.2),
             TokenStep(2, 11, 7, " No", 3.0, True, 0.8), TokenStep(3, 12, 8, ".\n", 3.0, True, None),
             TokenStep(4, 13, 9, "Q", 3.0, True, None)]
    steps[1].discarded = True
    tr = Trace(steps, [TraceEvent(2, "strength", {"strength": 3.0}),
                       TraceEvent(2, "rollback", {"tokens": 1, "note": "P(true)=0.20 < 0.6: back 1"})])
    page = widgets.trace_html(tr, threshold=0.6, stop="\n", title="t")
    assert "&lt;b&gt;" in page and "<b>" not in page.replace("<b>answer", "")  # token text is escaped
    assert page.index("sb-discarded") < page.index("⟲ back 1") < page.index(" No")
    assert "title='P(true)=0.20 &lt; 0.6: back 1'" in page
    assert "opacity:0.4" in page.split("Q</span>")[0].rsplit("<span", 1)[1]  # past the stop: faded
    assert "border-bottom:2px solid #2ca02c" in page  # steered
    assert "<b>answer (cut at the stop string):</b> Yes No." in page
    assert "sb-cursor" in widgets.trace_html(tr, 0.6, running=True) and "sb-cursor" not in page
    curves = widgets.trace_curves(tr)
    assert curves["score_x"] == [0, 1, 2] and curves["strength"] == [0.0, 0.0, 3.0, 3.0, 3.0]
    assert curves["rollbacks"] == [(2, 1, "P(true)=0.20 < 0.6: back 1")]
    assert "waiting" in widgets.trace_html(Trace())


def test_score_colour_and_cut_answer():
    assert widgets.score_colour(0.6, 0.6) == "#f7f7f7"  # white at the threshold
    assert widgets.score_colour(0.0, 0.6) == "#ef8a62" and widgets.score_colour(1.0, 0.6) == "#67a9cf"
    assert widgets.score_colour(0.5) == "#f7f7f7" and widgets.score_colour(None) == "#ffffff"
    assert widgets.cut_answer(" No, it does not.\n\nQ: next") == "No, it does not."
    assert widgets.cut_answer("a\nb", stop=None) == "a\nb"


def test_compare_answers_table(monkeypatch):
    from steerbench import generation

    calls = []

    class Out:
        def __init__(self, text):
            self.text = text

    def fake_generate(model, prompt, steer=None, max_new_tokens=64, **kw):
        calls.append((prompt, steer, max_new_tokens))
        return Out(f" {prompt} by {steer}\nQ: more")

    monkeypatch.setattr(generation, "generate", fake_generate)
    df = widgets.compare_answers("M", {"q1": "p1", "q2": "p2"}, {"none": None, "ITI": "iti"}, max_new_tokens=5)
    assert list(df.columns) == ["none", "ITI"] and list(df.index) == ["q1", "q2"]
    assert df.loc["q2", "ITI"] == "p2 by iti" and len(calls) == 4 and calls[0] == ("p1", None, 5)
    # columns made already (LiveTrace's generations) are taken as they are, in the order of steers
    df = widgets.compare_answers("M", ["p1", "p2"], {"none": None, "ITI": "iti", "FASB": None},
                                 done={"none": [Out("a\nQ"), "b"], "FASB": [Out(" c"), Out("d")]})
    assert list(df.columns) == ["none", "ITI", "FASB"] and list(df.index) == ["p1", "p2"]
    assert df["none"].tolist() == ["a", "b"] and df["FASB"].tolist() == ["c", "d"] and len(calls) == 6
    with pytest.raises(ValueError, match="2 prompts"):
        widgets.compare_answers("M", ["p1", "p2"], {}, done={"none": ["a"]})
    # a long answer is shown whole (pandas would cut it at 50 characters), escaped
    long = "word " * 40 + "<end>"
    html = widgets.compare_answers("M", ["p1"], {}, done={"none": [long]})._repr_html_()
    assert "&lt;end&gt;" in html and "…" not in html and "pre-wrap" in html


def test_figure_widgets_share_one_front_end_bundle():
    """Each figure's _esm is a few lines (plotly's 5 MB bundle compiled per figure timed out on
    reload; tests/test_browser.py sees it in Chromium); the bundle travels as a trait and is
    plotly's own, unchanged."""
    a = widgets._figure_widget(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    b = widgets._figure_widget(go.Figure())
    assert isinstance(a, go.FigureWidget) and all(isinstance(f, widgets._figure_class()) for f in (a, b))
    assert len(a._esm) < 2_000 and "import(" in a._esm and "setTimeout" in a._esm
    assert a._bundle == str(go.FigureWidget._esm) and len(a._bundle) > 1_000_000
    assert "_bundle" in a.get_state() and a.get_state()["_esm"] == a._esm
    assert a.data[0].x == (1, 2)
