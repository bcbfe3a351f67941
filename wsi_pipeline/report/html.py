"""HTML building blocks of the report: escaping, tables, figures as data: URIs, the page with inline CSS.

Everything is inline — no CDN, no external fonts, no JavaScript — so the file opens anywhere offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --accent:#0b6e99; --accent-2:#0b3c5d; --bg:#f3f5f8; --card:#fff;
        --border:#e1e5ea; --good:#1a7f4b; --bad:#b42318; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header.top { background:linear-gradient(120deg,var(--accent-2),var(--accent)); color:#fff; padding:28px 0 22px; }
header.top .inner, nav .inner, main { max-width:1320px; margin:0 auto; padding:0 32px; }
header.top h1 { margin:0 0 4px; font-size:26px; font-weight:650; letter-spacing:.2px; }
header.top .sub { opacity:.85; font-size:13px; }
.stats { display:flex; flex-wrap:wrap; gap:12px; margin-top:18px; }
.stat { background:rgba(255,255,255,.13); border:1px solid rgba(255,255,255,.18); border-radius:10px;
        padding:8px 16px; min-width:120px; }
.stat b { display:block; font-size:22px; line-height:1.2; }
.stat span { font-size:12px; opacity:.85; }
.stat.bad b { color:#ffd2cc; }
nav { position:sticky; top:0; z-index:10; background:#fff; border-bottom:1px solid var(--border);
      box-shadow:0 1px 3px rgba(16,24,40,.06); }
nav .inner { display:flex; flex-wrap:wrap; gap:4px 18px; padding-top:9px; padding-bottom:9px; }
nav a { color:var(--accent); text-decoration:none; font-weight:550; font-size:13px; }
nav a:hover { text-decoration:underline; }
main { padding-top:24px; padding-bottom:24px; }
section.card { background:var(--card); border:1px solid var(--border); border-radius:12px; padding:20px 24px;
               margin-bottom:22px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
section.card > h2 { margin:0 0 4px; font-size:19px; font-weight:650; }
section.card > .lead { color:var(--muted); margin:0 0 14px; font-size:13px; }
h3 { font-size:15px; margin:18px 0 8px; font-weight:620; }
.table-wrap { overflow:auto; max-height:620px; border:1px solid var(--border); border-radius:8px; }
table { border-collapse:collapse; width:100%; font-size:12.5px; }
table.compact { width:auto; min-width:420px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--border); text-align:left; vertical-align:middle;
         white-space:nowrap; }
th { background:#f5f7fa; font-weight:600; color:#3e4c59; position:sticky; top:0; z-index:1; }
tbody tr:nth-child(even) td { background:#fafbfc; }
tbody tr:hover td { background:#eef6fb; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
td.wrap { white-space:normal; min-width:260px; }
.thumb img { height:58px; max-width:110px; object-fit:contain; border-radius:4px; border:1px solid var(--border);
             background:#fff; display:block; }
.badge { display:inline-block; padding:1px 9px; border-radius:999px; font-size:11.5px; font-weight:600;
         background:#e9edf2; color:#3e4c59; }
.badge.inflamed { background:#fde4e1; color:#a3261b; }
.badge.excluded { background:#fff0d1; color:#8a5300; }
.badge.desert { background:#e2ebf8; color:#1d4f91; }
.badge.pos { background:#dcf3e6; color:var(--good); }
.badge.neg { background:#eceff3; color:#52606d; }
.badge.failed { background:#fde4e1; color:var(--bad); }
.bar { display:inline-block; width:74px; height:7px; border-radius:4px; background:#e4e8ee; margin-right:6px;
       vertical-align:middle; overflow:hidden; }
.bar > i { display:block; height:100%; background:var(--accent); }
.figs { display:grid; grid-template-columns:repeat(auto-fill,minmax(360px,1fr)); gap:16px; margin:12px 0; }
.figs.wide { grid-template-columns:1fr; }
.figs.wide img { max-width:1200px; }
figure { margin:0; }
figure img { width:100%; height:auto; border:1px solid var(--border); border-radius:8px; background:#fff; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.callout { border-left:4px solid var(--accent); background:#eef6fb; padding:10px 14px; border-radius:6px;
           margin:6px 0 14px; }
.callout.warn { border-color:#d97706; background:#fff7e6; }
.note { color:var(--muted); font-size:12.5px; }
.kv { display:grid; grid-template-columns:max-content 1fr; gap:2px 14px; font-size:13px; margin:6px 0 10px; }
.kv dt { color:var(--muted); }
.kv dd { margin:0; }
.err { color:var(--bad); font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px;
       white-space:pre-wrap; }
a.hm { color:var(--accent); text-decoration:none; margin-right:8px; font-size:12px; }
a.hm:hover { text-decoration:underline; }
footer { color:var(--muted); text-align:center; font-size:12px; padding:8px 0 30px; }
@media print { nav { position:static; } .table-wrap { max-height:none; } }
"""

PHENOTYPE_CLASSES = ("inflamed", "excluded", "desert")


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if not math.isfinite(v):
        return "–"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"


def fmt_ci(est: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    s = fmt_num(est, digits)
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)):
        sep = " to " if min(lo, hi) < 0 else "–"  # "-1 to -0.75", not "-1–-0.75"
        s += f" <span class='note'>({fmt_num(lo, digits)}{sep}{fmt_num(hi, digits)})</span>"
    return s


def fmt_p(p: Any) -> str:
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"


def badge(value: Any, kind: str = "") -> str:
    text = esc(value)
    cls = kind or (str(value).lower() if str(value).lower() in PHENOTYPE_CLASSES else "")
    return f"<span class='badge {esc(cls)}'>{text}</span>"


def prob_bar(p: Any) -> str:
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    w = max(0.0, min(1.0, v)) * 100
    return f"<span class='bar'><i style='width:{w:.0f}%'></i></span>{v:.2f}"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure><img src='{png_data_uri(png)}' alt='{esc(alt or caption)}'>{cap}</figure>"


def figures(items: Iterable[str], wide: bool = False) -> str:
    body = "".join(items)
    return f"<div class='figs{' wide' if wide else ''}'>{body}</div>" if body else ""


@dataclass
class Cell:
    """A table cell: pre-escaped HTML and a CSS class (``num`` for right-aligned numbers)."""

    html: str
    cls: str = ""


def cell(value: Any, cls: str = "") -> Cell:
    if isinstance(value, Cell):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Cell(fmt_num(value), cls or "num")
    return Cell(esc(value), cls)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], scroll: bool = True, compact: bool = False) -> str:
    """An HTML table; cells are :class:`Cell` (HTML as is) or plain values (escaped / number-formatted).
    ``scroll``: inside a bordered box with a height limit; ``compact``: as wide as its content."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        tds = []
        for v in row:
            c = cell(v)
            tds.append(f"<td class='{c.cls}'>{c.html}</td>" if c.cls else f"<td>{c.html}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    cls = " class='compact'" if compact else ""
    t = f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<div class='table-wrap'>{t}</div>" if scroll else t


def kv(pairs: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are HTML."""
    return "<dl class='kv'>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML
    lead: str = ""  # one-line description (HTML)

    def render(self) -> str:
        lead = f"<p class='lead'>{self.lead}</p>" if self.lead else ""
        return f"<section class='card' id='{esc(self.id)}'><h2>{esc(self.title)}</h2>{lead}{self.body}</section>"


def page(title: str, subtitle: str, stats: Sequence[tuple[str, str, str]], sections: Sequence[Section],
         footer: str) -> str:
    """The whole document. ``stats``: (value, label, css class) cards in the header."""
    stat_html = "".join(f"<div class='stat {esc(c)}'><b>{esc(v)}</b><span>{esc(lbl)}</span></div>"
                        for v, lbl, c in stats)
    nav = "".join(f"<a href='#{esc(s.id)}'>{esc(s.title)}</a>" for s in sections)
    body = "".join(s.render() for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header class='top'><div class='inner'><h1>{esc(title)}</h1><div class='sub'>{subtitle}</div>"
        f"<div class='stats'>{stat_html}</div></div></header>"
        f"<nav><div class='inner'>{nav}</div></nav>"
        f"<main>{body}</main><footer>{footer}</footer></body></html>\n"
    )
