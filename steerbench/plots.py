"""Plotly figures. Every function returns a ``go.Figure`` and never shows it."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

_READOUTS = {
    "win_rate": ("Answer-likelihood readout", "matching answer likelier (share of items)"),
    "letter": ("Letter readout (CAA reference)", "P(matching letter) / (P(A) + P(B))"),
    "margin": ("Answer-likelihood margin", "log p(matching) - log p(other), nats"),
}


def ab_sweep(df, metrics: Sequence[str] = ("win_rate", "letter"), title: str = "A/B score against multiplier") -> go.Figure:
    """Lines of each A/B readout against the multiplier, one line per steered layer.

    ``df`` is the tidy table from ``evaluation.ab_sweep`` (columns layer, multiplier and
    the readouts). A flat line at 0.5 on the letter readout means the model does not
    read the A/B choice at all.
    """
    metrics = [m for m in metrics if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise ValueError("the table has none of the requested readouts")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_READOUTS[m][0] for m in metrics])
    layers = sorted(df.layer.unique())
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
        fig.update_xaxes(title_text="steering multiplier m", row=1, col=col)
        fig.update_yaxes(title_text=_READOUTS[metric][1], row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", legend_title_text="steered layer",
                      height=420, width=520 * len(metrics))
    return fig


def vector_norms(vectors, title: str = "Steering vector norm by layer") -> go.Figure:
    """The norm of a per-layer steering vector (e.g. ``CAA.vectors``) against the layer."""
    norms = vectors.norm(dim=-1).tolist()
    fig = go.Figure(go.Bar(x=list(range(len(norms))), y=norms,
                           hovertemplate="layer %{x}<br>norm %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="layer",
                      yaxis_title="L2 norm of v[L] (residual-stream units)", height=360)
    return fig
