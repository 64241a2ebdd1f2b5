"""Checkpoints in the published third-party formats, written by the tests (not by fp8conv's writer)."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

E4M3 = ml_dtypes.float8_e4m3fn


def block_quantize(w: np.ndarray, block: int, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-block FP8 quantization as third-party tools do it (scale stored in scale_dtype)."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    scales = np.ones((gr, gc), np.float32)
    codes = np.zeros((rows, cols), E4M3)
    for i in range(gr):
        for j in range(gc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float32)
            amax = np.abs(tile).max()
            scale = np.float32(amax / 448) if amax else np.float32(1)
            scale = np.float32(np.array(scale).astype(scale_dtype))
            scales[i, j] = scale
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = np.clip(tile / scale, -448, 448).astype(E4M3)
    return codes, scales.astype(scale_dtype)


def weights(rng, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * 0.02).astype(ml_dtypes.bfloat16) for n, s in shapes.items()}


SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (256, 256),
    "model.layers.0.mlp.down_proj.weight": (256, 320),
    "lm_head.weight": (64, 256),
}


def source_model(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    tensors = weights(np.random.default_rng(5), SHAPES)
    tensors["model.norm.weight"] = np.ones(256, ml_dtypes.bfloat16)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    return tensors


def llm_compressor_fp8_block(root: Path, source: dict[str, np.ndarray]) -> Path:
    """compressed-tensors FP8_BLOCK as llm-compressor's model-free PTQ writes it: bf16 weight_scale."""
    root.mkdir(parents=True)
    out = {}
    for name, w in source.items():
        if name.endswith("_proj.weight"):
            codes, scales = block_quantize(w, 128, ml_dtypes.bfloat16)
            out[name], out[name[:-6] + "weight_scale"] = codes, scales
        else:
            out[name] = w
    save_file(out, str(root / "model.safetensors"), metadata={"format": "pt"})
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "block_structure": [128, 128],
            "dynamic": False, "group_size": None, "observer": "minmax", "observer_kwargs": {}, "actorder": None}
    act = {**args, "strategy": "group", "group_size": 128, "block_structure": None, "dynamic": True, "observer": None}
    config = {"model_type": "llama", "hidden_size": 256, "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": act,
                                      "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}}
    (root / "config.json").write_text(json.dumps(config))
    return root


def deepseek_fine_grained(root: Path, source: dict[str, np.ndarray]) -> Path:
    """Fine-grained FP8 (DeepSeek-V3 style): weight_scale_inv float32, scales in another shard."""
    root.mkdir(parents=True)
    first, second = {}, {}
    for name, w in source.items():
        if name.endswith("_proj.weight"):
            codes, scales = block_quantize(w, 128, np.float32)
            first[name], second[name[:-6] + "weight_scale_inv"] = codes, scales
        else:
            second[name] = w
    save_file(first, str(root / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(root / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "hidden_size": 256, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (root / "config.json").write_text(json.dumps(config))
    return root
