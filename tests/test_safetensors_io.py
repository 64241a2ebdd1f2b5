"""The header parser refuses every malformed header with one message; the writer's bytes are golden."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import stfile
from fp8conv.errors import InputError
from fp8conv.io.safetensors import OutEntry, TensorReader, build_header, printable, read_header, write_at

GOOD = {"a": stfile.entry("F32", [2], 0, 8), "b": stfile.entry("I8", [3], 8, 11)}
GOOD_DATA = b"\x00" * 11

HOSTILE = {
    "too short": (b"\x01\x02", None, "too short"),
    "header longer than file": (stfile.raw(GOOD, GOOD_DATA, length=10_000), None, "runs past the end"),
    "header absurdly large": (stfile.raw(GOOD, GOOD_DATA, length=2**40), None, "exceeds"),
    "not utf-8": (stfile.raw(b"\xff\xfe{}"), None, "not UTF-8"),
    "not json": (stfile.raw("{nope"), None, "not valid JSON"),
    "not an object": (stfile.raw("[1, 2]"), None, "not a JSON object"),
    "metadata not str map": (stfile.raw({"__metadata__": {"a": 1}}), None, "__metadata__"),
    "unknown dtype": (stfile.raw({"a": stfile.entry("F128", [1], 0, 16)}, b"\0" * 16), None, "unknown dtype"),
    "negative shape": (stfile.raw({"a": stfile.entry("F32", [-1], 0, 4)}, b"\0" * 4), None, "non-negative integers"),
    "float shape": (stfile.raw({"a": stfile.entry("F32", [1.5], 0, 4)}, b"\0" * 4), None, "non-negative integers"),
    "bool shape": (stfile.raw({"a": stfile.entry("F32", [True], 0, 4)}, b"\0" * 4), None, "non-negative integers"),
    "offsets out of range": (stfile.raw({"a": stfile.entry("F32", [2], 0, 8)}, b"\0" * 4), None, "truncated"),
    "overlapping": (stfile.raw({"a": stfile.entry("F32", [2], 0, 8), "b": stfile.entry("F32", [1], 4, 8)}, b"\0" * 8), None, "overlaps"),
    "gap": (stfile.raw({"a": stfile.entry("F32", [1], 4, 8)}, b"\0" * 8), None, "gap of 4 bytes"),
    "size mismatch": (stfile.raw({"a": stfile.entry("F32", [3], 0, 8)}, b"\0" * 8), None, "needs 12"),
    "end before begin": (stfile.raw({"a": stfile.entry("F32", [0], 8, 4)}, b"\0" * 8), None, "before begin"),
    "duplicate names": (stfile.raw('{"a": {"dtype":"I8","shape":[1],"data_offsets":[0,1]}, "a": {"dtype":"I8","shape":[1],"data_offsets":[1,2]}}'), None, "duplicate key"),
    "trailing bytes": (stfile.raw(GOOD, GOOD_DATA + b"xx"), None, "unexplained bytes"),
    "extra entry field": (stfile.raw({"a": {**stfile.entry("I8", [1], 0, 1), "x": 1}}, b"\0"), None, "exactly dtype"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_refused(tmp_path, case):
    data, _, message = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        read_header(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_valid_header_parses(tmp_path):
    path = stfile.write(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, **GOOD}, GOOD_DATA)
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.tensors["b"].shape == (3,) and header.tensors["b"].nbytes == 3
    assert header.tensors["a"].start == 8 + len(json.dumps({"__metadata__": {"format": "pt"}, **GOOD}))


def test_zero_size_and_scalar_tensors(tmp_path):
    header = {"e": stfile.entry("F32", [0, 4], 0, 0), "s": stfile.entry("F32", [], 0, 4)}
    path = stfile.write(tmp_path / "z.safetensors", header, struct.pack("<f", 2.5))
    parsed = read_header(path)
    with TensorReader(path) as reader:
        assert reader.read_rows(parsed.tensors["s"]) == np.float32(2.5)
        assert reader.read_rows(parsed.tensors["e"]).shape == (0, 4)


def test_golden_header_bytes():
    prefix, offsets = build_header([OutEntry("w", "F8_E4M3", (2, 2)), OutEntry("a", "F32", (1,))])
    body = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
           b'"w":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[4,8]}}'
    body += b" " * (-len(body) % 8)
    assert prefix == struct.pack("<Q", len(body)) + body
    assert offsets == {"a": len(prefix), "w": len(prefix) + 4}


def test_written_file_opens_with_safetensors(tmp_path):
    entries = [OutEntry("w", "F8_E4M3", (2, 2)), OutEntry("s", "F32", (1, 1)), OutEntry("i", "I8", (3,))]
    prefix, offsets = build_header(entries)
    path = tmp_path / "out.safetensors"
    path.write_bytes(prefix + b"\0" * 11)
    import os
    fd = os.open(path, os.O_WRONLY)
    write_at(fd, offsets["s"], np.array([[0.5]], np.float32))
    write_at(fd, offsets["i"], np.array([1, -2, 3], np.int8))
    os.close(fd)
    with safe_open(str(path), "np") as f:
        assert f.get_slice("w").get_dtype() == "F8_E4M3"
        assert f.get_tensor("s")[0, 0] == 0.5
        assert list(f.get_tensor("i")) == [1, -2, 3]


def test_control_characters_are_escaped():
    assert printable("evil\x1b[31mname\n") == "evil\\x1b[31mname\\n"
    assert printable("model.layers.0.weight") == "model.layers.0.weight"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_never_crash(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        read_header(path)
    except InputError as exc:
        assert "\n" not in str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "X"]) | json_values,
    "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | json_values,
})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4), st.integers(0, 48))
def test_fuzz_structured_headers(tmp_path_factory, header, data_len):
    """Structured near-valid headers: either parse into a self-consistent layout or raise InputError."""
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(stfile.raw(header, b"\0" * data_len))
    try:
        parsed = read_header(path)
    except InputError:
        return
    covered = sum(t.nbytes for t in parsed.tensors.values())
    assert covered == data_len
