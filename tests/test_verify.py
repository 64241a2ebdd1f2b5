"""fp8conv verify: each check passes on good checkpoints and fails on purpose-built broken ones."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import formats_fixtures as ff
from fp8conv.io.safetensors import read_header
from helpers import group_option, load_all, read_json, run_cli

MODELS = ["llama-tiny", "bert-tiny-fp32", "moe-tiny"]
SCHEMES = [
    ("fp8_e4m3", "block", "compressed-tensors"), ("fp8_e4m3", "block", "fp8-native"),
    ("fp8_e4m3", "channel", "compressed-tensors"), ("fp8_e4m3", "group", "compressed-tensors"),
    ("fp8_e4m3", "tensor", "compressed-tensors"), ("int8", "channel", "compressed-tensors"),
    ("int8", "block", "compressed-tensors"), ("fp8_e5m2", "block", "fp8conv"), ("fp8_e5m2", "channel", "fp8conv"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt,granularity,layout", SCHEMES)
def test_verify_passes_right_after_quantize(sample, tmp_path, model, fmt, granularity, layout):
    src, out = sample(model), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--format", fmt, "--granularity", granularity, "--layout", layout,
            *group_option(granularity))
    # Every default passes, llama-tiny's FP8 block included: vLLM fuses its 704-row gate_proj with up_proj
    # (only the last part may hold a partial block), so the default block is 64x64 there (#25).
    result = run_cli("verify", out, "--against", src, "--json")
    report = json.loads(result.stdout)
    assert report["compared_against_source"]
    assert report["passed"] and all(status == "pass" for status in report["checks"].values())
    quantized = [n for n, t in read_json(out / "fp8conv.manifest.json")["tensors"].items() if t["decision"] == "quantize"]
    assert sorted(t["name"] for t in report["tensors"]) == sorted(quantized)


@pytest.fixture
def quantized(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out)
    return src, out


def rewrite_shard(out, mutate):
    """Rewrite the shard holding layer 0 through the safetensors package, update the index, drop the manifest."""
    shard = out / "model-00001-of-00002.safetensors"
    tensors = {n: v for n, v in load_all(out).items() if n in read_header(shard).tensors}
    mutate(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = read_json(out / "model.safetensors.index.json")
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard.name or n in tensors}
    index["weight_map"].update({n: shard.name for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "fp8conv.manifest.json").unlink()


W = "model.layers.0.mlp.down_proj.weight"
S = "model.layers.0.mlp.down_proj.weight_scale"


def expect_failure(out, check, message, *extra, code=1):
    result = run_cli("verify", out, *extra, expect=code)
    if code == 1:
        assert f"FAIL [{check}]" in result.stdout and message in result.stdout, result.stdout
        report = json.loads(run_cli("verify", out, *extra, "--json", expect=1).stdout)
        assert report["checks"][check] == "fail" and not report["passed"]
    else:
        assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_missing_scale(quantized):
    _, out = quantized
    rewrite_shard(out, lambda t: t.pop(S))
    expect_failure(out, "structure", f"{W} has no weight_scale")


def test_wrong_scale_shape(quantized):
    _, out = quantized
    rewrite_shard(out, lambda t: t.__setitem__(S, np.ones((3, 6), np.float32)))
    expect_failure(out, "structure", "scale shape [3, 6] does not fit weight [256, 704]")


def test_orphan_scale(quantized):
    _, out = quantized
    rewrite_shard(out, lambda t: t.__setitem__("model.layers.0.input_layernorm.weight_scale", np.ones(1, np.float32)))
    expect_failure(out, "structure", "orphan scale model.layers.0.input_layernorm.weight_scale")


def test_nan_scale(quantized):
    _, out = quantized

    def poison(tensors):
        tensors[S] = tensors[S].copy()
        tensors[S][0, 0] = np.nan

    rewrite_shard(out, poison)
    expect_failure(out, "numerics", f"{S} holds 1 value(s) that are NaN, Inf or <= 0")


def test_flipped_byte_breaks_sha256(quantized):
    _, out = quantized
    shard = out / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    expect_failure(out, "integrity", "model-00002-of-00002.safetensors does not match its sha256")


def test_index_names_missing_shard(quantized):
    _, out = quantized
    (out / "model-00002-of-00002.safetensors").unlink()
    expect_failure(out, "integrity", "names shard model-00002-of-00002.safetensors, which is missing", code=3)


def test_config_lists_quantized_module_as_ignored(quantized):
    _, out = quantized
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"].append("model.layers.0.mlp.down_proj")
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    expect_failure(out, "structure", f"{W} is quantized but the quantization_config lists it as ignored")


def test_config_format_disagrees_with_tensors(quantized):
    """The format engines use is the config group's (compressed-tensors and vLLM), the top level's when the
    group names none."""
    _, out = quantized
    config = read_json(out / "config.json")
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "int-quantized"
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    expect_failure(out, "structure", "is F8_E4M3 but its config group's format int-quantized stores I8")
    del config["quantization_config"]["config_groups"]["group_0"]["format"]
    config["quantization_config"]["format"] = "int-quantized"
    (out / "config.json").write_text(json.dumps(config))
    expect_failure(out, "structure", "is F8_E4M3 but its config group's format int-quantized stores I8")
    config["quantization_config"]["format"] = "float-quantized"
    (out / "config.json").write_text(json.dumps(config))
    run_cli("verify", out, "--engine", "transformers")  # (vLLM: the sample's 704-row gate_proj in block 128)


def test_high_precision_module_not_ignored(quantized):
    _, out = quantized
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = ["model.embed_tokens"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    expect_failure(out, "structure", "lm_head.weight is high precision but not ignored")


def test_against_wrong_source_fails_numerics(quantized, sample, tmp_path):
    src, out = quantized
    other = tmp_path / "other"
    shutil.copytree(src, other)
    tensors = {n: v for n, v in load_all(other).items() if n in read_header(other / "model-00001-of-00002.safetensors").tensors}
    tensors[W] = (tensors[W].astype(np.float32) * 3).astype(tensors[W].dtype)
    tensors["model.layers.0.input_layernorm.weight"] = tensors["model.layers.0.input_layernorm.weight"] * 2
    save_file(tensors, str(other / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    result = run_cli("verify", out, "--against", other, expect=1)
    assert f"{W} relative RMS error" in result.stdout
    assert "model.layers.0.input_layernorm.weight is not bit-identical to the source" in result.stdout


def test_max_rel_error_threshold(quantized):
    src, out = quantized
    result = run_cli("verify", out, "--against", src, "--max-rel-error", "0.001", expect=1)
    assert "exceeds 0.001" in result.stdout


def test_tp_partition_constraint(quantized):
    _, out = quantized
    result = run_cli("verify", out, "--tp", "4", expect=1)
    # The default block is 64x64 on llama-tiny; one line per rule, its first tensors in layer order.
    line = next(line for line in result.stdout.splitlines() if "output partitions (tp 4)" in line)
    assert line.startswith("FAIL [engines] vllm: output partitions (tp 4) are not divisible by block 64 (8 tensors: "
                           "model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight, "
                           "model.layers.0.self_attn.k_proj.weight and ")
    assert "model.layers.0.mlp.gate_proj.weight output partition 176 (tp 4) is not divisible by block 64" in line


def test_transformers_engine_check(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--layout", "fp8-native")
    warned = run_cli("verify", out)
    assert "warn [engines] transformers: weights are not divisible by the 128x128 block" in warned.stdout
    assert "e.g. model.layers.0.mlp.down_proj.weight 256x704 is not divisible" in warned.stdout
    failed = run_cli("verify", out, "--engine", "transformers", expect=1)
    assert "FAIL [engines] transformers:" in failed.stdout


def test_fused_parts_quantized_differently(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    refused = run_cli("quantize", src, "-o", out, "--ignore", "model.layers.0.self_attn.k_proj", expect=2)
    assert "fused layer model.layers.0.self_attn has partitions quantized differently" in refused.stderr
    assert not out.exists()
    run_cli("quantize", src, "-o", out)
    source = load_all(src)

    def keep_k_proj_high_precision(tensors):  # what a tool without the pre-flight could write
        del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = source["model.layers.0.self_attn.k_proj.weight"]

    rewrite_shard(out, keep_k_proj_high_precision)
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"].append("model.layers.0.self_attn.k_proj")
    (out / "config.json").write_text(json.dumps(config))
    result = run_cli("verify", out, expect=1)
    assert ("vllm: fused layer model.layers.0.self_attn has partitions quantized differently (q_proj: fp8_e4m3 block "
            "64x64, k_proj: high precision, v_proj: fp8_e4m3 block 64x64)") in result.stdout  # the fitted default block


def test_llm_compressor_style_checkpoint(tmp_path):
    source = ff.source_model(tmp_path / "src")
    out = ff.llm_compressor_fp8_block(tmp_path / "ct", source)
    report = json.loads(run_cli("verify", out, "--against", tmp_path / "src", "--json").stdout)
    assert report["passed"] and report["layout"] == "compressed-tensors"
    assert len(report["tensors"]) == 2 and all(t["rel_rms_error"] < 0.05 for t in report["tensors"])
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["schemes"] == {"fp8_e4m3 block 128x128": 2}
    assert "[256, 320] -> [2, 3] BF16" in summary["scale_shapes"]


def test_deepseek_style_checkpoint_with_scales_in_other_shard(tmp_path):
    source = ff.source_model(tmp_path / "src")
    out = ff.deepseek_fine_grained(tmp_path / "ds", source)
    report = json.loads(run_cli("verify", out, "--against", tmp_path / "src", "--json").stdout)
    assert report["passed"] and report["layout"] == "fp8-native"
    assert any("320 is not divisible" in f["message"] or "256x320" in f["message"] for f in report["findings"])


def test_plain_model_fails_verify_and_inspects(sample):
    """A folder with nothing quantized is not a pass (#25: a pipeline pointing verify at the source by mistake):
    exit 1, the structure check names it; every other check still runs and passes."""
    src = sample("llama-tiny")
    report = json.loads(run_cli("verify", src, "--against", src, "--json", expect=1).stdout)
    assert not report["passed"] and report["layout"] == "none"
    assert {c for c, status in report["checks"].items() if status == "fail"} == {"structure"}
    assert [f["message"][:20] for f in report["findings"] if f["fatal"]] == ["nothing is quantized"]
    summary = json.loads(run_cli("inspect", src, "--json").stdout)
    assert summary["layout"] == "none" and summary["schemes"] == {}
