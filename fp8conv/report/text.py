"""Text for people: tables and sizes. Pure functions from data to strings (golden-tested)."""
from __future__ import annotations

from .findings import cut, natural_key
from ..io.safetensors import printable

WORST_SHOWN = 10
SHARDS_SHOWN = 4
PATH_WORDS = {"quantize": "quantized", "requantize": "re-quantized", "carry": "carried over",
              "dequantize": "dequantized", "copy": "copied", "drop": "dropped"}


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


def part_summary(summary: dict) -> str:
    shards = ", ".join(summary["shards"]) or "none (more parts than output shards)"
    return (f"part {summary['partition']} done: {shards}\n"
            f"when every part is done: fp8conv merge {printable(summary['out'])}")


def conversion_report(report: dict, verb: str, source: str, out: str) -> str:
    scheme = report["scheme"]
    described = f"dequantized to {scheme['dequantized_to']}" if "dequantized_to" in scheme else \
        f"{_describe(scheme)}, layout {scheme['layout']}"
    by_path = report["tensors_by_path"]
    paths = ", ".join(f"{by_path[action]} {word}" for action, word in PATH_WORDS.items() if by_path.get(action))
    schemes = report.get("schemes") or []
    if len(schemes) == 1:
        described += f" ({_scheme_count(schemes[0])})"
    lines = [
        f"fp8conv {verb} {printable(source)} -> {printable(out)}",
        f"scheme: {described}" if len(schemes) < 2 else f"schemes ({len(schemes)}, layout {scheme['layout']}):",
        *(f"  {s['describe']}: {_scheme_count(s)}" for s in (schemes if len(schemes) > 1 else [])),
        f"tensors: {paths}",
        f"size: {human_bytes(report['total_bytes_before'])} -> {human_bytes(report['total_bytes_after'])}"
        + (f" ({report['compression_ratio']:.2f}x smaller)" if (report["compression_ratio"] or 0) > 1 else ""),
    ]
    if report.get("bits_per_weight"):
        lines.append(f"quantized weights: {report['bits_per_weight']:.3f} bits per weight, scales included")
    dtypes = sorted(set(report["bytes_before"]) | set(report["bytes_after"]))
    lines.append(table(["dtype", "before", "after"], [
        [d, human_bytes(report["bytes_before"].get(d, 0)), human_bytes(report["bytes_after"].get(d, 0))] for d in dtypes
    ]))
    rows = report["tensors"]
    if rows:
        lines.append("worst tensors first:")
        observed = "rms_error_reduction" in rows[0]
        lines.append(table(
            ["tensor", "shape", "rel_rms", "sqnr_dB", "max_abs_err", "saturated", "flushed"]
            + (["minmax_rel_rms", "reduction"] if observed else []),
            [[printable(r["name"]), "x".join(map(str, r["shape"])), f"{r['rel_rms_error']:.4%}",
              _fmt_float(r["sqnr_db"], ".1f"), f"{r['max_abs_error']:.3g}", f"{r['saturated_fraction']:.3%}",
              f"{r['flushed_fraction']:.3%}"]
             + ([f"{r['minmax_rel_rms_error']:.4%}", f"{r['rms_error_reduction']:.2%}"] if observed else [])
             for r in rows[:WORST_SHOWN]],
        ))
        if len(rows) > WORST_SHOWN:
            lines.append(f"... {len(rows) - WORST_SHOWN} more in fp8conv.report.json")
    return "\n".join(lines)


def _scheme_count(entry: dict) -> str:
    return f"{entry['tensors']} tensor{'s' if entry['tensors'] != 1 else ''}, {human_bytes(entry['bytes'])}"


def _describe(scheme: dict) -> str:
    observed = f", {scheme['observer']} observer" if scheme.get("observer", "minmax") != "minmax" else ""
    if scheme.get("microscale"):
        return (f"{scheme['microscale']} ({scheme['format']} group {scheme['group_size']}, "
                f"{scheme['scale_format']} scales) weight-only{observed}")
    text = f"{scheme['format']} {scheme['granularity']}"
    if scheme.get("block_size"):
        text += " " + "x".join(map(str, scheme["block_size"]))
    if scheme.get("group_size"):
        text += f" {scheme['group_size']}"
    if scheme.get("symmetric") is False:
        text += " asymmetric"
    if scheme.get("activations") == "none":
        text += " weight-only"
    return text + observed


def dry_run_plan(plan) -> str:
    rows = []
    sizes = {e.name: e.nbytes for shard in plan.shards for e in shard.entries}
    made_from: dict[str, int] = {}
    for out_name, src_name in plan.origin.items():
        made_from[src_name] = made_from.get(src_name, 0) + sizes.get(out_name, 0)
    for name, decision in plan.decisions.items():
        info = plan.tensors[name]
        after = made_from.get(name, 0)
        rows.append([printable(name), info.dtype, "x".join(map(str, info.shape)) or "scalar", decision.action,
                     human_bytes(info.nbytes), human_bytes(after), decision.reason])
    for module, reason in sorted(plan.tensorless_modules.items()):
        rows.append([printable(module), "-", "-", "keep", "-", "-", reason])
    shards = ", ".join(f"{s.name} ({human_bytes(s.nbytes)})" for s in plan.shards)
    lines = [table(["tensor", "dtype", "shape", "action", "before", "after", "reason"], rows), f"output shards: {shards}"]
    if plan.layout is not None:
        ignored = plan.unquantized_modules
        lines.append(f"ignore list ({len(ignored)} modules, as vLLM and transformers name them): "
                     + (", ".join(printable(m) for m in ignored) if ignored else "none"))
    lines += [f"warning: {w}" for w in plan.warnings] + [f"refused: {r}" for r in plan.refusals]
    lines.append(f"pre-flight: {'REFUSED (exit 2)' if plan.refusals else 'ok'}")
    return "\n".join(lines)



def inspect_summary(summary: dict) -> str:
    lines = [
        f"checkpoint: {printable(summary['path'])}",
        f"shards: {len(summary['shards'])} ("
        + ", ".join(f"{printable(s['name'])} {human_bytes(s['bytes'])}" for s in summary["shards"][:SHARDS_SHOWN])
        + (f", ... {len(summary['shards']) - SHARDS_SHOWN} more" if len(summary["shards"]) > SHARDS_SHOWN else "") + ")",
        f"tensors: {summary['tensor_count']}, parameters: {summary['parameter_count']:,}",
        "bytes per dtype: " + ", ".join(f"{d} {human_bytes(n)}" for d, n in summary["bytes_per_dtype"].items()),
        f"quantization: {summary['layout_label']}"
        + (f", written by {summary['written_by']}" if summary["written_by"] else ""),
    ]
    if summary["schemes"]:
        lines.append("schemes: " + ", ".join(f"{s} ({n} weights)" for s, n in summary["schemes"].items()))
        lines.append(f"quantized modules: {len(summary['quantized_modules'])}; "
                     f"high-precision 2-D weights: {len(summary['high_precision_modules'])}"
                     + (f" ({', '.join(printable(m) for m in summary['high_precision_modules'][:8])}"
                        + (", ..." if len(summary["high_precision_modules"]) > 8 else "") + ")"
                        if summary["high_precision_modules"] else ""))
        lines.append("scale shapes: " + "; ".join(f"{k} x{n}" for k, n in summary["scale_shapes"].items()))
    for name, problem in summary["problems"].items():
        lines.append(f"problem: {printable(name)} {problem}")
    if "tensors" in summary:
        rows = [[printable(t["name"]), t["dtype"], "x".join(map(str, t["shape"])) or "scalar", human_bytes(t["bytes"]),
                 printable(t["shard"]), t["role"]] for t in summary["tensors"]]
        lines.append(table(["tensor", "dtype", "shape", "bytes", "shard", "role"], rows))
    if "stats" in summary:
        rows = [[printable(n), _num(s["min"]), _num(s["max"]), _num(s["absmax"]), str(s["nan"]), str(s["inf"]),
                 f"{s['zero_fraction']:.2%}"] for n, s in summary["stats"].items()]
        lines.append(table(["tensor", "min", "max", "absmax", "nan", "inf", "zeros"], rows))
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def grouped_findings(findings: list[dict], where: str) -> list[tuple[bool, str, str]]:
    """verify's findings as (fatal, check, text): those of one engine rule on one line with their count
    and first tensors (natural order), the others as they are; in the order first met."""
    order: list[tuple] = []
    members: dict[tuple, list[dict]] = {}
    for finding in findings:
        key = (finding["fatal"], finding["check"], finding.get("rule") or id(finding))
        if key not in members:
            order.append(key)
        members.setdefault(key, []).append(finding)
    out = []
    for key in order:
        group = members[key]
        if len(group) == 1 or not isinstance(key[2], str):
            out += [(f["fatal"], f["check"], f["message"]) for f in group]
            continue
        names = [f.get("tensor") or "?" for f in group]
        first = min(group, key=lambda f: natural_key(f.get("tensor") or ""))
        example = first["message"].partition(": ")[2] if first["message"].startswith(key[2].partition(":")[0] + ": ") \
            else first["message"]
        out.append((key[0], key[1], f"{key[2]} ({len(group)} tensors: {cut(names, where)}); e.g. {example}"))
    return out


def verify_summary(result: dict) -> str:
    verdict = "PASS" if result["passed"] else "FAIL"
    nothing = any(f["check"] == "structure" and f["message"].startswith("nothing is quantized") for f in result["findings"])
    lines = [f"fp8conv verify {printable(result['path'])}: "
             + ("FAIL: not a quantized checkpoint (nothing is quantized)" if nothing
                else f"{verdict} (layout {result['layout']})")]
    for check, status in result["checks"].items():
        fatal = [f for f in result["findings"] if f["check"] == check and f["fatal"]]
        lines.append(f"  {check:<10} {status}" + (f" ({len(fatal)} problems)" if fatal else ""))
    for fatal, check, text in grouped_findings(result["findings"], "--json lists all"):
        lines.append(f"{'FAIL' if fatal else 'warn'} [{check}] {printable(text)}")
    if result["tensors"]:
        lines.append("worst tensors first (dequantized vs source):")
        lines.append(table(["tensor", "scheme", "rel_rms", "limit", "sqnr_dB", "max_abs_err"], [
            [printable(t["name"]), t["scheme"], f"{t['rel_rms_error']:.4%}", f"{t['limit']:.2%}",
             _fmt_float(t["sqnr_db"], ".1f"), f"{t['max_abs_error']:.3g}"] for t in result["tensors"][:WORST_SHOWN]
        ]))
        if len(result["tensors"]) > WORST_SHOWN:
            lines.append(f"... {len(result['tensors']) - WORST_SHOWN} more with --json")
    elif not result["compared_against_source"]:
        lines.append("numerics compared with the source: no (pass --against SRC)")
    return "\n".join(lines)
