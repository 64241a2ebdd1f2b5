"""The HTML report's layer-sensitivity section, from fp8conv.sensitivity.json (fp8conv sensitivity --record)."""
from __future__ import annotations

from .html_parts import esc, fmt, html_section, html_table

SHOWN = 30


def sensitivity_section(data: dict | None) -> str:
    """The ranking (KL with one group quantized), the probe's totals and the suggested --scheme overrides."""
    if not isinstance(data, dict):
        return ""
    groups = [g for g in data.get("groups") or [] if isinstance(g, dict)]
    rows = [[fmt("", g.get("rank")), esc(g.get("group")), fmt("", g.get("elements")), _kl(g.get("kl")),
             fmt("", g.get("top1"))] for g in groups[:SHOWN]]
    table = html_table(["rank", "group", "params", "KL (nats/token)", "top-1"], rows,
                       ["num", "name", "num", "num", "num"]) if rows else ""
    more = f'<p class="muted">{len(groups) - SHOWN} more groups in fp8conv.sensitivity.json</p>' if len(groups) > SHOWN else ""
    head = (f"<p>{esc(data.get('scheme'))} · {fmt('', data.get('tokens'))} tokens of {esc(data.get('text'))} · "
            f"all groups quantized: KL {_kl(data.get('kl_all'))} · {_bits(data.get('bits_per_weight_base'))} bits per "
            "weight. Each row: KL(source || source with only that group quantized), measured with fp8conv's own "
            "quantize and dequantize of its weights.</p>")
    suggestion = data.get("suggestion")
    advice = ""
    if isinstance(suggestion, dict):
        flags = " ".join(f"--scheme '{esc(o)}'" for o in suggestion.get("overrides") or [])
        advice = (f"<p>Budget {esc(data.get('budget'))} bits per weight: keep {len(suggestion.get('groups') or [])} "
                  f"group(s) at {esc(data.get('promote'))}: {_bits(suggestion.get('bits_per_weight'))} bits per "
                  f"weight, probe KL {_kl(suggestion.get('kl_mix'))}.</p><pre>{flags}</pre>")
    return html_section("sensitivity", "Layer sensitivity (fp8conv sensitivity)", head + advice + table + more)


def _kl(value: object) -> str:
    return f"{value:.6f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _bits(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"
