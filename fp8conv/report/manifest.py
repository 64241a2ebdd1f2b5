"""The scales manifest and the size/error report: plain dicts built from the plan and the stats."""
from __future__ import annotations

import json
import math
from collections import Counter

from .. import __version__
from ..plan.records import ConversionPlan
from ..numerics.stats import ErrorStats
from ..layouts import CODES, SCALE
from ..plan.decisions import COPY

MANIFEST_SCHEMA = 1


def error_metrics(stats: ErrorStats) -> dict:
    """Relative RMS error, SQNR (dB; null when exact), max abs error, saturated and flushed fractions."""
    n = max(stats.elements, 1)
    if stats.sum_sq_err == 0:
        rel, sqnr = 0.0, None
    elif stats.sum_sq_ref == 0:
        rel, sqnr = math.inf, None
    else:
        rel = math.sqrt(stats.sum_sq_err / stats.sum_sq_ref)
        sqnr = 10 * math.log10(stats.sum_sq_ref / stats.sum_sq_err)
    metrics = {
        "rel_rms_error": rel,
        "sqnr_db": sqnr,
        "max_abs_error": stats.max_abs_err,
        "saturated_fraction": stats.saturated / n,
        "flushed_fraction": stats.flushed_to_zero / n,
        "nonfinite_values": stats.nonfinite,
    }
    if stats.minmax_sum_sq_err is not None:
        # As the observer measured them: RMS error with min-max scales, and how much less it is with its own.
        minmax, observed = stats.minmax_sum_sq_err, stats.observed_sum_sq_err or 0.0
        metrics["minmax_rel_rms_error"] = math.sqrt(minmax / stats.sum_sq_ref) if stats.sum_sq_ref else 0.0
        metrics["rms_error_reduction"] = 1 - math.sqrt(observed / minmax) if minmax else 0.0
    return metrics


def _scheme_json(plan: ConversionPlan) -> dict:
    if plan.scheme is None:
        return {"dequantized_to": plan.out_dtype}
    assert plan.layout is not None
    return {**plan.scheme.to_json(), "layout": plan.layout.name}


def scheme_summary(plan: ConversionPlan) -> list[dict]:
    """Each scheme the output holds (the default and every --scheme override that matched), with its
    tensor count, parameters and output bytes (codes + scales), largest first."""
    sizes = {entry.name: entry.nbytes for shard in plan.shards for entry in shard.entries}
    groups: dict[str, dict] = {}
    for name, decision in plan.decisions.items():
        if not decision.quantized:
            continue
        scheme = plan.schemes[name]
        entry = groups.setdefault(json.dumps(scheme.to_json(), sort_keys=True),
                                  {"describe": scheme.describe(), **scheme.to_json(), "tensors": 0, "parameters": 0,
                                   "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += math.prod(plan.source_quant[name].shape if name in plan.source_quant
                                         else plan.tensors[name].shape)
        entry["bytes"] += sum(sizes[spec.name] for spec in plan.outputs[name])
    return sorted(groups.values(), key=lambda g: (-g["bytes"], g["describe"]))


def build_report(plan: ConversionPlan, stats: dict[str, ErrorStats]) -> dict:
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    for info in plan.tensors.values():
        before[info.dtype] += info.nbytes
    for shard in plan.shards:
        for entry in shard.entries:
            after[entry.dtype] += entry.nbytes
    def logical(name: str) -> tuple[str, list[int]]:
        """The weight's own name and shape (a quantized source stores `weight_packed` with the packed shape)."""
        qw = plan.source_quant.get(name)
        return (qw.name, list(qw.shape)) if qw is not None and qw.shape else (name, list(plan.tensors[name].shape))

    rows = [
        {"name": logical(name)[0], "shape": logical(name)[1], "path": plan.decisions[name].action,
         **error_metrics(stats[name])}
        for name in plan.decisions
        if plan.decisions[name].quantized
    ]
    rows.sort(key=lambda r: (-r["rel_rms_error"], r["name"]))
    actions = Counter(d.action for d in plan.decisions.values())
    total_before, total_after = sum(before.values()), sum(after.values())
    parameters = sum(plan.tensors[name].numel for name in plan.decisions)
    quantized_params, quantized_bytes = quantized_footprint(plan)
    return {
        "scheme": _scheme_json(plan),
        "schemes": scheme_summary(plan),
        "tensors_total": len(plan.decisions),
        "tensors_quantized": len(rows),
        "tensors_copied": actions["copy"],
        "tensors_by_path": dict(sorted(actions.items())),
        "bytes_before": dict(sorted(before.items())),
        "bytes_after": dict(sorted(after.items())),
        "total_bytes_before": total_before,
        "total_bytes_after": total_after,
        "compression_ratio": total_before / total_after if total_after else None,
        "parameters_total": parameters,
        "parameters_quantized": quantized_params,
        "bytes_quantized_with_scales": quantized_bytes,
        # 8 x (codes + scales) / elements of the quantized tensors, and 8 x output bytes / all parameters.
        "bits_per_weight": 8 * quantized_bytes / quantized_params if quantized_params else None,
        "bits_per_parameter": 8 * total_after / parameters if parameters else None,
        "worst_rel_rms_error": rows[0]["rel_rms_error"] if rows else 0.0,
        "tensors": rows,
        "high_precision": [
            {"name": name, "dtype": plan.tensors[name].dtype, "shape": list(plan.tensors[name].shape), "reason": d.reason}
            for name, d in sorted(plan.decisions.items()) if d.action == COPY
        ] + [  # modules an engine builds without a tensor of their own (a tied lm_head)
            {"name": module, "dtype": None, "shape": None, "reason": reason}
            for module, reason in sorted(plan.tensorless_modules.items())
        ],
        "warnings": plan.warnings,
        "findings": plan.findings,
    }


def quantized_footprint(plan: ConversionPlan) -> tuple[int, int]:
    """(elements, output bytes of codes + scale tensors) over the tensors stored quantized."""
    sizes = {entry.name: entry.nbytes for shard in plan.shards for entry in shard.entries}
    names = [name for name, d in plan.decisions.items() if d.quantized]
    elements = sum(math.prod(plan.source_quant[name].shape) if name in plan.source_quant else plan.tensors[name].numel
                   for name in names)
    return elements, sum(sizes[spec.name] for name in names for spec in plan.outputs[name])


def build_manifest(plan: ConversionPlan, files: dict[str, dict]) -> dict:
    out_shard = plan.shard_of_output
    source_shard_out: dict[str, str] = {}
    for out_name, src_name in plan.origin.items():
        source_shard_out.setdefault(src_name, out_shard[out_name])
    tensors = {}
    for name, decision in plan.decisions.items():
        info = plan.tensors[name]
        record = {
            "decision": decision.action,
            "reason": decision.reason,
            "source_shard": plan.source_shard[name],
            "source_dtype": info.dtype,
            "shape": list(info.shape),
            "output_shard": source_shard_out.get(name),
            "output_dtype": plan.output_dtype(name),
            "scale": None,
        }
        if decision.quantized:
            specs = plan.outputs[name]
            scale = next(s for s in specs if s.role == SCALE)
            record["scale"] = {"name": scale.name, "shape": list(scale.shape), "dtype": scale.dtype,
                               "shard": out_shard[scale.name]}
            if [s.role for s in specs] != [CODES, SCALE] or specs[0].name != name:
                record["outputs"] = [{"name": s.name, "role": s.role, "dtype": s.dtype, "shape": list(s.shape),
                                      "shard": out_shard[s.name]} for s in specs]
        tensors[name] = record
    return {
        "schema_version": MANIFEST_SCHEMA,
        "tool": "fp8conv",
        "tool_version": __version__,
        "scheme": _scheme_json(plan),
        "schemes": scheme_summary(plan),
        "tensors": tensors,
        "modules_without_tensors": {m: {"decision": "keep", "reason": r} for m, r in sorted(plan.tensorless_modules.items())},
        "files": dict(sorted(files.items())),
    }
