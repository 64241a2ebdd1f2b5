"""The microscaling kernels against the installed compressed-tensors / llm-compressor, bit for bit.

Their side is llm-compressor's model-free PTQ converter (`ModelFreePtqConverter.process`, the exact
per-shard code of `model_free_ptq`, which calibrates with compressed-tensors' observers and
compresses with its compressors) and compressed-tensors' own decompressors. Same input, same bytes.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fp8conv.numerics import microscale as ms

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch", reason="interop tests need the test extra (torch CPU 2.13.0)")
pytest.importorskip("llmcompressor")

BF16 = np.dtype(ml_dtypes.bfloat16)
PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}


def converter(fmt: str):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from llmcompressor.entrypoints.model_free.converter import ModelFreePtqConverter

    scheme = preset_name_to_scheme(PRESETS[fmt], ["Linear"])
    return ModelFreePtqConverter(QuantizationConfig(config_groups={"group_0": scheme}, ignore=[])), scheme


def to_torch(w: np.ndarray):
    if w.dtype == BF16:
        return torch.from_numpy(w.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(w.copy())


def to_numpy(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def hard_weight(rows: int, cols: int, dtype, seed: int) -> np.ndarray:
    """Random weights plus the corner cases: zero groups, -0.0, tiny negatives, an outlier row,
    groups whose NVFP4 scale is an e4m3 subnormal, exact ties of the e2m1 grid."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = -0.0
    w[2, :32] = -1e-6
    w[3, :] *= 50
    w[4, :32] = 1e-5 * rng.standard_normal(32)
    w[5, :16] = np.array([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -6, -5, -3.5, -2.5, -1.75, -1.25, -0.75, -0.25]) * 0.01
    w[6, :32] = 7 * 2.0 ** -8  # significand 1.75
    return w.astype(dtype)


def assert_bytes(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    bad = np.argwhere(ours.view(np.uint8) != theirs.view(np.uint8)) if ours.dtype.itemsize == 1 else \
        np.argwhere(ours != theirs)
    assert bad.size == 0, f"{what}: {len(bad)} differ, first at {tuple(bad[0])}"


NAME = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_same_bytes_as_llm_compressor_model_free(fmt, dtype):
    conv, scheme = converter(fmt)
    for seed, (rows, cols) in enumerate([(16, 64), (9, 160), (33, 96)]):
        w = hard_weight(rows, cols, dtype, seed)
        theirs = {k: to_numpy(v) for k, v in conv.process({f"{NAME}.weight": to_torch(w)}).items()}
        if fmt == "nvfp4":
            gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
            packed, scales = ms.quantize_nvfp4(w, gs)
            assert_bytes(np.array([gs], np.float32), theirs[f"{NAME}.weight_global_scale"], "global scale")
            assert_bytes(packed, theirs[f"{NAME}.weight_packed"], "packed e2m1")
        elif fmt == "mxfp4":
            packed, scales = ms.quantize_mx(w, "e2m1")
            assert_bytes(packed, theirs[f"{NAME}.weight_packed"], "packed e2m1")
        else:
            codes, scales = ms.quantize_mx(w, "e4m3")
            assert_bytes(codes, theirs[f"{NAME}.weight"], "e4m3 codes")
        assert_bytes(scales, theirs[f"{NAME}.weight_scale"], "scales")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_compressed_tensors_decompressor_equals_our_dequantize(fmt):
    from compressed_tensors.compressors import BaseCompressor

    _, scheme = converter(fmt)
    compressor = BaseCompressor.load_from_registry(
        {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}[fmt])
    w = hard_weight(24, 128, BF16, 7)
    if fmt == "nvfp4":
        gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
        packed, scales = ms.quantize_nvfp4(w, gs)
        state = {"weight_packed": torch.from_numpy(packed), "weight_global_scale": torch.tensor([gs]),
                 "weight_scale": torch.from_numpy(scales).view(torch.float8_e4m3fn)}
        ours = ms.dequantize_nvfp4(packed, scales, gs)
    elif fmt == "mxfp4":
        packed, scales = ms.quantize_mx(w, "e2m1")
        state = {"weight_packed": torch.from_numpy(packed), "weight_scale": torch.from_numpy(scales)}
        ours = ms.dequantize_mx(packed, scales, "e2m1")
    else:
        codes, scales = ms.quantize_mx(w, "e4m3")
        state = {"weight": torch.from_numpy(codes).view(torch.float8_e4m3fn), "weight_scale": torch.from_numpy(scales)}
        ours = ms.dequantize_mx(codes, scales, "e4m3")
    theirs = compressor.decompress(state, scheme)["weight"]
    assert theirs.dtype == torch.bfloat16
    assert_bytes(ours.view(np.uint16), to_numpy(theirs).view(np.uint16), "dequantized bf16")


def test_fused_partners_share_the_global_scale_llm_compressor_computes():
    conv, _ = converter("nvfp4")
    prefix = "model.layers.0.self_attn"
    parts = {p: hard_weight(16, 64, BF16, i) * (i + 1) for i, p in enumerate(["q_proj", "k_proj", "v_proj"])}
    theirs = conv.process({f"{prefix}.{p}.weight": to_torch(w) for p, w in parts.items()})
    amax = max(ms.tensor_amax(w) for w in parts.values())
    gs = ms.nvfp4_global_scale(amax, BF16)
    for p, w in parts.items():
        assert theirs[f"{prefix}.{p}.weight_global_scale"].item() == gs
        packed, scales = ms.quantize_nvfp4(w, gs)
        assert_bytes(packed, to_numpy(theirs[f"{prefix}.{p}.weight_packed"]), p)
        assert_bytes(scales, to_numpy(theirs[f"{prefix}.{p}.weight_scale"]), p)


def ours_and_theirs(fmt: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(our scale codes, theirs, our float32 dequantized weight, theirs) for one tensor."""
    conv, _ = converter(fmt)
    theirs = {k: to_numpy(v) for k, v in conv.process({f"{NAME}.weight": to_torch(w)}).items()}
    scale_t = theirs[f"{NAME}.weight_scale"]
    if fmt == "nvfp4":
        gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
        packed, scales = ms.quantize_nvfp4(w, gs)
        deq = ms.dequantize_nvfp4(packed, scales, gs, np.float32)
        deq_t = ms.dequantize_nvfp4(theirs[f"{NAME}.weight_packed"], scale_t, theirs[f"{NAME}.weight_global_scale"][0],
                                    np.float32)
        return scales, scale_t, deq, deq_t
    element = "e2m1" if fmt == "mxfp4" else "e4m3"
    codes, scales = ms.quantize_mx(w, element)
    key = f"{NAME}.weight_packed" if fmt == "mxfp4" else f"{NAME}.weight"
    return scales, scale_t, ms.dequantize_mx(codes, scales, element, np.float32), \
        ms.dequantize_mx(theirs[key], scale_t, element, np.float32)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_fp16_mx_differs_only_below_fp16_normals_where_ours_is_closer(fmt):
    """compressed-tensors takes the power of two of an fp16 group amax from its fp16 bits; below 2^-14
    (fp16 subnormals) that is 0 (its scale 2^-127 is 0 in fp16 and becomes its eps 1.0: code 127,
    every element 0) or, when the rounding bit carries, 2^-14. Ours takes the exponent of the exact
    value. Elsewhere the bytes are the same."""
    w = hard_weight(16, 128, np.float16, 3)
    for i, amax in enumerate([1e-4, 1e-5, 1e-6, 1e-7]):
        w[8 + i] = (np.linspace(-1, 1, 128) * amax).astype(np.float16)
    scales, scale_t, deq, deq_t = ours_and_theirs(fmt, w)
    tiny = ms.group_amax(w, 32) < 2.0**-14
    assert tiny.any() and (~tiny).any()
    assert_bytes(scales[~tiny], scale_t[~tiny], "scales of normal groups")
    assert (scale_t[tiny & (ms.group_amax(w, 32) > 0)] == 127).any()
    x = w.astype(np.float64)
    err, err_t = np.abs(deq - x).reshape(16, 4, 32).max(axis=2), np.abs(deq_t - x).reshape(16, 4, 32).max(axis=2)
    assert (err[~tiny] == err_t[~tiny]).all()
    assert (err[tiny] <= err_t[tiny]).all() and err[tiny].sum() < err_t[tiny].sum()


def test_fp16_nvfp4_small_tensor_keeps_its_global_scale():
    """For an fp16 tensor with amax < 2688 / 65504 the global scale overflows fp16; compressed-tensors falls
    back to 1.0 (scales then sit in the e4m3 subnormals), ours redoes it in float32: lower error."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((32, 128)) * 0.004).astype(np.float16)
    scales, scale_t, deq, deq_t = ours_and_theirs("nvfp4", w)
    x = w.astype(np.float64)
    ours, theirs = np.sqrt(((deq - x) ** 2).sum()), np.sqrt(((deq_t - x) ** 2).sum())
    assert ours < 0.8 * theirs, (ours, theirs)
    w = (rng.standard_normal((32, 128)) * 0.05).astype(np.float16)
    scales, scale_t, deq, deq_t = ours_and_theirs("nvfp4", w)
    assert_bytes(scales, scale_t, "scales where fp16 holds the global scale")
    assert (deq == deq_t).all()


# ---- whole checkpoints through the CLI ------------------------------------------------------------

CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}


def nvfp4_reference(packed: np.ndarray, scales: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """bf16 [rows, 2 * packed cols] from the stored bytes, in float64: element 2k in the low nibble, sign bit 8,
    value e2m1 x float32(e4m3 scale / float32 global scale), rounded to float32 then bf16 (torch's product)."""
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    packed = packed.view(np.uint8)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    values = grid[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    scale = scales.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    factor = (scale / float(np.asarray(global_scale, np.float32).reshape(-1)[0])).astype(np.float32).astype(np.float64)
    return (values * np.repeat(factor, 16, axis=1)).astype(np.float32).astype(BF16)


def _load(folder):
    from helpers import load_all

    return load_all(folder)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_checkpoint_is_byte_identical_to_llm_compressor_model_free_ptq(sample, tmp_path, fmt):
    """The sample Llama (bf16, two shards, q/k/v and gate/up fused): every tensor and the config equal."""
    import json

    from helpers import run_cli
    from llmcompressor import model_free_ptq

    src = sample("llama-tiny")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_cli("quantize", src, "-o", ours, "--format", fmt, "-q")
    model_free_ptq(model_stub=str(src), save_directory=str(theirs), scheme=PRESETS[fmt],
                   ignore=["lm_head", "model.embed_tokens"], max_workers=1, device="cpu")
    a, b = _load(ours), _load(theirs)
    assert set(a) == set(b)
    for name in sorted(a):
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    config_a = json.loads((ours / "config.json").read_text())["quantization_config"]
    config_b = json.loads((theirs / "config.json").read_text())["quantization_config"]
    config_b.pop("version")  # compressed-tensors' own version, which fp8conv does not claim
    assert config_a == config_b


@pytest.mark.parametrize("fmt, observer", [(f, o) for f in ("nvfp4", "mxfp4", "mxfp8") for o in ("minmax", "mse")]
                         + [("nvfp4", "expanded")])
def test_compressed_tensors_and_transformers_read_our_checkpoint_as_we_do(sample, tmp_path, fmt, observer):
    """compressed-tensors' decompressor on each module and transformers' CPU load (dequantized on load)
    give exactly `fp8conv dequantize`'s bf16 weights; with --observer mse / expanded too (scale values and,
    for expanded, the global scale differ). NVFP4: also exactly the float64 reference of the stored values,
    bf16(e2m1 x float32(e4m3 scale / global scale))."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from helpers import read_json, run_cli

    out, deq = tmp_path / "q", tmp_path / "dq"
    run_cli("quantize", sample("llama-tiny"), "-o", out, "--format", fmt, "--observer", observer, "-q")
    run_cli("dequantize", out, "-o", deq, "-q")
    ours, stored = _load(deq), _load(out)
    assert read_json(out / "fp8conv.manifest.json")["scheme"].get("observer", "minmax") == observer
    config = QuantizationConfig.model_validate(read_json(out / "config.json")["quantization_config"])
    scheme = next(iter(config.config_groups.values()))
    compressor = BaseCompressor.load_from_registry(CT_FORMAT[fmt])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    loaded = model.state_dict()
    checked = 0
    for name in (n for n in ours if n.endswith("_proj.weight")):
        prefix = name[: -len("weight")]
        state = {k[len(prefix):]: torch.from_numpy(v.view(np.uint8).copy()) if v.dtype.itemsize == 1 else
                 torch.from_numpy(v.copy()) for k, v in stored.items() if k.startswith(prefix)}
        if "weight_scale" in state and fmt == "nvfp4":
            state["weight_scale"] = state["weight_scale"].view(torch.float8_e4m3fn)
        if fmt == "mxfp8":
            state["weight"] = state["weight"].view(torch.float8_e4m3fn)
        theirs = compressor.decompress(state, scheme)["weight"]
        assert_bytes(ours[name].view(np.uint16), to_numpy(theirs).view(np.uint16), f"decompressor {name}")
        assert_bytes(ours[name].view(np.uint16), to_numpy(loaded[name]).view(np.uint16), f"transformers {name}")
        if fmt == "nvfp4":
            ref = nvfp4_reference(*(stored[prefix + k] for k in ("weight_packed", "weight_scale", "weight_global_scale")))
            assert_bytes(ref.view(np.uint16), to_numpy(theirs).view(np.uint16), f"float64 reference {name}")
        checked += 1
    assert checked == 14
