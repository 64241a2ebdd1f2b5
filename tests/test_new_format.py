"""A format added from outside the package, through the public registry only.

A 3-bit integer codec (codes -4..3, ten to an int32 word when packed) is defined here by subclassing
`fp8conv.formats.ElementFormat`; nothing in fp8conv names it. quantize, inspect, verify, dequantize and
the HTML report then handle it end to end, and the codes and dequantized values are checked against a
reference computed in this test from the format's definition.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from fp8conv.formats import FORMATS, ElementFormat
from helpers import load_all, read_json, run_cli
from test_reliability import sharded_model

BITS, QMIN, QMAX, PER_WORD = 3, -4, 3, 10
GROUP = 32


def define_int3() -> type:
    """The throwaway codec: every fact and behaviour the registry asks of a format, nothing else."""

    class Int3(ElementFormat, name="int3"):
        bits = BITS
        is_float = False
        dtype = np.dtype(np.int8)
        safetensors_tag = "I8"
        qmin, qmax = float(QMIN), float(QMAX)
        weight_only = True
        default_granularity = "group"
        packs_int32 = True
        max_rel_error = 0.6
        per_word = PER_WORD

        def encode(self, values: np.ndarray, out: np.ndarray) -> None:
            np.rint(values, out=values)
            np.copyto(out, values, casting="unsafe")

        def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
            np.copyto(out, codes, casting="unsafe")

        def packed_cols(self, cols: int) -> int:
            return -(-cols // PER_WORD)

        def packed_bytes(self, cols: int) -> int:
            return self.packed_cols(cols) * 4

        def pack_codes(self, codes: np.ndarray) -> np.ndarray:
            rows, cols = codes.shape
            fields = np.zeros((rows, self.packed_cols(cols) * PER_WORD), np.uint32)
            fields[:, :cols] = (codes.astype(np.int32) - QMIN).astype(np.uint32)
            fields = fields.reshape(rows, -1, PER_WORD)
            words = np.zeros(fields.shape[:2], np.uint32)
            for j in range(PER_WORD):
                words |= fields[:, :, j] << np.uint32(j * BITS)
            return words.view(np.int32)

        def unpack_codes(self, packed: np.ndarray, cols: int) -> np.ndarray:
            words = np.ascontiguousarray(packed).view(np.uint32)
            fields = np.stack([(words >> np.uint32(j * BITS)) & np.uint32(7) for j in range(PER_WORD)], axis=-1)
            return (fields.reshape(words.shape[0], -1)[:, :cols].astype(np.int16) + QMIN).astype(np.int8)

    return Int3


@pytest.fixture
def int3():
    codec = define_int3()
    try:
        yield FORMATS["int3"]
    finally:
        del FORMATS["int3"]
        assert codec.name not in FORMATS


def reference_int3(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, bf16-stored scales) of a float32 [rows, cols] weight by the documented integer weight-only
    rule over the full code range: scale = bf16(amax / ((qmax - qmin) / 2)) per group of GROUP along a row,
    q = clip(rint(w / scale), qmin, qmax) with the division in float32."""
    rows, cols = w.shape
    tiles = w.reshape(rows, cols // GROUP, GROUP)
    amax = np.abs(tiles).max(axis=2)
    scale = (amax / np.float32((QMAX - QMIN) / 2)).astype(np.float32)
    scale = scale.astype(ml_dtypes.bfloat16).astype(np.float32)  # round to nearest even bf16
    scale[amax == 0] = 1.0
    q = np.clip(np.rint(tiles / scale[:, :, None]), QMIN, QMAX)
    return q.reshape(rows, cols).astype(np.int8), scale


def test_a_codec_registered_by_a_test_runs_end_to_end(int3, tmp_path):
    src = sharded_model(tmp_path / "src", shards=2, rows=64, cols=4 * GROUP)
    out, deq = tmp_path / "out", tmp_path / "deq"
    run_cli("quantize", src, "-o", out, "--format", "int3", "--group-size", str(GROUP), "-q")

    config = read_json(out / "config.json")["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["format"], weights["num_bits"], weights["type"], weights["group_size"]) == \
        ("pack-quantized", BITS, "int", GROUP)
    source, stored = load_all(src), load_all(out)
    for name in ("layers.0.proj.weight", "layers.1.proj.weight"):
        prefix = name[: -len("weight")]
        w = source[name].astype(np.float32)
        codes, scales = reference_int3(w)
        packed = stored[prefix + "weight_packed"]
        assert packed.dtype == np.int32 and packed.shape == (64, int3.packed_cols(4 * GROUP))
        np.testing.assert_array_equal(int3.unpack_codes(packed, 4 * GROUP), codes, err_msg=name)
        np.testing.assert_array_equal(stored[prefix + "weight_scale"].astype(np.float32), scales, err_msg=name)
        assert tuple(stored[prefix + "weight_shape"]) == (64, 4 * GROUP)

    inspected = json.loads(run_cli("inspect", out, "--json").stdout)
    assert "int3" in json.dumps(inspected)
    verified = json.loads(run_cli("verify", out, "--against", src, "--json").stdout)
    assert verified["passed"] is True and set(verified["checks"].values()) == {"pass"}, verified
    assert [t["scheme"] for t in verified["tensors"]] == [f"int3 group {GROUP} weight-only"] * 2
    assert all(0 < t["rel_rms_error"] < int3.max_rel_error for t in verified["tensors"]), verified["tensors"]

    run_cli("dequantize", out, "-o", deq, "-q")
    restored = load_all(deq)
    for name in ("layers.0.proj.weight", "layers.1.proj.weight"):
        codes, scales = reference_int3(source[name].astype(np.float32))
        expected = (codes.reshape(64, -1, GROUP) * scales[:, :, None]).reshape(64, -1)
        expected = expected.astype(ml_dtypes.bfloat16)  # the source dtype, round to nearest even
        np.testing.assert_array_equal(restored[name].view(np.uint16), expected.view(np.uint16), err_msg=name)

    page = (out / "fp8conv.report.html").read_text(encoding="utf-8")
    assert "int3" in page
    run_cli("report", out)
    assert (out / "fp8conv.report.html").read_text(encoding="utf-8") == page


def test_the_cli_offers_a_registered_codec(int3):
    assert "int3" in FORMATS and FORMATS["int3"].emax == 1  # floor(log2(3))
    assert run_cli("quantize", "--help").stdout.count("int3") >= 1
