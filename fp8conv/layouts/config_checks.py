"""The shape of a checkpoint's `quantization_config`, checked once when the checkpoint is opened: every
field any layout reads (fp8conv.layouts.*.hints, ConfigGroups, the ignore lists) has the JSON type and
range it must have, before any of it reaches arithmetic (`int("1e999")`, a group size of 10**400, a
list where a name belongs). Fields fp8conv does not read are not looked at."""
from __future__ import annotations

from ..io.untrusted import printable
from ..plan.scheme import MAX_TILE

IGNORE_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers")


def _is_size(value: object, high: int = MAX_TILE) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= high


def _is_tile(value: object) -> bool:
    """[rows, cols] of positive sizes, or compressed-tensors' older "RxC" string."""
    if isinstance(value, str):
        parts = value.split("x")
        return len(parts) == 2 and all(p.isascii() and p.isdigit() and len(p) <= 6 and _is_size(int(p)) for p in parts)
    return isinstance(value, list) and len(value) == 2 and all(_is_size(v) for v in value)


def _check(where: str, value: object, ok: bool, want: str) -> str | None:
    if value is None or ok:
        return None
    shown = printable(repr(value))
    return f"config.json: quantization_config{where} is {shown[:60]}, not {want}"


def _weights_problem(where: str, args: object) -> str | None:
    if args is None:
        return None
    if not isinstance(args, dict):
        return _check(where, args, False, "an object")
    checks = (
        ("num_bits", lambda v: _is_size(v, 64), "a bit width in 1..64"),
        ("group_size", _is_size, f"a group size in 1..{MAX_TILE}"),
        ("block_structure", _is_tile, "[rows, cols] (or \"RxC\") of sizes"),
        ("strategy", lambda v: isinstance(v, str), "a name"),
        ("symmetric", lambda v: isinstance(v, bool), "true or false"),
    )
    for key, test, want in checks:
        problem = _check(f"{where}.{key}", args.get(key), test(args.get(key)), want)
        if problem:
            return problem
    return None


def quant_config_problem(qc: dict) -> str | None:
    """Why the fields fp8conv reads from `qc` (a quantization_config object) cannot be used, or None."""
    top = (
        ("quant_method", lambda v: isinstance(v, str), "a name"),
        ("format", lambda v: isinstance(v, str), "a name"),
        ("fmt", lambda v: isinstance(v, str), "a name"),
        ("granularity", lambda v: isinstance(v, str), "a name"),
        ("weight_block_size", _is_tile, "[rows, cols] of sizes"),
        ("block_size", _is_tile, "[rows, cols] of sizes"),
        ("group_size", _is_size, f"a group size in 1..{MAX_TILE}"),
        ("config_groups", lambda v: isinstance(v, dict), "an object of groups"),
        *((key, lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "a list of names")
          for key in IGNORE_KEYS),
    )
    for key, test, want in top:
        problem = _check(f".{key}", qc.get(key), test(qc.get(key)), want)
        if problem:
            return problem
    for name, group in (qc.get("config_groups") or {}).items():
        where = f".config_groups.{printable(str(name))[:40]}"
        if not isinstance(group, dict):
            return _check(where, group, False, "an object")
        targets = group.get("targets")
        problem = (_check(f"{where}.targets", targets, isinstance(targets, list) and all(isinstance(t, str) for t in targets),
                          "a list of names")
                   or _check(f"{where}.format", group.get("format"), isinstance(group.get("format"), str), "a name")
                   or _weights_problem(f"{where}.weights", group.get("weights")))
        if problem:
            return problem
    return None
