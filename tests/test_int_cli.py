"""INT4 / INT8 weight-only end to end: files written, config, dequantize / inspect / verify, refusals."""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from fp8conv.formats import FORMATS
from helpers import load_all, read_json, run_cli
from reference import reference_quantize_int

SCHEMES = [
    ("int4", "group", True), ("int4", "group", False), ("int4", "channel", True), ("int4", "channel", False),
    ("int8", "group", True), ("int8", "channel", False),
]


def unpack_rows(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Codes from int32 words, element j at bit j * bits of its word, offset by 2^(bits-1) (test's own loop)."""
    u = words.view(np.uint32).astype(np.int64)
    per = 32 // bits
    fields = [(u >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(fields, axis=-1).reshape(words.shape[0], -1)[:, :cols] - (1 << (bits - 1))


@pytest.mark.parametrize("fmt,granularity,symmetric", SCHEMES)
def test_pack_quantized_sample(sample, tmp_path, fmt, granularity, symmetric):
    src, out = sample("llama-tiny"), tmp_path / "out"
    args = ["--format", fmt, "--granularity", granularity, "--activations", "none", "--workers", "2"]
    args += ["--group-size", "64"] if granularity == "group" else []
    args += [] if symmetric else ["--asymmetric"]
    run_cli("quantize", src, "-o", out, *args)
    bits = 4 if fmt == "int4" else 8
    config = read_json(out / "config.json")["quantization_config"]
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == bits and weights["type"] == "int" and weights["symmetric"] == symmetric
    assert weights["strategy"] == granularity and weights["group_size"] == (64 if granularity == "group" else None)
    assert weights.get("zp_dtype") == (None if symmetric else "torch.int8")
    assert config["config_groups"]["group_0"]["input_activations"] is None
    source, result = load_all(src), load_all(out)
    checked = 0
    for name in (n for n in source if n.endswith("_proj.weight")):
        prefix = name[:-6]
        assert name not in result
        w = source[name].astype(np.float32)
        rows, cols = w.shape
        codes, scales, zps, _ = reference_quantize_int(w, bits, granularity, 64, symmetric, "bf16")
        assert result[prefix + "weight_packed"].dtype == np.int32
        np.testing.assert_array_equal(unpack_rows(result[prefix + "weight_packed"], bits, cols), codes, err_msg=name)
        assert result[prefix + "weight_scale"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(result[prefix + "weight_scale"].astype(np.float32), scales)
        assert result[prefix + "weight_shape"].dtype == np.int64 and result[prefix + "weight_shape"].tolist() == [rows, cols]
        if symmetric:
            assert prefix + "weight_zero_point" not in result
        else:
            zp = result[prefix + "weight_zero_point"]
            assert zp.dtype == np.int32 and zp.shape == (-(-rows * bits // 32), scales.shape[1])
            np.testing.assert_array_equal(unpack_rows(np.ascontiguousarray(zp.T), bits, rows).T, zps)  # packed along rows
        checked += 1
    assert checked == 14
    verify = json.loads(run_cli("verify", out, "--against", src, "--json").stdout)
    assert verify["passed"] and len(verify["tensors"]) == 14
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert list(summary["schemes"].values()) == [14] and summary["parameter_count"] == 1_737_984
    back = tmp_path / "back"
    run_cli("dequantize", out, "-o", back, "--dtype", "fp32")
    restored = load_all(back)
    for name in (n for n in source if n.endswith("_proj.weight")):
        _, _, _, deq = reference_quantize_int(source[name].astype(np.float32), bits, granularity, 64, symmetric, "bf16")
        np.testing.assert_array_equal(restored[name], deq.astype(np.float32), err_msg=name)
    assert "quantization_config" not in read_json(back / "config.json")


def test_group_that_does_not_divide_is_refused_up_front(sample, tmp_path):
    out = tmp_path / "out"
    # An explicit group is refused (the default one is fitted to the model: tests/test_defaults.py).
    result = run_cli("quantize", sample("llama-tiny"), "-o", out, "--format", "int4", "--group-size", "128", expect=2)
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "model.layers.0.mlp.down_proj.weight (704)" in message
    assert "model.layers.1.mlp.down_proj.weight (704)" in message and "--group-size 64 / 32 / 16 / 8" in message
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args,needle", [
    (["--format", "int4", "--activations", "dynamic"], "weight-only"),
    (["--format", "fp8_e4m3", "--asymmetric", "--granularity", "channel"], "integer formats"),
    (["--format", "int8", "--asymmetric", "--granularity", "channel"], None),
    (["--format", "int4", "--granularity", "block"], "channel or group"),
    (["--format", "int4", "--layout", "fp8conv", "--granularity", "channel"], "pack-quantized"),
    (["--format", "fp8_e4m3", "--activations", "none", "--granularity", "channel"], "integer formats"),
])
def test_combinations(sample, tmp_path, args, needle):
    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "o", *args, expect=None)
    if needle is None:  # asymmetric implies weight-only
        assert result.exit_code == 0, result.stderr
        assert read_json(tmp_path / "o" / "config.json")["quantization_config"]["format"] == "pack-quantized"
    else:
        assert result.exit_code == 2 and needle in result.stderr, result.stderr


def test_verify_fails_on_wrong_zero_points(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--format", "int4", "--granularity", "channel", "--asymmetric")
    os.remove(out / "fp8conv.manifest.json")  # keep the integrity check out of it: numerics must catch this
    name = "model.layers.0.self_attn.q_proj.weight_zero_point"
    shard = next(p for p in out.glob("*.safetensors") if name in load_all_names(p))
    tensors = load_all(out)
    fmt = FORMATS["int4"]
    zp = fmt.unpack_int32(np.ascontiguousarray(tensors[name].T), 256).T
    wrong = np.clip(zp.astype(np.int16) + 3, -8, 7).astype(np.int8)
    rewrite(shard, {name: np.ascontiguousarray(fmt.pack_int32(np.ascontiguousarray(wrong.T)).T)})
    report = json.loads(run_cli("verify", out, "--against", src, "--json", expect=1).stdout)
    bad = [f for f in report["findings"] if f["fatal"]]
    assert [f["tensor"] for f in bad] == ["model.layers.0.self_attn.q_proj.weight"] and bad[0]["check"] == "numerics"


def load_all_names(path):
    from fp8conv.io.safetensors import read_header

    return read_header(path).tensors


def rewrite(shard, replacements: dict) -> None:
    from fp8conv.io.safetensors import TensorReader, read_header

    header = read_header(shard)
    with TensorReader(shard) as reader:
        tensors = {n: reader.read_rows(i) for n, i in header.tensors.items()}
    tensors.update(replacements)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def ct_int8_asymmetric(root, rng):
    """A compressed-tensors int-quantized INT8 checkpoint with symmetric: false (unpacked int8 zero points)."""
    root.mkdir()
    w = (rng.standard_normal((8, 16)) * 0.1 + 0.05).astype(np.float32)
    codes, scales, zps, deq = reference_quantize_int(w, 8, "channel", symmetric=False)
    save_file({"m.weight": codes, "m.weight_scale": scales, "m.weight_zero_point": zps}, str(root / "model.safetensors"))
    args = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel", "group_size": None,
            "dynamic": False, "zp_dtype": "torch.int8"}
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}}}
    (root / "config.json").write_text(json.dumps(config))
    return w, deq


def test_int8_asymmetric_input_honours_zero_points(tmp_path):
    w, deq = ct_int8_asymmetric(tmp_path / "src", np.random.default_rng(5))
    run_cli("dequantize", tmp_path / "src", "-o", tmp_path / "out", "--dtype", "fp32")
    np.testing.assert_array_equal(load_all(tmp_path / "out")["m.weight"], deq.astype(np.float32))
    assert np.abs(deq - w).max() > 0  # a real quantization, and the zero points are not all zero
    run_cli("quantize", tmp_path / "src", "-o", tmp_path / "fp8", "--granularity", "channel")
    fp8 = load_all(tmp_path / "fp8")
    requantized = fp8["m.weight"].astype(np.float32) * fp8["m.weight_scale"]
    assert np.abs(requantized - deq).max() < 0.05 * np.abs(deq).max()


@pytest.mark.parametrize("command", ["quantize", "dequantize", "verify"])
@pytest.mark.parametrize("kind", ["gptq", "bitsandbytes", "unknown", "marlin-24"])
def test_foreign_quantization_refused(tmp_path, command, kind):
    src = tmp_path / "src"
    src.mkdir()
    tensors = {"m.weight": np.zeros((4, 4), ml_dtypes.bfloat16)}
    config: dict = {}
    if kind == "gptq":
        tensors = {"m.qweight": np.zeros((1, 4), np.int32), "m.qzeros": np.zeros((1, 1), np.int32),
                   "m.scales": np.ones((1, 4), np.float16)}
        config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    elif kind == "bitsandbytes":
        tensors.update({"m.weight.absmax": np.ones(1, np.float32), "m.weight.quant_map": np.ones(16, np.float32)})
    elif kind == "unknown":
        config = {"quantization_config": {"quant_method": "hqq"}}
    else:
        config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "marlin-24"}}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    args = [] if command == "verify" else ["-o", tmp_path / "out"]
    result = run_cli(command, src, *args, expect=3)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fp8conv: error:")
    assert {"gptq": "GPTQ/AWQ", "bitsandbytes": "bitsandbytes", "unknown": "'hqq'", "marlin-24": "marlin-24"}[kind] in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_source_scales_refused(tmp_path):
    w, _ = ct_int8_asymmetric(tmp_path / "src", np.random.default_rng(6))
    tensors = load_all(tmp_path / "src")
    tensors["m.weight_scale"][3, 0] = np.nan
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    result = run_cli("dequantize", tmp_path / "src", "-o", tmp_path / "out", expect=3)
    assert "m.weight_scale holds 1 value(s) that are NaN, Inf or <= 0" in result.stderr


def test_verify_checks_fused_packed_parts(sample, tmp_path):
    """q/k/v of a pack-quantized output are checked as one fused layer too (by their logical names)."""
    from test_verify import rewrite_shard

    src, out = sample("llama-tiny"), tmp_path / "out"
    refused = run_cli("quantize", src, "-o", out, "--format", "int4", "--granularity", "channel",
                      "--ignore", "model.layers.0.self_attn.k_proj", expect=2)  # the pre-flight refuses it
    assert "fused layer model.layers.0.self_attn has partitions quantized differently" in refused.stderr
    run_cli("quantize", src, "-o", out, "--format", "int4", "--granularity", "channel")
    source = load_all(src)
    k = "model.layers.0.self_attn.k_proj."

    def keep_k_proj_high_precision(tensors):  # what a tool without the pre-flight could write
        for suffix in ("weight_packed", "weight_scale", "weight_shape"):
            tensors.pop(k + suffix, None)
        tensors[k + "weight"] = source[k + "weight"]

    rewrite_shard(out, keep_k_proj_high_precision)
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"].append(k[:-1])
    (out / "config.json").write_text(json.dumps(config))
    report = json.loads(run_cli("verify", out, "--json", expect=1).stdout)
    assert any("partitions quantized differently" in f["message"] and "layers.0.self_attn" in f["message"]
               for f in report["findings"])
