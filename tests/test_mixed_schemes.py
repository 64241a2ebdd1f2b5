"""--scheme PATTERN=SPEC: several schemes in one checkpoint, written as compressed-tensors config_groups."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import load_all, read_json, run_cli

MIXED = ["--scheme", "re:.*down_proj=int8:channel", "--scheme", "*.mlp.*=int4:group:32"]


def test_mixed_schemes_config_groups_read_back_by_compressed_tensors(sample, tmp_path):
    pytest.importorskip("compressed_tensors", reason="needs the test extra")
    from compressed_tensors.quantization import QuantizationConfig

    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, *MIXED)
    raw = read_json(out / "config.json")["quantization_config"]
    config = QuantizationConfig.model_validate(raw)
    assert config.format == "mixed-precision"
    groups = config.config_groups
    assert groups["group_0"].targets == ["Linear"] and groups["group_0"].format == "float-quantized"
    assert (groups["group_0"].weights.type, groups["group_0"].weights.strategy) == ("float", "block")
    assert groups["group_1"].format == "int-quantized" and groups["group_1"].weights.strategy == "channel"
    assert groups["group_1"].targets == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_2"].format == "pack-quantized"
    assert (groups["group_2"].weights.num_bits, groups["group_2"].weights.group_size) == (4, 32)
    assert groups["group_2"].input_activations is None  # W4A16
    assert groups["group_2"].targets == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")]
    tensors = load_all(out)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == np.int8
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 1)
    assert "model.layers.0.mlp.up_proj.weight_packed" in tensors
    assert str(tensors["model.layers.0.self_attn.q_proj.weight"].dtype) == "float8_e4m3fn"
    report = json.loads(run_cli("verify", out, "--against", src, "--json", "--engine", "transformers").stdout)
    assert report["passed"]
    schemes = {t["name"]: t["scheme"] for t in report["tensors"]}
    assert schemes["model.layers.1.mlp.down_proj.weight"] == "int8 channel"
    assert schemes["model.layers.1.mlp.gate_proj.weight"].startswith("int4 group 32")
    assert schemes["model.layers.1.self_attn.o_proj.weight"] == "fp8_e4m3 block 128x128"
    run_cli("dequantize", out, "-o", tmp_path / "deq")
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["model.layers.0.mlp.down_proj.weight"]["decision"] == "quantize"


def test_mixed_schemes_in_the_dry_run_and_refusals(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    refused = run_cli("quantize", src, "-o", out, "--scheme", "*.k_proj=int8:channel", "--dry-run", expect=2)
    assert ("fused layer model.layers.0.self_attn has partitions quantized differently (q_proj: fp8_e4m3 block "
            "128x128, k_proj: int8 channel, v_proj: fp8_e4m3 block 128x128)") in refused.stderr
    run_cli("quantize", src, "-o", out, "--scheme", "*.k_proj=int8:channel", expect=2)
    assert not out.exists()
    run_cli("quantize", src, "-o", out, "--scheme", "re:.*self_attn.[qkv]_proj=int8:channel", "--dry-run")
    bad = run_cli("quantize", src, "-o", out, "--layout", "fp8-native", "--scheme", "*.down_proj=fp8_e4m3:block:64", expect=2)
    assert "--scheme needs --layout compressed-tensors" in bad.stderr
    for spec, words in (("*.down_proj", "is not PATTERN=SPEC"), ("*.down_proj=fp9", "unknown format 'fp9'"),
                        ("*.down_proj=nvfp4", "--scheme does not mix NVFP4 / MXFP4 / MXFP8"),
                        ("*.down_proj=int8:channel:64", "a size applies to block or group"),
                        ("*.down_proj=fp8_e5m2:block", "cannot describe fp8_e5m2")):
        assert words in run_cli("quantize", src, "-o", out, "--scheme", spec, expect=2).stderr, spec
