"""Architecture matrix: tiny random-weight models of real families, built offline by transformers from a
config, saved with save_pretrained, converted with defaults, loaded back by transformers' own
quantization loaders and compared with the model rebuilt from `fp8conv dequantize`.

Marked slow (CI runs it). compressed-tensors in transformers multiplies codes by the scale cast to
bf16, so its weights are checked bit for bit against codes x bf16(scale) and its logits only for
closeness; the fine-grained FP8 loader dequantizes with float32 scales, as fp8conv does: equal logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fp8conv.plan.architecture import Architecture
from helpers import load_all, read_json, run_cli

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch", reason="the matrix needs the test extra (torch CPU 2.13.0)")
transformers = pytest.importorskip("transformers")

IDS = [[1, 5, 9, 33, 100, 200, 300, 7, 42, 11]]


def save(model, path: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(path)


def llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    save(LlamaForCausalLM(LlamaConfig(**DENSE)), path)


def qwen3(path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    save(Qwen3ForCausalLM(Qwen3Config(**DENSE, head_dim=64, tie_word_embeddings=False)), path)


def qwen3_moe(path: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**DENSE, head_dim=64, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1, mlp_only_layers=[])
    save(Qwen3MoeForCausalLM(config), path)


def deepseek_v3(path: Path) -> None:
    """MLA (kv_a_proj_with_mqa: 512 + 64 = 576 rows, not a multiple of 128), a dense first layer, routed +
    shared experts, e_score_correction_bias, and one MTP / NextN layer appended the way DeepSeek ships it
    (layer num_hidden_layers: enorm, hnorm, eh_proj, shared_head, a full decoder layer)."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**DENSE, "num_key_value_heads": 4}, moe_intermediate_size=128, first_k_dense_replace=1,
                              n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                              q_lora_rank=256, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                              v_head_dim=64, rope_scaling=None)
    save(DeepseekV3ForCausalLM(config), path)
    tensors = load_file(path / "model.safetensors")
    hidden, last = config.hidden_size, config.num_hidden_layers - 1
    mtp = f"model.layers.{config.num_hidden_layers}."
    for name in [n for n in tensors if n.startswith(f"model.layers.{last}.")]:
        tensors[mtp + name[len(f"model.layers.{last}."):]] = tensors[name].clone()
    g = torch.Generator().manual_seed(1)
    for name, shape in (("eh_proj.weight", (hidden, 2 * hidden)), ("embed_tokens.weight", (config.vocab_size, hidden)),
                        ("shared_head.head.weight", (config.vocab_size, hidden))):
        tensors[mtp + name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        tensors[mtp + name] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    # As DeepSeek-V3 ships: noaux_tc routing with sigmoid scores (vLLM registers e_score_correction_bias then).
    patch_config(path, num_nextn_predict_layers=1, topk_method="noaux_tc", scoring_func="sigmoid")


def gpt_oss(path: Path) -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{**DENSE, "intermediate_size": 384}, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=64, layer_types=["sliding_attention", "full_attention"], rope_scaling=None)
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # transformers initialises expert biases to zero: random ones show a loader that drops them
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.02)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.02)
    save(model, path)


def gemma3(path: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**DENSE, head_dim=64, sliding_window=64)
    assert config.tie_word_embeddings
    save(Gemma3ForCausalLM(config), path)


def qwen2_5_vl(path: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**DENSE, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256,
                  fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    save(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)), path)


VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=56,
              patch_size=14)


def qwen2_vl(path: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {**DENSE, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
    vision = dict(depth=2, embed_dim=128, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    save(Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)), path)


def gemma3_vl(path: Path) -> None:
    """Gemma 3 with its SigLIP vision tower (Gemma3ForConditionalGeneration, model_type gemma3)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**DENSE, "head_dim": 64, "sliding_window": 64}
    save(Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=4)), path)


def mistral3(path: Path) -> None:
    """Mistral 3 (Mistral-Small-3.1 style: Pixtral vision tower, Mistral text model)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {**DENSE, "head_dim": 64, "model_type": "mistral"}
    save(Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config={**VISION, "head_dim": 64})), path)


def llama4(path: Path) -> None:
    """Llama 4 (Scout / Maverick style: a dense and a MoE layer, vision tower)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = {**DENSE, "head_dim": 64, "intermediate_size_mlp": 512, "num_local_experts": 2, "interleave_moe_layer_step": 2,
            "moe_layers": [1], "no_rope_layers": [1, 1]}
    vision = {**VISION, "vision_output_dim": 256, "projector_input_dim": 256, "projector_output_dim": 256}
    save(Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)), path)


def patch_config(path: Path, **values) -> None:
    config = read_json(path / "config.json")
    config.update(values)
    (path / "config.json").write_text(json.dumps(config, indent=2))


DENSE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=128)
FAMILIES = {"llama": llama, "qwen3": qwen3, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3, "gpt_oss": gpt_oss,
            "gemma3": gemma3, "qwen2_5_vl": qwen2_5_vl, "qwen2_vl": qwen2_vl, "gemma3_vl": gemma3_vl,
            "mistral3": mistral3, "llama4": llama4}
COMPOSITE = ("qwen2_5_vl", "qwen2_vl", "gemma3_vl", "mistral3", "llama4")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(family)
            FAMILIES[family](path)
            cache[family] = path
        return cache[family]

    return build


def load(path: Path, quantization_config=None, prepare=lambda model: None):
    """The class named in config.json (VLMs are not AutoModelForCausalLM), logits of a fixed prompt."""
    cls = getattr(transformers, read_json(path / "config.json")["architectures"][0])
    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = cls.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    prepare(model)
    with torch.no_grad():
        return model, model(torch.tensor(IDS)).logits.float()


def linear_dequant(codes: np.ndarray, scale: np.ndarray, scale_dtype) -> "torch.Tensor":
    """codes x scale (cast to `scale_dtype`) per tile, rounded to bf16: transformers' compressed-tensors path
    for a Linear uses bf16 scales; for VLMs (weights left in float32, cast to bf16 here) float32 scales."""
    c = torch.from_numpy(codes.view(np.uint8).copy()).view(torch.float8_e4m3fn).to(scale_dtype)
    s = torch.from_numpy(scale.astype(np.float32)).to(scale_dtype)  # bf16 scales (composite models) widen exactly
    rows, cols = c.shape
    s = s.repeat_interleave(-(-rows // s.shape[0]), 0)[:rows].repeat_interleave(-(-cols // s.shape[1]), 1)[:, :cols]
    return (c * s).to(torch.bfloat16)


# (family, layout, extra quantize options). Schemes chosen where transformers' loaders can load the family:
# its compressed-tensors MoE path multiplies each expert's codes by its scale without expanding blocks
# (block experts crash: test_transformers_cannot_load_block_fp8_experts_from_compressed_tensors), and its
# fine-grained FP8 loader refuses weights that do not divide the block (DeepSeek-V3's 576-row
# kv_a_proj_with_mqa with 128: test_deepseek_576_rows_with_block_128).
CASES = [
    ("llama", "compressed-tensors", []), ("llama", "fp8-native", []),
    ("qwen3", "compressed-tensors", []), ("qwen3", "fp8-native", []),
    ("qwen3_moe", "compressed-tensors", ["--granularity", "channel"]), ("qwen3_moe", "fp8-native", []),
    ("deepseek_v3", "compressed-tensors", ["--granularity", "channel"]),
    ("deepseek_v3", "fp8-native", ["--block-size", "64"]),
    ("gpt_oss", "compressed-tensors", []), ("gpt_oss", "fp8-native", []),
    ("gemma3", "compressed-tensors", []), ("gemma3", "fp8-native", []),
    ("qwen2_5_vl", "compressed-tensors", []), ("qwen2_5_vl", "fp8-native", []),
]


def loader_config(layout: str):
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    return CompressedTensorsConfig(dequantize=True) if layout == "compressed-tensors" else FineGrainedFP8Config(dequantize=True)


@pytest.mark.parametrize("family,layout,options", CASES, ids=[f"{f}-{l}" for f, l, _ in CASES])
def test_family_loads_in_transformers_like_our_dequantized_model(built, tmp_path, family, layout, options):
    from compressed_tensors.quantization import disable_quantization

    src, out, deq = built(family), tmp_path / "q", tmp_path / "deq"
    run_cli("quantize", src, "-o", out, "--layout", layout, *options)
    engines = ["--engine", "transformers"] if layout == "fp8-native" else []
    run_cli("verify", out, "--against", src, *engines)  # also: every source tensor (MTP layer included) is in OUT
    run_cli("dequantize", out, "-o", deq)
    # transformers 5.17 leaves decompressed VLM weights in float32 and simulates the dynamic FP8
    # activations of compressed-tensors in forward; compare weights only: cast back, fake quantization off.
    prepare = (lambda m: m.to(torch.bfloat16).apply(disable_quantization)) if layout == "compressed-tensors" else (lambda m: None)
    model, theirs = load(out, loader_config(layout), prepare)
    rebuilt, ours = load(deq)
    check_every_expert_loaded(family, model, rebuilt)
    _, original = load(src)
    assert torch.isfinite(theirs).all()
    if layout == "fp8-native":
        assert torch.equal(theirs, ours)  # float32 scales, like fp8conv dequantize
    else:
        params = dict(model.named_parameters())
        tensors = load_all(out)
        checked = 0
        for name, codes in tensors.items():
            for loaded_as in Architecture.from_config(read_json(src / "config.json")).loader_names(name):
                if name[:-6] + "weight_scale" in tensors and loaded_as in params:
                    scale = tensors[name[:-6] + "weight_scale"]
                    got = params[loaded_as].data
                    assert (torch.equal(got, linear_dequant(codes, scale, torch.bfloat16))
                            or torch.equal(got, linear_dequant(codes, scale, torch.float32))), name
                    checked += 1
        assert checked >= 8
        assert (theirs - ours).abs().max().item() < 0.03 * ours.abs().max().item()
    assert (ours - original).abs().max().item() < 0.15 * original.abs().max().item()
    config = read_json(src / "config.json")
    if config.get("tie_word_embeddings") and family != "qwen2_5_vl":
        assert torch.equal(model.lm_head.weight.data, model.model.embed_tokens.weight.data)
    check_family_decisions(family, out)


@pytest.mark.parametrize("family", COMPOSITE)
def test_composite_vlm_runs_in_transformers_as_written(built, tmp_path, family):
    """A vision-language model converted with defaults runs in transformers as a user loads it (the config's
    own quantization_config, no cast): its compressed-tensors scales are bf16 like its weights, since
    transformers 5.17 leaves a composite model's decompressed weights in the scales' dtype (float32 scales:
    'self and mat2 must have the same dtype'). The vision tower stays in bf16."""
    src, out = built(family), tmp_path / "q"
    run_cli("quantize", src, "-o", out)
    run_cli("verify", out, "--against", src)
    tensors = load_all(out)
    scales = {n: t for n, t in tensors.items() if n.endswith(".weight_scale")}
    assert len(scales) >= 8 and {t.dtype.name for t in scales.values()} == {"bfloat16"}
    decisions = read_json(out / "fp8conv.manifest.json")["tensors"]
    vision = [n for n, d in decisions.items() if "vision tower" in d["reason"]]
    assert vision and all(decisions[n]["decision"] == "copy" for n in vision)
    model, theirs = load(out)
    _, original = load(src)
    assert torch.isfinite(theirs).all()
    assert (theirs - original).abs().max().item() < 0.15 * original.abs().max().item()


def check_every_expert_loaded(family: str, model, rebuilt) -> None:
    """No loader skipped an expert: every expert parameter of the loaded model (transformers 5.17 fuses experts
    into 3-D parameters in memory) is the one of the model rebuilt from `fp8conv dequantize`: equal where the
    experts stay bf16 (gpt-oss), within the bf16-scale rounding of transformers' dequantization otherwise."""
    ours = dict(rebuilt.named_parameters())
    experts = {n: p.data for n, p in model.named_parameters() if ".experts." in n and p.dim() >= 2}
    if family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        assert len(experts) >= 2, sorted(experts)  # gate_up_proj and down_proj of each MoE layer
    for name, got in experts.items():
        want = ours[name].data
        assert got.shape == want.shape and want.abs().max() > 0, name
        if family == "gpt_oss":
            assert torch.equal(got, want), name
        else:
            assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max(), name


def check_family_decisions(family: str, out: Path) -> None:
    """The family-specific defaults, as recorded in the manifest and the written config."""
    decisions = read_json(out / "fp8conv.manifest.json")["tensors"]
    qc = read_json(out / "config.json")["quantization_config"]
    ignored = qc.get("ignore", qc.get("modules_to_not_convert"))

    def decision(name: str) -> tuple[str, str]:
        return decisions[name]["decision"], decisions[name]["reason"]

    if family == "deepseek_v3":
        assert decision("model.layers.2.eh_proj.weight")[0] == "copy" and "MTP" in decision("model.layers.2.eh_proj.weight")[1]
        assert decision("model.layers.2.shared_head.head.weight")[0] == "copy"
        action, reason = decision("model.layers.2.mlp.experts.0.down_proj.weight")
        assert action == "quantize" and "MTP (NextN) layer 2" in reason
        assert decision("model.layers.1.mlp.gate.weight")[0] == "copy"
        assert "expert-score correction bias" in decision("model.layers.1.mlp.gate.e_score_correction_bias")[1]
        assert decision("model.layers.1.mlp.shared_experts.up_proj.weight")[0] == "quantize"
        assert decision("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")[0] == "quantize"
    if family == "gpt_oss":
        action, reason = decision("model.layers.0.mlp.experts.gate_up_proj")
        assert action == "copy" and reason.startswith("fused experts")
        assert "model.layers.0.mlp.router" in ignored
    if family == "qwen3_moe":
        assert decision("model.layers.0.mlp.gate.weight")[0] == "copy" and "model.layers.0.mlp.gate" in ignored
        assert decision("model.layers.0.mlp.experts.3.gate_proj.weight")[0] == "quantize"
    if family == "qwen2_5_vl":
        action, reason = decision("visual.blocks.0.attn.qkv.weight")
        assert action == "copy" and "vision tower" in reason
        assert {"visual.merger.mlp.0", "model.visual.merger.mlp.0", "model.visual.blocks.1.attn.qkv",
                "model.embed_tokens", "model.language_model.embed_tokens"} <= set(ignored)
    if family == "gemma3":
        assert "lm_head" in ignored


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_transformers_cannot_load_block_fp8_experts_from_compressed_tensors(built, tmp_path, family):
    """The limitation the CASES work around, shown: per-expert block scales crash transformers 5.17's
    compressed-tensors MoE loader (codes x scale without expanding the blocks)."""
    out = tmp_path / "q"
    run_cli("quantize", built(family), "-o", out)
    with pytest.raises(RuntimeError, match="conversion"):
        load(out, loader_config("compressed-tensors"))


def test_deepseek_576_rows_with_block_128(built, tmp_path):
    """kv_a_proj_with_mqa has 512 + 64 = 576 rows: block 128 leaves a partial block. fp8conv says so before
    writing; transformers' fine-grained FP8 loader refuses it (vLLM pads it)."""
    out = tmp_path / "q"
    result = run_cli("quantize", built("deepseek_v3"), "-o", out, "--layout", "fp8-native")
    assert "kv_a_proj_with_mqa.weight 576x256 is not divisible by the 128x128 block" in result.stderr
    report = read_json(out / "fp8conv.manifest.json")
    assert report["tensors"]["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]["scale"]["shape"] == [5, 2]
    run_cli("verify", out, "--engine", "transformers", expect=1)
    with pytest.raises(RuntimeError, match="conversion"):  # "Weight shape (576, 256) not divisible by scale grid"
        load(out, loader_config("fp8-native"))


def test_transformers_skips_per_expert_quantized_gpt_oss_experts(built, tmp_path):
    """Why fp8conv keeps gpt-oss's fused experts in bf16 (with test_vllm's: vLLM's CPU build has no quantized
    MoE kernel for them): the per-expert form vLLM 0.32's gpt-oss loader reads (experts.{i}.gate_up_proj.weight
    [in, out] int8 codes, weight_scale [1, out]; it transposes both) loads in transformers 5.17 *without an
    error*, the experts newly initialised at random: a silent skip. Built by hand here, from fp8conv's output."""
    from safetensors.torch import load_file, save_file

    src, out = built("gpt_oss"), tmp_path / "q"
    run_cli("quantize", src, "-o", out, "--format", "int8", "--granularity", "channel")
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stack = tensors.pop(name).float()
        for e in range(stack.shape[0]):
            scale = stack[e].abs().amax(0, keepdim=True) / 127  # one per output column of [in, out]
            expert = name.replace(".experts.", f".experts.{e}.")
            tensors[expert + ".weight"] = torch.round(stack[e] / scale).clamp(-127, 127).to(torch.int8)
            tensors[expert + ".weight_scale"] = scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = [m for m in config["quantization_config"]["ignore"] if "experts" not in m]
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True,
                                      quantization_config=loader_config("compressed-tensors"))
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")} <= \
        set(info["missing_keys"])
    assert "model.layers.0.mlp.experts.3.gate_up_proj.weight" in info["unexpected_keys"]
    source = load_file(src / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(model.model.layers[0].mlp.experts.gate_up_proj.data, source)
