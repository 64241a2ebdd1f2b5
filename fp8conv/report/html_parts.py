"""The pieces every HTML page is built of: the style sheet, escaping of untrusted text, how values are written,
tables, sections, SVG openings and the document around them."""
from __future__ import annotations

import html
import math

from ..io.untrusted import printable
from .report_file import METRICS
from .text import PATH_WORDS, human_bytes

CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1c1d21;--muted:#5f6368;--line:#d5d8dd;--card:#f4f5f7;--bad:#b3261e;--good:#1e7d34;--accent:#2f5bd3}
@media (prefers-color-scheme:dark){:root{--bg:#15161a;--fg:#e6e8eb;--muted:#9aa0a6;--line:#3a3d42;--card:#1f2126;--bad:#f2b8b5;--good:#8fd19e;--accent:#9db8ff}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1120px;padding:24px;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
p.sub,.muted{color:var(--muted)}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:20px;font-variant-numeric:tabular-nums}.card span{color:var(--muted);font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left;vertical-align:top}
th{font-weight:600;color:var(--muted)}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name,td.names{word-break:break-all;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
td.names{color:var(--muted)}
.pass{color:var(--good);font-weight:600}.fail{color:var(--bad);font-weight:600}.warn{color:var(--muted)}
svg{max-width:100%;height:auto;display:block}
svg text{fill:var(--fg);font:11px system-ui,sans-serif}
svg .axis{stroke:var(--muted);stroke-width:1}
svg .bar{fill:var(--accent)}
svg text.in{font-size:10px}
ul{margin:4px 0;padding-left:20px}
footer{margin-top:32px;color:var(--muted);font-size:12px}
@media print{:root{--bg:#fff;--fg:#000;--muted:#444;--line:#bbb;--card:#fff;--accent:#2f5bd3}
body{max-width:none;padding:0;font-size:11px}section{break-inside:avoid}h2{break-after:avoid}
.card{border-color:#999}svg,svg *{print-color-adjust:exact;-webkit-print-color-adjust:exact}}
"""


def esc(value: object) -> str:
    """Untrusted text (tensor names, messages) made inert: control characters escaped, then HTML."""
    return html.escape(printable(str(value)), quote=True)


def fmt(key: str, value: object) -> str:
    """How a per-tensor value is written on the page (the tests parse these back)."""
    style = METRICS.get(key, (None, "g4"))[1]
    if value is None:
        return "exact" if style == "db" else "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if style == "pct4":
        return f"{value:.4%}"
    if style == "pct2":
        return f"{value:.2%}"
    if style == "db":
        return f"{value:.2f}"
    if style == "int" or isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def fmt_bytes(n: int) -> str:
    """Exact bytes with separators, then a human size."""
    return f'{n:,} <span class="muted">({human_bytes(n)})</span>'


def svg_open(cls: str, width: float, height: float, label: str) -> str:
    return (f'<svg class="{cls}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{label}">')


def cell_text(value: object) -> str:
    if isinstance(value, list):
        return esc("x".join(str(v) for v in value)) or "scalar"
    return esc(PATH_WORDS.get(value, value)) if isinstance(value, str) else fmt("", value)


def html_table(headers: list[str], rows: list[list[str]], classes: list[str], attrs: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in zip(row, classes))
        body.append(f"<tr{attrs[i] if attrs else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2>{body}</section>'


def as_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int such as 10**400 from a hand-edited report.json
        return math.inf if value > 0 else -math.inf


def html_document(title: str, subtitle: str, body: list[str], origin: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            # No script, no network: the page is opened on air-gapped machines, and names are untrusted.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS.strip()}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p class=\"sub\">{subtitle}</p></header>"
            + "".join(b for b in body if b)
            + f"<footer>Rendered by fp8conv from {origin}; every number above is read from it.</footer>"
            "</body></html>\n")
