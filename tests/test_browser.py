"""The notebooks as a user sees them: JupyterLab on 127.0.0.1, driven in headless Chromium.

Notebooks 01, 04 and 05 run with the menu's Run All in a JupyterLab started for this module
(a copy of each notebook in a temporary folder, so autosave never touches ``notebooks/``),
in Debian's Chromium driven by Playwright. Playwright rather than Selenium: it drives the
system browser over the DevTools protocol with no chromedriver to match, reports console
messages and page errors as events, waits on selectors by itself, and its mouse moves
through intermediate points, so a slider drag is a real drag.

From the DOM, for every notebook: each code cell ran and no output is an error (read back
from the saved notebook); every figure drew its SVG and fits inside its output area; no
"Error displaying widget"; no console error or uncaught page error. Notebook 04: dragging
PCAExplorer's slider changes the figure's title to the layer the slider shows, as does an
arrow key. Notebook 05: LiveTrace strikes through rolled-back tokens. After a page reload,
with the kernel still running, every output shows what it showed before (titles, points
drawn, slider readouts, token panels).

Screenshots of every figure and widget go to ``$STEERBENCH_BROWSER_SHOTS`` (default
``build/browser/`` in the checkout); the test prints the folder. Without Chromium or
Playwright it skips, except under ``CI=true``, where ``.ci/run`` installs the browser and a
missing one fails. ``make test-browser`` runs this file alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# notebook -> the least number of figures it draws (plotly figures and figure widgets)
NOTEBOOKS = {"01_quickstart.ipynb": 3, "04_pca.ipynb": 3, "05_fasb_live.ipynb": 8}
RUN_TIMEOUT_S = 900  # one notebook's Run All
CHROMIUM = os.environ.get("STEERBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (it is in the dev extras)"
    return None


if _missing():
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test cannot run in CI: {_missing()}", pytrace=False)
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

SHOTS = Path(os.environ.get("STEERBENCH_BROWSER_SHOTS") or ROOT / "build" / "browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pids: list[int]) -> None:
    """SIGTERM the processes, then SIGKILL what is left after 20 s; by PID."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Lab:
    """A JupyterLab server of this test: its URL, token, folder and process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        settings = folder.parent / "lab-settings"
        # a new user's JupyterLab but for two prompts: which kernel (the notebook's own) and Jupyter news
        for plugin, values in {"apputils-extension/notification": {"fetchNews": "false"}}.items():
            path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTER_CONFIG_DIR=str(folder.parent / "jupyter-config"),
                   JUPYTER_RUNTIME_DIR=str(folder.parent / "jupyter-runtime"))
        self.log = (folder.parent / "jupyterlab.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={folder}",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not start: {(folder.parent / 'jupyterlab.log').read_text()}")
                time.sleep(0.5)

    def pids(self) -> list[int]:
        """The server and everything it started (its kernels), children first."""
        import psutil

        try:
            server = psutil.Process(self.process.pid)
            return [c.pid for c in server.children(recursive=True)] + [server.pid]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        pids = self.pids()
        _stop(pids)
        self.process.wait(timeout=30)
        self.log.close()
        left = [pid for pid in pids if _alive(pid)]
        assert not left, f"processes of the test's JupyterLab still running: {left}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser") / "notebooks"
    folder.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, folder / name)
    server = Lab(folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, lab):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.problems = []  # console errors and uncaught page errors
    page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    yield page
    context.close()


# --- reading the page ---------------------------------------------------------------------

# per output area: what it shows, for comparing before and after a reload
_SIGNATURE_JS = """
() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].map((out, i) => ({
  index: i,
  cell: (out.closest('.jp-CodeCell')?.querySelector('.cm-line')?.textContent || '').slice(0, 60),
  mime: out.dataset.mimeType || '',
  widget: !!out.querySelector('.jupyter-widgets'),
  titles: [...out.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent),
  points: [...out.querySelectorAll('.js-plotly-plot')].map(p => p.querySelectorAll('.scatterlayer path.point').length),
  lines: [...out.querySelectorAll('.js-plotly-plot')].map(
      p => [...p.querySelectorAll('.scatterlayer path.js-line')].filter(l => (l.getAttribute('d') || '').length > 0).length),
  readouts: [...out.querySelectorAll('.widget-readout')].map(r => r.textContent.trim()),
  struck: out.querySelectorAll('s.sb-discarded').length,
  text: [...out.querySelectorAll('.widget-html-content')].map(h => h.textContent.replace(/\\s+/g, ' ').trim()),
  broken: out.textContent.includes('Error displaying widget'),
  image: !!out.querySelector('img.plot-img'),
}))
"""

_PROMPTS_JS = """
() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim())
"""


def _open(page: Page, lab: Lab, name: str) -> None:
    # a workspace of its own, reset: the notebooks opened before stay closed
    page.goto(f"{lab.url}/lab/workspaces/{name.removesuffix('.ipynb')}/tree/{name}?reset&token={lab.token}")
    _ready(page)


def _ready(page: Page) -> None:
    """Wait for the notebook and its kernel; answer "Select Kernel" with the notebook's own."""
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.wait_for_timeout(2000)
    accept = page.locator(".jp-Dialog .jp-mod-accept")  # Select Kernel: the notebook's own
    if accept.count():
        accept.click()


def _run_all(page: Page) -> None:
    """Run > Run All Cells from the menu bar, then wait until no cell is queued or running."""
    for attempt in range(3):  # the kernel may still be connecting: then the command does nothing
        page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        try:
            page.wait_for_function(f"() => ({_PROMPTS_JS})().some(p => p.includes('*') || /[0-9]/.test(p))",
                                   timeout=20_000)
            break
        except PlaywrightTimeout:
            page.screenshot(path=str(SHOTS / f"run-all-attempt{attempt}.png"))
            if attempt == 2:
                raise
    page.wait_for_function(
        f"() => !({_PROMPTS_JS})().some(p => p.includes('*'))"
        " && document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]')",
        timeout=RUN_TIMEOUT_S * 1000, polling=1000)


def _save(page: Page, lab: Lab, name: str) -> dict:
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    before = (lab.folder / name).stat().st_mtime
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while (lab.folder / name).stat().st_mtime == before and time.monotonic() < deadline:
        time.sleep(0.2)
    while True:  # the server may still be writing it: read until it parses
        try:
            return json.loads((lab.folder / name).read_text())
        except json.JSONDecodeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _show_every_output(page: Page) -> None:
    """Scroll each output into view (JupyterLab skips drawing cells out of view) and let plotly draw."""
    outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
    for i in range(outputs.count()):
        outputs.nth(i).scroll_into_view_if_needed()
        if _has_figure(outputs.nth(i)):
            outputs.nth(i).locator(".main-svg").first.wait_for(timeout=30_000)


def _has_figure(output) -> bool:
    """A plotly figure (the output itself, as the mime renderer draws it, or inside a widget)."""
    return output.evaluate("o => !!(o.matches('.js-plotly-plot') || o.querySelector('.js-plotly-plot'))")


def _shoot(page: Page, name: str, tag: str) -> None:
    outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
    stem = name.removesuffix(".ipynb")
    for i in range(outputs.count()):
        out = outputs.nth(i)
        if _has_figure(out) or out.locator(".jupyter-widgets").count():
            out.scroll_into_view_if_needed()
            out.screenshot(path=str(SHOTS / f"{stem}-{tag}-output{i:02d}.png"))


def _figures_fit(page: Page) -> list[str]:
    """Figures wider than their output area, as 'output i: figure w px in an area of a px'."""
    return page.evaluate("""
() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].flatMap((out, i) => {
  const area = out.getBoundingClientRect();
  return [...out.querySelectorAll('.js-plotly-plot .main-svg')].slice(0, 1).map(svg => svg.getBoundingClientRect())
    .filter(r => r.right > area.right + 2 || r.left < area.left - 2)
    .map(r => `output ${i}: figure ${Math.round(r.width)} px in an area of ${Math.round(area.width)} px`);
})""")


# --- the test -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_in_the_browser(page, lab, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {SHOTS}")
    _open(page, lab, name)
    t0 = time.monotonic()
    _run_all(page)
    print(f"{name}: Run All took {time.monotonic() - t0:.0f} s")

    saved = _save(page, lab, name)
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert all(c["execution_count"] for c in code), f"{name}: not every code cell ran"

    _show_every_output(page)
    (SHOTS / f"{name.removesuffix('.ipynb')}-run.html").write_text(page.content())
    before = page.evaluate(_SIGNATURE_JS)
    figures = page.locator(".jp-Notebook .js-plotly-plot")
    kinds = page.evaluate("() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]"
                          ".map(o => o.dataset.mimeType + (o.querySelector('.js-plotly-plot') ? ' (figure)' : ''))")
    assert figures.count() >= NOTEBOOKS[name], f"{name}: {figures.count()} figures drawn; outputs: {kinds}"
    for i in range(figures.count()):
        assert figures.nth(i).locator(".main-svg").count(), f"{name}: figure {i} drew no SVG"
    broken = [(s["cell"], s["mime"]) for s in before if s["broken"]]
    assert not broken, f"{name}: Error displaying widget, in the outputs of {broken}"
    too_wide = _figures_fit(page)
    assert not too_wide, f"{name}: figures wider than the page: {too_wide}"

    if name == "04_pca.ipynb":
        _drag_the_layer_slider(page)
        before = page.evaluate(_SIGNATURE_JS)
    if name == "05_fasb_live.ipynb":
        struck = [s["struck"] for s in before if s["widget"]]
        assert any(struck), f"no LiveTrace shows a struck-through (rolled back) token: {struck}"
        assert all(s["points"] and max(s["points"]) > 0 for s in before if s["widget"] and s["points"]), \
            "a LiveTrace chart drew no points"
    _shoot(page, name, "run")

    # A reload under load (CI: the other test worker runs a notebook) can miss ipywidgets'
    # own time limits for restoring models from the kernel (the control comm's 4 s, a view's
    # 2 s wait for its model): the page then shows "Error displaying widget: model not found"
    # and a second reload restores it. Up to 3 reloads, each miss printed; a widget that never
    # comes back, or comes back showing something else, fails.
    for attempt in range(3):
        page.reload()
        _ready(page)
        page.wait_for_function(
            f"() => document.querySelectorAll('.jp-Notebook .js-plotly-plot').length >= {figures.count()}"
            " || document.body.textContent.includes('Error displaying widget')", timeout=60_000)
        after = _settled(page, before)
        (SHOTS / f"{name.removesuffix('.ipynb')}-reloaded.html").write_text(page.content())
        _shoot(page, name, "reloaded")
        broken = [(s["cell"], s["mime"]) for s in after if s["broken"]]
        if not broken:
            break
        print(f"{name}: reload {attempt + 1}: Error displaying widget in the outputs of {broken}; problems {page.problems}")
        page.problems.clear()
    assert not broken, f"{name}: Error displaying widget after 3 reloads, in the outputs of {broken}"
    changed = [(b, a) for b, a in zip(before, after) if not _same_after_reload(b, a)]
    assert len(after) == len(before) and not changed, f"{name}: outputs differ after a reload: {changed[:2]}"
    assert not page.problems, f"{name}: {page.problems}"


def _settled(page: Page, before: list[dict], seconds: float = 90) -> list[dict]:
    """The outputs' signatures once they show what they showed before the reload, or once a
    widget reports an error, or after ``seconds`` (whatever they show then).

    A widget view draws its figure only after the page has compiled plotly's bundle and the
    kernel has sent the model's state, which under load (CI: another worker runs a notebook)
    comes seconds after the figure's container exists: one look right after the reload saw a
    PCAExplorer with its slider but an empty figure."""
    deadline = time.monotonic() + seconds
    while True:
        _show_every_output(page)
        after = page.evaluate(_SIGNATURE_JS)
        same = len(after) == len(before) and all(_same_after_reload(b, a) for b, a in zip(before, after))
        if same or any(s["broken"] for s in after) or time.monotonic() > deadline:
            return after
        page.wait_for_timeout(1_000)


def _same_after_reload(before: dict, after: dict) -> bool:
    """Whether an output shows after a reload what it showed before.

    A widget: exactly (titles, points, lines, slider readouts, token panels). A plain plotly
    figure (not a widget) of a notebook JupyterLab reopens as untrusted is drawn by plotly's
    renderer as the PNG it stored with the output, the same picture without hover (JupyterLab
    does not sign a notebook saved after Run All; ``jupyter trust`` does): that counts as the same."""
    if before == after:
        return True
    return not before["widget"] and bool(before["titles"]) and after["image"] and not after["widget"]


def _drag_the_layer_slider(page: Page) -> None:
    """PCAExplorer: drag the slider's handle with the mouse, then press an arrow key; the title follows."""
    explorer = page.locator(".jp-OutputArea-output", has=page.locator(".widget-slider")).last
    explorer.scroll_into_view_if_needed()
    handle, track = explorer.locator(".noUi-handle").first, explorer.locator(".noUi-target").first
    title = explorer.locator(".js-plotly-plot .gtitle").first
    readout = explorer.locator(".widget-readout").first
    first = title.text_content()
    box, bar = handle.bounding_box(), track.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(bar["x"] + bar["width"] * 0.6, box["y"] + box["height"] / 2, steps=12)
    page.mouse.up()
    layer = readout.text_content().strip()
    assert layer != "0", "the drag did not move the slider"
    page.wait_for_function("([el, old]) => el.textContent !== old", arg=[title.element_handle(), first], timeout=30_000)
    assert re.search(rf"\b{layer}\b", title.text_content()), f"title {title.text_content()!r} for layer {layer}"

    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, old]) => el.textContent.trim() !== old", arg=[readout.element_handle(), layer])
    nxt = readout.text_content().strip()
    page.wait_for_function("([el, n]) => new RegExp('\\\\b' + n + '\\\\b').test(el.textContent)",
                           arg=[title.element_handle(), nxt], timeout=30_000)


def test_report_figures_fit_the_window(browser, tmp_path):
    """A report page (``report.write_page``, as the demo and the bench write) at window widths
    from 1,000 px: every figure, its legend and colour bar inside the window."""
    import numpy as np
    import pandas as pd

    from steerbench import plots
    from steerbench.report import write_page

    rows = [{"layer": L, "multiplier": m, "unit": "m (x v[L])", "win_rate": 0.5 + 0.05 * m * (L % 3),
             "letter": 0.5 + 0.02 * m, "margin": m, "n": 25}
            for L in (4, 8, 12, 16, 18, 22) for m in (-4, -2, 0, 2, 4)]
    heat = plots.go.Figure(plots.go.Heatmap(z=np.random.default_rng(0).random((30, 9)), colorbar={"title": "acc"}))
    page = write_page(tmp_path / "report.html", "fits", [("A/B sweep", plots.ab_sweep(pd.DataFrame(rows))),
                                                          ("grid", heat)])
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1000, 1280, 1500):
        context = browser.new_context(viewport={"width": width, "height": 900})
        p = context.new_page()
        p.goto(page.as_uri())
        p.wait_for_selector(".js-plotly-plot .main-svg")
        p.wait_for_timeout(500)
        outside = p.evaluate("""(width) => [...document.querySelectorAll('.js-plotly-plot')].flatMap((plot, i) =>
            [...plot.querySelectorAll('.main-svg, .legend, .colorbar')]
              .map(el => [el.getAttribute('class'), el.getBoundingClientRect()])
              .filter(([, r]) => r.width > 0 && (r.left < -1 || r.right > width + 1))
              .map(([c, r]) => `figure ${i}: ${c} spans ${Math.round(r.left)}-${Math.round(r.right)} px`))""", width)
        p.screenshot(path=str(SHOTS / f"report-{width}px.png"), full_page=True)
        context.close()
        assert not outside, f"at {width} px: {outside}"
