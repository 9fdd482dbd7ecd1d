"""A self-contained HTML page of figures and generations (works offline)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path


def generations_html(rows: Sequence[dict]) -> str:
    """A table: one row per prompt, one column per multiplier."""
    if not rows:
        return ""
    mults = sorted({r["multiplier"] for r in rows})
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    cell = {(r["prompt"], r["multiplier"]): r["text"] for r in rows}
    head = "".join(f"<th>m = {m:g}{' (unsteered)' if m == 0 else ''}</th>" for m in mults)
    body = []
    for p in prompts:
        cells = "".join(f"<td>{html.escape(cell.get((p, m), ''))}</td>" for m in mults)
        body.append(f"<tr><th>{html.escape(p)}</th>{cells}</tr>")
    return f"<table><tr><th>prompt</th>{head}</tr>{''.join(body)}</table>"


def write_page(path: str | Path, title: str, sections: Sequence[tuple[str, object]]) -> Path:
    """Write sections (heading, figure or HTML string or pandas table) to one HTML file."""
    parts, first_fig = [], True
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if hasattr(content, "to_html") and hasattr(content, "layout"):  # plotly figure
            # no fixed width: the figure fills the page's column and follows the window
            parts.append(content.to_html(full_html=False, include_plotlyjs=first_fig, default_width="100%",
                                         config={"responsive": True, "displaylogo": False}))
            first_fig = False
        elif hasattr(content, "to_html"):  # pandas
            parts.append(content.to_html(index=False, float_format=lambda x: f"{x:.3f}"))
        else:
            parts.append(str(content))
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:6px;"
             "vertical-align:top;text-align:left;font-size:14px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(page)
    return p
