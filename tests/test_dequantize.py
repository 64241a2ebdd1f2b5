"""fp8conv dequantize, and quantized checkpoints as input to quantize (re-quantize / carry over)."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import formats_fixtures as ff
from conftest import tree_digest
from helpers import group_option, load_all, read_json, run_cli
from reference import reference_quantize, value_table

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def reference_dequantize(codes: np.ndarray, scales: np.ndarray, block: int, out_dtype) -> np.ndarray:
    """w = code value * scale of its block, exact in float64, rounded once to float32, then to out_dtype."""
    if codes.dtype == np.int8:
        values = codes.astype(np.float64)
    else:
        values = value_table("fp8_e4m3")[codes.view(np.uint8)]
    rows, cols = codes.shape
    expanded = np.repeat(np.repeat(scales.astype(np.float64), block, 0), block, 1)[:rows, :cols]
    return (values * expanded).astype(np.float32).astype(out_dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_fine_grained_fp8_with_scales_in_another_shard(tmp_path, dtype):
    source = ff.source_model(tmp_path / "src")
    ds = ff.deepseek_fine_grained(tmp_path / "ds", source)
    before = tree_digest(ds)
    out = tmp_path / "out"
    run_cli("dequantize", ds, "-o", out, "--dtype", dtype)
    assert tree_digest(ds) == before
    quantized, result = load_all(ds), load_all(out)
    for name in ff.SHAPES:
        if not name.endswith("_proj.weight"):
            continue
        expected = reference_dequantize(quantized[name], quantized[name[:-6] + "weight_scale_inv"], 128, DTYPES[dtype])
        assert result[name].dtype == DTYPES[dtype]
        np.testing.assert_array_equal(result[name].view(np.uint8), expected.view(np.uint8), err_msg=name)
    assert not any(n.endswith("weight_scale_inv") for n in result)
    assert result["lm_head.weight"].tobytes() == source["lm_head.weight"].tobytes()
    config = read_json(out / "config.json")
    assert "quantization_config" not in config and config["model_type"] == "deepseek_v3"
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(result)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in result.values())


def test_llm_compressor_bf16_scales(tmp_path):
    source = ff.source_model(tmp_path / "src")
    ct = ff.llm_compressor_fp8_block(tmp_path / "ct", source)
    out = tmp_path / "out"
    run_cli("dequantize", ct, "-o", out, "--dtype", "fp32")
    quantized, result = load_all(ct), load_all(out)
    name = "model.layers.0.mlp.down_proj.weight"
    expected = reference_dequantize(quantized[name], quantized[name[:-6] + "weight_scale"].astype(np.float32), 128, np.float32)
    np.testing.assert_array_equal(result[name], expected)


@pytest.mark.parametrize("fmt,granularity", [("fp8_e4m3", "channel"), ("int8", "channel"), ("fp8_e4m3", "group"),
                                             ("fp8_e4m3", "tensor"), ("int8", "block")])
def test_round_trip_of_our_output(sample, tmp_path, fmt, granularity):
    src = sample("moe-tiny")
    quant, out = tmp_path / "q", tmp_path / "dq"
    run_cli("quantize", src, "-o", quant, "--format", fmt, "--granularity", granularity, *group_option(granularity))
    run_cli("dequantize", quant, "-o", out, "--dtype", "fp32")
    source, result = load_all(src), load_all(out)
    assert set(result) == set(source)
    name = "model.layers.0.mlp.experts.gate_up_proj.weight"
    for e in range(source[name].shape[0]):
        _, _, deq = reference_quantize(source[name][e].astype(np.float32), fmt, granularity, (128, 128), 32)
        np.testing.assert_array_equal(result[name][e], deq.astype(np.float32))
    assert result["model.layers.0.mlp.gate.weight"].tobytes() == source["model.layers.0.mlp.gate.weight"].tobytes()


def test_lossless_relayout_fine_grained_to_compressed_tensors(tmp_path):
    source = ff.source_model(tmp_path / "src")
    ds = ff.deepseek_fine_grained(tmp_path / "ds", source)
    out = tmp_path / "ct"
    result = run_cli("quantize", ds, "-o", out, "--layout", "compressed-tensors", "--json")
    before, after = load_all(ds), load_all(out)
    for name in ff.SHAPES:
        if name.endswith("_proj.weight"):
            assert after[name].tobytes() == before[name].tobytes(), name
            assert after[name[:-6] + "weight_scale"].tobytes() == before[name[:-6] + "weight_scale_inv"].tobytes()
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["model.layers.0.mlp.down_proj.weight"]["decision"] == "carry"
    assert manifest["model.layers.0.mlp.down_proj.weight_scale_inv"]["decision"] == "drop"
    assert json.loads(result.stdout)["tensors_by_path"]["carry"] == 2
    assert read_json(out / "config.json")["quantization_config"]["quant_method"] == "compressed-tensors"
    run_cli("verify", out)


def test_requantize_fine_grained_into_int8_channel(tmp_path):
    source = ff.source_model(tmp_path / "src")
    ds = ff.deepseek_fine_grained(tmp_path / "ds", source)
    out, deq = tmp_path / "int8", tmp_path / "deq"
    run_cli("quantize", ds, "-o", out, "--format", "int8", "--granularity", "channel")
    run_cli("dequantize", ds, "-o", deq, "--dtype", "fp32")
    dequantized, result = load_all(deq), load_all(out)
    name = "model.layers.0.mlp.down_proj.weight"
    codes, scales, _ = reference_quantize(dequantized[name], "int8", "channel")
    np.testing.assert_array_equal(result[name], codes)
    np.testing.assert_array_equal(result[name[:-6] + "weight_scale"], scales)
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest[name]["decision"] == "requantize"
    assert "dequantized (float32) and re-quantized" in manifest[name]["reason"]


def test_bf16_scales_are_requantized_not_carried(tmp_path):
    source = ff.source_model(tmp_path / "src")
    ct = ff.llm_compressor_fp8_block(tmp_path / "ct", source)
    out = tmp_path / "out"
    run_cli("quantize", ct, "-o", out)
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["model.layers.0.mlp.down_proj.weight"]["decision"] == "requantize"
    run_cli("verify", out)


def broken_fine_grained(tmp_path, mutate):
    source = ff.source_model(tmp_path / "src")
    ds = ff.deepseek_fine_grained(tmp_path / "ds", source)
    shard = ds / "model-00002-of-00002.safetensors"
    tensors = {n: v for n, v in load_all(ds).items() if n.endswith(("scale_inv", "norm.weight", "lm_head.weight"))}
    mutate(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = read_json(ds / "model.safetensors.index.json")
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard.name}
    index["weight_map"].update({n: shard.name for n in tensors})
    (ds / "model.safetensors.index.json").write_text(json.dumps(index))
    return ds


@pytest.mark.parametrize("command", ["dequantize", "quantize"])
def test_wrong_scale_shape_refused(tmp_path, command):
    scale = "model.layers.0.mlp.down_proj.weight_scale_inv"
    ds = broken_fine_grained(tmp_path, lambda t: t.__setitem__(scale, np.ones((2, 2), np.float32)))
    result = run_cli(command, ds, "-o", tmp_path / "out", expect=3)
    assert "model.layers.0.mlp.down_proj.weight scale shape [2, 2] does not fit weight [256, 320]" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_weight_without_scale_refused(tmp_path):
    ds = broken_fine_grained(tmp_path, lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale_inv"))
    result = run_cli("dequantize", ds, "-o", tmp_path / "out", expect=3)
    assert "quantized weight model.layers.0.mlp.down_proj.weight has no weight_scale" in result.stderr


def test_nothing_to_dequantize(sample, tmp_path):
    result = run_cli("dequantize", sample("llama-tiny"), "-o", tmp_path / "out", expect=3)
    assert "holds no quantized weights" in result.stderr


def test_dequantize_output_identical_for_any_worker_count(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "q")
    run_cli("dequantize", tmp_path / "q", "-o", tmp_path / "d1", "--workers", "1")
    run_cli("dequantize", tmp_path / "q", "-o", tmp_path / "d2", "--workers", "2")
    assert tree_digest(tmp_path / "d1") == tree_digest(tmp_path / "d2")
