"""Small notebook apps composed from ``steerbench.plots``: the plots draw, the widgets wire them up.

Each app keeps its ipywidgets container in ``.widget`` (a notebook cell that ends with the
app displays it) and has plain-Python methods (``show_layer``, ``update``, ``select``) that
the controls call, so an app can be driven, and tested, without a browser.

The figures are ``plotly.graph_objects.FigureWidget``, which needs the ``anywidget`` package
(plotly >= 6).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import html
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import plotly.graph_objects as go

from steerbench import geometry, plots

if TYPE_CHECKING:
    from steerbench.generation import Generation
    from steerbench.geometry import PCAProjection
    from steerbench.probes import ProbeGrid


def _figure_widget(fig: go.Figure) -> go.FigureWidget:
    try:
        return _figure_class()(fig)
    except ImportError as e:
        raise ImportError(
            f"steerbench.widgets needs plotly's FigureWidget, which needs anywidget: pip install anywidget ({e})"
        ) from None


# plotly's FigureWidget ships its front end (plotly.js and the widget, 5 MB) as the widget's
# ``_esm``, and anywidget compiles it for every figure widget on the page, each within 2 s
# (anywidget 0.11's runtime: ``AbortSignal.timeout(2000)``, then "[anywidget] Failed to
# initialize model." and every later update from Python to that figure is dropped). Measured in
# headless Chromium on a 2-core machine with a benchmark running: one compile 1.7-2.0 s, five at
# once (a page reload of notebook 05) 9.8 s. Our figures' ``_esm`` is a few lines that compile the
# same bundle (a trait of its own) once per page, shared by every figure; ``initialize`` only
# starts that compile and returns (inside anywidget's limit). The compile waits half a second
# after the first figure asks: it holds the page's main thread for 1-2 s, and the figures
# restored together after a reload each need a few milliseconds first. plotly's own model
# starts when the bundle is ready, from the model's state at that time (complete, as
# ``_updating`` writes it), before any view draws.
_SHARED_ESM = """\
const KEY = Symbol.for("steerbench: plotly widget bundle @VERSION@");
function plotlyWidget(model) {
  globalThis[KEY] ??= new Promise((resolve) => setTimeout(resolve, 500))
    .then(() => import(URL.createObjectURL(new Blob([model.get("_bundle")], { type: "text/javascript" }))))
    .then((module) => module.default);
  return globalThis[KEY];
}
export default () => {
  let widget;  // plotly's widget for this model, once the bundle is compiled and it is initialized
  return {
    initialize(context) {
      widget = plotlyWidget(context.model).then((make) => { const w = make(); w.initialize(context); return w; });
    },
    async render(context) {
      return (await widget).render(context);
    },
  };
};
"""


@functools.cache
def _figure_class() -> type[go.FigureWidget]:
    import plotly
    import traitlets

    bundle = str(go.FigureWidget._esm)  # anywidget's FileContents of plotly's widgetbundle.js: its text
    if "export" not in bundle:
        raise ImportError(f"plotly {plotly.__version__}'s FigureWidget has no widget bundle as its _esm")

    class Figure(go.FigureWidget):
        """plotly's FigureWidget whose front end compiles once per page (``_SHARED_ESM``)."""

        _esm = _SHARED_ESM.replace("@VERSION@", plotly.__version__)
        _bundle = traitlets.Unicode(bundle).tag(sync=True)

    return Figure


@contextlib.contextmanager
def _updating(target: go.FigureWidget):
    """``target.batch_update()``, then the result written into the widget's own state.

    A FigureWidget sends changes made from Python to the views open now as messages, and
    its state (``_widget_data`` / ``_widget_layout``, what a view drawn later, or after a
    page reload, starts from) keeps the figure it was created with: after a reload a
    slider would read layer 23 over the figure of layer 0. Assigning the state whole
    syncs it; plotly's front end draws from messages, so the open views do not redraw."""
    with target.batch_update():
        yield target
    target._widget_data = copy.deepcopy(target._data)
    target._widget_layout = copy.deepcopy(target._layout_obj._props)


def _copy_into(target: go.FigureWidget, fig: go.Figure) -> None:
    """Show ``fig`` in ``target`` in place: same traces updated, annotations, shapes and titles replaced."""
    with _updating(target):
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

    def _on_click(self, trace, points, state) -> None:  # noqa: ARG002 (plotly's on_click signature)
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
        with _updating(self.grid_figure):
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


class HeadSweepExplorer(_App):
    """A head sweep's grids (probe accuracy beside the MC2 change of steering each head
    alone); click a head for its MC2 change against alpha, computed on the click by
    ``curve(layer, head)`` (rows of a head sweep over several alphas) and kept."""

    def __init__(self, sweep, curve: Callable[[int, int], Any] | None = None, alpha: float | None = None):
        self.sweep, self.curve_fn = sweep, curve
        self.curves: dict[tuple[int, int], Any] = {}
        self.grid_figure = _figure_widget(plots.head_sweep_grid(sweep, alpha))
        for trace in self.grid_figure.data:
            trace.on_click(self._on_click)
        self.curve_figure: go.FigureWidget | None = None
        self._side = widgets.VBox([widgets.HTML("<i>click a head for its curve over alpha</i>")])
        self.widget = widgets.VBox([self.grid_figure, self._side])
        self.selected: tuple[int, int] | None = None

    @classmethod
    def run(cls, model, probes, questions, alpha: float = 5.0, curve_alphas: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 15.0),
            **kwargs) -> HeadSweepExplorer:
        """Sweep every head at ``alpha`` on ``questions`` (validation ones); a click adds the
        head's curve over ``curve_alphas``. ``kwargs`` go to ``truthfulqa.head_sweep``."""
        from steerbench.truthfulqa import head_sweep

        kwargs.pop("alphas", None)
        sweep = head_sweep(model, probes, questions, alphas=[alpha], heads=kwargs.pop("heads", None), **kwargs)
        return cls(sweep, lambda layer, head: head_sweep(model, probes, questions, alphas=curve_alphas,
                                                         heads=[(layer, head)], **kwargs), alpha)

    def _on_click(self, trace, points, state) -> None:  # noqa: ARG002 (plotly's on_click signature)
        if points.point_inds:
            r, c = points.point_inds[0]
            self.select(int(r), int(c))

    def select(self, layer: int, head: int):
        """Show head (layer, head)'s MC2 change against alpha (its rows of the sweep without a ``curve``)."""
        rows = self.sweep[(self.sweep["layer"] == layer) & (self.sweep["head"] == head)]
        if rows.empty:
            raise ValueError(f"head ({layer}, {head}) is not in the sweep")
        if (layer, head) not in self.curves:
            self.curves[(layer, head)] = self.curve_fn(layer, head) if self.curve_fn is not None else rows
        fig = plots.head_curve(self.curves[(layer, head)])
        if self.curve_figure is None:
            self.curve_figure = _figure_widget(fig)
            self._side.children = (self.curve_figure,)
        else:
            _copy_into(self.curve_figure, fig)
        with _updating(self.grid_figure):
            self.grid_figure.layout.shapes = [{
                "type": "rect", "xref": x, "yref": y, "x0": head - 0.5, "x1": head + 0.5, "y0": layer - 0.5,
                "y1": layer + 0.5, "line": {"color": "#d62728", "width": 3}} for x, y in (("x", "y"), ("x2", "y2"))]
        self.selected = (layer, head)
        return self.curves[(layer, head)]


# -------------------------------------------------------------------------------------
# a generation as it happens


def _stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if not stop:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(x for x in stop if x)


def cut_answer(text: str, stop: str | Sequence[str] | None = "\n") -> str:
    """``text`` up to the first of the ``stop`` strings (None keeps it whole), stripped.

    The answer a QA prompt asks for, also from a generation made without ``generate(stop=...)``
    (which runs on into the next "Q:").
    """
    text = str(text)
    for x in _stops(stop):
        text = text.split(x, 1)[0]
    return text.strip()


def _rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def score_colour(value: float | None, threshold: float | None = None, lo: float = 0.0, hi: float = 1.0) -> str:
    """A token's background for ``value`` on ``plots.trace``'s scale: orange-red low, white, blue high.

    White sits at ``threshold`` when it lies strictly inside (lo, hi), else half way; values
    outside [lo, hi] are clipped. None or NaN (not scored yet) is white.
    """
    if value is None or not math.isfinite(float(value)):
        return "#ffffff"
    if not hi > lo:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    mid = threshold if threshold is not None and lo < threshold < hi else (lo + hi) / 2
    v = min(max(float(value), lo), hi)
    t = 0.5 * (v - lo) / (mid - lo) if v <= mid else 0.5 + 0.5 * (v - mid) / (hi - mid)
    stops: list[tuple[float, str]] = [(float(t), str(c)) for t, c in plots._LIGHT_DIVERGING]  # type: ignore[arg-type]
    for (t0, c0), (t1, c1) in itertools.pairwise(stops):
        if t <= t1:
            f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            rgb = [round(a + f * (b - a)) for a, b in zip(_rgb(c0), _rgb(c1))]
            return "#" + "".join(f"{x:02x}" for x in rgb)
    return stops[-1][1]


def _steps_and_events(trace_or_generation) -> tuple[list, list, str | None]:
    """(steps in production order, events, final text or None) of a Trace or a Generation."""
    trace = getattr(trace_or_generation, "trace", trace_or_generation)
    text = getattr(trace_or_generation, "text", None)
    return sorted(trace.steps, key=lambda s: s.step), list(trace.events), text


def trace_html(trace, threshold: float | None = None, stop: str | Sequence[str] | None = None,
               title: str | None = None,
               running: bool = False, score_name: str = "P(true)") -> str:
    """One generation as coloured tokens, in the order they were produced (an HTML string).

    ``trace`` is a ``Trace`` (possibly still growing) or a ``Generation``. Each kept token's
    background is the score the steerer observed there (``score_colour``; white: not scored
    yet); a green underline marks a steered token; tokens discarded by a rollback are struck
    through and grey, followed by a red "⟲ back k" marker (the steerer's note is its tooltip)
    and the regenerated tokens. With ``stop`` (a string or several), kept tokens after the
    point where the text first contains one are faded: they are past the answer (a generation
    made with ``generate(stop=...)`` ends there anyway). Hover a token for its step, position, score and
    strength. ``running`` adds a cursor at the end.
    """
    steps, events, final_text = _steps_and_events(trace)
    marks: dict[int, list] = {}
    for e in events:
        if e.kind in ("rollback", "rollback_refused"):
            marks.setdefault(e.step, []).append(e)

    def marker(e) -> str:
        k = e.detail.get("tokens", "?")
        if e.kind == "rollback":
            note = e.detail.get("note") or f"rolled back {k} token(s)"
            return (f"<span class='sb-rollback' title='{html.escape(str(note), quote=True)}' "
                    f"style='color:#d62728;font-weight:bold;margin:0 4px;white-space:nowrap'>⟲ back {k}</span>")
        note = f"rollback of {k} token(s) refused: at most {e.detail.get('limit', '?')} rollbacks per generation"
        return (f"<span class='sb-rollback-refused' title='{html.escape(note, quote=True)}' "
                f"style='color:#ff9896;margin:0 4px;white-space:nowrap'>⟲ refused</span>")

    stops = _stops(stop)
    past_stop, so_far = False, ""
    parts: list[str] = []
    for s in steps:
        parts.extend(marker(e) for e in marks.pop(s.step, []))
        score = "not scored" if s.score is None else f"{score_name} {s.score:.3f}"
        tip = (f"step {s.step}, position {s.position}, token {s.text!r} (id {s.token_id}); {score}; "
               f"strength {s.strength:.3g} ({'steered' if s.steered else 'not steered'})")
        label = plots._token_label(s.text, limit=40)
        base = "white-space:pre;border-radius:3px;padding:1px 2px;margin:0 1px;"
        if s.discarded:
            tip += "; discarded by a rollback"
            parts.append(f"<s class='sb-discarded' title='{html.escape(tip, quote=True)}' "
                         f"style='{base}color:#8c8c8c;background:#e6e6e6'>{label}</s>")
        else:
            style = base + f"color:#111111;background:{score_colour(s.score, threshold)};"
            if s.steered:
                style += "border-bottom:2px solid #2ca02c;"
            if past_stop:
                style += "opacity:0.4;"
                tip += "; after the stop string, not part of the answer"
            parts.append(f"<span class='sb-token' title='{html.escape(tip, quote=True)}' style='{style}'>{label}</span>")
            so_far += s.text
            if stops and any(x in so_far for x in stops):
                past_stop = True
        if "\n" in s.text and not s.discarded:  # discarded newlines stay inline, struck through
            parts.append("<br>")
    for rest in marks.values():  # a rollback after the last token so far: regeneration comes next
        parts.extend(marker(e) for e in rest)
    if running:
        parts.append("<span class='sb-cursor' style='color:#1f77b4'>▌</span>")
    elif not steps:
        parts.append("<i style='color:#8c8c8c'>waiting…</i>")

    kept = [s for s in steps if not s.discarded]
    n_gone, n_rb = len(steps) - len(kept), sum(e.kind == "rollback" for e in events)
    body = "".join(parts)
    out = ["<div class='sb-live-trace' style='min-width:0'>"]
    if title:
        out.append(f"<div style='font-weight:bold;margin-bottom:4px'>{html.escape(title)}</div>")
    out.append("<div style='line-height:2.1;font-family:monospace;font-size:13px;border:1px solid #ccc;"
               f"padding:6px 8px;word-break:break-word'>{body}</div>")
    if steps:
        text = final_text if final_text is not None else "".join(s.text for s in kept)
        answer = cut_answer(text, stops) if stops else " ".join(text.split())
        scored = [s.score for s in kept if s.score is not None]
        facts = [f"{len(kept)} tokens kept"]
        if n_gone:
            facts.append(f"{n_gone} discarded in {n_rb} rollback(s)")
        if scored:
            facts.append(f"mean {score_name} {sum(scored) / len(scored):.2f}")
        out.append(f"<div style='margin-top:4px;color:#444'>{'; '.join(facts)}</div>")
        what = "answer (cut at the stop string)" if stops else "text"
        out.append(f"<div style='margin-top:2px'><b>{what}:</b> {html.escape(answer)}</div>")
    out.append("</div>")
    return "".join(out)


def trace_legend_html(threshold: float | None = None, score_name: str = "P(true)") -> str:
    """A one-line key to ``trace_html``'s colours and marks."""
    lo, hi = 0.0, 1.0
    mid = threshold if threshold is not None and lo < threshold < hi else 0.5
    chip = "display:inline-block;padding:0 6px;border-radius:3px;margin:0 2px;"
    parts = [f"<span style='{chip}background:{score_colour(v, threshold)}'>{v:g}</span>" for v in (lo, mid, hi)]
    where = f" (white = threshold {threshold:g})" if threshold is not None and lo < threshold < hi else ""
    return (f"<div style='font-size:12px;color:#444'>{html.escape(score_name)} the steerer read at each token: "
            f"{''.join(parts)}{where} · <s style='color:#8c8c8c;background:#e6e6e6'>struck through</s>: "
            "discarded by a rollback · <span style='color:#d62728'>⟲ back k</span>: regenerated from here "
            "(hover for why) · <span style='border-bottom:2px solid #2ca02c'>underlined</span>: steered</div>")


def trace_curves(trace) -> dict[str, list]:
    """The chart data of a Trace or Generation: score per observed token, strength per step, rollbacks.

    Keys: ``score_x``/``score_y``/``score_discarded`` (one entry per token with a score),
    ``step``/``strength``/``discarded`` (one per token produced), ``rollbacks`` ((step, tokens, note)).
    """
    steps, events, _ = _steps_and_events(trace)
    scored = [s for s in steps if s.score is not None]
    return {
        "score_x": [s.step for s in scored], "score_y": [float(s.score) for s in scored],
        "score_discarded": [s.discarded for s in scored],
        "step": [s.step for s in steps], "strength": [float(s.strength) for s in steps],
        "discarded": [s.discarded for s in steps],
        "rollbacks": [(e.step, e.detail.get("tokens"), e.detail.get("note", "")) for e in events
                      if e.kind == "rollback"],
    }


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


class LiveTrace(_App):
    """Watch a steered generation token by token: scores, rollbacks and strength as they happen.

    ``run()`` generates with ``steer`` (and, with ``compare``, the same prompt unsteered) and
    redraws after every token: the tokens coloured by the score the steerer read (P(true) for
    FASB; ``trace_html``) and a chart of score and strength per step with the ``threshold``
    line. The unsteered side runs ``steer.monitor()`` when the steerer has one (it reads the
    same probes and never intervenes: the same tokens as no steering, with scores), else no
    steerer. Results stay in ``.generation`` and ``.unsteered``; ``figure()`` is the static
    ``plots.trace`` of the steered one, for saving.

    ``stop`` (a string or several, e.g. ``"\n"`` for one-line answers) ends each generation
    once its text contains one (``generate(stop=...)``; a dynamic steerer still judges the last
    token and may roll back) and cuts the shown answer there. ``refresh`` is the least time in
    seconds between two redraws (rollbacks and the end always redraw); 0 redraws on every event.
    Other keyword arguments go to ``generate``.
    """

    def __init__(self, model, prompt, steer, max_new_tokens: int = 40, threshold: float | None = None,
                 compare: bool = True, stop: str | Sequence[str] | None = None, refresh: float = 0.1,
                 chat: bool = True,
                 score_name: str = "P(true)", **generate_kwargs):
        from steerbench.generation import Trace, _as_prompt

        if "on_step" in generate_kwargs:
            raise ValueError("LiveTrace sets on_step itself")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.steer = model, steer
        self.prompt = _as_prompt(model, prompt, chat)  # both runs get the very same ids
        self.max_new_tokens, self.stop, self.refresh = int(max_new_tokens), _stops(stop), float(refresh)
        self.threshold = threshold if threshold is not None else getattr(steer, "threshold", None)
        self.compare = bool(compare) and steer is not None
        self.baseline = steer.monitor() if self.compare and hasattr(steer, "monitor") else None
        self.score_name = score_name
        self.generate_kwargs = generate_kwargs
        self.generation: Generation | None = None
        self.unsteered: Generation | None = None
        self.n_events = 0  # events received from the loop, both runs
        self.n_redraws = 0
        self._traces = {"steered": Trace(), "unsteered": Trace()}
        self._running: str | None = None
        self._last_draw = 0.0
        self._shown = False

        self.steered_html = widgets.HTML(layout=widgets.Layout(width="50%" if self.compare else "100%"))
        self.unsteered_html = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.legend = widgets.HTML(trace_legend_html(self.threshold, score_name))
        self.chart = _figure_widget(self._empty_chart())
        columns = [self.steered_html] + ([self.unsteered_html] if self.compare else [])
        self.widget = widgets.VBox([self.legend, widgets.HBox(columns), self.chart])
        self._draw("steered")
        if self.compare:
            self._draw("unsteered")

    # -- titles and chart ------------------------------------------------------------------
    def _title(self, side: str) -> str:
        if side == "steered":
            return self.steer.describe() if self.steer is not None else "unsteered"
        if self.baseline is not None:
            return f"unsteered (the probes only read, threshold 0: {self.baseline.describe()})"
        return "unsteered"

    def _empty_chart(self) -> go.Figure:
        from plotly.subplots import make_subplots

        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=f"{self.score_name}, steered",
                                 line={"color": "#ff7f0e"}, marker={"size": 7},
                                 hovertemplate=f"step %{{x}}<br>{self.score_name} %{{y:.3f}}<extra></extra>"),
                      secondary_y=False)
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="steering strength",
                                 line={"shape": "hv", "color": "#1f77b4"}, marker={"size": 6},
                                 hovertemplate="step %{x}<br>strength %{y:.3g}<extra></extra>"),
                      secondary_y=True)
        if self.compare:
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=f"{self.score_name}, unsteered",
                                     line={"color": "#7f7f7f", "dash": "dot"}, marker={"size": 5},
                                     hovertemplate=f"step %{{x}}<br>{self.score_name} %{{y:.3f}}<extra></extra>"),
                          secondary_y=False)
        fig.update_layout(template="plotly_white", height=330, margin={"t": 40, "b": 50},
                          title=f"{self.score_name} and steering strength per generation step",
                          legend={"orientation": "h", "y": -0.25}, shapes=self._shapes([]))
        fig.update_xaxes(title_text="generation step (discarded tokens included)", rangemode="tozero")
        fig.update_yaxes(title_text=self.score_name, range=[-0.02, 1.02], secondary_y=False)
        fig.update_yaxes(title_text="steering strength", range=[-0.02, 1.02], tickmode="auto", showgrid=False,
                         secondary_y=True)
        return fig

    def _shapes(self, rollbacks) -> list[dict]:
        shapes = []
        if self.threshold is not None:
            shapes.append({"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y",
                           "y0": self.threshold, "y1": self.threshold,
                           "line": {"dash": "dash", "color": "#7f7f7f", "width": 1.5}})
        for step, _, _ in rollbacks:
            shapes.append({"type": "line", "xref": "x", "x0": step - 0.5, "x1": step - 0.5, "yref": "paper",
                           "y0": 0, "y1": 1, "line": {"dash": "dot", "color": "#d62728"}})
        return shapes

    def _draw(self, side: str) -> None:
        trace = self._traces[side]
        running = self._running == side
        result = self.generation if side == "steered" else self.unsteered
        source = result if (result is not None and not running) else trace
        page = trace_html(source, self.threshold, self.stop, self._title(side), running, self.score_name)
        (self.steered_html if side == "steered" else self.unsteered_html).value = page
        data = trace_curves(source)
        with _updating(self.chart):
            if side == "steered":
                score, strength = self.chart.data[0], self.chart.data[1]
                score.x, score.y = data["score_x"], data["score_y"]
                score.marker.color = ["#bdbdbd" if d else "#ff7f0e" for d in data["score_discarded"]]
                strength.x, strength.y = data["step"], data["strength"]
                strength.marker.color = ["#bdbdbd" if d else "#1f77b4" for d in data["discarded"]]
                top = max([1.0, *data["strength"]])  # both axes put 0 at the same height, unless
                low = min([0.0, *data["strength"]])  # a learned strength (CLAS) goes negative
                self.chart.layout.yaxis2.range = [low - 0.02 * (top - low), 1.02 * top]
                self.chart.layout.shapes = self._shapes(data["rollbacks"])
                self.chart.layout.annotations = [
                    {"x": step - 0.5, "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "showarrow": False,
                     "text": f"⟲ back {k}", "hovertext": html.escape(str(note)), "font": {"color": "#d62728"}}
                    for step, k, note in data["rollbacks"]
                ]
            else:
                self.chart.data[2].x, self.chart.data[2].y = data["score_x"], data["score_y"]
        self.n_redraws += 1

    # -- running ---------------------------------------------------------------------------
    def _generate(self, side: str, steer):
        import time

        from steerbench.generation import TokenStep, Trace, generate

        trace = Trace()
        self._traces[side] = trace
        self._running = side
        self._last_draw = 0.0

        def on_step(item) -> None:
            # the loop hands over its own TokenStep objects: scores and discards it sets later show up here
            (trace.steps if isinstance(item, TokenStep) else trace.events).append(item)
            self.n_events += 1
            now = time.monotonic()
            if not isinstance(item, TokenStep) or now - self._last_draw >= self.refresh:
                self._last_draw = now
                self._draw(side)

        try:
            g = generate(self.model, self.prompt, steer=steer, max_new_tokens=self.max_new_tokens,
                         stop=self.stop, on_step=on_step, **self.generate_kwargs)
            if side == "steered":
                self.generation = g
            else:
                self.unsteered = g
            self._traces[side] = g.trace
        finally:
            self._running = None
            self._draw(side)  # the last token's score arrives after its event; an interrupted run shows what it had
        return g

    def run(self, show: bool | None = None):
        """Generate (steered, then unsteered with ``compare``), redrawing as tokens come.

        Returns the steered ``Generation``, or ``(steered, unsteered)`` with ``compare``.
        ``show`` displays the app first (default: when running in a notebook kernel and not
        displayed by ``run`` before), so a cell that calls ``run()`` shows it live.
        """
        if show is None:
            show = _in_kernel() and not self._shown
        if show:
            from IPython.display import display

            display(self.widget)
            self._shown = True
        from steerbench.generation import Trace

        self.generation = self.unsteered = None
        self._traces = {"steered": Trace(), "unsteered": Trace()}
        for side in ("steered", "unsteered") if self.compare else ("steered",):
            self._draw(side)  # a second run starts from empty columns
        steered = self._generate("steered", self.steer)
        if not self.compare:
            return steered
        return steered, self._generate("unsteered", self.baseline)

    def figure(self, title: str | None = None) -> go.Figure:
        """The static ``plots.trace`` figure of the steered generation (``plots.save_html`` writes it)."""
        if self.generation is None:
            raise ValueError("nothing generated yet: call run() first")
        return plots.trace(self.generation, self.threshold, title=title)


def _answer_table():
    import pandas as pd

    class AnswerTable(pd.DataFrame):
        """A DataFrame of answers that a notebook shows whole: every answer wrapped in its
        cell, none cut with "…" at pandas' ``display.max_colwidth``."""

        @property
        def _constructor(self):
            return AnswerTable

        def _repr_html_(self) -> str:
            with pd.option_context("display.max_colwidth", None):
                table = self.to_html(escape=True)
            style = ("<style>.steerbench-answers td, .steerbench-answers th {white-space: pre-wrap; "
                     "text-align: left; vertical-align: top; max-width: 32em; overflow-wrap: anywhere}</style>")
            return f'<div class="steerbench-answers">{style}{table}</div>'

    return AnswerTable


def compare_answers(model, prompts, steers: Mapping[str, Any], max_new_tokens: int = 40,
                    stop: str | Sequence[str] | None = "\n", done: Mapping[str, Sequence[Any]] | None = None,
                    **generate_kwargs):
    """A table of answers: one row per prompt, one column per steerer (None = unsteered).

    ``prompts`` is a mapping label -> prompt (str or ``Prompt``) or a sequence of prompts
    (labelled by their text). Each answer is ``generate(..., stop=stop).text``, stripped
    (``cut_answer``); greedy unless ``temperature`` says otherwise. ``done`` gives columns
    already generated (e.g. ``LiveTrace``'s ``.unsteered`` and ``.generation``): one
    Generation or text per prompt, in order; those columns are not generated again.
    """

    from steerbench.generation import generate

    items = list(prompts.items()) if isinstance(prompts, Mapping) else [
        (_short(getattr(p, "text", p), 80), p) for p in prompts]
    done = dict(done or {})
    if not items or not (steers or done):
        raise ValueError("give at least one prompt and one steerer")
    for name, made in done.items():
        if len(made) != len(items):
            raise ValueError(f"done[{name!r}] has {len(made)} answers for {len(items)} prompts")
    columns = list(dict.fromkeys([*steers, *done]))
    rows = []
    for i, (label, prompt) in enumerate(items):
        row = {"prompt": label}
        for name in columns:
            if name in done:
                text = getattr(done[name][i], "text", done[name][i])
            else:
                text = generate(model, prompt, steer=steers[name], max_new_tokens=max_new_tokens,
                                stop=_stops(stop), **generate_kwargs).text
            row[name] = cut_answer(text, stop)
        rows.append(row)
    return _answer_table()(rows).set_index("prompt")  # shown whole in a notebook, never cut with "…"
