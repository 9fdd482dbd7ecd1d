"""Figures and PCA geometry on synthetic inputs (no language model is loaded)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from steerbench import geometry, plots, widgets
from steerbench.generation import Generation, TokenStep, Trace, TraceEvent
from steerbench.model import Prompt
from steerbench.probes import fit_probes


@pytest.fixture(scope="module")
def sweep_df() -> pd.DataFrame:
    rows = [
        {"layer": L, "multiplier": m, "win_rate": 0.5 + 0.02 * L * m, "letter": 0.5 + 0.01 * m,
         "margin": 0.3 * m, "n": 10}
        for L in (2, 5) for m in (-4.0, -1.0, 0.0, 1.0, 4.0)
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the figure must not rely on row order


@pytest.fixture(scope="module")
def planted():
    """Two classes separated along feature 0, 10 features, 40 examples."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 10))
    x[:, 0] += 4.0 * y
    return x, y


@pytest.fixture(scope="module")
def head_grid_fit():
    rng = np.random.default_rng(1)
    y = np.arange(40) % 2
    acts = torch.tensor(rng.normal(size=(40, 2, 3, 4)), dtype=torch.float32)
    acts[:, 1, 2, 0] += 3.0 * torch.tensor(y, dtype=torch.float32)
    return fit_probes(acts, y), acts, y


def make_generation(scores: bool = True) -> Generation:
    """Six tokens; the 4th and 5th are discarded by a rollback and regenerated as the 6th and 7th."""
    texts = [" The", " cat", " is", " very", " bad", " kind", "."]
    gone = [False, False, False, True, True, False, False]
    steps = [
        TokenStep(step=i, position=3 + i, token_id=100 + i, text=t, strength=0.0 if i < 2 else 4.0,
                  steered=i >= 2, score=(0.9 - 0.1 * i) if scores else None, discarded=d)
        for i, (t, d) in enumerate(zip(texts, gone))
    ]
    trace = Trace(steps=steps, events=[TraceEvent(5, "rollback", {"tokens": 2, "text": " very bad"})])
    return Generation(prompt=Prompt(ids=[1, 2, 3], steer_from=2), tokens=[100, 101, 102, 105, 106],
                      text="The cat is kind.", trace=trace)


# -------------------------------------------------------------------------------------
# geometry


def test_pca_projection_planted_separation(planted):
    x, y = planted
    gap = x[y == 1].mean(0) - x[y == 0].mean(0)
    proj = geometry.pca_projection(torch.tensor(x), y, direction=torch.tensor(gap))
    assert proj.coords.shape == (40, 2) and proj.explained.shape == (2,)
    assert proj.separation() == pytest.approx(1.0, abs=0.02)
    assert geometry.pca_projection(x, y, direction=-gap).separation() == pytest.approx(-1.0, abs=0.02)
    # the arrow is scaled to the data, its direction kept
    assert np.linalg.norm(proj.direction) == pytest.approx(0.8 * np.abs(proj.coords).max())
    # PCs are oriented so that class 1 lies on the positive side of PC1
    assert proj.coords[y == 1, 0].mean() > proj.coords[y == 0, 0].mean()
    assert 0.5 < proj.direction_share <= 1.0 + 1e-9


def test_pca_projection_without_direction(planted):
    x, y = planted
    proj = geometry.pca_projection(x, y)
    assert proj.direction is None and math.isnan(proj.separation())
    assert proj.texts == [f"example {i}" for i in range(40)]
    assert proj.label_names == ("negative", "positive")


@pytest.mark.parametrize(
    "acts, labels, kwargs, match",
    [
        (np.ones((2, 4)), [0, 1], {}, "at least 3 examples"),
        (np.random.default_rng(0).normal(size=(5, 1)), [0, 1, 0, 1, 0], {}, "at least 2 features"),
        (np.random.default_rng(0).normal(size=(5, 3)), [0, 1, 0], {}, "3 labels for 5 examples"),
        (np.random.default_rng(0).normal(size=(5, 3)), [0, 1, 2, 0, 1], {}, "binary"),
        (np.random.default_rng(0).normal(size=(5, 3)), [0, 1, 0, 1, 0], {"texts": ["a"]}, "1 texts for 5"),
        (np.random.default_rng(0).normal(size=(5, 3)), [0, 1, 0, 1, 0], {"direction": np.ones(4)}, "d=3"),
        (np.random.default_rng(0).normal(size=(5, 3)), [0, 1, 0, 1, 0], {"direction": np.zeros(3)}, "zero vector"),
        (np.random.default_rng(0).normal(size=(5, 3, 2)), [0, 1, 0, 1, 0], {}, "pca_by_layer"),
        (np.ones((5, 3)), [0, 1, 0, 1, 0], {}, "no variance"),
    ],
)
def test_pca_projection_validation(acts, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        geometry.pca_projection(acts, labels, **kwargs)


def test_pca_projection_rejects_nan(planted):
    x, y = planted
    x = x.copy()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 of 40"):
        geometry.pca_projection(x, y)


def test_pca_by_layer_tensor_and_dict(planted):
    x, y = planted
    acts = torch.tensor(np.stack([x, x[:, ::-1].copy(), 2 * x], axis=1))  # [N, 3, d]
    dirs = torch.zeros(3, 10)
    dirs[:, 0] = 1.0
    out = geometry.pca_by_layer(acts, y, directions=dirs, title="tone")
    assert sorted(out) == [0, 1, 2]
    assert out[1].title == "tone — layer 1"
    assert out[2].separation() == pytest.approx(1.0, abs=0.05)
    sub = geometry.pca_by_layer({4: x, 9: 2 * x}, y, directions={4: dirs[0], 9: dirs[0]}, layers=[9])
    assert list(sub) == [9] and sub[9].title == "layer 9"
    with pytest.raises(ValueError, match="not in acts"):
        geometry.pca_by_layer({4: x}, y, layers=[5])
    with pytest.raises(ValueError, match=r"\[N, n_layers, d\]"):
        geometry.pca_by_layer(torch.zeros(4, 3), y[:4])


# -------------------------------------------------------------------------------------
# sweep and probe heatmaps


def test_sweep_heatmap_values_and_labels(sweep_df):
    fig = plots.sweep_heatmap(sweep_df)
    assert isinstance(fig, go.Figure)
    (heat,) = fig.data
    assert heat.type == "heatmap"
    expected = sweep_df.pivot(index="layer", columns="multiplier", values="win_rate").sort_index()
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), expected.to_numpy())
    assert list(heat.x) == ["-4", "-1", "0", "1", "4"] and list(heat.y) == ["2", "5"]
    assert heat.zmid == 0.5 and "%{z" in heat.hovertemplate
    assert fig.layout.xaxis.title.text == "steering multiplier m"
    assert fig.layout.yaxis.title.text == "steered layer"
    assert fig.layout.title.text and fig.layout.template.layout.paper_bgcolor == "white"

    margin = plots.sweep_heatmap(sweep_df, metric="margin")
    assert margin.data[0].zmid == 0 and margin.data[0].zmin == -margin.data[0].zmax


def test_sweep_heatmap_errors(sweep_df):
    with pytest.raises(ValueError, match="metric must be one of"):
        plots.sweep_heatmap(sweep_df, metric="accuracy")
    with pytest.raises(ValueError, match="no column"):
        plots.sweep_heatmap(sweep_df.drop(columns="letter"), metric="letter")
    with pytest.raises(ValueError, match="several rows for layer"):
        plots.sweep_heatmap(pd.concat([sweep_df, sweep_df]))


def test_head_grid(head_grid_fit):
    grid, _, _ = head_grid_fit
    fig = plots.head_grid(grid)
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), grid.val_acc.numpy())
    custom = np.asarray(heat.customdata)
    assert custom.shape == (2, 3, 5)
    assert custom[1, 2, 0] == 1 and custom[1, 2, 1] == 2
    np.testing.assert_allclose(custom[..., 4], grid.val_auc.numpy())
    assert "val_acc" in heat.hovertemplate and "val_auc" in heat.hovertemplate and "head" in heat.hovertemplate
    assert fig.layout.xaxis.title.text == "attention head" and fig.layout.yaxis.title.text == "layer"
    auc = plots.head_grid(grid, metric="val_auc")
    np.testing.assert_allclose(np.asarray(auc.data[0].z, dtype=float), grid.val_auc.numpy())
    with pytest.raises(ValueError, match="metric must be one of"):
        plots.head_grid(grid, metric="mass_mean")


def test_head_grid_needs_two_site_dims():
    rng = np.random.default_rng(2)
    y = np.arange(20) % 2
    per_layer = fit_probes(torch.tensor(rng.normal(size=(20, 2, 3)), dtype=torch.float32), y)
    with pytest.raises(ValueError, match="2 site dims"):
        plots.head_grid(per_layer)


# -------------------------------------------------------------------------------------
# PCA scatter


def test_pca_scatter_with_direction(planted):
    x, y = planted
    texts = [f"sentence {i} <with> a tag" + " and more words" * (8 if i == 0 else 0) for i in range(40)]
    gap = x[y == 1].mean(0) - x[y == 0].mean(0)
    proj = geometry.pca_projection(x, y, texts, direction=gap, label_names=("sad", "happy"), title="layer 3")
    fig = plots.pca_scatter(proj)
    neg, pos = fig.data[0], fig.data[1]
    assert (neg.name, pos.name) == ("sad", "happy")
    assert len(neg.x) == len(pos.x) == 20
    i = int(pos.customdata[1])  # customdata holds each point's example index
    assert y[i] == 1 and f"sentence {i} &lt;with&gt; a tag" in pos.hovertext[1]
    long = neg.hovertext[0]
    assert "<br>" in long and long.endswith("…") and len(long.replace("<br>", "")) <= 90
    assert fig.layout.xaxis.title.text.startswith("PC1 (") and "% of variance)" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text.startswith("PC2 (")
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert len(arrows) == 1
    assert (arrows[0].ax, arrows[0].ay) == (0, 0)
    assert (arrows[0].x, arrows[0].y) == pytest.approx(tuple(proj.direction))
    assert "layer 3" in fig.layout.title.text and "cos(direction" in fig.layout.title.text


def test_pca_scatter_without_direction(planted):
    x, y = planted
    fig = plots.pca_scatter(geometry.pca_projection(x, y))
    assert not [a for a in fig.layout.annotations if a.showarrow]
    assert (fig.data[0].name, fig.data[1].name) == ("negative", "positive")


# -------------------------------------------------------------------------------------
# generation trace


def _token_trace(fig: go.Figure):
    return next(t for t in fig.data if t.name == "tokens")


def test_trace_shows_discarded_tokens_and_threshold():
    gen = make_generation()
    fig = plots.trace(gen, threshold=0.5)
    tokens = _token_trace(fig)
    assert len(tokens.text) == 7  # discarded tokens stay, in production order
    assert tokens.text[3] == "<s> very</s>" and tokens.text[4] == "<s> bad</s>"
    assert tokens.text[5] == " kind"
    assert "discarded by a rollback" in tokens.hovertext[3] and "discarded" not in tokens.hovertext[5]
    colour = fig.data[0]
    assert colour.type == "heatmap"
    z = np.asarray(colour.z, dtype=float)
    assert z[0, 0] == pytest.approx(0.9) and np.isnan(z[0, 3])  # coloured by score; discarded cells grey
    assert np.asarray(fig.data[1].z, dtype=float)[0, 3] == 1.0
    steered = next(t for t in fig.data if t.name == "steered token")
    assert list(steered.x) == [2, 3, 4, 5, 6]
    names = {t.name for t in fig.data}
    assert {"strength", "score", "threshold 0.5"} <= names
    threshold = next(t for t in fig.data if t.name == "threshold 0.5")
    assert set(threshold.y) == {0.5}
    assert any("rollback 2" in (a.text or "") for a in fig.layout.annotations)
    # white sits at the threshold (zmid would be ignored with zmin/zmax set)
    assert (colour.zmin, colour.zmax) == (0.0, 1.0) and colour.colorscale[1][0] == pytest.approx(0.5)
    at6 = plots.trace(gen, threshold=0.6).data[0]
    assert at6.colorscale[1][0] == pytest.approx(0.6) and at6.colorscale[1][1] == "#f7f7f7"
    assert widgets.score_colour(0.6, threshold=0.6) == "#f7f7f7"  # the live widget agrees
    assert "2 discarded in 1 rollback" in fig.layout.title.text and "The cat is kind." in fig.layout.title.text


def test_trace_without_scores_colours_by_strength():
    fig = plots.trace(make_generation(scores=False), threshold=0.5, per_row=4)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 4)
    assert z[0, 2] == 4.0 and z[0, 0] == 0.0
    assert fig.data[0].colorscale[1][0] == pytest.approx(0.5)  # white at strength 0, mid-scale
    names = {t.name for t in fig.data}
    assert "score" not in names and "threshold 0.5" not in names
    assert "steering strength" in fig.layout.yaxis2.title.text


def test_trace_errors():
    gen = make_generation()
    gen.trace = Trace()
    with pytest.raises(ValueError, match="no trace steps"):
        plots.trace(gen)


# -------------------------------------------------------------------------------------
# export


def test_save_html(tmp_path, sweep_df):
    path = plots.save_html(plots.sweep_heatmap(sweep_df), tmp_path / "figs" / "sweep.html")
    assert path == tmp_path / "figs" / "sweep.html" and path.exists()
    page = path.read_text()
    assert "plotly" in page and "<html" in page and "Answer-likelihood" in page
    # plotly.js is inlined (megabytes), not loaded from a CDN: the page works offline
    assert len(page) > 1_000_000 and 'src="http' not in page


def test_plots_and_widgets_are_reachable_as_the_readme_writes_them():
    import steerbench as sb

    assert callable(sb.plots.trace) and callable(sb.plots.strength_map) and sb.widgets.LiveTrace
    with pytest.raises(AttributeError, match="no attribute"):
        sb.no_such_module  # noqa: B018


def _answer_tokens():
    """Two answers (one true of 3 tokens, one false of 4) with 1 head of width 2."""
    from steerbench.datasets import MCQuestion
    from steerbench.steering.readouts import AnswerTokens

    q = MCQuestion("Is the sky green?", "No", ["No"], ["Yes"])
    answer = np.array([0, 0, 0, 1, 1, 1, 1])
    return AnswerTokens(torch.randn(7, 1, 2), answer == 0, torch.tensor([0, 1, 2, 0, 1, 2, 3]), answer,
                        torch.tensor([[0, 0]]), [q], ["No", ",", " never", "Yes", ",", " it", " is"])


class _ByPosition:
    """A readout stand-in: P(true) falls with the position."""

    threshold = 0.5

    def p_true(self, z, pos):
        return 1.0 - pos.double() / 4


def test_readout_figures_draw_each_readout_with_its_threshold():
    from steerbench.steering.readouts import decision_table

    tok = _answer_tokens()
    fig = plots.readout_along({"a": _ByPosition(), "b": _ByPosition()}, tok, [0, 1])
    assert [t.name for t in fig.data] == ["a", "b", "a", "b"] and [len(t.y) for t in fig.data] == [3, 3, 4, 4]
    assert list(fig.data[2].y) == [1.0, 0.75, 0.5, 0.25] and fig.layout.xaxis2.ticktext[-1] == " is"
    assert len([s for s in fig.layout.shapes if s.y0 == 0.5]) == 4  # each readout's threshold in each panel
    table = decision_table(_ByPosition().p_true(tok.z, tok.pos), tok, 0.5)
    assert table["flag_true"] == 0.0 and table["flag_false"] == 1.0 and table["median_first_flag"] == 3.0
    fig = plots.readout_auc({"a": table})
    assert list(fig.data[0].x) == ["0", "1", "3", "9", "last"] and "flags 100% of false" in fig.data[0].name
    with pytest.raises(ValueError, match="at least one"):
        plots.readout_along({}, tok, [0])


def test_direction_accuracy_varies_where_the_classes_do_and_keeps_pairs_together():
    rng = np.random.default_rng(0)
    n, d = 40, 8
    y = np.array([1] * n + [0] * n)
    x = rng.normal(size=(2 * n, 2, d))
    x[y == 1, 1, 0] += 4.0  # layer 1 separates the classes along one axis; layer 0 does not
    acc = geometry.direction_accuracy(x, y, groups=[i % n for i in range(2 * n)])
    assert acc.shape == (2,) and acc[1] > 0.95 and 0.3 < acc[0] < 0.7
    proj = geometry.pca_projection(x[:, 1], y, direction=np.eye(d)[0])
    assert abs(proj.pc1_cosine) > 0.9  # the class gap dominates the variance: PC1 is the direction
    with pytest.raises(ValueError, match="one group per example"):
        geometry.direction_accuracy(x, y, groups=[0, 1])
    with pytest.raises(ValueError, match="NaN"):
        geometry.direction_accuracy(np.full((4, 2), np.nan), [0, 1, 0, 1], folds=2)
    fig = plots.by_layer({"accuracy": acc})
    assert list(fig.data[0].y) == list(acc)


def test_figures_fill_their_container_instead_of_a_fixed_width(sweep_df, planted, tmp_path):
    x, y = planted
    figs = [plots.ab_sweep(sweep_df), plots.sweep_heatmap(sweep_df),
            plots.pca_scatter(geometry.pca_projection(x, y, direction=np.eye(10)[0])), plots.by_layer({"a": [0.5]})]
    for fig in figs:
        assert fig.layout.width is None, fig.layout.title.text
    page = plots.save_html(figs[0], tmp_path / "f.html").read_text()
    assert '"responsive": true' in page and "width:100%" in page.replace(" ", "")
