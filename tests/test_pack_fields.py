"""Integer codes packed into int32 words (formats/integer.pack_int32) by both backends: the C kernel
(accel pack_fields) and the numpy reference give the bytes of a plain loop written here, compressed-tensors'
pack_to_int32 rule, for every code value (in range or not), ragged widths and empty shapes."""
from __future__ import annotations

import numpy as np
import pytest

from fp8conv.accel import native
from fp8conv.formats import FORMATS

pytestmark = pytest.mark.conformance

BACKENDS = ["numpy"] + (["native"] if native.AVAILABLE else [])


def reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Word w of a row: sum over its fields j of ((code + 2^(bits-1)) mod 256, masked to a byte's
    share) << (j * bits), fields past the row's end zero; int32 little end first."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per_word)
    out = np.zeros((rows, words), np.uint32)
    for r in range(rows):
        for w in range(words):
            word = 0
            for j in range(per_word):
                c = w * per_word + j
                if c < cols:
                    field = (int(codes[r, c]) + (1 << (bits - 1))) % 256
                    byte, shift = divmod(j * bits, 8)
                    word |= ((field << shift) & 0xFF) << (8 * byte)
            out[r, w] = word
    return out.view(np.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("cols", [0, 1, 2, 3, 7, 8, 9, 31, 33, 130])
def test_both_backends_pack_as_the_reference(monkeypatch, backend, name, cols):
    monkeypatch.setenv("FP8CONV_BACKEND", backend)
    fmt = FORMATS[name]
    rng = np.random.default_rng(cols)
    codes = rng.integers(-128, 128, (3, cols)).astype(np.int8)  # out-of-range codes too: bytes still defined
    codes[0, : min(cols, 2)] = (-(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1)[: min(cols, 2)]
    got = fmt.pack_int32(codes)
    expected = reference(codes, fmt.bits)
    assert got.dtype == np.int32 and got.shape == expected.shape
    bad = np.argwhere(got != expected)
    assert bad.size == 0, f"{name} {backend}: word {bad[0].tolist()} is {got[tuple(bad[0])]:#x}, not {expected[tuple(bad[0])]:#x}"
