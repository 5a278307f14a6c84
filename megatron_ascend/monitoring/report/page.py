"""The reports' HTML: one self-contained page (no network) that shows the verdict, tables and figures.

A small script runs when the page has loaded: every figure records whether it loaded (``data-natural-width``)
and where it sits (``data-rect``), a figure that failed gets a visible "figure failed to load" line, and
``<body data-figures data-figures-failed>`` hold the counts (tests/test_report_browser.py reads them from a
headless browser, and a reader sees a broken figure named instead of an empty frame).
"""
from __future__ import annotations

import html
from typing import Dict, List, Optional, Sequence, Tuple

from .analysis import fmt_num

CSS = """
body{font-family:sans-serif;margin:1.5em 2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}
figure{margin:0.8em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}
.verdict li{margin:0.3em 0}.warn{background:#fff3cd;border:1px solid #e0c060;padding:0.5em 1em}
.missing{color:#b00;font-weight:bold}code{font-size:0.9em}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i], r = im.getBoundingClientRect();
    im.setAttribute('data-natural-width', String(im.naturalWidth));
    im.setAttribute('data-rect', [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]
      .map(Math.round).join(','));
    if (!im.complete || im.naturalWidth === 0) {
      bad++;
      var p = document.createElement('p');
      p.className = 'missing';
      p.textContent = 'figure failed to load: ' + im.getAttribute('src');
      im.parentNode.insertBefore(p, im.nextSibling);
    }
  }
  document.body.setAttribute('data-figures', String(imgs.length));
  document.body.setAttribute('data-figures-failed', String(bad));
  document.body.setAttribute('data-page-height', String(document.documentElement.scrollHeight));
});
"""


def esc(v) -> str:
    return html.escape(str(v))


def cell(v) -> str:
    if isinstance(v, float) or isinstance(v, int) and not isinstance(v, bool):
        return fmt_num(v)
    if v is None:
        return "n/a"
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence], left_cols: int = 1) -> str:
    h = "".join(f"<th class='l'>{esc(x)}</th>" if i < left_cols else f"<th>{esc(x)}</th>"
                for i, x in enumerate(header))
    body = ""
    for row in rows:
        body += "<tr>" + "".join(f"<td class='l'>{cell(x)}</td>" if i < left_cols else f"<td>{cell(x)}</td>"
                                 for i, x in enumerate(row)) + "</tr>"
    return f"<table><tr>{h}</tr>{body}</table>"


def transposed(labels: Sequence[str], rows: Dict[str, Dict[str, object]], keys: Sequence[str]) -> str:
    """One column per run, one row per key."""
    return table([""] + list(labels), [[k] + [rows[lab].get(k) for lab in labels] for k in keys])


def figure(name: str, caption: str) -> str:
    return (f"<figure><img class='figure' src='{esc(name)}' alt='{esc(caption)}' data-figure='{esc(name)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


class Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: List[str] = []

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{esc(text)}</h2>")

    def p(self, text: str, cls: Optional[str] = None) -> None:
        self.parts.append(f"<p{f' class={chr(39)}{cls}{chr(39)}' if cls else ''}>{esc(text)}</p>")

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def bullets(self, items: Sequence[str], cls: str = "") -> None:
        self.parts.append(f"<ul class='{cls}'>" + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>")

    def figures(self, figs: Sequence[Tuple[str, str]]) -> None:
        for name, caption in figs:
            self.parts.append(figure(name, caption))

    def render(self) -> str:
        return ("<!doctype html><html><head><meta charset='utf-8'>"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
                f"<h1>{esc(self.title)}</h1>" + "".join(self.parts)
                + f"<script>{CHECK_SCRIPT}</script></body></html>")
