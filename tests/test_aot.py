"""The ahead-compiled kernel (aot.py): its cache, what it refuses, and a worker that never imports numba.

Its numerics are tests/test_kernels.py's: every compiled-path test there runs both through the
loaded object and through numba's dispatcher, against the float64 reference."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fp8conv.accel import aot, compiled

ROOT = Path(__file__).resolve().parent.parent
KEY = {"build": 1, "source": "x" * 64, "numba": "0", "llvmlite": "0", "triple": "t", "cpu": "c", "features": "+f"}


def test_a_cache_file_round_trips(tmp_path):
    path = aot.cache_file(tmp_path, KEY)
    aot.write(path, KEY, "entry", b"\x7fELF" + bytes(range(256)))
    assert aot.read(path, KEY) == ("entry", b"\x7fELF" + bytes(range(256)))
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert aot.cache_file(tmp_path, {**KEY, "cpu": "other"}) != path  # another CPU: another file


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "appended", "other key", "bad header",
                                    "writable by others", "symlink", "not ours"])
def test_a_damaged_or_foreign_cache_file_is_not_used(tmp_path, damage):
    """Loading machine code runs it: a file is used only when ours, closed to others and intact."""
    path = aot.cache_file(tmp_path, KEY)
    aot.write(path, KEY, "entry", bytes(range(200)))
    data = path.read_bytes()
    key = KEY
    if damage == "flipped byte":
        path.write_bytes(data[:-7] + bytes([data[-7] ^ 1]) + data[-6:])
    elif damage == "truncated":
        path.write_bytes(data[:-1])
    elif damage == "appended":
        path.write_bytes(data + b"\0")
    elif damage == "other key":
        key = {**KEY, "numba": "1"}
    elif damage == "bad header":
        path.write_bytes(aot.MAGIC + b"{not json\n" + bytes(range(200)))
    elif damage == "writable by others":
        path.chmod(0o666)
    elif damage == "symlink":
        target = tmp_path / "elsewhere.o"
        path.rename(target)
        path.symlink_to(target)
    elif damage == "not ours":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")  # CI runs as root: this case runs there
        os.chown(path, 12345, 12345)
    assert aot.read(path, key) is None


def test_an_object_that_calls_outside_itself_is_refused():
    """The object may need nothing from numba's runtime or helpers: the check that build() applies."""
    import llvmlite.binding as ll

    module = ll.parse_assembly("""
        declare i32 @numba_do_raise(ptr)
        declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
        declare ptr @memset(ptr, i32, i64)
        @PyExc_RuntimeError = external global i8
        define i32 @entry(ptr %p) {
          %r = call i32 @numba_do_raise(ptr @PyExc_RuntimeError)
          ret i32 %r
        }""")
    assert aot.external_symbols(module) == ["numba_do_raise", "PyExc_RuntimeError"]
    clean = ll.parse_assembly("""
        declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
        define void @entry(ptr %p) {
          call void @llvm.memset.p0.i64(ptr %p, i8 0, i64 8, i1 false)
          ret void
        }""")
    assert aot.external_symbols(clean) == []


def test_the_ctypes_arguments_match_the_entry_signature():
    from numba import types

    from fp8conv.accel import _numba_kernels

    signature = _numba_kernels.native_signature()
    as_ctypes = {types.int64: ctypes.c_int64, types.float32: ctypes.c_float}
    expected = [ctypes.c_void_p if isinstance(t, (types.CPointer, types.RawPointer)) else as_ctypes[t]
                for t in signature.args]
    assert list(aot._ARGS) == expected
    assert signature.return_type == types.int32


def native(bf16: bool = True):
    kernel = aot.entry(bf16)
    if kernel is None:
        pytest.fail("the ahead-compiled kernel did not load (llvmlite and numba are in the test extra)")
    return kernel


def test_the_loaded_kernel_refuses_arguments_that_do_not_fit():
    kernel = native()
    src = np.zeros((10, 16), np.uint16)
    codes = np.empty((10, 16), np.uint8)
    stats = np.zeros(5)
    with pytest.raises(ValueError, match="do not fit"):  # 10 rows of 2-row tiles need 5 grid rows
        kernel(src, True, 2, 8, np.float32(0), np.float32(448), 0, codes, np.empty((4, 2), np.float32), stats, False)
    with pytest.raises(ValueError, match="src must be a C-contiguous uint16"):  # the bf16 entry
        kernel(src.view(np.float16), True, 2, 8, np.float32(0), np.float32(448), 0, codes,
               np.empty((5, 2), np.float32), stats, False)
    with pytest.raises(ValueError, match="codes must be"):
        kernel(src, True, 2, 8, np.float32(0), np.float32(448), 0, np.empty((16, 10), np.uint8).T,
               np.empty((5, 2), np.float32), stats, False)
    with pytest.raises(ValueError, match="stats must be"):
        kernel(src, True, 2, 8, np.float32(0), np.float32(448), 0, codes, np.empty((5, 2), np.float32),
               np.zeros(4), False)


def test_the_loaded_kernel_grows_its_scratch_and_matches_the_dispatcher():
    """Chunks of growing width (the scratch grows between calls), NaN (the numpy path's cue) and an
    unknown kind: the loaded object and numba's dispatcher answer alike, to the last bit."""
    kernels = {bf16: aot.NativeKernel(aot.map_object(*cached_object(bf16)), bf16) for bf16 in (True, False)}
    dispatcher = compiled.load_numba().quantize_chunk
    rng = np.random.default_rng(7)
    sizes = []  # the bf16 kernel's scratch (float64, float32, uint32 elements) after each shape
    for rows, cols, tile in [(3, 5, (1, 5)), (130, 300, (128, 128)), (64, 4099, (1, 4099)), (9, 2500, (1, 32))]:
        w = (rng.standard_normal((rows, cols)) * 0.03).astype(np.float32)
        grid = (-(-rows // tile[0]), -(-cols // tile[1]))
        for src in (w, (w.view(np.uint32) >> 16).astype(np.uint16)):
            results = []
            for run in (kernels[src.dtype == np.uint16], dispatcher):
                codes, scales, stats = np.empty((rows, cols), np.uint8), np.empty(grid, np.float32), np.zeros(5)
                flag = run(src, src.dtype == np.uint16, tile[0], tile[1], np.float32(0), np.float32(448), 0,
                           codes, scales, stats, False)
                results.append((flag, codes.tobytes(), scales.tobytes(), stats.tobytes()))
            assert results[0] == results[1] and results[0][0] is False
        sizes.append(tuple(a.size for a in kernels[True]._scratch.arrays))
    assert all(a <= b for earlier, later in zip(sizes, sizes[1:]) for a, b in zip(earlier, later))  # never shrinks
    assert sizes[-1][0] > sizes[0][0] and sizes[-1][1] > sizes[0][1] and sizes[-1][2] > sizes[0][2], sizes
    w[1, 2] = np.nan
    for run in (kernels[False], dispatcher):
        assert run(w, False, 1, 32, np.float32(0), np.float32(448), 0, np.empty(w.shape, np.uint8),
                   np.empty((w.shape[0], 79), np.float32), np.zeros(5), False) is True
        assert run(w[:1, :8].copy(), False, 1, 8, np.float32(0), np.float32(448), 7, np.empty((1, 8), np.uint8),
                   np.empty((1, 1), np.float32), np.zeros(5), False) is True  # an unknown kind


PROBE = """
import json, sys
import numpy as np
from fp8conv.accel import aot, compiled
from fp8conv.numerics import kernels
compiled.preload()
w = np.random.default_rng(3).standard_normal((256, 384)).astype(np.float32)
fast = kernels.quantize_array(w, kernels.Scheme("fp8_e4m3", "block"), backend="numba")
slow = kernels.quantize_array(w, kernels.Scheme("fp8_e4m3", "block"), backend="numpy")
print(json.dumps({"native": aot.entry(True) is not None and aot.entry(False) is not None, "numba_imported": "numba" in sys.modules,
                  "llvm_loaded": "llvmlite.binding" in sys.modules,
                  "same": fast.codes.tobytes() == slow.codes.tobytes() and fast.scales.tobytes() == slow.scales.tobytes()
                  and fast.stats == slow.stats}))
"""


def probe(cache: Path, *extra_env: tuple[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "FP8CONV_"))}
    env.update(PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache), **dict(extra_env))
    return subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def answer(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_processes_build_the_object_once_then_load_it_without_numba(tmp_path):
    """Two processes on an empty cache: one builds (the other waits on the lock), both quantize as the
    numpy reference does; a later process loads the object and never imports numba. FP8CONV_NO_AOT=1
    gives numba's dispatcher, same bytes. (x86-64: the later process maps the object without LLVM.)"""
    first = [probe(tmp_path), probe(tmp_path)]
    for result in map(answer, first):
        assert result["native"] and result["same"]
    objects = list(tmp_path.glob("fp8conv-kernel-*.o"))
    assert len(objects) == 2, objects  # one per source type
    built = [o.stat().st_mtime_ns for o in objects]
    later = answer(probe(tmp_path))
    assert later == {"native": True, "numba_imported": False, "llvm_loaded": False, "same": True}  # elfload mapped it
    assert [o.stat().st_mtime_ns for o in objects] == built  # loaded, not rebuilt
    assert answer(probe(tmp_path, ("FP8CONV_NO_AOT", "1"))) == {"native": False, "numba_imported": True,
                                                                "llvm_loaded": True, "same": True}


def cached_object(bf16: bool = True) -> tuple[str, bytes]:
    native(bf16)  # built into the cache if missing
    key = aot.cache_key(bf16)
    found = aot.read(aot.cache_file(compiled.kernel_cache_dir(), key), key)
    assert found is not None
    return found


def test_both_loaders_run_the_same_machine_code():
    """elfload (no LLVM) and llvmlite's MCJIT map the same object; the kernel answers alike."""
    symbol, code = cached_object(True)
    rng = np.random.default_rng(11)
    src = (rng.standard_normal((200, 300)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    answers = []
    for loader in ("elf", "llvm"):
        kernel = aot.NativeKernel(aot.map_object(symbol, code, loader), True)
        codes, scales, stats = np.empty((200, 300), np.uint8), np.empty((2, 3), np.float32), np.zeros(5)
        assert kernel(src, True, 128, 128, np.float32(0), np.float32(448), 0, codes, scales, stats, False) is False
        answers.append((codes.tobytes(), scales.tobytes(), stats.tobytes()))
    assert answers[0] == answers[1]


def test_elfload_refuses_what_it_does_not_handle():
    from fp8conv.accel import elfload

    symbol, code = cached_object(True)
    memset = {"memset": elfload.libc_address("memset")}
    assert elfload.load(code, memset).address(symbol)
    with pytest.raises(elfload.NotLoadable, match="needs 'memset'"):
        elfload.load(code, {})
    with pytest.raises(elfload.NotLoadable, match="not a 64-bit"):
        elfload.load(b"\x7fELF\x01\x01" + bytes(64), memset)
    with pytest.raises(elfload.NotLoadable):
        elfload.load(code[: len(code) // 2], memset)  # sections and tables past the end
    with pytest.raises(elfload.NotLoadable, match="not an x86-64"):
        elfload.load(code[:18] + (183).to_bytes(2, "little") + code[20:], memset)  # EM_AARCH64
    # Every relocation rewritten to R_X86_64_PC32 (type 2): refused, not applied wrongly.
    import struct

    data = bytearray(code)
    (shoff,) = struct.unpack_from("<Q", data, 40)
    (shnum,) = struct.unpack_from("<H", data, 60)
    changed = 0
    for i in range(shnum):
        _, kind, _, _, offset, size, *_ = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64)
        if kind == elfload.SHT_RELA:
            for r in range(size // 24):
                info_at = offset + r * 24 + 8
                (info,) = struct.unpack_from("<Q", data, info_at)
                struct.pack_into("<Q", data, info_at, (info >> 32) << 32 | 2)
                changed += 1
    assert changed
    with pytest.raises(elfload.NotLoadable, match="relocation type 2"):
        elfload.load(bytes(data), memset)
