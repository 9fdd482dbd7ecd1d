"""Plotly figures. Every function returns a ``go.Figure`` and never shows it."""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from steerbench.generation import Generation
    from steerbench.geometry import PCAProjection
    from steerbench.probes import ProbeGrid

_READOUTS = {
    "win_rate": ("Answer-likelihood readout", "matching answer likelier (share of items)"),
    "letter": ("Letter readout (CAA reference)", "P(matching letter) / (P(A) + P(B))"),
    "margin": ("Answer-likelihood margin", "log p(matching) - log p(other), nats"),
}


def ab_sweep(df, metrics: Sequence[str] = ("win_rate", "letter"), title: str = "A/B score against multiplier") -> go.Figure:
    """Lines of each A/B readout against the multiplier, one line per steered layer.

    ``df`` is the tidy table from ``evaluation.ab_sweep`` (columns layer, multiplier, unit
    and the readouts; the x axis names the unit). A flat line at 0.5 on the letter readout means the model does not
    read the A/B choice at all.
    """
    metrics = [m for m in metrics if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise ValueError("the table has none of the requested readouts")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_READOUTS[m][0] for m in metrics])
    layers = sorted(df.layer.unique())
    # what the multiplier counts (CAA: m x v[L], or s x the mean residual norm at L)
    unit = df["unit"].iloc[0] if "unit" in df.columns else "multiplier m"
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for col, metric in enumerate(metrics, start=1):
        for k, layer in enumerate(layers):
            part = df[df.layer == layer].sort_values("multiplier")
            fig.add_trace(
                go.Scatter(
                    x=part.multiplier, y=part[metric], mode="lines+markers", name=f"layer {layer}",
                    legendgroup=str(layer), showlegend=col == 1, line={"color": palette[k % len(palette)]},
                    hovertemplate=f"layer {layer}<br>multiplier %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>",
                ),
                row=1, col=col,
            )
        if metric in ("win_rate", "letter"):
            fig.add_hline(y=0.5, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text=f"steering strength: {unit}", row=1, col=col)
        fig.update_yaxes(title_text=_READOUTS[metric][1], row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", legend_title_text="steered layer",
                      height=420, autosize=True)
    return fig


def vector_norms(vectors, title: str = "Steering vector norm by layer") -> go.Figure:
    """The norm of a per-layer steering vector (e.g. ``CAA.vectors``) against the layer."""
    norms = vectors.norm(dim=-1).tolist()
    fig = go.Figure(go.Bar(x=list(range(len(norms))), y=norms,
                           hovertemplate="layer %{x}<br>norm %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="layer",
                      yaxis_title="L2 norm of v[L] (residual-stream units)", height=360)
    return fig


# -------------------------------------------------------------------------------------
# sweeps and probes as heatmaps

# light diverging scale: black text stays readable on every cell
_DIVERGING = [[0.0, "#b2182b"], [0.25, "#ef8a62"], [0.5, "#f7f7f7"], [0.75, "#67a9cf"], [1.0, "#2166ac"]]
_LIGHT_DIVERGING = [[0.0, "#ef8a62"], [0.5, "#f7f7f7"], [1.0, "#67a9cf"]]


def diverging_at(white: float) -> list:
    """``_LIGHT_DIVERGING`` with its white stop moved to ``white`` (a fraction of the scale)."""
    (_, low), (_, mid), (_, high) = _LIGHT_DIVERGING
    w = min(max(float(white), 1e-6), 1 - 1e-6)
    return [[0.0, low], [w, mid], [1.0, high]]


_COLORBAR = {
    "win_rate": "share of items<br>where the matching<br>answer is likelier",
    "letter": "P(matching letter)<br>/ (P(A) + P(B))",
    "margin": "log p(matching)<br>− log p(other)<br>(nats)",
}


def sweep_heatmap(df, metric: str = "win_rate", title: str | None = None) -> go.Figure:
    """One A/B readout over the layer x multiplier grid of ``evaluation.ab_sweep``.

    Each cell is one (steered layer, multiplier) setting. Blue cells push the model towards
    the behaviour's matching answer, red cells away from it, white is no preference (0.5 for
    win_rate and letter, 0 nats for margin). Multipliers are evenly spaced columns whatever
    their values.
    """
    if metric not in _READOUTS:
        raise ValueError(f"metric must be one of {list(_READOUTS)}, got {metric!r}")
    missing = [c for c in ("layer", "multiplier", metric) if c not in df.columns]
    if missing:
        raise ValueError(
            f"the table has no column(s) {missing}; pass the DataFrame from evaluation.ab_sweep, "
            f"scored with readouts that include {metric!r}"
        )
    if df[metric].isna().all():
        raise ValueError(f"every {metric} value in the table is missing; score the sweep with readouts including {metric!r}")
    dup = df.duplicated(["layer", "multiplier"])
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(
            f"the table has several rows for layer {first.layer}, multiplier {first.multiplier}; "
            "keep one run per setting (e.g. average them with df.groupby(['layer', 'multiplier']).mean())"
        )
    table = df.pivot(index="layer", columns="multiplier", values=metric).sort_index().sort_index(axis=1)
    z = table.to_numpy(dtype=float)
    if metric == "margin":
        bound = float(np.nanmax(np.abs(z))) or 1.0
        scale = {"zmid": 0.0, "zmin": -bound, "zmax": bound}
    else:
        scale = {"zmid": 0.5, "zmin": 0.0, "zmax": 1.0}
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"{m:g}" for m in table.columns], y=[str(L) for L in table.index],
            colorscale=_DIVERGING, **scale, texttemplate="%{z:.2f}", xgap=1, ygap=1,
            colorbar={"title": {"text": _COLORBAR[metric], "side": "top"}},
            hovertemplate=f"layer %{{y}}<br>multiplier %{{x}}<br>{metric} %{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{_READOUTS[metric][0]} by layer and multiplier", template="plotly_white",
        xaxis={"title": "steering multiplier m", "type": "category"},
        yaxis={"title": "steered layer", "type": "category"},
        height=max(380, 36 * len(table.index) + 180), autosize=True,
    )
    return fig


_PROBE_METRICS = {
    "val_acc": ("Probe validation accuracy", "validation<br>accuracy<br>(chance 0.5)"),
    "val_auc": ("Probe validation ROC AUC", "validation<br>ROC AUC<br>(chance 0.5)"),
    "train_acc": ("Probe training accuracy", "training<br>accuracy<br>(chance 0.5)"),
}


def head_grid(grid: ProbeGrid, metric: str = "val_acc", title: str | None = None) -> go.Figure:
    """A probe metric for every attention head: layer (rows) x head (columns).

    ``grid`` is a ProbeGrid fitted on per-head activations [N, n_layers, n_heads, d_head].
    Bright cells are heads whose output linearly separates the two classes; 0.5 is chance.
    Each cell's ``customdata`` is (layer, head, train_acc, val_acc, val_auc), so a click
    handler can read the head from ``customdata[:2]``.
    """
    if len(grid.sites_shape) != 2:
        raise ValueError(
            f"head_grid needs a ProbeGrid with 2 site dims (layer, head), fitted on [N, layers, heads, d_head] "
            f"activations; got sites_shape {grid.sites_shape}. For one probe per layer plot grid.val_acc as a line"
        )
    if metric not in _PROBE_METRICS:
        raise ValueError(f"metric must be one of {list(_PROBE_METRICS)}, got {metric!r}")
    n_layers, n_heads = grid.sites_shape
    vals = {k: getattr(grid, k).detach().cpu().double().numpy() for k in _PROBE_METRICS}
    z = vals[metric]
    layer_idx, head_idx = np.indices((n_layers, n_heads))
    custom = np.stack([layer_idx, head_idx, vals["train_acc"], vals["val_acc"], vals["val_auc"]], axis=-1)
    lowest = float(np.nanmin(z)) if np.isfinite(z).any() else 0.5
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=custom,
            colorscale="Viridis", zmin=min(0.5, lowest), zmax=1.0, xgap=1, ygap=1,
            colorbar={"title": {"text": _PROBE_METRICS[metric][1], "side": "top"}},
            hovertemplate=(
                "layer %{customdata[0]}, head %{customdata[1]}<br>val_acc %{customdata[3]:.3f}"
                "<br>val_auc %{customdata[4]:.3f}<br>train_acc %{customdata[2]:.3f}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title=title or f"{_PROBE_METRICS[metric][0]} per attention head", template="plotly_white",
        xaxis={"title": "attention head", "dtick": 1 if n_heads <= 32 else None, "showgrid": False},
        yaxis={"title": "layer", "dtick": 1 if n_layers <= 40 else None, "showgrid": False},
        height=max(380, 22 * n_layers + 180), autosize=True,
    )
    return fig


def head_sweep_grid(sweep, alpha: float | None = None, title: str | None = None) -> go.Figure:
    """A head sweep (``truthfulqa.head_sweep``) as two layer x head grids side by side: each
    head's probe validation accuracy (what ITI ranks heads by) and the change in MC2 when
    that head alone is steered at ``alpha`` (default: the largest swept). Heads missing
    from the sweep are blank. Each cell's ``customdata`` is (layer, head)."""
    if len(sweep) == 0:
        raise ValueError("the sweep is empty")
    alphas = sorted(sweep["alpha"].unique())
    alpha = alphas[-1] if alpha is None else float(alpha)
    at = sweep[sweep["alpha"] == alpha]
    if at.empty:
        raise ValueError(f"the sweep has no alpha {alpha:g}; it has {', '.join(f'{a:g}' for a in alphas)}")
    n_layers, n_heads = int(sweep["layer"].max()) + 1, int(sweep["head"].max()) + 1
    acc, delta = np.full((n_layers, n_heads), np.nan), np.full((n_layers, n_heads), np.nan)
    acc[sweep["layer"], sweep["head"]] = sweep["probe_val_acc"]
    delta[at["layer"], at["head"]] = at["d_mc2"]
    custom = np.moveaxis(np.indices((n_layers, n_heads)), 0, -1)  # [layers, heads, (layer, head)]
    bound = max(float(np.nanmax(np.abs(delta))), 1e-6)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "probe validation accuracy", f"MC2 change, that head alone steered at alpha {alpha:g}"))
    hover = "layer %{customdata[0]}, head %{customdata[1]}<br>%{z:.3f}<extra></extra>"
    fig.add_trace(go.Heatmap(z=acc, customdata=custom, colorscale="Viridis", zmin=0.5, zmax=1.0, xgap=1, ygap=1,
                             hovertemplate=hover, colorbar={"x": 0.44, "len": 0.9, "thickness": 12}), row=1, col=1)
    fig.add_trace(go.Heatmap(z=delta, customdata=custom, colorscale=_DIVERGING, zmid=0.0, zmin=-bound, zmax=bound,
                             xgap=1, ygap=1, hovertemplate=hover, colorbar={"x": 1.0, "len": 0.9, "thickness": 12}),
                  row=1, col=2)
    base = sweep.attrs.get("unsteered", {}).get("mc2")
    sub = f" (unsteered MC2 {base:.3f}, {sweep.attrs.get('n_questions', '?')} validation questions)" if base else ""
    fig.update_layout(title=title or f"Steering one head at a time{sub}", template="plotly_white",
                      height=max(420, 22 * n_layers + 200), autosize=True)
    fig.update_xaxes(title_text="attention head", showgrid=False)
    fig.update_yaxes(title_text="layer", showgrid=False)
    return fig


def head_curve(curve, title: str | None = None) -> go.Figure:
    """MC2 change against alpha for one head (rows of a head sweep for one head)."""
    if len(curve) == 0:
        raise ValueError("no rows to draw")
    c = curve.sort_values("alpha")
    layer, head = int(c["layer"].iloc[0]), int(c["head"].iloc[0])
    fig = go.Figure(go.Scatter(x=c["alpha"], y=c["d_mc2"], mode="lines+markers", name=f"L{layer}H{head}",
                               hovertemplate="alpha %{x:g}: MC2 %{y:+.3f}<extra></extra>"))
    fig.add_hline(y=0.0, line={"color": "grey", "dash": "dash"})
    fig.update_layout(title=title or f"Layer {layer}, head {head}: MC2 change against alpha", xaxis_title="alpha",
                      yaxis_title="MC2 change", template="plotly_white", height=360, autosize=True)
    return fig


def sadi_contrast(sadi, title: str | None = None) -> go.Figure:
    """SADI's contrast D = mean(true - false) for every element: layer (rows) x element
    (columns), blue where true answers activate the element more, red where false ones do.
    The K elements SADI scales (the largest positive values) are ringed. ``sadi`` is a
    fitted :class:`~steerbench.steering.sadi.SADI`."""
    d = sadi.scores.detach().cpu().double().numpy()
    n_layers, n_units = d.shape
    bound = float(np.abs(d).max()) or 1.0
    unit = {"head": "attention head", "neuron": "MLP neuron", "hidden": "MLP output dimension"}[sadi.elements]
    fig = go.Figure(
        go.Heatmap(
            z=d, x=list(range(n_units)), y=list(range(n_layers)), colorscale=_DIVERGING, zmid=0.0, zmin=-bound,
            zmax=bound, xgap=1 if n_units <= 64 else 0, ygap=1,
            colorbar={"title": {"text": "mean(true − false)", "side": "top"}},
            hovertemplate=f"layer %{{y}}, {unit} %{{x}}<br>D %{{z:.4f}}<extra></extra>",
        )
    )
    picked = sadi.selected()
    if picked:
        fig.add_trace(go.Scatter(
            x=[u for _, u in picked], y=[L for L, _ in picked], mode="markers", name=f"scaled (top {len(picked)})",
            marker={"symbol": "circle-open", "size": 14 if n_units <= 64 else 9, "color": "black", "line": {"width": 2}},
            hovertemplate=f"layer %{{y}}, {unit} %{{x}}: scaled by 1 + delta<extra></extra>",
        ))
    fig.update_layout(
        title=title or f"SADI-{sadi.elements.upper()}: which elements true answers activate more", template="plotly_white",
        xaxis={"title": unit, "dtick": 1 if n_units <= 32 else None, "showgrid": False},
        yaxis={"title": "layer", "dtick": 1 if n_layers <= 40 else None, "showgrid": False},
        height=max(380, 22 * n_layers + 180), autosize=True,
        legend={"orientation": "h", "y": -0.15},
    )
    return fig


def relevance_grids(relevance, k: int = 16, scorer: str | None = None, title: str | None = None) -> go.Figure:
    """REAL's relevance of every head next to ITI's probe validation accuracy, as two
    layer x head grids, each method's top ``k`` heads ringed (black: in both top-k, white:
    in one only). ``relevance`` is a fitted :class:`~steerbench.steering.real.HeadRelevance`;
    the title gives the top-k overlap and the Spearman correlation over all heads."""
    scorer = relevance.resolve_scorer(scorer)
    rel = relevance.relevance[scorer].detach().cpu().double().numpy()
    acc = relevance.probes.grid.val_acc.detach().cpu().double().numpy()
    n_layers, n_heads = rel.shape
    tops = {"real": relevance.ranking(scorer)[:k], "iti": relevance.probes.ranking()[:k]}
    both = set(tops["real"]) & set(tops["iti"])
    names = {"real": f"REAL relevance (validation ROC-AUC, {scorer} scorer)", "iti": "ITI probe validation accuracy"}
    fig = make_subplots(rows=1, cols=2, subplot_titles=[names["real"], names["iti"]], horizontal_spacing=0.12)
    for col, (key, z) in enumerate((("real", rel), ("iti", acc)), start=1):
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis", xgap=1, ygap=1,
            zmin=min(0.5, float(np.nanmin(z))), zmax=float(np.nanmax(z)),
            colorbar={"x": 0.44 if col == 1 else 1.0, "len": 0.9, "thickness": 12},
            hovertemplate=f"layer %{{y}}, head %{{x}}<br>{names[key].split(' (')[0]} %{{z:.3f}}<extra></extra>",
        ), row=1, col=col)
        for shared, color in ((True, "black"), (False, "white")):
            pts = [(L, h) for L, h in tops[key] if ((L, h) in both) == shared]
            if pts:
                fig.add_trace(go.Scatter(
                    x=[h for _, h in pts], y=[L for L, _ in pts], mode="markers", showlegend=col == 1,
                    name=f"in both top {k}" if shared else f"in one top {k} only", legendgroup=str(shared),
                    marker={"symbol": "circle-open", "size": 13, "color": color, "line": {"width": 2}},
                    hovertemplate="layer %{y}, head %{x}<extra></extra>",
                ), row=1, col=col)
        fig.update_xaxes(title_text="attention head", dtick=1 if n_heads <= 32 else None, showgrid=False, row=1, col=col)
        fig.update_yaxes(title_text="layer" if col == 1 else None, dtick=1 if n_layers <= 40 else None,
                         showgrid=False, row=1, col=col)
    fig.update_layout(
        title=title or (f"Which heads to steer: top-{k} overlap {len(both)}/{k}, Spearman "
                        f"{relevance.rank_correlation(scorer):+.2f} over all {rel.size} heads"),
        template="plotly_white", height=max(420, 22 * n_layers + 200), autosize=True,
        legend={"orientation": "h", "y": -0.12},
    )
    return fig


# -------------------------------------------------------------------------------------
# PCA views


_CLASS_COLORS = ("#1f77b4", "#ff7f0e")
_ARROW_COLOR = "#2ca02c"


def _hover_text(text: str, limit: int = 80, width: int = 40) -> str:
    """One example's text for a hover label: whitespace collapsed, cut at ``limit``, wrapped, escaped."""
    t = " ".join(str(text).split())
    if len(t) > limit:
        t = t[: limit - 1].rstrip() + "…"
    return "<br>".join(html.escape(line) for line in textwrap.wrap(t, width) or [""])


def pca_scatter(proj: PCAProjection, title: str | None = None) -> go.Figure:
    """Examples on their first two principal components, one colour per class, with the steering direction.

    Hover a point to read its example. The crosses are the class means; the arrow from the
    origin (the mean of all examples) is the steering direction's component in this plane,
    scaled to the data. The axes share one scale, so angles are true: an arrow parallel to the
    line between the means points from one class to the other (``proj.separation()`` is that
    cosine). Under the title: the direction's cosine with PC1 and its share in the plane.
    """
    fig = go.Figure()
    for k in (0, 1):
        idx = np.flatnonzero(proj.labels == k)
        fig.add_trace(
            go.Scatter(
                x=proj.coords[idx, 0], y=proj.coords[idx, 1], mode="markers", name=proj.label_names[k],
                customdata=idx, hovertext=[_hover_text(proj.texts[i]) for i in idx],
                marker={"color": _CLASS_COLORS[k], "size": 8, "opacity": 0.75, "line": {"width": 0.5, "color": "white"}},
                hovertemplate="%{hovertext}<br>PC1 %{x:.2f}, PC2 %{y:.2f}<extra>%{fullData.name}</extra>",
            )
        )
    means = proj.class_means()
    fig.add_trace(
        go.Scatter(
            x=[None if math.isnan(v) else v for v in means[:, 0]],
            y=[None if math.isnan(v) else v for v in means[:, 1]],
            mode="markers", name="class means", hovertext=[f"mean of {html.escape(n)}" for n in proj.label_names],
            marker={"symbol": "x-thin", "size": 16, "line": {"width": 3, "color": list(_CLASS_COLORS)}},
            hovertemplate="%{hovertext}<br>PC1 %{x:.2f}, PC2 %{y:.2f}<extra></extra>",
        )
    )
    subtitle = ""
    annotations: list[dict] = []
    if proj.direction is not None:
        dx, dy = (float(v) for v in proj.direction)
        if dx == 0 and dy == 0:
            annotations.append({
                "xref": "paper", "yref": "paper", "x": 0.01, "y": 0.99, "showarrow": False, "align": "left",
                "text": "the steering direction is orthogonal to this plane", "font": {"color": _ARROW_COLOR},
            })
        else:
            annotations.append({
                "x": dx, "y": dy, "ax": 0, "ay": 0, "xref": "x", "yref": "y", "axref": "x", "ayref": "y",
                "text": "", "showarrow": True, "arrowhead": 2, "arrowsize": 1.2, "arrowwidth": 2.5,
                "arrowcolor": _ARROW_COLOR,
            })
            annotations.append({
                "x": dx, "y": dy, "xref": "x", "yref": "y", "text": "steering direction", "showarrow": False,
                "xanchor": "left" if dx >= 0 else "right", "yanchor": "bottom" if dy >= 0 else "top",
                "font": {"color": _ARROW_COLOR},
            })
        # (not the cosine with the class-mean gap: for a mean-difference vector such as CAA's
        # it is 1 at every layer by construction)
        parts = []
        if not math.isnan(proj.pc1_cosine):
            parts.append(f"cos(direction, PC1) = {proj.pc1_cosine:.2f}")
        if not math.isnan(proj.direction_share):
            parts.append(f"{proj.direction_share:.0%} of the direction's norm lies in this plane")
        subtitle = "; ".join(parts)
    name = title or proj.title or "Activations on their first two principal components"
    ev = [e if np.isfinite(e) else float("nan") for e in np.asarray(proj.explained, dtype=float)]

    def axis(i: int) -> str:
        return f"PC{i + 1} ({ev[i]:.1%} of variance)" if not math.isnan(ev[i]) else f"PC{i + 1}"

    fig.update_layout(
        title={"text": name + (f"<br><sup>{subtitle}</sup>" if subtitle else "")}, template="plotly_white",
        xaxis={"title": axis(0), "zeroline": True}, yaxis={"title": axis(1), "zeroline": True, "scaleanchor": "x"},
        annotations=annotations, legend_title_text="class", height=520, autosize=True,
    )
    return fig


# -------------------------------------------------------------------------------------
# generation trace


def _token_label(text: str, limit: int = 10) -> str:
    t = text.replace("\n", "↵").replace("\t", "→")
    if not t.strip():
        t = t.replace(" ", "␣") or "∅"
    if len(t) > limit:
        t = t[: limit - 1] + "…"
    return html.escape(t)


def _step_strength(s, layer: int | None) -> float:
    """A token's strength: the one in force, or (``layer``) what a steerer that computes its
    own per layer (CLAS) applied at that layer's residual stream."""
    if layer is None or s.site_strengths is None:
        return float(s.strength)
    return float(s.site_strengths.get(f"blocks.{layer}.hook_resid_post", 0.0))


def trace(generation: Generation, threshold: float | None = None, per_row: int = 16,
          title: str | None = None, layer: int | None = None) -> go.Figure:
    """The token-by-token trace of one generation: what was produced, how strongly steered, what was undone.

    Top: the tokens in the order they were produced, ``per_row`` to a line. Each is coloured
    by the score the steerer observed there (when any token has one) else by the steering
    strength of the pass that produced it; a triangle marks steered tokens; grey struck-through
    tokens were discarded by a rollback, and the regenerated tokens follow them (⟲ marks where).
    Bottom: the strength per step (and the score, right axis, with ``threshold`` as a dashed
    line; ``threshold`` is ignored when no token has a score); dotted lines mark rollbacks.
    ``layer``: for a steerer whose strength is computed per token and layer (CLAS), show
    that layer's strength instead of the mean over layers.
    Reads only ``generation.trace`` and ``generation.text``.
    """
    steps = sorted(generation.trace.steps, key=lambda s: s.step)
    if not steps:
        raise ValueError("the generation has no trace steps; make it with steerbench.generate, which records one per token")
    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    n = len(steps)
    cols = min(per_row, n)
    n_rows = math.ceil(n / cols)
    has_score = any(s.score is not None for s in steps)
    order = {s.step: i for i, s in enumerate(steps)}  # a step number -> its cell in production order

    def cell(i: int) -> tuple[int, int]:
        r, c = divmod(i, cols)
        return r, c

    strengths = [_step_strength(s, layer) for s in steps]
    values = np.array([(s.score if has_score else strengths[i]) for i, s in enumerate(steps)], dtype=float)  # None -> nan
    finite = values[np.isfinite(values)]
    if has_score:
        if not finite.size or (finite.min() >= 0 and finite.max() <= 1):
            lo, hi = 0.0, 1.0  # probabilities
        else:
            lo, hi = float(finite.min()), float(finite.max())
            hi = hi if hi > lo else lo + 1.0
        mid = threshold if threshold is not None and lo < threshold < hi else (lo + hi) / 2
        colour_title = "score"
    else:
        bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        lo, hi, mid = -bound, bound, 0.0
        colour_title = "strength"

    z = np.full((n_rows, cols), np.nan)
    z_gone = np.full((n_rows, cols), np.nan)
    for i, s in enumerate(steps):
        r, c = cell(i)
        if s.discarded:
            z_gone[r, c] = 1.0
        else:
            z[r, c] = values[i]

    tok_h, curve_h = 46 * n_rows + 30, 260
    height = tok_h + curve_h + 190
    fig = make_subplots(
        rows=2, cols=1, row_heights=[tok_h, curve_h], vertical_spacing=70 / height,
        specs=[[{}], [{"secondary_y": True}]],
        subplot_titles=["tokens in the order produced, coloured by "
                        + ("the score the steerer observed" if has_score else "steering strength"),
                        "steering strength" + (" and score" if has_score else "") + " per step"],
    )
    dom = fig.layout.yaxis.domain
    fig.add_trace(go.Heatmap(
        # plotly ignores zmid once zmin/zmax are set, so white goes where mid falls on the scale
        z=z, colorscale=diverging_at((mid - lo) / (hi - lo)), zmin=lo, zmax=hi, xgap=2, ygap=2, hoverinfo="skip",
        name=colour_title,
        colorbar={"title": {"text": colour_title, "side": "top"}, "lenmode": "pixels", "len": max(80, tok_h - 10),
                  "y": dom[1], "yanchor": "top", "thickness": 14, "x": 1.02},
    ), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=z_gone, colorscale=[[0, "#e6e6e6"], [1, "#e6e6e6"]], showscale=False, xgap=2, ygap=2,
        hoverinfo="skip", name="discarded",
    ), row=1, col=1)

    labels, hovers, colours, xs, ys = [], [], [], [], []
    for i, s in enumerate(steps):
        r, c = cell(i)
        lab = _token_label(s.text)
        labels.append(f"<s>{lab}</s>" if s.discarded else lab)
        colours.append("#8c8c8c" if s.discarded else "#111111")
        xs.append(c)
        ys.append(r)
        score = "n/a" if s.score is None else f"{s.score:.3g}"
        hovers.append(
            f"step {s.step}, position {s.position}<br>token {html.escape(repr(s.text))} (id {s.token_id})"
            f"<br>strength {_step_strength(s, layer):.3g} ({'steered' if s.steered else 'not steered'})<br>score {score}"
            + ("<br><b>discarded by a rollback</b>" if s.discarded else "")
        )
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="text", text=labels, textfont={"color": colours, "size": 13}, hovertext=hovers,
        hovertemplate="%{hovertext}<extra></extra>", name="tokens", showlegend=False,
    ), row=1, col=1)
    steered = [i for i, s in enumerate(steps) if s.steered]
    fig.add_trace(go.Scatter(
        x=[cell(i)[1] for i in steered], y=[cell(i)[0] + 0.36 for i in steered], mode="markers",
        marker={"symbol": "triangle-up", "size": 7, "color": "#2ca02c"}, name="steered token", hoverinfo="skip",
    ), row=1, col=1)
    rollbacks = [e for e in generation.trace.events if e.kind == "rollback" and e.step in order]
    if rollbacks:
        fig.add_trace(go.Scatter(
            x=[cell(order[e.step])[1] - 0.47 for e in rollbacks], y=[cell(order[e.step])[0] - 0.28 for e in rollbacks],
            mode="text", text=["⟲"] * len(rollbacks), textfont={"color": "#d62728", "size": 14},
            textposition="middle right", name="regenerated from here", hoverinfo="skip",
        ), row=1, col=1)

    step_no = [s.step for s in steps]
    point_colour = ["#bdbdbd" if s.discarded else "#1f77b4" for s in steps]
    fig.add_trace(go.Scatter(
        x=step_no, y=strengths, mode="lines+markers", line={"shape": "hv", "color": "#1f77b4"},
        marker={"color": point_colour, "size": 7}, name="strength" if layer is None else f"strength at layer {layer}",
        hovertemplate="step %{x}<br>strength %{y:.3g}<extra></extra>",
    ), row=2, col=1, secondary_y=False)
    if has_score:
        scored = [s for s in steps if s.score is not None]
        fig.add_trace(go.Scatter(
            x=[s.step for s in scored], y=[s.score for s in scored], mode="lines+markers",
            line={"color": "#ff7f0e"}, name="score",
            marker={"color": ["#bdbdbd" if s.discarded else "#ff7f0e" for s in scored], "size": 7},
            hovertemplate="step %{x}<br>score %{y:.3g}<extra></extra>",
        ), row=2, col=1, secondary_y=True)
        if threshold is not None:
            fig.add_trace(go.Scatter(
                x=[step_no[0] - 0.5, step_no[-1] + 0.5], y=[threshold, threshold], mode="lines",
                line={"dash": "dash", "color": "#7f7f7f"}, name=f"threshold {threshold:g}", hoverinfo="skip",
            ), row=2, col=1, secondary_y=True)
    for e in generation.trace.events:
        if e.kind not in ("rollback", "rollback_refused"):
            continue
        k = e.detail.get("tokens", "?")
        refused = e.kind == "rollback_refused"
        fig.add_vline(
            x=e.step - 0.5, row=2, col=1, line_dash="dot", line_color="#ff9896" if refused else "#d62728",
            annotation_text=f"rollback of {k} refused" if refused else f"rollback {k}",
            annotation_font_color="#d62728", annotation_position="top left",
        )

    n_gone = sum(s.discarded for s in steps)
    n_rb = len(generation.trace.rollbacks)
    text = " ".join(generation.text.split())
    text = text if len(text) <= 110 else text[:109] + "…"
    head = title or f"Generation trace: {n - n_gone} tokens kept, {n_gone} discarded in {n_rb} rollback(s)"
    fig.update_layout(
        title={"text": f"{head}<br><sup>final text: {html.escape(text)}</sup>"}, template="plotly_white",
        height=height, autosize=True,
        legend={"y": fig.layout.yaxis2.domain[1], "yanchor": "top", "x": 1.1 if has_score else 1.02},
    )
    fig.update_xaxes(visible=False, range=[-0.5, cols - 0.5], row=1, col=1)
    fig.update_yaxes(visible=False, autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="generation step (every token produced, discarded ones included)", row=2, col=1)
    fig.update_yaxes(title_text="steering strength (0 = unsteered)", row=2, col=1, secondary_y=False)
    if has_score:
        pad = 0.04 * (hi - lo)
        fig.update_yaxes(title_text="score the steerer observed", row=2, col=1, secondary_y=True, showgrid=False,
                         tickmode="auto", range=[min(lo, threshold if threshold is not None else lo) - pad,
                                                 max(hi, threshold if threshold is not None else hi) + pad])
    return fig


# -------------------------------------------------------------------------------------
# export


def strength_map(generation: Generation, title: str | None = None) -> go.Figure:
    """Layer x generated token: the strength a steerer that computes its own (CLAS) applied
    at each layer when it produced each kept token (``TokenStep.site_strengths``), on a
    diverging scale around 0 (no push). The line above it is the mean over layers, what
    ``trace`` shows."""
    steps = [s for s in sorted(generation.trace.steps, key=lambda s: s.step) if not s.discarded]
    sites = sorted({k for s in steps for k in (s.site_strengths or {})}, key=lambda k: int(k.split(".")[1]))
    if not sites:
        raise ValueError("no token has per-layer strengths: steer with a steerer that computes its own (CLAS)")
    layers = [int(k.split(".")[1]) for k in sites]
    z = np.array([[(s.site_strengths or {}).get(k, 0.0) for s in steps] for k in sites], dtype=float)
    bound = float(np.abs(z).max()) or 1.0
    labels = [f"{i}:{_token_label(s.text)}" for i, s in enumerate(steps)]
    fig = make_subplots(rows=2, cols=1, row_heights=[0.22, 0.78], shared_xaxes=True, vertical_spacing=0.04)
    fig.add_trace(go.Scatter(x=labels, y=z.mean(0), mode="lines+markers", name="mean over layers",
                             line={"color": "#1f77b4"}, hovertemplate="%{x}<br>mean %{y:.3g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=z, x=labels, y=layers, colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                             colorbar={"title": {"text": "strength"}, "thickness": 12, "len": 0.75, "y": 0.38},
                             hovertemplate="layer %{y}<br>token %{x}<br>strength %{z:.3g}<extra></extra>"),
                  row=2, col=1)
    fig.update_yaxes(title_text="mean", row=1, col=1)
    fig.update_yaxes(title_text="layer", row=2, col=1)
    fig.update_xaxes(title_text="generated token", tickangle=-45, row=2, col=1)
    fig.update_layout(title=title or f"Strength applied per layer and token: {generation.steer}", template="plotly_white",
                      height=max(420, 14 * len(layers) + 260), autosize=True, showlegend=False,
                      margin={"l": 60, "r": 20, "t": 60, "b": 90})
    return fig


def bench_bars(summary, metrics: Sequence[str] = ("mc1", "mc2", "mc3"), title: str = "TruthfulQA MC") -> go.Figure:
    """Grouped bars of each method's MC scores, with its off-task KL beside them.

    ``summary`` is ``BenchResult.summary()``: one row per method with the metric columns,
    ``kl`` and ``chosen`` (the hyperparameters chosen on validation in each fold).
    """
    missing = [m for m in (*metrics, "method") if m not in summary.columns]
    if missing:
        raise ValueError(f"the summary has no column(s) {', '.join(missing)}")
    has_kl = "kl" in summary.columns
    fig = make_subplots(rows=1, cols=2 if has_kl else 1, column_widths=[0.75, 0.25] if has_kl else None,
                        subplot_titles=("cross-validated test score", "KL to unsteered on neutral text") if has_kl else None)
    palette = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    names = {"mc1": "MC1", "mc2": "MC2", "mc3": "MC3"}
    for k, row in enumerate(summary.itertuples(index=False)):
        chosen = getattr(row, "chosen", "")
        fig.add_trace(
            go.Bar(
                x=[names.get(m, m) for m in metrics], y=[getattr(row, m) for m in metrics], name=row.method,
                legendgroup=row.method, marker_color=palette[k % len(palette)],
                text=[f"{getattr(row, m):.3f}" for m in metrics], textposition="outside",
                hovertemplate=f"{row.method}<br>%{{x}} %{{y:.3f}}<br>chosen: {html.escape(str(chosen))}<extra></extra>",
            ),
            row=1, col=1,
        )
        if has_kl:
            fig.add_trace(
                go.Bar(x=[row.method], y=[row.kl], name=row.method, legendgroup=row.method, showlegend=False,
                       marker_color=palette[k % len(palette)], hovertemplate="%{x}<br>KL %{y:.4f} nats<extra></extra>"),
                row=1, col=2,
            )
    fig.update_yaxes(title_text="score", range=[0, 1], row=1, col=1)
    if has_kl:
        fig.update_yaxes(title_text="nats per token", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=440, autosize=True,
                      legend_title_text="method")
    return fig


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def readout_along(fasbs: dict, tokens, answers: Sequence[int], title: str | None = None) -> go.Figure:
    """P(true) token by token along reference ``answers`` (indices into ``tokens``, e.g. one
    true and one false), under each FASB of ``fasbs`` (name -> FASB; its readout), each with
    its threshold dotted: where, along a written answer, each readout would flag it."""
    if not fasbs or not answers:
        raise ValueError("give at least one FASB and one answer")
    labels = tokens.answer_labels()
    names = [f"answer {a}: {'true' if labels[a] else 'false'}" for a in answers]
    fig = make_subplots(rows=1, cols=len(answers), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=names)
    for c, a in enumerate(answers, start=1):
        idx = tokens.of_answer(a)
        ticks = [_token_label(tokens.pieces[i]) for i in idx]
        for j, (name, f) in enumerate(fasbs.items()):
            color = _PALETTE[j % len(_PALETTE)]
            p = f.p_true(tokens.z[idx], tokens.pos[idx]).numpy()
            fig.add_trace(go.Scatter(x=list(range(len(idx))), y=p, mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=c == 1, line={"color": color},
                                     customdata=ticks, hovertemplate="%{customdata}: P(true) %{y:.2f}<extra>" + name
                                     + "</extra>"), row=1, col=c)
            fig.add_hline(y=f.threshold, line={"color": color, "dash": "dot", "width": 1}, row=1, col=c)
        fig.update_xaxes(tickvals=list(range(len(idx))), ticktext=ticks, tickangle=-45, row=1, col=c)
    text = "".join(tokens.pieces[i] for i in tokens.of_answer(answers[0])).strip()
    q = tokens.questions[int(np.searchsorted(np.cumsum([len(x.correct) + len(x.incorrect) for x in tokens.questions]),
                                             answers[0], side="right"))].question
    fig.update_yaxes(title_text="P(true)", range=[0, 1], row=1, col=1)
    q = html.escape(q if len(q) <= 70 else q[:69] + "…")
    fig.update_layout(title=title or f"P(true) along answers to “{q}”<br><sup>first: {html.escape(text[:80])}"
                      "; dotted: each readout's threshold</sup>", template="plotly_white", autosize=True,
                      legend={"orientation": "h", "y": -0.35}, margin={"t": 90})
    return fig


def readout_auc(tables: dict, title: str = "How early can a readout tell a false answer from a true one?") -> go.Figure:
    """ROC-AUC of P(true) between true and false answers by answer token, one line per
    readout (``tables``: name -> ``readouts.decision_table``), with the flag shares at each
    readout's threshold in the legend."""
    if not tables:
        raise ValueError("no readout to draw")
    fig = go.Figure()
    for j, (name, t) in enumerate(tables.items()):
        keys = [k for k in t if k.startswith("auc@")]
        label = (f"{name}: flags {t['flag_false']:.0%} of false, {t['flag_true']:.0%} of true answers "
                 f"(threshold {t['threshold']:.2f})")
        fig.add_trace(go.Scatter(x=[k[4:] for k in keys], y=[t[k] for k in keys], mode="lines+markers", name=label,
                                 line={"color": _PALETTE[j % len(_PALETTE)]}))
    fig.add_hline(y=0.5, line={"color": "grey", "dash": "dash"}, annotation_text="chance")
    fig.update_layout(title=title, xaxis_title="answer token (0 = first)", yaxis_title="ROC-AUC, true vs false",
                      yaxis_range=[0.4, 1.0], template="plotly_white", autosize=True,
                      legend={"orientation": "h", "y": -0.3})
    return fig


def by_layer(series: dict, title: str = "By layer", y_title: str = "", y_range=(0.0, 1.0)) -> go.Figure:
    """One line per entry of ``series`` (name -> one value per layer, layer 0 first)."""
    if not series:
        raise ValueError("no series to draw")
    fig = go.Figure()
    for j, (name, values) in enumerate(series.items()):
        v = np.asarray(values, dtype=float)
        fig.add_trace(go.Scatter(x=list(range(len(v))), y=v, mode="lines+markers", name=name,
                                 line={"color": _PALETTE[j % len(_PALETTE)]},
                                 hovertemplate="layer %{x}: %{y:.2f}<extra>" + html.escape(name) + "</extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=y_title, yaxis_range=list(y_range),
                      template="plotly_white", autosize=True, legend={"orientation": "h", "y": -0.25})
    return fig


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a standalone HTML page (plotly.js inlined: it opens offline); returns the path.

    Creates missing folders. The camera button of the saved page downloads an SVG, for papers
    and slides.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(
        str(p), include_plotlyjs=True, full_html=True, default_width="100%",
        config={"displaylogo": False, "responsive": True,
                "toImageButtonOptions": {"format": "svg", "filename": p.stem}},
    )
    return p
