"""Architecture facts read from config.json and tensor names: tied heads (fast, no torch)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from fp8conv.plan.architecture import Architecture
from safetensors.numpy import save_file

from helpers import load_all, read_json, run_cli

EMBED = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("config,names,expected", [
    ({"architectures": ["Gemma3ForCausalLM"], "tie_word_embeddings": True}, EMBED, ["lm_head"]),
    ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}, EMBED, []),
    ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}, EMBED + ["lm_head.weight"], []),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {"tie_word_embeddings": True}}, EMBED, ["lm_head"]),
    ({"architectures": ["Qwen3ForCausalLM"]}, EMBED, ["lm_head"]),  # not stated, no stored head: shared
    ({"architectures": ["BertModel"]}, EMBED, []),  # no head module at all
    (None, EMBED, []),
])
def test_tied_heads(config, names, expected):
    assert Architecture.from_config(config).tied_heads(names) == expected


@pytest.fixture
def tied_llama(sample, tmp_path):
    """The Llama sample with its head removed and tie_word_embeddings set, as SmolLM2 / Gemma 3 ship."""
    original = sample("llama-tiny")
    src = tmp_path / "tied"
    src.mkdir()
    tensors = {n: t for n, t in load_all(original).items() if n != "lm_head.weight"}
    save_file(tensors, str(src / "model.safetensors"))
    config = read_json(original / "config.json")
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8-native"])
def test_tied_head_is_ignored_recorded_and_verified(tied_llama, tmp_path, layout):
    out = tmp_path / "out"
    dry = run_cli("quantize", tied_llama, "-o", out, "--layout", layout, "--dry-run").stdout
    assert "lm_head" in dry and "tied to the input embedding" in dry
    run_cli("quantize", tied_llama, "-o", out, "--layout", layout)
    qc = read_json(out / "config.json")["quantization_config"]
    ignored = qc.get("ignore", qc.get("modules_to_not_convert"))
    assert "lm_head" in ignored and "model.embed_tokens" in ignored
    manifest = read_json(out / "fp8conv.manifest.json")
    assert manifest["modules_without_tensors"]["lm_head"]["decision"] == "keep"
    # The sample's 704-row gate_proj in block 128 is refused by vLLM in compressed-tensors and by
    # transformers in fine-grained FP8 (not the point here): check with the engine that loads each.
    engine = "transformers" if layout == "compressed-tensors" else "vllm"
    run_cli("verify", out, "--against", tied_llama, "--engine", engine)


def test_verify_fails_when_a_tied_head_is_not_ignored(tied_llama, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", tied_llama, "-o", out)
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = ["model.embed_tokens"]  # what fp8conv wrote before the fix
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    report = json.loads(run_cli("verify", out, "--json", expect=1).stdout)
    assert report["checks"]["structure"] == "fail"
    assert any(f["tensor"] == "lm_head" and "tied to the input embedding" in f["message"] for f in report["findings"])


def write_model(folder, config: dict, shapes: dict[str, tuple[int, ...]]):
    """A checkpoint of small random float32 tensors with the given names and a config.json."""
    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


FAMILY_SHAPES = {
    "model.embed_tokens.weight": (64, 32), "lm_head.weight": (64, 32),
    "model.layers.0.self_attn.q_a_proj.weight": (32, 32), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (40, 32),
    "model.layers.0.mlp.gate.weight": (4, 32), "model.layers.0.mlp.gate.e_score_correction_bias": (4,),
    "model.layers.0.mlp.experts.0.up_proj.weight": (16, 32), "model.layers.0.mlp.experts.0.gate_proj.weight": (16, 32),
    "model.layers.0.mlp.experts.0.down_proj.weight": (32, 16),
    "model.layers.0.mixer.conv1d.weight": (48, 1, 4), "model.layers.0.mixer.in_proj.weight": (96, 32),
    "model.layers.0.moe.experts.gate_up_proj": (4, 32, 64), "model.layers.0.moe.experts.down_proj": (4, 32, 32),
    "model.layers.0.block_sparse_moe.w1.weight": (4, 16, 32),
    "visual.blocks.0.attn.qkv.weight": (96, 32), "visual.merger.mlp.0.weight": (32, 32),
    "model.layers.1.eh_proj.weight": (32, 64), "model.layers.1.shared_head.head.weight": (64, 32),
    "model.layers.1.self_attn.o_proj.weight": (32, 32), "model.layers.1.enorm.weight": (32,),
}
FAMILY_CONFIG = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                 "num_hidden_layers": 1, "num_nextn_predict_layers": 1, "n_routed_experts": 4,
                 "vision_config": {"depth": 1}, "tie_word_embeddings": False}
EXPECTED = {  # tensor: (decision, words its reason must contain)
    "model.embed_tokens.weight": ("copy", "embedding kept in high precision by default"),
    "lm_head.weight": ("copy", "output head"),
    "model.layers.0.self_attn.q_a_proj.weight": ("quantize", "2-D weight"),
    "model.layers.0.mlp.gate.weight": ("copy", "MoE router"),
    "model.layers.0.mlp.gate.e_score_correction_bias": ("copy", "expert-score correction bias"),
    "model.layers.0.mlp.experts.0.up_proj.weight": ("quantize", "2-D weight"),
    "model.layers.0.mixer.conv1d.weight": ("copy", "not an expert stack"),
    "model.layers.0.mixer.in_proj.weight": ("quantize", "2-D weight"),
    "model.layers.0.moe.experts.gate_up_proj": ("copy", "fused 3-D experts"),
    "model.layers.0.block_sparse_moe.w1.weight": ("quantize", "3-D stacked experts"),  # leading dim = n_routed_experts
    "visual.blocks.0.attn.qkv.weight": ("copy", "vision tower"),
    "visual.merger.mlp.0.weight": ("copy", "vision tower"),
    "model.layers.1.eh_proj.weight": ("copy", "MTP (NextN) input projection"),
    "model.layers.1.shared_head.head.weight": ("copy", "output head"),
    "model.layers.1.self_attn.o_proj.weight": ("quantize", "MTP (NextN) layer 1: kept, never dropped"),
    "model.layers.1.enorm.weight": ("copy", "1-D"),
}


def test_every_default_rule_with_its_reason(tmp_path):
    src = write_model(tmp_path / "src", FAMILY_CONFIG, FAMILY_SHAPES)
    out = tmp_path / "out"
    dry = run_cli("quantize", src, "-o", out, "--dry-run", "--granularity", "channel")
    assert "stay in high precision although the scheme asks for fp8_e4m3 channel" in dry.stderr  # fused experts
    plan = json.loads(run_cli("quantize", src, "-o", out, "--dry-run", "--json", "--granularity", "channel").stdout)
    for name, (action, words) in EXPECTED.items():
        assert plan["decisions"][name]["action"] == action, name
        assert words in plan["decisions"][name]["reason"], (name, plan["decisions"][name]["reason"])
    run_cli("quantize", src, "-o", out, "--granularity", "channel")
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert {n: (t["decision"], t["reason"]) for n, t in manifest.items()} == \
        {n: (d["action"], d["reason"]) for n, d in plan["decisions"].items()}
    ignored = read_json(out / "config.json")["quantization_config"]["ignore"]
    # Both names of each kept vision module: the checkpoint's (vLLM) and transformers' in-memory one.
    assert {"visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv", "model.layers.1.eh_proj",
            "model.language_model.layers.1.eh_proj", "model.layers.0.mlp.gate"} <= set(ignored)


def test_include_cannot_quantize_a_convolution(tmp_path):
    src = write_model(tmp_path / "src", FAMILY_CONFIG, FAMILY_SHAPES)
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--include", "*conv1d", expect=2)
    assert "--include *conv1d matches model.layers.0.mixer.conv1d.weight, which cannot be quantized" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fused_partitions_refused_before_writing(tmp_path):
    src = write_model(tmp_path / "src", FAMILY_CONFIG, FAMILY_SHAPES)
    out = tmp_path / "out"
    dry = run_cli("quantize", src, "-o", out, "--dry-run", "--ignore", "*.kv_a_proj_with_mqa", expect=2)
    # The family's small experts do not hold whole blocks for vLLM's fused MoE: the default is channel scales here.
    assert "fused layer model.layers.0.self_attn has partitions quantized differently (q_a_proj: fp8_e4m3 " \
           "channel, kv_a_proj_with_mqa: high precision)" in dry.stderr
    assert "pre-flight: REFUSED (exit 2)" in dry.stdout
    run_cli("quantize", src, "-o", out, "--ignore", "*.kv_a_proj_with_mqa", expect=2)
    assert not out.exists()
    run_cli("quantize", src, "-o", out, "--ignore", "*.kv_a_proj_with_mqa", "--ignore", "*.q_a_proj")


def test_tp_divisibility_preflight(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    # vLLM binds by default: no block fits --tp 4 (k_proj 128 / 4 = 32 rows, gate_proj 704 / 4 = 176), so the
    # default falls to channel scales, which only need the dims to split (256/4 and 704/4 do), and says so.
    fitted = run_cli("quantize", src, "-o", out, "--tp", "4", "--dry-run")
    assert "using fp8_e4m3 channel, which every weight fits (as --granularity channel would" in fitted.stderr
    assert "pre-flight: ok" in fitted.stdout
    refused = run_cli("quantize", src, "-o", out, "--tp", "4", "--block-size", "128", "--dry-run", expect=2)
    assert ("fp8conv: error: vllm: input partitions (tp 4) are not divisible by block 128 (4 tensors: "
            "model.layers.0.mlp.down_proj.weight, model.layers.0.self_attn.o_proj.weight, "
            "model.layers.1.mlp.down_proj.weight and 1 more (--dry-run --json lists all)); e.g. "
            "model.layers.0.mlp.down_proj.weight input partition 176 (tp 4) is not divisible by block 128") in refused.stderr
    assert "--granularity channel fits every weight" in refused.stderr
    # An engine that is not named only warns.
    warned = run_cli("quantize", src, "-o", out, "--tp", "4", "--block-size", "128", "--engine", "transformers",
                     "--dry-run")
    assert "warning: vllm: output partitions (tp 4) are not divisible by block 128" in warned.stdout
    real = run_cli("quantize", src, "-o", out, "--tp", "4", "--block-size", "128", expect=2)
    assert "refused before writing anything: vllm:" in real.stderr and not out.exists()
    run_cli("quantize", src, "-o", out, "--tp", "4", "--engine", "vllm", "--granularity", "channel")
    run_cli("verify", out, "--tp", "4")
    run_cli("quantize", src, "-o", tmp_path / "o3", "--tp", "3", "--engine", "vllm", "--granularity", "channel", expect=2)


def test_merged_partition_block_rule(tmp_path):
    """vLLM (compressed-tensors, block): in a fused layer only the last partition may hold a partial block."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 1}
    shapes = {"model.layers.0.self_attn.q_a_proj.weight": (192, 128),
              "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (576, 128)}
    src = write_model(tmp_path / "src", config, shapes)
    refused = run_cli("quantize", src, "-o", tmp_path / "out", "--engine", "vllm", "--block-size", "128", expect=2)
    assert "q_a_proj.weight 192 rows are not divisible by block 128, and vLLM fuses it with kv_a_proj_with_mqa" in refused.stderr
    assert refused.stderr.strip().endswith("; --block-size 64 fits every weight")
    fitted = run_cli("quantize", src, "-o", tmp_path / "fitted", "--engine", "vllm")  # the default block: 64x64
    assert read_json(tmp_path / "fitted" / "fp8conv.report.json")["scheme"]["block_size"] == [64, 64]
    shapes["model.layers.0.self_attn.q_a_proj.weight"] = (256, 128)
    src = write_model(tmp_path / "src2", config, shapes)
    run_cli("quantize", src, "-o", tmp_path / "out", "--engine", "vllm")  # 576 is the last partition: allowed


def test_kept_experts_are_ignored_as_one_fused_layer_and_partial_experts_refused(tmp_path):
    src = write_model(tmp_path / "src", FAMILY_CONFIG, FAMILY_SHAPES)
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--granularity", "channel")
    ignored = read_json(out / "config.json")["quantization_config"]["ignore"]
    assert "model.layers.0.moe.experts" in ignored  # gpt-oss style fused experts kept: vLLM must not expect FP8
    assert "model.layers.0.mlp.experts" not in ignored
    # vLLM decides a fused MoE layer from its expert 0 projections, after its gpt-oss name mapper rewrites any
    # ignore entry ending in ".down_proj" (to ".w2_weight"): a `re:` pattern is what survives the mapper.
    pattern = next(i for i in ignored if i.startswith("re:") and "moe" in i)
    vllm_checks = [f"model.layers.0.moe.experts.{e}.{p}" for e in (0, 3) for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(re.match(pattern[3:], name) for name in vllm_checks)
    assert not re.match(pattern[3:], "model.layers.0.moe.experts.0.down_proj_bias")
    assert not any(i.startswith("re:") and "mlp.experts" in i for i in ignored)
    refused = run_cli("quantize", src, "-o", tmp_path / "o2", "--ignore", "*.experts.0.down_proj", expect=2)
    assert "the experts of model.layers.0.mlp.experts are quantized differently" in refused.stderr


def test_vision_config_without_known_vision_tensors_warns(tmp_path):
    config = {**FAMILY_CONFIG, "architectures": ["SomeVLMForConditionalGeneration"], "model_type": "some_vlm"}
    src = write_model(tmp_path / "src", config, {"image_encoder.blocks.0.fc1.weight": (32, 32)})
    dry = run_cli("quantize", src, "-o", tmp_path / "out", "--dry-run")
    assert "config.json describes a vision tower (vision_config) but no tensor has a known vision prefix" in dry.stderr


def test_verify_fails_kept_fused_experts_vllm_does_not_see_ignored(tmp_path):
    """gpt-oss: vLLM asks whether `<experts>.0.gate_proj / up_proj / down_proj` are ignored after its name
    mapper rewrote the list (`...down_proj` -> `...w2_weight`): only the `re:` entry fp8conv writes survives."""
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": 1,
              "num_local_experts": 4}
    shapes = {"model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.mlp.router.weight": (4, 32),
              "model.layers.0.mlp.experts.gate_up_proj": (4, 32, 64), "model.layers.0.mlp.experts.down_proj": (4, 32, 32)}
    src, out = write_model(tmp_path / "src", config, shapes), tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--granularity", "channel", "--engine", "vllm")
    run_cli("verify", out, "--against", src, "--engine", "vllm")
    qc = read_json(out / "config.json")
    owner = "model.layers.0.mlp.experts"
    for ignore in ([m for m in qc["quantization_config"]["ignore"] if not m.startswith("re:")],  # earlier fp8conv
                   [m for m in qc["quantization_config"]["ignore"] if not m.startswith("re:")]
                   + [f"{owner}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]):  # mapped away by vLLM
        qc["quantization_config"]["ignore"] = ignore
        (out / "config.json").write_text(json.dumps(qc))
        (out / "fp8conv.manifest.json").unlink(missing_ok=True)
        report = json.loads(run_cli("verify", out, "--json", "--engine", "vllm", expect=1).stdout)
        message = next(f["message"] for f in report["findings"] if f["tensor"] == owner)
        assert message.startswith(f"vllm: the experts of {owner} are kept in high precision but vLLM does not find "
                                  "gate_proj, up_proj, down_proj of its expert 0 ignored")
        assert message.endswith(r"ignore re:model\.layers\.0\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")
    config["model_type"] = "qwen3_moe"  # no vLLM mapper rewrites its names: explicit names are seen
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc["quantization_config"]}))
    report = json.loads(run_cli("verify", out, "--json", "--engine", "vllm").stdout)
    assert not any(f["tensor"] == owner for f in report["findings"])
