"""The per-tensor SQNR histogram of the HTML report (inline SVG)."""
from __future__ import annotations

import math
import statistics

from .html_parts import as_number, fmt, html_section, svg_open

def _nice_step(span: float, bins: int) -> float:
    raw = max(span / bins, 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def sqnr_section(rows: list[dict]) -> str:
    if not any("sqnr_db" in r for r in rows):
        return ""
    values = sorted(v for r in rows if (v := as_number(r.get("sqnr_db"))) is not None and math.isfinite(v))
    exact = sum(1 for r in rows if "sqnr_db" in r and r["sqnr_db"] is None)
    note = f'<p class="muted" data-key="sqnr_exact">{exact:,} tensor(s) reproduced exactly (no SQNR).</p>' if exact else ""
    if not values:
        return html_section("sqnr", "SQNR distribution", note or "<p>No SQNR values.</p>")
    step = _nice_step(values[-1] - values[0], min(24, max(5, round(2 * math.sqrt(len(values))))))
    start = math.floor(values[0] / step) * step
    n = max(1, math.floor((values[-1] - start) / step) + 1)
    counts = [0] * n
    for v in values:
        counts[min(n - 1, math.floor((v - start) / step))] += 1
    width, height, left, bottom = 680, 220, 40, 36
    bw = (width - left - 10) / n
    peak = max(counts)
    out = [svg_open("sqnr", width, height, "histogram of per-tensor SQNR"),
           f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}"/>']
    decimals = max(0, -math.floor(math.log10(step)))
    label_every = max(1, math.ceil(n / 12))
    for i, count in enumerate(counts):
        x = left + i * bw
        h = (height - bottom - 20) * count / peak
        edge = start + i * step
        out.append(f'<rect class="bar" data-lo="{edge:.{decimals}f}" data-count="{count}" x="{x + 1:.1f}" '
                   f'y="{height - bottom - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}">'
                   f"<title>{edge:.{decimals}f} to {edge + step:.{decimals}f} dB: {count}</title></rect>")
        if count:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{height - bottom - h - 3:.1f}" text-anchor="middle">{count}</text>')
        if i % label_every == 0:
            out.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle">{edge:.{decimals}f}</text>')
    out.append(f'<text x="{(width + left) / 2:.0f}" y="{height - 4}" text-anchor="middle">'
               f"SQNR (dB), {len(values):,} tensors, bins of {step:g} dB</text>")
    out.append("</svg>")
    facts = (f'<p>median <b data-key="sqnr_median">{fmt("sqnr_db", statistics.median(values))}</b> dB, lowest '
             f'<b data-key="sqnr_min">{fmt("sqnr_db", values[0])}</b> dB, '
             f'highest <b data-key="sqnr_max">{fmt("sqnr_db", values[-1])}</b> dB.</p>')
    return html_section("sqnr", "SQNR distribution", facts + note + "".join(out))
