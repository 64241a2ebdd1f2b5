"""report.json as the HTML page reads it: loaded and checked enough to render (types, integer and metric
ranges), before any arithmetic; and the per-tensor metrics it may hold."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from ..io.checkpoint import REPORT_NAME
from ..io.untrusted import load_json, printable

METRICS = {  # key -> (column label, how the value is written); unknown numeric keys get a generic column
    "rel_rms_error": ("rel. RMS error", "pct4"),
    "sqnr_db": ("SQNR dB", "db"),
    "max_abs_error": ("max abs error", "g4"),
    "saturated_fraction": ("saturated", "pct4"),
    "flushed_fraction": ("flushed to zero", "pct4"),
    "nonfinite_values": ("NaN/Inf in source", "int"),
    "limit": ("limit", "pct2"),
    "minmax_rel_rms_error": ("min-max rel. RMS error", "pct4"),
    "rms_error_reduction": ("RMS error reduction vs min-max", "pct2"),
}

# What a report can hold (float32 data bounds SQNR by ~1700 dB): checked on load, before any arithmetic.
METRIC_RANGES = {"rel_rms_error": (0.0, 1e30), "sqnr_db": (-1e4, 1e4), "max_abs_error": (0.0, 1e300),
                 "saturated_fraction": (0.0, 1.0), "flushed_fraction": (0.0, 1.0), "nonfinite_values": (0, 2 ** 63),
                 "limit": (0.0, 1e30), "minmax_rel_rms_error": (0.0, 1e30), "rms_error_reduction": (-1e30, 1e30)}


def load_report(path: Path) -> dict:
    """OUT/fp8conv.report.json (or the JSON file itself), checked enough to render; raises InputError."""
    path = Path(path)
    file = path / REPORT_NAME if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path} has no {REPORT_NAME}: not an fp8conv output (quantize and dequantize write it)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file} is not readable JSON ({exc})") from None
    report = load_json(text, str(file), "is not readable JSON")
    if not isinstance(report, dict):
        raise InputError(f"{file} is not a JSON object")
    _check_numbers(report, file, "")
    for key in ("bytes_before", "bytes_after"):
        sizes = report.get(key, {})
        if not isinstance(sizes, dict) or not all(_is_count(v) for v in sizes.values()):
            raise InputError(f"{file}: {key} is not an object of byte counts")
    for key in ("total_bytes_before", "total_bytes_after", "tensors_total"):
        if key in report and report[key] is not None and not _is_count(report[key]):
            raise InputError(f"{file}: {key} is not a byte count")
    _check_rows(report.get("tensors", []), file, "tensors")
    _check_rows(report.get("high_precision", []), file, "high_precision")
    return report


MAX_INT = 2 ** 63  # every integer fp8conv writes (bytes, counts) fits in int64


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INT


def _check_numbers(value: object, file: Path, where: str) -> None:
    """Refuse integers no float holds (10**400) anywhere in the document, before any arithmetic."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and not -MAX_INT <= item < MAX_INT:
            raise InputError(f"{file}: {at or 'a value'} is an integer out of range ({len(str(abs(item)))} digits)")
        if isinstance(item, dict):
            stack.extend((v, f"{at}.{printable(str(k))}" if at else printable(str(k))) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))


def has_report(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / REPORT_NAME).is_file()


def _check_rows(rows: object, file: Path, key: str) -> None:
    if not isinstance(rows, list):
        raise InputError(f"{file}: {key} is not a list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise InputError(f"{file}: {key}[{i}] has no tensor name")
        for k, v in row.items():
            if k in METRICS and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InputError(f"{file}: {key}[{i}] ({printable(row['name'])}) has a non-numeric {k}")
            low, high = METRIC_RANGES.get(k, (-math.inf, math.inf))
            if k in METRICS and v is not None and not low <= v <= high:
                raise InputError(f"{file}: {key}[{i}] ({printable(row['name'])}) has {k} {v!r}, outside [{low:g}, {high:g}]")
