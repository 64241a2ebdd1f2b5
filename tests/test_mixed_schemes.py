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


def test_verify_checks_each_tensor_against_its_config_groups_format(sample, tmp_path):
    """A mixed-precision config: each weight's codes must have the dtype of the format of the group that
    targets it; a group that says float-quantized over int8 codes fails on exactly its modules."""
    src, out = sample("llama-tiny"), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--granularity", "channel", *MIXED)
    run_cli("verify", out)
    config = read_json(out / "config.json")
    config["quantization_config"]["config_groups"]["group_1"]["format"] = "float-quantized"  # int8 down_proj
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    report = json.loads(run_cli("verify", out, "--json", expect=1).stdout)
    assert report["checks"]["structure"] == "fail"
    flagged = sorted(f["tensor"] for f in report["findings"] if "config group's format" in f["message"])
    assert flagged == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert "is I8 but its config group's format float-quantized stores F8_E4M3" in \
        next(f["message"] for f in report["findings"] if f["tensor"] == flagged[0])
    config["quantization_config"]["config_groups"]["group_1"]["format"] = "int-quantized"
    config["quantization_config"]["config_groups"]["group_2"]["format"] = "int-quantized"  # packed int4 mlp
    (out / "config.json").write_text(json.dumps(config))
    report = json.loads(run_cli("verify", out, "--json", expect=1).stdout)
    flagged = sorted(f["tensor"] for f in report["findings"] if "config group's format" in f["message"])
    assert flagged == [f"model.layers.{i}.mlp.{p}_proj.weight_packed" for i in (0, 1) for p in ("gate", "up")]


def test_mixed_schemes_in_the_dry_run_and_refusals(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    refused = run_cli("quantize", src, "-o", out, "--scheme", "*.k_proj=int8:channel", "--dry-run", expect=2)
    # The default block is 64x64 here (llama-tiny's 704-row gate_proj); one line for both layers.
    line = next(line for line in refused.stderr.splitlines() if "quantized differently" in line)
    assert ("fused layer model.layers.0.self_attn has partitions quantized differently (q_proj: fp8_e4m3 block "
            "64x64, k_proj: int8 channel, v_proj: fp8_e4m3 block 64x64)") in line
    assert "(2 tensors: model.layers.0.self_attn.q_proj.weight, model.layers.1.self_attn.q_proj.weight)" in line
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


# (label, quantize options, the scheme each kind of module must get, as transformers' compressed-tensors reads it)
MIXED_LOADS = [
    ("fp8-channel+int8-down", ["--granularity", "channel", "--scheme", "re:.*down_proj=int8:channel"],
     {"down_proj": ("int", 8, "channel"), "gate_proj": ("float", 8, "channel"), "q_proj": ("float", 8, "channel")}),
    ("fp8-channel+w4a16-mlp", ["--granularity", "channel", "--scheme", "*.mlp.*=int4:group:32"],
     {"down_proj": ("int", 4, "group"), "gate_proj": ("int", 4, "group"), "q_proj": ("float", 8, "channel")}),
]


@pytest.mark.slow
@pytest.mark.parametrize("label,options,expected", MIXED_LOADS, ids=[m[0] for m in MIXED_LOADS])
def test_transformers_loads_mixed_schemes_like_our_dequantize(tiny_llama, tmp_path, label, options, expected):
    """transformers (compressed-tensors, dequantize on load) gives each module the scheme of its config group and
    its weights: W8A8 ones are codes x scale computed in bf16 (transformers casts the float32 scale to the model
    dtype first), pack-quantized W4A16 ones (bf16 scales) equal `fp8conv dequantize` bit for bit."""
    torch = pytest.importorskip("torch")
    from compressed_tensors.quantization import disable_quantization
    from transformers import CompressedTensorsConfig, LlamaForCausalLM

    out, deq = tmp_path / "q", tmp_path / "deq"
    run_cli("quantize", tiny_llama, "-o", out, *options)
    run_cli("dequantize", out, "-o", deq)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    model.apply(disable_quantization)  # weights only: no simulated activation quantization in the logits
    ours = LlamaForCausalLM.from_pretrained(deq, dtype=torch.bfloat16).eval()
    written, dequantized = load_all(out), load_all(deq)
    checked = 0
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            continue
        kind = expected.get(leaf, expected["q_proj"] if leaf in ("k_proj", "v_proj", "o_proj") else expected["gate_proj"])
        args = module.quantization_scheme.weights
        assert (args.type, args.num_bits, args.strategy) == kind, name
        got = module.weight.data
        if kind[1] == 4:
            reference = torch.from_numpy(dequantized[name + ".weight"].view(np.int16).copy()).view(torch.bfloat16)
        else:
            codes = written[name + ".weight"]
            codes = torch.from_numpy(codes.view(np.uint8).copy()).view(torch.float8_e4m3fn) if kind[0] == "float" \
                else torch.from_numpy(codes.copy())
            reference = codes.to(torch.bfloat16) * torch.from_numpy(written[name + ".weight_scale"].copy()).to(torch.bfloat16)
        assert torch.equal(got, reference), name
        checked += 1
    assert checked == 14
    ids = torch.tensor([[1, 5, 9, 33, 100, 200, 300, 7, 42, 11]])
    with torch.no_grad():
        theirs, mine = model(ids).logits.float(), ours(ids).logits.float()
    assert (theirs - mine).abs().max().item() < 0.03 * mine.abs().max().item()
