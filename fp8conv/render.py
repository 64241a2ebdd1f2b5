"""Text for people: tables and sizes. Pure functions from data to strings (golden-tested)."""
from __future__ import annotations

from .safetensors_io import printable

WORST_SHOWN = 10


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _fmt_float(value: float | None, spec: str) -> str:
    return "exact" if value is None else format(value, spec)


def quantize_report(report: dict, source: str, out: str) -> str:
    scheme = report["scheme"]
    lines = [
        f"fp8conv quantize {source} -> {out}",
        f"scheme: {_describe(scheme)}, layout {scheme['layout']}",
        f"tensors: {report['tensors_quantized']} quantized, {report['tensors_copied']} copied",
        f"size: {human_bytes(report['total_bytes_before'])} -> {human_bytes(report['total_bytes_after'])}"
        + (f" ({report['compression_ratio']:.2f}x smaller)" if report["compression_ratio"] else ""),
    ]
    dtypes = sorted(set(report["bytes_before"]) | set(report["bytes_after"]))
    lines.append(table(["dtype", "before", "after"], [
        [d, human_bytes(report["bytes_before"].get(d, 0)), human_bytes(report["bytes_after"].get(d, 0))] for d in dtypes
    ]))
    rows = report["tensors"]
    if rows:
        lines.append("worst tensors first:")
        lines.append(table(
            ["tensor", "shape", "rel_rms", "sqnr_dB", "max_abs_err", "saturated", "flushed"],
            [[printable(r["name"]), "x".join(map(str, r["shape"])), f"{r['rel_rms_error']:.4%}",
              _fmt_float(r["sqnr_db"], ".1f"), f"{r['max_abs_error']:.3g}", f"{r['saturated_fraction']:.3%}",
              f"{r['flushed_fraction']:.3%}"] for r in rows[:WORST_SHOWN]],
        ))
        if len(rows) > WORST_SHOWN:
            lines.append(f"... {len(rows) - WORST_SHOWN} more in fp8conv.report.json")
    return "\n".join(lines)


def _describe(scheme: dict) -> str:
    text = f"{scheme['format']} {scheme['granularity']}"
    if scheme.get("block_size"):
        text += " " + "x".join(map(str, scheme["block_size"]))
    if scheme.get("group_size"):
        text += f" {scheme['group_size']}"
    return text


def dry_run_plan(plan) -> str:
    rows = []
    for name, decision in plan.decisions.items():
        info = plan.tensors[name]
        after = info.numel * (1 if decision.quantized else info.np_dtype.itemsize)
        if decision.quantized:
            scale_shape = plan.layout.scale_shape(plan.scheme, info.shape)
            after += 4 * _prod(scale_shape)
        rows.append([printable(name), info.dtype, "x".join(map(str, info.shape)) or "scalar", decision.action,
                     human_bytes(info.nbytes), human_bytes(after), decision.reason])
    shards = ", ".join(f"{s.name} ({human_bytes(s.nbytes)})" for s in plan.shards)
    return table(["tensor", "dtype", "shape", "action", "before", "after", "reason"], rows) + f"\noutput shards: {shards}"


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
