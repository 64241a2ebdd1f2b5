"""Every scheme that existed before the format core keeps its output byte for byte.

The sha256 of each sample conversion (every format x granularity x layout combination the CLI
accepted before INT4 / zero points / packed layouts were added) was recorded with that older code
in tests/golden/sample_sha256.json. Shards, index and config must match exactly; the manifest too,
except for the digests of the report files (the report's error sums changed from per-backend float32
sums to one fixed-order float64 sum, on purpose; the HTML page shows them).

Regenerate (only when a byte change is intended and explained in the commit):
    FP8CONV_REGEN_GOLDEN=1 python3 -m pytest tests/test_golden_bytes.py
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import run_cli

GOLDEN = Path(__file__).parent / "golden" / "sample_sha256.json"
DERIVED_FROM_REPORT = ("fp8conv.report.json", "fp8conv.report.html")  # hold the error sums
CARD = "README.md"  # the model card (#27): version, command and paths, outside the manifest's files
MODELS = ("llama-tiny", "bert-tiny-fp32", "moe-tiny")
COMBOS = [("compressed-tensors", f, g) for f in ("fp8_e4m3", "int8") for g in ("block", "channel", "group", "tensor")]
COMBOS += [("fp8-native", "fp8_e4m3", "block")]
COMBOS += [("fp8conv", f, g) for f in ("fp8_e4m3", "fp8_e5m2", "int8") for g in ("block", "channel", "group", "tensor")]
DEQUANTIZED = [("compressed-tensors", "fp8_e4m3", "block"), ("compressed-tensors", "int8", "channel"),
               ("fp8-native", "fp8_e4m3", "block"), ("fp8conv", "fp8_e5m2", "group")]


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name in DERIVED_FROM_REPORT or path.name == CARD:
            continue
        data = path.read_bytes()
        if path.name == "fp8conv.manifest.json":
            manifest = json.loads(data)
            for name in DERIVED_FROM_REPORT:
                manifest["files"].pop(name, None)
            data = json.dumps(manifest, sort_keys=True).encode()
        out[path.name] = hashlib.sha256(data).hexdigest()
    return out


def key(model: str, layout: str, fmt: str, granularity: str) -> str:
    return f"{model} {layout} {fmt} {granularity}"


def convert_all(tmp_path: Path) -> dict[str, dict[str, str]]:
    root = Path(__file__).resolve().parent.parent / "sample_models"
    result = {}
    for model in MODELS:
        for layout, fmt, granularity in COMBOS:
            out = tmp_path / key(model, layout, fmt, granularity).replace(" ", "_")
            extra = ["--group-size", "32"] if granularity == "group" else []
            run_cli("quantize", root / model, "-o", out, "--format", fmt, "--granularity", granularity,
                    "--layout", layout, "--workers", "1", "-q", *extra)
            result[key(model, layout, fmt, granularity)] = digests(out)
            if (layout, fmt, granularity) in DEQUANTIZED:
                back = out.with_name(out.name + "_deq")
                run_cli("dequantize", out, "-o", back, "--workers", "1", "-q")
                result["dequantize " + key(model, layout, fmt, granularity)] = digests(back)
    return result


def test_sample_outputs_keep_their_bytes(tmp_path):
    got = convert_all(tmp_path)
    if os.environ.get("FP8CONV_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden digests regenerated")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    changed = [f"{k}: {f}" for k in sorted(want) for f in sorted(set(want[k]) | set(got[k]))
               if want[k].get(f) != got[k].get(f)]
    assert not changed, f"{len(changed)} files changed bytes, e.g. {changed[:5]}"
