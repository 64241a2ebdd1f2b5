"""The HTML report: one self-contained page (inline CSS and SVG, no script) rendered from report.json.

Every number on the page is read from the report dict (conversion) or the verify result (measured
errors); nothing is recomputed from tensors. Format names are never interpreted: the scheme is shown
as the key/value pairs it has, and any numeric per-tensor field a future format adds gets a column.
The output is a pure function of its input (sorted iteration, fixed float formats), so the page a
conversion writes is byte-identical across runs and worker counts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..io.checkpoint import REPORT_HTML_NAME, REPORT_NAME
from ..io.atomic import write_atomic
from .text import grouped_findings, human_bytes
from .report_file import METRICS, has_report, load_report  # noqa: F401  (has_report, load_report: API)
from .html_parts import (as_number, cell_text, esc, fmt, fmt_bytes, html_document, html_section,
                         html_table, svg_open)
from .sensitivity_section import sensitivity_section
from .sqnr_chart import sqnr_section

WORST_SHOWN = 20
HOTSPOTS_SHOWN = 10
AGGREGATES_SHOWN = 20
NAMES_PER_REASON = 40
PATH_ROWS_SHOWN = 50
HEAT_METRIC = "rel_rms_error"
# Perceptually uniform (viridis) anchors: low error dark, high error bright; readable light and dark.
PALETTE = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725")
CATEGORICAL = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
TEXT_FIELDS = ("shape", "path", "scheme")

# ---- writing ------------------------------------------------------------------------------------


def write_page(path: Path, page: str) -> None:
    """Write atomically (temp file + rename); raises OutputError."""
    write_atomic(path, page)


def default_page_path(out: Path) -> Path:
    return Path(out) / REPORT_HTML_NAME if Path(out).is_dir() else Path(out).with_suffix(".html")


# ---- formatting ----------------------------------------------------------------------------------


# ---- sections -----------------------------------------------------------------------------------


def _scheme_section(scheme: object, schemes: object = None) -> str:
    if not isinstance(scheme, dict) or not scheme:
        return ""
    rows = [[esc(k), cell_text(v) if v is not None else "–"] for k, v in scheme.items()]
    body = html_table(["setting", "value"], rows, ["", "name"])
    listed = [s for s in schemes if isinstance(s, dict)] if isinstance(schemes, list) else []
    if listed:
        # Every scheme in the output, the --scheme overrides included: what someone signs off from.
        body = html_table(["scheme", "tensors", "bytes (codes + scales)"],
                      [[cell_text(s.get("describe")), fmt("", s.get("tensors")), fmt_bytes(s["bytes"]) if isinstance(s.get("bytes"), int) else "–"] for s in listed],
                      ["name", "num", "num"], [f' data-scheme="{esc(s.get("describe"))}"' for s in listed]) + body
    return html_section("scheme", "Schemes" if len(listed) > 1 else "Scheme", body)


def _cards(items: list[tuple[str, str, str]]) -> str:
    cards = "".join(f'<div class="card" data-key="{key}"><b>{value}</b><span>{label}</span></div>'
                    for key, value, label in items)
    return f'<div class="cards">{cards}</div>'


def _summary_cards(report: dict, rows: list[dict]) -> str:
    items = []
    before, after = report.get("total_bytes_before"), report.get("total_bytes_after")
    if isinstance(before, int) and isinstance(after, int):
        items.append(("total_bytes_after", human_bytes(after), f"after, from {human_bytes(before)}"))
    for key, label, spec in (("compression_ratio", "compression ratio (x smaller)", ".3f"),
                             ("bits_per_weight", "bits per quantized weight, scales included", ".3f"),
                             ("bits_per_parameter", "bits per parameter, whole model", ".3f")):
        value = as_number(report.get(key))
        if value is not None:
            items.append((key, format(value, spec), label))
    quantized, total = report.get("tensors_quantized", len(rows)), report.get("tensors_total")
    if isinstance(quantized, int) and isinstance(total, int):
        items.append(("tensors_quantized", f"{quantized:,} / {total:,}", "tensors quantized / total"))
    worst = max((r for r in rows if as_number(r.get(HEAT_METRIC)) is not None), key=lambda r: r[HEAT_METRIC], default=None)
    if worst is not None:
        items.append(("worst_rel_rms_error", fmt(HEAT_METRIC, worst[HEAT_METRIC]), "worst relative RMS error"))
    return _cards(items) if items else ""


def _sizes_section(report: dict) -> str:
    before, after = report.get("bytes_before"), report.get("bytes_after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    dtypes = sorted(set(before) | set(after))
    rows = [[esc(d), fmt_bytes(int(before.get(d, 0))), fmt_bytes(int(after.get(d, 0)))] for d in dtypes]
    attrs = [f' data-dtype="{esc(d)}"' for d in dtypes]
    total_before, total_after = report.get("total_bytes_before"), report.get("total_bytes_after")
    if isinstance(total_before, int) and isinstance(total_after, int):
        rows.append(["<b>total</b>", fmt_bytes(total_before), fmt_bytes(total_after)])
        attrs.append(' data-dtype="total"')
    lines = [html_table(["dtype", "before (bytes)", "after (bytes)"], rows, ["", "num", "num"], attrs),
             _size_bars(dtypes, before, after)]
    facts = []
    for key, label in (("parameters_total", "parameters"), ("parameters_quantized", "parameters stored quantized"),
                       ("bytes_quantized_with_scales", "bytes of quantized codes + scales")):
        if isinstance(report.get(key), int):
            facts.append(f'<li data-key="{key}">{label}: <b>{report[key]:,}</b></li>')
    if facts:
        lines.append(f"<ul>{''.join(facts)}</ul>")
    return html_section("sizes", "Sizes", "".join(lines))


def _size_bars(dtypes: list[str], before: dict, after: dict) -> str:
    """Two stacked horizontal bars (before, after), one colour per dtype."""
    total = max(sum(int(v) for v in before.values()), sum(int(v) for v in after.values()), 1)
    width, left, bar_h = 640, 60, 22
    parts = [svg_open("sizes", width + 20, 2 * (bar_h + 10) + 34, "bytes per dtype before and after")]
    for i, (label, sizes) in enumerate((("before", before), ("after", after))):
        y = 4 + i * (bar_h + 10)
        parts.append(f'<text x="0" y="{y + 15}">{label}</text>')
        x = float(left)
        for j, dtype in enumerate(dtypes):
            w = (width - left) * int(sizes.get(dtype, 0)) / total
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{CATEGORICAL[j % len(CATEGORICAL)]}">'
                             f"<title>{esc(dtype)} {label}: {int(sizes.get(dtype, 0)):,} bytes</title></rect>")
            x += w
    x, y = float(left), 2 * (bar_h + 10) + 20
    for j, dtype in enumerate(dtypes):
        parts.append(f'<rect x="{x:.0f}" y="{y - 9}" width="10" height="10" fill="{CATEGORICAL[j % len(CATEGORICAL)]}"/>'
                     f'<text x="{x + 14:.0f}" y="{y}">{esc(dtype)}</text>')
        x += 24 + 7 * len(dtype)
    parts.append("</svg>")
    return "".join(parts)


def heat_cell(name: str) -> tuple[tuple[int, str, int], str, str | None]:
    """Where a tensor sits in the heatmap: (row key, module column, member such as the expert index).

    The first all-digit segment of the dotted name is the layer; later all-digit segments (experts)
    become '*' so those tensors aggregate into one cell. Names without a layer go to a last row."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    layer_at = next((i for i, p in enumerate(parts) if _index(p)), None)
    if layer_at is None:
        return (1, "", 0), ".".join(parts), None
    rest = parts[layer_at + 1:]
    members = [p for p in rest if _index(p)]
    module = ".".join("*" if _index(p) else p for p in rest) or "(layer)"
    return (0, ".".join(parts[:layer_at]), int(parts[layer_at])), module, ".".join(members) or None


def _index(part: str) -> bool:
    """A layer or expert index: ASCII digits that int() reads ('①'.isdigit() is true; 5000 digits exceed int's limit)."""
    return 0 < len(part) <= 18 and part.isascii() and part.isdigit()


def _color(t: float) -> str:
    """Linear interpolation along the palette, t in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(t), len(PALETTE) - 2)
    frac = t - i
    a, b = PALETTE[i], PALETTE[i + 1]
    mix = [round(int(a[k:k + 2], 16) * (1 - frac) + int(b[k:k + 2], 16) * frac) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _heatmap_section(rows: list[dict]) -> str:
    cells: dict[tuple, dict] = {}
    for row in rows:
        value = as_number(row.get(HEAT_METRIC))
        if value is None:
            continue
        key, module, member = heat_cell(row["name"])
        cell = cells.setdefault((key, module), {"count": 0, "worst": None, "value": -1.0, "member": None})
        cell["count"] += 1
        if value > cell["value"] or (value == cell["value"] and (cell["worst"] is None or row["name"] < cell["worst"])):
            cell.update(value=value, worst=row["name"], member=member)
    if not cells:
        return ""
    row_keys = sorted({k for k, _ in cells})
    modules = sorted({m for _, m in cells})
    stacks = {k[1] for k in row_keys if k[0] == 0}
    labels = {k: ("other" if k[0] else (f"{k[1]}.{k[2]}" if len(stacks) > 1 else str(k[2]))) for k in row_keys}
    finite = [c["value"] for c in cells.values() if math.isfinite(c["value"]) and c["value"] > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 1.0)
    span = math.log(hi) - math.log(lo) if hi > lo else 0.0  # hi / lo overflows for 1e300 / 1e-300
    cw, ch = 64, (20 if len(row_keys) <= 48 else 14)
    left = 12 + 7 * max(len(labels[k]) for k in row_keys)
    top = 16 + min(180, int(5.2 * max(len(m) for m in modules)))
    width, height = left + cw * len(modules) + 150, top + max(ch * len(row_keys), 130) + 10
    out = [svg_open("heatmap", width, height, "relative RMS error by layer and module")]
    for j, module in enumerate(modules):
        x = left + cw * j + cw / 2
        out.append(f'<text transform="translate({x:.0f},{top - 6}) rotate(-40)">{esc(module)}</text>')
    for i, key in enumerate(row_keys):
        out.append(f'<text x="{left - 6}" y="{top + ch * i + ch / 2 + 4:.0f}" text-anchor="end">{esc(labels[key])}</text>')
    row_at = {key: i for i, key in enumerate(row_keys)}  # list.index per cell made the heatmap quadratic
    module_at = {module: j for j, module in enumerate(modules)}
    for (key, module), cell in sorted(cells.items()):
        i, j = row_at[key], module_at[module]
        value = cell["value"]
        t = 1.0 if not math.isfinite(value) else (0.5 if span == 0 else (math.log(value) - math.log(lo)) / span) if value > 0 else None
        fill = "#9aa0a6" if t is None else _color(t)
        ink = "#000" if t is None or t > 0.62 else "#fff"
        label = "exact" if value == 0 else (f"{value * 100:.2f}" if math.isfinite(value) else "inf")
        member = f", worst of {cell['count']}: {esc(cell['member'])}" if cell["count"] > 1 and cell["member"] else ""
        x, y = left + cw * j, top + ch * i
        out.append(f'<g class="cell" data-layer="{esc(labels[key])}" data-module="{esc(module)}" data-value="{value!r}" '
                   f'data-worst="{esc(cell["worst"])}" data-count="{cell["count"]}">'
                   f'<rect x="{x + 1}" y="{y + 1}" width="{cw - 2}" height="{ch - 2}" rx="2" fill="{fill}"/>'
                   f'<text class="in" x="{x + cw / 2:.0f}" y="{y + ch / 2 + 3.5:.1f}" text-anchor="middle" style="fill:{ink}">{label}</text>'
                   f"<title>layer {esc(labels[key])} {esc(module)}: {fmt(HEAT_METRIC, value)}{member} "
                   f"({esc(cell['worst'])})</title></g>")
    out.append(_legend(left + cw * len(modules) + 20, top, lo, hi))
    out.append("</svg>")
    note = (f'<p class="muted">Relative RMS error in percent, worst tensor of each cell; colour on a log scale '
            f"from {fmt(HEAT_METRIC, lo)} to {fmt(HEAT_METRIC, hi)}. Rows: layers; columns: modules; "
            "numbered members (experts) are aggregated into one cell (<code>*</code>).</p>")
    return html_section("heatmap", "Error by layer and module", note + "".join(out) + _aggregates(cells, labels))


def _legend(x: int, y: int, lo: float, hi: float) -> str:
    stops = "".join(f'<stop offset="{i / (len(PALETTE) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(PALETTE))
    return (f'<defs><linearGradient id="heat" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>'
            f'<rect x="{x}" y="{y}" width="14" height="120" fill="url(#heat)"/>'
            f'<text x="{x + 20}" y="{y + 10}">{fmt(HEAT_METRIC, hi)}</text>'
            f'<text x="{x + 20}" y="{y + 120}">{fmt(HEAT_METRIC, lo)}</text>')


def _aggregates(cells: dict, labels: dict) -> str:
    merged = [(c["value"], k, m, c) for (k, m), c in cells.items() if c["count"] > 1]
    if not merged:
        return ""
    merged.sort(key=lambda item: (-item[0], item[1], item[2]))
    rows = [[esc(labels[k]), esc(m), f"{c['count']:,}", esc(c["member"] or ""), f'<span title="{esc(c["worst"])}">{fmt(HEAT_METRIC, v)}</span>']
            for v, k, m, c in merged[:AGGREGATES_SHOWN]]
    more = f'<p class="muted">{len(merged) - AGGREGATES_SHOWN:,} more aggregated cells in the heatmap.</p>' if len(merged) > AGGREGATES_SHOWN else ""
    return ("<h3>Aggregated cells, worst member named</h3>"
            + html_table(["layer", "module", "members", "worst member", "rel. RMS error"], rows, ["", "name", "num", "name", "num"]) + more)


def _columns(rows: list[dict]) -> list[str]:
    present: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key != "name" and (key in TEXT_FIELDS or key in METRICS or as_number(value) is not None or value is None):
                present.setdefault(key, None)
    known = [k for k in TEXT_FIELDS + tuple(METRICS) if k in present]
    return known + sorted(k for k in present if k not in known)


def _tensor_table(rows: list[dict], anchor: str) -> str:
    columns = _columns(rows)
    headers = ["tensor"] + [esc(METRICS.get(c, (c.replace("_", " "),))[0]) for c in columns]
    classes = ["name"] + ["" if c in TEXT_FIELDS else "num" for c in columns]
    body = [[esc(r["name"])] + [cell_text(r.get(c)) if c in TEXT_FIELDS else fmt(c, r.get(c)) for c in columns] for r in rows]
    attrs = [f' data-name="{esc(r["name"])}"' for r in rows]
    # The column keys ride along so that a machine (the tests) can read the page back.
    return html_table(headers, body, classes, attrs).replace(
        "<table>", f'<table class="tensors" data-table="{esc(anchor)}" data-columns="{esc(",".join(columns))}">', 1)


def _worst_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    ranked = sorted(rows, key=lambda r: (-(as_number(r.get(HEAT_METRIC)) or 0.0), r["name"]))[:WORST_SHOWN]
    title = f"Worst {len(ranked)} tensors" + (f" of {len(rows):,}" if len(rows) > len(ranked) else "")
    return html_section("worst", title, _tensor_table(ranked, "worst"))


def _hotspots_section(rows: list[dict]) -> str:
    found = {k for r in rows for k in r if k.endswith("_fraction") and as_number(r[k]) is not None}
    keys = [k for k in METRICS if k in found] + sorted(found - set(METRICS))
    parts = []
    for key in keys:
        hot = sorted((r for r in rows if (as_number(r.get(key)) or 0) > 0), key=lambda r: (-r[key], r["name"]))
        label = METRICS.get(key, (key.replace("_", " "),))[0]
        if not hot:
            parts.append(f'<p data-key="{esc(key)}">{esc(label)}: no values in any tensor.</p>')
            continue
        peak = hot[0][key]
        body = [[esc(r["name"]), fmt(key, r[key]),
                 f'<svg width="120" height="10" viewBox="0 0 120 10">'
                 f'<rect class="bar" width="{max(1.0, 120 * r[key] / peak):.1f}" height="10"/></svg>']
                for r in hot[:HOTSPOTS_SHOWN]]
        attrs = [f' data-name="{esc(r["name"])}"' for r in hot[:HOTSPOTS_SHOWN]]
        parts.append(f"<h3>{esc(label)}: {len(hot):,} tensor(s) affected, highest first</h3>"
                     + html_table(["tensor", esc(label), ""], body, ["name", "num", ""], attrs)
                     .replace("<table>", f'<table class="hotspots" data-key="{esc(key)}">', 1))
    if not parts:
        return ""
    return html_section("hotspots", "Saturation and flush-to-zero hot spots",
                    '<p class="muted">Fraction of each tensor\'s values clipped to the largest code (saturated) or '
                    "rounded to zero although non-zero (flushed).</p>" + "".join(parts))


def _high_precision_section(kept: object) -> str:
    if not isinstance(kept, list):
        return ""
    if not kept:
        return html_section("high-precision", "Tensors kept in high precision", "<p>None.</p>")
    by_reason: dict[str, list[str]] = {}
    for row in kept:
        by_reason.setdefault(str(row.get("reason", "")), []).append(row["name"])
    rows = []
    for reason, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        shown = ", ".join(esc(n) for n in names[:NAMES_PER_REASON])
        if len(names) > NAMES_PER_REASON:
            shown += f" … and {len(names) - NAMES_PER_REASON:,} more (in {REPORT_NAME})"
        rows.append([esc(reason), f"{len(names):,}", shown])
    return html_section("high-precision", f"Tensors kept in high precision ({len(kept):,})",
                    html_table(["reason", "tensors", "names"], rows, ["", "num", "names"]))


def _paths_section(report: dict, rows: list[dict]) -> str:
    by_path = report.get("tensors_by_path")
    if not isinstance(by_path, dict) or not by_path:
        return ""
    table = html_table(["path", "tensors"], [[cell_text(k), fmt("", v)] for k, v in sorted(by_path.items())], ["", "num"],
                   [f' data-path="{esc(k)}"' for k, _ in sorted(by_path.items())])
    detail = []
    for path in sorted({r.get("path") for r in rows if isinstance(r.get("path"), str)} - {"quantize"}):
        chosen = sorted((r for r in rows if r.get("path") == path), key=lambda r: r["name"])
        shown = chosen[:PATH_ROWS_SHOWN]
        more = f'<p class="muted">… and {len(chosen) - len(shown):,} more in {REPORT_NAME}.</p>' if len(chosen) > len(shown) else ""
        detail.append(f"<h3>{cell_text(path)} ({len(chosen):,})</h3>" + _tensor_table(shown, path) + more)
    intro = ('<p class="muted">For a quantized source: <i>carried over</i> keeps codes and scales byte for byte; '
             "<i>re-quantized</i> dequantizes in float32 and quantizes again.</p>" if detail else "")
    return html_section("paths", "What happened to each tensor", table + intro + "".join(detail))


def _warnings_section(warnings: object) -> str:
    if not isinstance(warnings, list) or not warnings:
        return ""
    return html_section("warnings", "Warnings", "<ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>")


def _eval_section(evaluation: dict | None) -> str:
    """fp8conv eval's verdict, reasons and per-window metrics (the model's outputs, not its weights)."""
    if not isinstance(evaluation, dict):
        return ""
    verdict = "PASS" if evaluation.get("passed") else "FAIL"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in evaluation.get("reasons") or [])
    windows = [w for w in evaluation.get("windows") or [] if isinstance(w, dict)]
    overall = evaluation.get("overall")
    labelled = [(str(i + 1), w) for i, w in enumerate(windows)] + ([("all", overall)] if isinstance(overall, dict) else [])
    keys = [k for k in (labelled[0][1] if labelled else {})]
    table = html_table(["window", *[esc(k) for k in keys]], [[label, *[fmt(k, w.get(k)) for k in keys]] for label, w in labelled],
                   ["name", *["num"] * len(keys)]) if labelled else ""
    head = (f"<p data-eval=\"{verdict.lower()}\"><b>{verdict}</b> · {esc(evaluation.get('engine'))} · "
            f"text {esc(evaluation.get('text'))} · gate {esc(json.dumps(evaluation.get('gate')))}</p>")
    return html_section("eval", "Evaluation (fp8conv eval)", head + (f"<ul>{reasons}</ul>" if reasons else "") + table)


def _scheme_line(scheme: object, schemes: object = None) -> str:
    if not isinstance(scheme, dict):
        return ""
    if isinstance(schemes, list) and len(schemes) > 1:
        return " · ".join(f"{cell_text(s.get('describe'))} ({fmt('', s.get('tensors'))} tensors)" for s in schemes
                          if isinstance(s, dict)) + f" · layout {cell_text(scheme.get('layout'))}"
    return " · ".join(f"{esc(k)} {cell_text(v)}" for k, v in scheme.items() if v is not None)


# ---- pages --------------------------------------------------------------------------------------


def render_conversion(report: dict, evaluation: dict | None = None, sensitivity: dict | None = None) -> str:
    """The page of a conversion, from its report dict (fp8conv.report.json), eval result (fp8conv.eval.json) and
    layer sensitivity (fp8conv.sensitivity.json)."""
    rows = [r for r in report.get("tensors", []) if isinstance(r, dict)]
    return html_document("fp8conv conversion report", _scheme_line(report.get("scheme"), report.get("schemes")), [
        _summary_cards(report, rows),
        _warnings_section(report.get("warnings")),
        _eval_section(evaluation),
        sensitivity_section(sensitivity),
        *_report_sections(report, rows, with_paths=True),
    ], REPORT_NAME)


def _report_sections(report: dict, rows: list[dict], with_paths: bool) -> list[str]:
    """The sections a conversion page and a verify page share, in page order."""
    return [
        _scheme_section(report.get("scheme"), report.get("schemes")),
        _sizes_section(report),
        _heatmap_section(rows),
        sqnr_section(rows),
        _hotspots_section(rows),
        _worst_section(rows),
        _high_precision_section(report.get("high_precision")),
        _paths_section(report, rows) if with_paths else "",
    ]


def render_verification(result: dict, report: dict | None = None) -> str:
    """The page of `fp8conv verify`: its checks and measured errors, plus the conversion's report if any."""
    report = report or {}
    measured = bool(result.get("compared_against_source"))
    rows = result.get("tensors", []) if measured else [r for r in report.get("tensors", []) if isinstance(r, dict)]
    status = '<span class="pass">passed</span>' if result.get("passed") else '<span class="fail">FAILED</span>'
    checks = html_table(["check", "result"], [[esc(c), f'<span class="{esc(s)}">{esc(s)}</span>'] for c, s in result.get("checks", {}).items()],
                    ["", ""], [f' data-check="{esc(c)}"' for c in result.get("checks", {})])
    listed = [f for f in result.get("findings", []) if isinstance(f, dict)]
    findings = "".join(f'<li class="{"fail" if fatal else "warn"}">{esc(check)}: {esc(text)}</li>'
                       for fatal, check, text in grouped_findings(listed, "fp8conv verify --json lists all"))
    source = ("Errors below were measured by dequantizing every tensor and comparing it with the source (--against)."
              if measured else
              "Numerics were not compared with the source (pass --against SRC); errors below are the ones recorded at conversion."
              if rows else "Numerics were not compared with the source (pass --against SRC).")
    verdict = html_section("checks", f"Verification: {status}", checks + (f"<ul>{findings}</ul>" if findings else "")
                       + f'<p class="muted">{source}</p>')
    subtitle = f"{esc(result.get('path', ''))} · layout {esc(result.get('layout', ''))}"
    return html_document("fp8conv verification report", subtitle, [
        verdict,
        _summary_cards(report, rows) if report else "",
        *_report_sections(report, rows, with_paths=not measured),
    ], f"the verify result{' and ' + REPORT_NAME if report else ''}")
