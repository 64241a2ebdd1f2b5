"""INT4 / INT8 weight-only (pack-quantized) against compressed-tensors' and llm-compressor's own code.

Marked slow (CI runs them). Figures printed here are quoted in README's Compatibility table.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fp8conv.formats import FORMATS
from helpers import load_all, read_json, run_cli

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch", reason="interop tests need the test extra (torch CPU 2.13.0)")

SCHEMES = [  # (format, granularity, asymmetric)
    ("int4", "group", False), ("int4", "group", True), ("int4", "channel", True), ("int8", "group", False),
    ("int8", "channel", True),
]


def ct_scheme(out):
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(read_json(out / "config.json")["quantization_config"])
    assert config.format == "pack-quantized"
    return next(iter(config.config_groups.values()))


def t(array: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(array))


def bf16(array: np.ndarray):
    return t(array.view(np.uint16).astype(np.int16)).view(torch.bfloat16)


def quantize(src, out, fmt, granularity, asymmetric):
    args = ["--format", fmt, "--granularity", granularity, "--activations", "none"]
    args += ["--group-size", "64"] if granularity == "group" else []
    run_cli("quantize", src, "-o", out, *args, *(["--asymmetric"] if asymmetric else []))


@pytest.mark.parametrize("fmt,granularity,asymmetric", SCHEMES)
def test_compressed_tensors_decompresses_ours_exactly(sample, tmp_path, fmt, granularity, asymmetric):
    """Its PackedQuantizationCompressor.decompress on our tensors == `fp8conv dequantize` (bf16), bit for bit."""
    from compressed_tensors.compressors import BaseCompressor

    out, back = tmp_path / "q", tmp_path / "deq"
    quantize(sample("llama-tiny"), out, fmt, granularity, asymmetric)
    scheme = ct_scheme(out)
    assert scheme.weights.num_bits == FORMATS[fmt].bits and scheme.weights.symmetric is not asymmetric
    run_cli("dequantize", out, "-o", back)
    ours, tensors = load_all(back), load_all(out)
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    checked = 0
    for name in (n for n in ours if n.endswith("_proj.weight")):
        prefix = name[:-6]
        state = {"weight_packed": t(tensors[prefix + "weight_packed"]), "weight_scale": bf16(tensors[prefix + "weight_scale"]),
                 "weight_shape": t(tensors[prefix + "weight_shape"])}
        if asymmetric:
            state["weight_zero_point"] = t(tensors[prefix + "weight_zero_point"])
        theirs = compressor.decompress(state, scheme)["weight"]
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs.view(torch.int16), bf16(ours[name]).view(torch.int16)), name
        checked += 1
    assert checked == 14


@pytest.mark.parametrize("fmt,granularity,asymmetric", SCHEMES)
def test_compressed_tensors_compressor_reproduces_our_bytes(sample, tmp_path, fmt, granularity, asymmetric):
    """Its compress(), given the source weights with our scales and zero points, writes our bytes: this pins
    the packing order of codes and zero points (and the rounding, since it divides in float32 as we do)."""
    from compressed_tensors.compressors import BaseCompressor

    src, out = sample("llama-tiny"), tmp_path / "q"
    quantize(src, out, fmt, granularity, asymmetric)
    scheme = ct_scheme(out)
    source, tensors = load_all(src), load_all(out)
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    fmt_obj = FORMATS[fmt]
    for name in (n for n in source if n.endswith("_proj.weight")):
        prefix = name[:-6]
        state = {"weight": t(source[name].astype(np.float32)), "weight_scale": bf16(tensors[prefix + "weight_scale"])}
        if asymmetric:
            packed_zp = tensors[prefix + "weight_zero_point"]
            rows = source[name].shape[0]
            state["weight_zero_point"] = t(fmt_obj.unpack_int32(np.ascontiguousarray(packed_zp.T), rows).T)
        compressed = compressor.compress(state, scheme)
        np.testing.assert_array_equal(compressed["weight_packed"].numpy(), tensors[prefix + "weight_packed"], err_msg=name)
        assert compressed["weight_shape"].tolist() == tensors[prefix + "weight_shape"].tolist()
        if asymmetric:
            np.testing.assert_array_equal(compressed["weight_zero_point"].numpy(), tensors[prefix + "weight_zero_point"])
        else:
            assert "weight_zero_point" not in compressed


def rel_errors(source: dict, restored: dict) -> dict[str, float]:
    out = {}
    for name, w in source.items():
        if name in restored and name.endswith("_proj.weight"):
            ref = w.astype(np.float64)
            out[name] = float(np.linalg.norm(restored[name].astype(np.float64) - ref) / np.linalg.norm(ref))
    return out


@pytest.mark.parametrize("preset,args", [("W4A16_ASYM", ["--format", "int4", "--asymmetric"]),
                                         ("W4A16", ["--format", "int4"]),
                                         ("W8A16", ["--format", "int8", "--activations", "none", "--granularity", "group"])])
def test_llm_compressor_output_and_error_comparison(tiny_llama, tmp_path, preset, args):
    """llm-compressor's model-free PTQ output dequantizes in fp8conv exactly as compressed-tensors decompresses
    it, verifies, and our error on the same weights is at most its error (printed per tensor)."""
    llmcompressor = pytest.importorskip("llmcompressor")
    from compressed_tensors.compressors import BaseCompressor

    theirs_dir, ours_dir = tmp_path / "llmc", tmp_path / "ours"
    llmcompressor.model_free_ptq(model_stub=str(tiny_llama), save_directory=str(theirs_dir), scheme=preset,
                                 ignore=["lm_head", "re:.*embed_tokens$"], max_workers=1, device="cpu")
    report = json.loads(run_cli("verify", theirs_dir, "--against", tiny_llama, "--json").stdout)
    assert report["passed"] and len(report["tensors"]) == 14
    run_cli("dequantize", theirs_dir, "-o", tmp_path / "theirs_deq")
    deq, tensors = load_all(tmp_path / "theirs_deq"), load_all(theirs_dir)
    scheme = ct_scheme(theirs_dir)
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    for name in (n for n in deq if n.endswith("_proj.weight")):
        prefix = name[:-6]
        state = {k: t(tensors[prefix + k]) if tensors[prefix + k].dtype != np.dtype("bfloat16") else bf16(tensors[prefix + k])
                 for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if prefix + k in tensors}
        expected = compressor.decompress(state, scheme)["weight"]
        assert torch.equal(expected.view(torch.int16), bf16(deq[name]).view(torch.int16)), name
    run_cli("quantize", tiny_llama, "-o", ours_dir, *args)
    run_cli("dequantize", ours_dir, "-o", tmp_path / "ours_deq", "--dtype", "fp32")
    run_cli("dequantize", theirs_dir, "-o", tmp_path / "theirs_f32", "--dtype", "fp32")
    source = load_all(tiny_llama)
    ours, theirs = rel_errors(source, load_all(tmp_path / "ours_deq")), rel_errors(source, load_all(tmp_path / "theirs_f32"))
    worse = {n: (ours[n], theirs[n]) for n in ours if ours[n] > theirs[n]}
    print(f"{preset}: mean rel RMS error fp8conv {np.mean(list(ours.values())):.5f}, llm-compressor "
          f"{np.mean(list(theirs.values())):.5f}; tensors where fp8conv is worse: {len(worse)}/{len(ours)} {worse}")
    assert len(ours) == 14 and not worse
