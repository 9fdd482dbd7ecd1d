"""Small notebook apps composed from ``steerbench.plots``: the plots draw, the widgets wire them up.

Each app keeps its ipywidgets container in ``.widget`` (a notebook cell that ends with the
app displays it) and has plain-Python methods (``show_layer``, ``update``, ``select``) that
the controls call, so an app can be driven, and tested, without a browser.

The figures are ``plotly.graph_objects.FigureWidget``, which needs the ``anywidget`` package
(plotly >= 6).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import plotly.graph_objects as go

from steerbench import geometry, plots

if TYPE_CHECKING:
    from steerbench.geometry import PCAProjection
    from steerbench.probes import ProbeGrid


def _figure_widget(fig: go.Figure) -> go.FigureWidget:
    try:
        return go.FigureWidget(fig)
    except ImportError as e:
        raise ImportError(
            f"steerbench.widgets needs plotly's FigureWidget, which needs anywidget: pip install anywidget ({e})"
        ) from None


def _copy_into(target: go.FigureWidget, fig: go.Figure) -> None:
    """Show ``fig`` in ``target`` in place: same traces updated, annotations, shapes and titles replaced."""
    with target.batch_update():
        same = len(target.data) == len(fig.data) and all(
            a.type == b.type for a, b in zip(target.data, fig.data)
        )
        if same:
            for old, new in zip(target.data, fig.data):
                props = new.to_plotly_json()
                props.pop("type", None)
                props.pop("uid", None)
                old.update(props, overwrite=True)
        else:
            target.data = ()
            target.add_traces(list(fig.data))
        target.layout.title = fig.layout.title
        target.layout.annotations = fig.layout.annotations
        target.layout.shapes = fig.layout.shapes
        target.layout.xaxis.title = fig.layout.xaxis.title
        target.layout.yaxis.title = fig.layout.yaxis.title


class _App:
    widget: widgets.Widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _slider_for(values: Sequence[int], description: str) -> widgets.Widget:
    """An IntSlider when the values are evenly spaced, else a SelectionSlider over them."""
    values = list(values)
    steps = {b - a for a, b in itertools.pairwise(values)}
    if len(steps) <= 1:
        return widgets.IntSlider(value=values[0], min=values[0], max=values[-1], step=steps.pop() if steps else 1,
                                 description=description, continuous_update=False)
    return widgets.SelectionSlider(options=values, value=values[0], description=description,
                                   continuous_update=False)


# -------------------------------------------------------------------------------------


class PCAExplorer(_App):
    """A layer slider over per-layer PCA views (``geometry.pca_by_layer``) and their scatter.

    ``show_layer(L)`` redraws the figure in place and moves the slider; the slider calls it.
    """

    def __init__(self, projections: Mapping[int, PCAProjection], layer: int | None = None):
        if not projections:
            raise ValueError("no projections to explore; make them with geometry.pca_by_layer(acts, labels)")
        self.projections = {int(k): v for k, v in projections.items()}
        self.layers = sorted(self.projections)
        self.layer = self.layers[0] if layer is None else int(layer)
        self._check(self.layer)
        self.figure = _figure_widget(plots.pca_scatter(self.projections[self.layer]))
        self.slider = _slider_for(self.layers, "layer")
        self.slider.value = self.layer
        self.slider.observe(self._on_slider, names="value")
        self.widget = widgets.VBox([self.slider, self.figure])

    def _check(self, layer: int) -> None:
        if layer not in self.projections:
            raise ValueError(f"no projection for layer {layer}; available layers: {self.layers}")

    def _on_slider(self, change: dict) -> None:
        if change["new"] in self.projections and change["new"] != self.layer:
            self.show_layer(change["new"])

    def show_layer(self, layer: int) -> None:
        """Show layer ``layer``'s projection (points, hover texts, arrow, titles) and move the slider."""
        layer = int(layer)
        self._check(layer)
        self.layer = layer
        _copy_into(self.figure, plots.pca_scatter(self.projections[layer]))
        if self.slider.value != layer:
            self.slider.value = layer


# -------------------------------------------------------------------------------------


def _short(text: str, limit: int = 60) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[: limit - 1] + "…"


class SweepExplorer(_App):
    """Unsteered and steered generations side by side, for a chosen prompt, layer and multiplier.

    ``generate_fn(prompt, layer, multiplier) -> str`` makes one generation; multiplier 0 is
    the unsteered baseline and is made once per prompt, whatever the layer. Every result is
    cached by (prompt, layer, multiplier), so revisiting a setting costs nothing. The first
    setting (first prompt, first layer, largest positive multiplier) is generated on construction.
    """

    def __init__(
        self,
        generate_fn: Callable[[Any, int, float], str],
        prompts: Sequence[Any],
        layers: Sequence[int],
        multipliers: Sequence[float],
    ):
        if not prompts:
            raise ValueError("give at least one prompt")
        if not layers or not multipliers:
            raise ValueError("give at least one layer and one multiplier")
        self.generate_fn = generate_fn
        self.prompts = list(prompts)
        self.layers = [int(L) for L in layers]
        self.multipliers = sorted(float(m) for m in multipliers)
        self.cache: dict[tuple[int, int | None, float], str] = {}
        positive = [m for m in self.multipliers if m > 0]
        nonzero = [m for m in self.multipliers if m != 0]
        self.prompt_index, self.layer = 0, self.layers[0]
        self.multiplier = positive[-1] if positive else (nonzero[0] if nonzero else self.multipliers[0])

        self.prompt_box = widgets.Dropdown(
            options=[(_short(getattr(p, "text", "") or p), i) for i, p in enumerate(self.prompts)],
            value=0, description="prompt", layout=widgets.Layout(width="480px"),
        )
        self.layer_box = widgets.Dropdown(options=self.layers, value=self.layer, description="layer")
        self.multiplier_box = widgets.SelectionSlider(
            options=[(f"{m:g}", m) for m in self.multipliers], value=self.multiplier,
            description="multiplier", continuous_update=False,
        )
        self.output = widgets.HTML()
        self._busy = False
        for box, key in ((self.prompt_box, "prompt"), (self.layer_box, "layer"), (self.multiplier_box, "multiplier")):
            box.observe(lambda change, key=key: self._on_control(key, change["new"]), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.prompt_box, self.layer_box, self.multiplier_box]), self.output,
        ])
        self.update()

    @classmethod
    def for_steerer(
        cls,
        model,
        make: Callable[[int, float], Any],
        prompts: Sequence[Any],
        layers: Sequence[int],
        multipliers: Sequence[float],
        max_new_tokens: int = 40,
    ) -> SweepExplorer:
        """A SweepExplorer that generates with ``steerbench.generate(model, prompt, steer=make(layer, m))``.

        ``make(layer, multiplier)`` returns the Steerer (e.g. ``lambda L, m: caa.steerer(L, m)``);
        multiplier 0 generates unsteered. Generation is greedy, so a cached result is the result.
        """

        def generate_fn(prompt, layer: int, multiplier: float) -> str:
            from steerbench.generation import generate

            steer = make(layer, multiplier) if multiplier != 0 else None
            return generate(model, prompt, steer=steer, max_new_tokens=max_new_tokens).text

        return cls(generate_fn, prompts, layers, multipliers)

    def _on_control(self, key: str, value) -> None:
        if not self._busy:
            self.update(**{key: value})

    def _index(self, prompt) -> int:
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            if not 0 <= prompt < len(self.prompts):
                raise ValueError(f"prompt index {prompt} is out of range (0..{len(self.prompts) - 1})")
            return prompt
        for i, p in enumerate(self.prompts):
            if p is prompt or p == prompt:
                return i
        raise ValueError(f"prompt {_short(str(prompt))!r} is not one of this explorer's prompts; pass it or its index")

    def _text(self, i: int, layer: int, multiplier: float) -> str:
        key = (i, None if multiplier == 0 else layer, multiplier)
        if key not in self.cache:
            self.cache[key] = str(self.generate_fn(self.prompts[i], layer, multiplier))
        return self.cache[key]

    def update(self, prompt=None, layer: int | None = None, multiplier: float | None = None) -> tuple[str, str]:
        """Show the given setting (None keeps the current one); returns (unsteered text, steered text).

        ``prompt`` is one of the prompts or its index.
        """
        i = self.prompt_index if prompt is None else self._index(prompt)
        if layer is not None and int(layer) not in self.layers:
            raise ValueError(f"layer {layer} is not one of this explorer's layers {self.layers}")
        if multiplier is not None and float(multiplier) not in self.multipliers:
            raise ValueError(f"multiplier {multiplier} is not one of this explorer's multipliers {self.multipliers}")
        self.prompt_index = i
        self.layer = self.layer if layer is None else int(layer)
        self.multiplier = self.multiplier if multiplier is None else float(multiplier)
        self._busy = True
        try:
            self.prompt_box.value, self.layer_box.value = i, self.layer
            self.multiplier_box.value = self.multiplier
        finally:
            self._busy = False
        self.output.value = "<i>generating…</i>"
        base = self._text(i, self.layer, 0.0)
        steered = self._text(i, self.layer, self.multiplier)
        self.output.value = self._render(base, steered)
        return base, steered

    def _render(self, base: str, steered: str) -> str:
        def column(heading: str, text: str) -> str:
            return (f"<div style='flex:1;min-width:0'><b>{html.escape(heading)}</b>"
                    f"<div style='white-space:pre-wrap;border:1px solid #ccc;padding:8px;margin-top:4px'>"
                    f"{html.escape(text)}</div></div>")

        return ("<div style='display:flex;gap:16px;align-items:flex-start'>"
                + column("unsteered (m = 0)", base)
                + column(f"layer {self.layer}, m = {self.multiplier:g}", steered) + "</div>")


# -------------------------------------------------------------------------------------


class HeadGridExplorer(_App):
    """A probe grid over attention heads; click a head to see its probe and its activations' PCA.

    ``head_acts`` [N, n_layers, n_heads, d_head] are the activations ``grid`` was fitted on.
    Clicking a cell calls ``select(layer, head)``; it starts on the best head.
    """

    def __init__(self, grid: ProbeGrid, head_acts, labels, texts: Sequence[str] | None = None,
                 label_names: tuple[str, str] = ("negative", "positive"), metric: str = "val_acc"):
        heat = plots.head_grid(grid, metric)  # checks the grid has (layer, head) sites
        shape = tuple(head_acts.shape)
        want = (*grid.sites_shape, grid.d)
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"head_acts must be [N, {', '.join(map(str, want))}] like the activations the grid was fitted on, "
                f"got {shape}"
            )
        self.grid, self.head_acts, self.labels = grid, head_acts, labels
        self.texts, self.label_names = texts, label_names
        self.grid_figure = _figure_widget(heat)
        self.grid_figure.data[0].on_click(self._on_click)
        ranked = grid.top(grid.n_sites)
        self._rank = {site: r for r, (site, _) in enumerate(ranked, start=1)}
        self.summary = widgets.HTML()
        self.scatter: go.FigureWidget | None = None
        self.selected: tuple[int, int] | None = None
        self.projection: PCAProjection | None = None
        self._side = widgets.VBox([self.summary])
        self.widget = widgets.HBox([self.grid_figure, self._side])
        self.select(*ranked[0][0])

    def _on_click(self, trace, points, state) -> None:
        if points.xs and points.ys:
            self.select(int(points.ys[0]), int(points.xs[0]))

    def select(self, layer: int, head: int) -> PCAProjection:
        """Show head (layer, head): its probe's scores and rank, its PCA with the probe direction."""
        n_layers, n_heads = self.grid.sites_shape
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"no head ({layer}, {head}): the grid has {n_layers} layers x {n_heads} heads")
        proj = geometry.pca_projection(
            self.head_acts[:, layer, head], self.labels, self.texts,
            direction=self.grid.directions[layer, head], label_names=self.label_names,
            title=f"Layer {layer}, head {head}: activations on their first two PCs",
        )
        fig = plots.pca_scatter(proj)
        if self.scatter is None:
            self.scatter = _figure_widget(fig)
            self._side.children = (self.summary, self.scatter)
        else:
            _copy_into(self.scatter, fig)
        self.grid_figure.layout.shapes = [{
            "type": "rect", "x0": head - 0.5, "x1": head + 0.5, "y0": layer - 0.5, "y1": layer + 0.5,
            "line": {"color": "#d62728", "width": 3},
        }]
        g = self.grid
        self.summary.value = (
            f"<b>Layer {layer}, head {head}</b> — rank {self._rank[(layer, head)]} of {g.n_sites} heads "
            f"by validation accuracy<br>train accuracy {float(g.train_acc[layer, head]):.3f} · "
            f"validation accuracy {float(g.val_acc[layer, head]):.3f} · "
            f"validation AUC {float(g.val_auc[layer, head]):.3f}"
        )
        self.selected, self.projection = (layer, head), proj
        return proj
