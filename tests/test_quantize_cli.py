"""fp8conv quantize end to end on the shipped samples: files, layouts, manifest, report, errors."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from safetensors import safe_open

from fp8conv import dequantize_tensor
from helpers import group_option, load_all, read_json, run_cli
from reference import reference_quantize

SCHEMES = [
    ("fp8_e4m3", "block", "compressed-tensors"),
    ("fp8_e4m3", "block", "fp8-native"),
    ("fp8_e4m3", "channel", "compressed-tensors"),
    ("fp8_e4m3", "group", "compressed-tensors"),
    ("fp8_e4m3", "tensor", "compressed-tensors"),
    ("int8", "channel", "compressed-tensors"),
    ("int8", "block", "compressed-tensors"),
    ("fp8_e5m2", "block", "fp8conv"),
]
TAGS = {"fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2", "int8": "I8"}


def expected_scale_shape(granularity, layout, shape, block=(128, 128), group=32):
    *lead, rows, cols = shape
    grid = {"block": (-(-rows // block[0]), -(-cols // block[1])), "channel": (rows, 1),
            "group": (rows, -(-cols // group)), "tensor": (1, 1)}[granularity]
    if granularity == "tensor" and layout == "compressed-tensors":
        return [*lead, 1]
    return [*lead, *grid]


def fitted_block(model, fmt, layout):
    """The default block for the default engine (vLLM): llama-tiny's 704-row gate_proj is fused with
    up_proj and must hold whole FP8 blocks in compressed-tensors, so the default falls to 64x64."""
    return (64, 64) if (model, fmt, layout) == ("llama-tiny", "fp8_e4m3", "compressed-tensors") else (128, 128)


@pytest.mark.parametrize("model", ["llama-tiny", "bert-tiny-fp32", "moe-tiny"])
@pytest.mark.parametrize("fmt,granularity,layout", SCHEMES)
def test_quantize_sample(sample, tmp_path, model, fmt, granularity, layout):
    src = sample(model)
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--format", fmt, "--granularity", granularity, "--layout", layout,
            *group_option(granularity), "--workers", "1")
    manifest = read_json(out / "fp8conv.manifest.json")
    source = load_all(src)
    result = load_all(out)
    for name, record in manifest["tensors"].items():
        if record["decision"] == "copy":
            assert result[name].tobytes() == source[name].tobytes(), name
            continue
        assert record["output_dtype"] == TAGS[fmt]
        scale = record["scale"]
        assert scale["shape"] == expected_scale_shape(granularity, layout, record["shape"], fitted_block(model, fmt, layout))
        assert list(result[scale["name"]].shape) == scale["shape"] and result[scale["name"]].dtype == np.float32
        # The codes on disk equal the float64 reference of the source weight.
        w = source[name].astype(np.float32)
        matrices = w.reshape(-1, *w.shape[-2:])
        codes = result[name].reshape(-1, *w.shape[-2:])
        scales = result[scale["name"]].reshape(len(matrices), -1)
        for e, matrix in enumerate(matrices):
            ref_codes, ref_scales, _ = reference_quantize(matrix, fmt, granularity, fitted_block(model, fmt, layout), 32)
            got = codes[e].view(np.uint8) if fmt != "int8" else codes[e]
            np.testing.assert_array_equal(got, ref_codes, err_msg=name)
            np.testing.assert_array_equal(scales[e], ref_scales.reshape(-1), err_msg=f"{name} scales")
    # Every file the manifest lists has its recorded sha256.
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == info["sha256"], rel
    # The model card quotes the manifest's sha256, so the manifest cannot list it (verify checks the quote).
    assert set(os.listdir(out)) - set(manifest["files"]) == {"fp8conv.manifest.json", "README.md"}


def test_output_opens_with_safetensors_and_index_is_consistent(sample, tmp_path):
    src = sample("llama-tiny")
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out)
    index = read_json(out / "model.safetensors.index.json")
    seen = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for key in f.keys():
                seen[key] = shard.name
                dtype = f.get_slice(key).get_dtype()
                if key.endswith("_proj.weight"):
                    assert dtype == "F8_E4M3"
                if key.endswith("weight_scale"):
                    assert dtype == "F32"
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(out / s) for s in set(seen.values())) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in set(seen.values()))
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_compressed_tensors_config(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--granularity", "channel")
    config = read_json(out / "config.json")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["type"] == "float"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]
    assert config["hidden_size"] == 256  # the rest of the config is kept


def test_fp8_native_config_and_names(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, "--layout", "fp8-native")
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
    tensors = load_all(out)
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" in tensors
    assert "not divisible by the 128x128 block" in result.stderr and "mlp.down_proj" in result.stderr


def test_report_numbers_match_dequantized_weights(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--json")
    report = read_json(out / "fp8conv.report.json")
    source, result = load_all(src), load_all(out)
    row = next(r for r in report["tensors"] if r["name"] == "model.layers.0.mlp.down_proj.weight")
    w = source[row["name"]].astype(np.float64)
    deq = dequantize_tensor(result[row["name"]], result[row["name"][:-6] + "weight_scale"],
                            block_size=fitted_block("llama-tiny", "fp8_e4m3", "compressed-tensors")).astype(np.float64)
    rel = np.sqrt(((w - deq) ** 2).sum() / (w ** 2).sum())
    assert row["rel_rms_error"] == pytest.approx(rel, rel=1e-4)
    assert row["sqnr_db"] == pytest.approx(-20 * np.log10(rel), rel=1e-4)
    assert row["max_abs_error"] == pytest.approx(np.abs(w - deq).max(), rel=1e-5)
    assert [r["rel_rms_error"] for r in report["tensors"]] == sorted((r["rel_rms_error"] for r in report["tensors"]), reverse=True)
    assert report["total_bytes_before"] == sum(v.nbytes for v in source.values())


def test_json_stdout_is_the_report(sample, tmp_path):
    import json

    src, out = sample("bert-tiny-fp32"), tmp_path / "out"
    result = run_cli("quantize", src / "model.safetensors", "-o", out, "--json")
    assert json.loads(result.stdout) == read_json(out / "fp8conv.report.json")


def test_human_report_lists_worst_tensors(sample, tmp_path):
    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "out")
    lines = result.stdout.splitlines()
    assert lines[1] == "scheme: fp8_e4m3 block 64x64, layout compressed-tensors (14 tensors, 1.48 MB)"
    assert lines[2] == "tensors: 14 quantized, 7 copied"
    assert any(line.startswith("worst tensors first:") for line in lines)


def test_output_identical_for_any_worker_count(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "w1", "--workers", "1")
    run_cli("quantize", src, "-o", tmp_path / "w2", "--workers", "2")
    run_cli("quantize", src, "-o", tmp_path / "w2b", "--workers", "2")
    for name in sorted(set(os.listdir(tmp_path / "w1")) - {"README.md"}):  # the card quotes the command and OUT
        one = (tmp_path / "w1" / name).read_bytes()
        assert one == (tmp_path / "w2" / name).read_bytes() == (tmp_path / "w2b" / name).read_bytes(), name


def test_ignore_and_include(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--ignore", "re:.*\\.[qkv]_proj", "--ignore", "*.layers.1.mlp.*",
            "--include", "lm_head")
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["model.layers.0.self_attn.k_proj.weight"]["reason"] == "matched --ignore re:.*\\.[qkv]_proj"
    assert manifest["model.layers.1.mlp.up_proj.weight"]["decision"] == "copy"
    assert manifest["model.layers.0.mlp.up_proj.weight"]["decision"] == "quantize"
    assert manifest["lm_head.weight"]["decision"] == "quantize"
    assert manifest["model.embed_tokens.weight"]["decision"] == "copy"
    ignore = read_json(out / "config.json")["quantization_config"]["ignore"]
    assert "model.layers.0.self_attn.k_proj" in ignore and "lm_head" not in ignore


def test_moe_router_and_experts(sample, tmp_path):
    src, out = sample("moe-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out)
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["model.layers.0.mlp.gate.weight"]["decision"] == "copy"
    assert "MoE router" in manifest["model.layers.0.mlp.gate.weight"]["reason"]
    experts = manifest["model.layers.0.mlp.experts.gate_up_proj.weight"]
    assert experts["decision"] == "quantize" and experts["scale"]["shape"] == [4, 3, 1]


def test_dry_run_writes_nothing(sample, tmp_path):
    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "out", "--dry-run")
    assert not (tmp_path / "out").exists()
    assert "embedding kept in high precision by default" in result.stdout
    assert "output shards:" in result.stdout


def test_reshard(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--max-shard-size", "600KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = load_all(out)
    for weight in (n for n in tensors if n.endswith("_proj.weight")):
        index = read_json(out / "model.safetensors.index.json")["weight_map"]
        assert index[weight] == index[weight[:-6] + "weight_scale"]  # scale stays with its weight


@pytest.mark.parametrize("args,code,message", [
    (["--format", "fp8_e5m2"], 2, "cannot describe fp8_e5m2"),
    (["--layout", "fp8-native", "--granularity", "channel"], 2, "fp8-native holds only fp8_e4m3 block"),
    (["--layout", "fp8-native", "--format", "int8"], 2, "fp8-native holds only"),
    (["--block-size", "0"], 2, "block and group sizes"),
    (["--block-size", "12y4"], 2, "is not N or NxM"),
    (["--group-size", "-3"], 2, "--group-size"),
    (["--format", "fp4"], 2, "--format"),
    (["--ignore", "re:("], 2, "not a valid regular expression"),
    (["--granularity", "channel", "--group-size", "32"], 2, "--group-size applies to --granularity group"),
    (["--granularity", "tensor", "--block-size", "64"], 2, "--block-size applies to --granularity block"),
    (["--overwrite", "--resume"], 2, "pass one"),
])
def test_bad_options(sample, tmp_path, args, code, message):
    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "out", *args, expect=code)
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_refuses_nonempty_output_and_overwrites_on_request(sample, tmp_path):
    src, out = sample("bert-tiny-fp32"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run_cli("quantize", src, "-o", out, expect=4)
    assert "exists and is not empty" in result.stderr and (out / "keep.txt").exists()
    run_cli("quantize", src, "-o", out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "fp8conv.manifest.json").exists()


def test_refuses_output_inside_source(sample):
    src = sample("bert-tiny-fp32")
    result = run_cli("quantize", src, "-o", src / "out", expect=4)
    assert "overlaps the source" in result.stderr


def test_missing_source(tmp_path):
    result = run_cli("quantize", tmp_path / "nope", "-o", tmp_path / "out", expect=3)
    assert "no such file or folder" in result.stderr


def test_internal_error_is_one_line(sample, tmp_path, monkeypatch):
    from fp8conv.run import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "plan_recipe", broken)
    result = run_cli("quantize", sample("bert-tiny-fp32"), "-o", tmp_path / "out", expect=70)
    assert result.stderr.startswith("fp8conv: error: internal error (RuntimeError: boom)")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_module_help_lists_every_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fp8conv.cli", "--help"], capture_output=True, text=True, check=True)
    listed = [line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.startswith("  ")]
    assert {"dequantize", "inspect", "quantize", "verify"} <= set(listed)
