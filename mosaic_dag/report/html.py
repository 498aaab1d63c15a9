"""A self-contained HTML page for the report: images embedded as base64, tables sortable by a few lines
of inline JavaScript, no server and no network needed to read it."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["data_uri", "html_page", "html_table", "markdown_image"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.1em}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0 1em}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}th.asc:after{content:" ▲"}th.desc:after{content:" ▼"}
tr.selected td{background:#eef6ff}.note{color:#555;max-width:60em}.skip{color:#a33}
.scroll{overflow-x:auto}footer{margin-top:3em;border-top:1px solid #ddd;font-size:.8em;color:#555}
mark{background:#ffd54f;padding:0 1px}code{background:#f5f5f5;padding:0 3px}
"""

# click a header: sort its table by that column (numbers numerically, empty cells last); click again: reverse
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var asc=!th.classList.contains('asc');
      t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
      th.classList.add(asc?'asc':'desc');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[i].textContent.trim(),y=b.cells[i].textContent.trim();
        if(x===''&&y!=='')return 1; if(y===''&&x!=='')return -1;
        var nx=parseFloat(x),ny=parseFloat(y),c;
        if(!isNaN(nx)&&!isNaN(ny)&&/^[-+0-9.eE]+$/.test(x)&&/^[-+0-9.eE]+$/.test(y))c=nx-ny;else c=x.localeCompare(y);
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r)});
    });
  });
});
"""


def data_uri(path: Path) -> str:
    """A PNG (or SVG) file as a ``data:`` URI, for pages and Dagster markdown that must not link files."""
    kind = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def markdown_image(path: Path, alt: str) -> str:
    return f"![{alt}]({data_uri(path)})"


def _cell(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def html_table(df: pd.DataFrame | None, max_rows: int = 500, raw_columns: Sequence[str] = ()) -> str:
    """A sortable table; rows whose ``selected`` column is true are highlighted; ``raw_columns`` hold HTML."""
    if df is None or len(df) == 0:
        return "<p>No rows.</p>"
    shown = df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    sel = list(shown.columns).index("selected") if "selected" in shown.columns else None
    for row in shown.itertuples(index=False):
        cls = ' class="selected"' if sel is not None and bool(row[sel]) is True else ""
        cells = "".join(f"<td>{v if c in raw_columns else _cell(v)}</td>" for c, v in zip(shown.columns, row, strict=True))
        body.append(f"<tr{cls}>{cells}</tr>")
    more = f"<p class='note'>… {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    return (f"<div class='scroll'><table class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>{more}")


def _inline_md(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def markdown_to_html(text: str) -> str:
    """Headings, bullets and paragraphs of the report's own short notes (not a general markdown parser)."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if block.startswith("#"):
            level = min(len(block) - len(block.lstrip("#")) + 0, 4)
            blocks.append(f"<h{level}>{_inline_md(block.lstrip('#').strip())}</h{level}>")
        elif all(ln.lstrip().startswith("- ") for ln in lines):
            blocks.append("<ul>" + "".join(f"<li>{_inline_md(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        elif block.lstrip().startswith("|"):
            blocks.append(f"<pre>{html.escape(block)}</pre>")
        else:
            blocks.append(f"<p>{_inline_md(' '.join(lines))}</p>")
    return "\n".join(blocks)


def _figure(heading: str, png: Path | None, skipped: str | None, level: int = 3) -> str:
    if png is None:
        return f"<h{level}>{html.escape(heading)}</h{level}><p class='skip'>Skipped: {html.escape(str(skipped))}.</p>"
    svg = png.with_suffix(".svg")
    link = f" <a href='{html.escape(svg.name)}'>SVG</a>" if svg.exists() else ""
    return (f"<h{level}>{html.escape(heading)}</h{level}><img alt='{html.escape(heading)}' src='{data_uri(png)}'>"
            f"<p class='note'>{html.escape(png.name)}{link}</p>")


def html_page(
    title: str,
    *,
    summary: pd.DataFrame | None,
    summary_note: str,
    comparisons: pd.DataFrame | None,
    comparisons_note: str,
    figures: Sequence[tuple[str, Path | None, str | None]],
    transfer: Sequence[tuple[str, Path | None, str | None, Mapping[str, pd.DataFrame]]],
    conditions: tuple[Path | None, str | None, pd.DataFrame | None],
    results: pd.DataFrame | None,
    extra_md: str,
    provenance: Mapping[str, str],
    sections_html: str = "",
) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Selected configuration per source</h2>",
             f"<p class='note'>{_inline_md(summary_note)}</p>", html_table(summary)]
    if comparisons is not None and len(comparisons):
        parts += ["<h2>SAE vs hidden states vs TF-IDF (paired, selected configurations)</h2>",
                  f"<p class='note'>{_inline_md(comparisons_note)}</p>", html_table(comparisons)]
    parts.append("<h2>Figures</h2>")
    parts += [_figure(h, p, s) for h, p, s in figures]
    if transfer:
        parts += ["<h2>Cross-lingual transfer</h2>",
                  "<p class='note'>Rows: train language; columns: test language; cells: test macro-F1.</p>"]
        for name, png, skipped, panels in transfer:
            parts.append(_figure(name, png, skipped))
            for ptitle, matrix in panels.items():
                if matrix is not None and matrix.size:
                    parts += [f"<p>{html.escape(ptitle)}</p>" if ptitle else "", html_table(matrix.round(3).reset_index())]
    png, skipped, curves = conditions
    parts += ["<h2>Hard conditions</h2>", _figure("Hard conditions", png, skipped, 3)]
    if curves is not None and len(curves):
        parts.append(html_table(curves.reset_index(drop=True)))
    if sections_html:
        parts.append(sections_html)
    if results is not None and len(results):
        parts += ["<h2>All results</h2>", "<p class='note'>Click a column header to sort; selected rows are "
                  "highlighted.</p>", html_table(results, max_rows=2000)]
    if extra_md.strip():
        parts.append(markdown_to_html(extra_md))
    foot = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in provenance.items())
    parts.append(f"<footer><b>Provenance</b><ul>{foot or '<li>not recorded</li>'}</ul></footer>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>")
