"""The end of every run and of `merge`: index, config, extra files, report and manifest, written into the
staging folder once every shard is there."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io.checkpoint import CARD_NAME, CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, REPORT_HTML_NAME, REPORT_NAME, Checkpoint
from ..io.outdir import JOURNAL_NAME, Staging
from ..io.safetensors import sha256_of
from ..io.sidefiles import carry
from ..numerics.stats import ErrorStats
from ..plan.records import ConversionPlan
from ..report import html_page as html_report
from ..report.manifest import build_manifest, build_report
from .options import ConversionResult


def finalize(checkpoint: Checkpoint, plan: ConversionPlan, staging: Staging, files: dict[str, dict],
              stats_json: dict[str, dict], notes: list[str]) -> ConversionResult:
    """With every shard in the staging folder: index, config, extra files, report, then the
    manifest of them all. A whole run and `merge` both end here, so their bytes are the same."""
    stats = {name: ErrorStats.from_json(d) for name, d in stats_json.items()}
    for name, decision in plan.decisions.items():
        if decision.quantized:
            stats.setdefault(name, ErrorStats(elements=plan.tensors[name].numel))
    files = dict(files)
    _write_index(plan, staging, checkpoint)
    config_updated = _write_config(plan, checkpoint, staging, notes)
    _copy_extras(checkpoint, staging)
    report = build_report(plan, stats)
    write_long_json(staging.path(REPORT_NAME), report)
    staging.path(REPORT_HTML_NAME).write_text(html_report.render_conversion(report), encoding="utf-8")
    for path in sorted(p for p in staging.tmp.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(staging.tmp).as_posix()
        if rel not in files and rel != JOURNAL_NAME:
            files[rel] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    write_long_json(staging.path(MANIFEST_NAME), build_manifest(plan, files))
    return ConversionResult(plan, report, staging.out, config_updated, notes)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_long_json(path: Path, data: dict) -> None:
    """As write_json for the two outer levels (the same bytes when nothing is nested deeper), each value
    below them on one line: json's indenting encoder is pure Python (~10 s for a million tensors'
    manifest rows), its compact one is C."""
    path.write_text(_outer_indented(data) + "\n", encoding="utf-8")


def _outer_indented(data: object, depth: int = 0) -> str:
    def leaf(value: object) -> str:
        return json.dumps(value, allow_nan=False, separators=(", ", ": "))

    if depth >= 2 or not isinstance(data, (dict, list)) or not data:
        return leaf(data) if isinstance(data, (dict, list)) and data else json.dumps(data, allow_nan=False)
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(data, dict):
        items = [f"{inner}{json.dumps(k)}: {_outer_indented(v, depth + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return "[\n" + ",\n".join(f"{inner}{_outer_indented(v, depth + 1)}" for v in data) + "\n" + pad + "]"


def _write_index(plan: ConversionPlan, staging: Staging, checkpoint: Checkpoint) -> None:
    if len(plan.shards) == 1 and checkpoint.index is None:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in plan.shards)},
        "weight_map": dict(sorted(plan.shard_of_output.items())),
    }
    write_long_json(staging.path(INDEX_NAME), index)


def _write_config(plan: ConversionPlan, checkpoint: Checkpoint, staging: Staging, notes: list[str]) -> bool:
    """config.json gains the layout's quantization_config (quantize) or loses it (dequantize)."""
    what = "quantization_config NOT written" if plan.layout else "quantization_config NOT removed"
    try:
        config = checkpoint.read_json(CONFIG_NAME)
    except InputError as exc:
        notes.append(f"{exc}; config.json copied unchanged, {what}")
        return False
    if config is None:
        notes.append(f"source has no config.json; {what} (engines need it)")
        return False
    if plan.layout is None:
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
    else:
        assert plan.scheme is not None
        config["quantization_config"] = plan.layout.quantization_config(plan.scheme, plan.unquantized_modules,
                                                                        plan.scheme_groups)
    write_json(staging.path(CONFIG_NAME), config)
    return True


def _copy_extras(checkpoint: Checkpoint, staging: Staging) -> None:
    """Tokenizer, generation config, subfolders...: real files in OUT even when SRC holds links. README.md is
    the model card's (fp8conv.report.card merges SRC's into it after the run)."""
    carry(checkpoint.root, checkpoint.extra_files, staging.path, (MANIFEST_NAME, REPORT_NAME, REPORT_HTML_NAME, CARD_NAME))
