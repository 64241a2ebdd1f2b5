"""fp8conv inspect: headers only by default, any checkpoint, escaped names, golden text."""
from __future__ import annotations

import json


import stfile
from fp8conv.io.safetensors import TensorReader
from helpers import run_cli

GOLDEN_LLAMA_FP8 = """\
checkpoint: {out}
shards: 2 (model-00001-of-00002.safetensors 1.00 MB, model-00002-of-00002.safetensors 1.00 MB)
tensors: 35, parameters: 1,737,984
bytes per dtype: BF16 526.85 KB, F32 1.44 KB, F8_E4M3 1.47 MB
quantization: compressed-tensors, written by fp8conv 0.1.0
schemes: fp8_e4m3 block 64x64 (14 weights)
quantized modules: 14; high-precision 2-D weights: 2 (lm_head, model.embed_tokens)
scale shapes: [256, 704] -> [4, 11] F32 x2; [704, 256] -> [11, 4] F32 x4; [128, 256] -> [2, 4] F32 x4; [256, 256] -> [4, 4] F32 x4
"""  # the default block is 64x64 on this sample (#25: its 704-row gate_proj is fused with up_proj in vLLM)


def test_golden_summary(sample, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", sample("llama-tiny"), "-o", out)
    assert run_cli("inspect", out).stdout == GOLDEN_LLAMA_FP8.format(out=out)


def test_headers_only_without_stats(sample, monkeypatch):
    src = sample("llama-tiny")

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data without --stats")

    monkeypatch.setattr(TensorReader, "read_into", no_data)
    summary = json.loads(run_cli("inspect", src, "--json", "--tensors").stdout)
    assert summary["tensor_count"] == 21 and summary["layout"] == "none"
    assert summary["bytes_per_dtype"] == {"BF16": sum(t["bytes"] for t in summary["tensors"])}


def test_tensor_listing_with_pattern(sample, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", sample("moe-tiny"), "-o", out)
    rows = json.loads(run_cli("inspect", out, "--json", "--tensors", "*.experts.*").stdout)["tensors"]
    assert [r["name"] for r in rows] == [
        "model.layers.0.mlp.experts.down_proj.weight", "model.layers.0.mlp.experts.down_proj.weight_scale",
        "model.layers.0.mlp.experts.gate_up_proj.weight", "model.layers.0.mlp.experts.gate_up_proj.weight_scale"]
    assert rows[0]["role"] == "quantized" and rows[0]["scale"]["shape"] == [4, 1, 2] and rows[1]["role"] == "scale"
    text = run_cli("inspect", out, "--tensors", "re:.*q_proj").stdout
    assert "model.layers.0.self_attn.q_proj.weight  F8_E4M3  128x128" in text


def test_stats(sample):
    summary = json.loads(run_cli("inspect", sample("bert-tiny-fp32"), "--stats", "--json").stdout)
    stats = summary["stats"]
    assert stats["embeddings.position_ids"] == {"min": 0.0, "max": 63.0, "absmax": 63.0, "nan": 0, "inf": 0,
                                                "zero_fraction": 1 / 64}
    assert stats["embeddings.LayerNorm.bias"]["zero_fraction"] == 1.0


def test_stats_of_quantized_weights_are_dequantized(sample, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", sample("bert-tiny-fp32"), "-o", out, "--granularity", "channel")
    stats = json.loads(run_cli("inspect", out, "--stats", "--json").stdout)["stats"]
    absmax = stats["encoder.layer.0.attention.self.query.weight"]["absmax"]
    assert 0.1 < absmax < 2  # real weight magnitudes, not raw FP8 code values up to 448


def test_control_characters_escaped(tmp_path):
    name = "evil\x1b[2Jname.weight"
    path = stfile.write(tmp_path / "m.safetensors", {name: stfile.entry("F32", [1], 0, 4)}, b"\0" * 4)
    text = run_cli("inspect", path, "--tensors").stdout
    assert "\x1b" not in text and "evil\\x1b[2Jname.weight" in text


def test_corrupt_input_one_line_exit_3(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00")
    result = run_cli("inspect", path, expect=3)
    assert result.stderr == f"fp8conv: error: {path}: file is 2 bytes, too short for a safetensors header\n"
