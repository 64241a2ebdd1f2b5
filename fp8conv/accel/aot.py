"""The compiled kernel's machine code, cached on disk and loaded without numba.

Loading a kernel from numba's own cache costs each process about 0.8 CPU s (numba's import, its typing
and target registries, its runtime) for 40 KB of machine code: a sixth of a 2-core conversion of a
2 GB checkpoint, paid again by every worker. So numba compiles the kernel's C entry
(`_numba_kernels.native_entry`) once; its LLVM IR, with every function but the entry made internal and
optimised again (the exception paths of numba's calling convention then fold away: nothing in the
kernel can raise), is emitted as an object file for this CPU and cached; a process maps it into
executable memory (elfload.py on x86-64, about 1 ms; elsewhere llvmlite's MCJIT, about 0.05 s) and
calls it through ctypes (which releases the GIL).

The object is built only when its IR calls nothing outside itself but LLVM intrinsics and
memset / memcpy / memmove, so it needs neither numba's runtime nor its helpers. A cache file is
used only when it is ours (owner, not writable by others), its key matches (kernel source, this
file's build version, numba and llvmlite versions, machine, the CPU's model and feature flags) and
its checksum holds; anything else is rebuilt. On any failure `entry()` returns None and compiled.py
runs numba's own dispatcher (same numerics, bit for bit: tests/test_kernels.py runs both).
FP8CONV_NO_AOT=1 turns this off.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import kcache

BUILD_VERSION = 1  # bump when the build below changes what an object holds
MAGIC = b"fp8conv-aot\n"
ALLOWED_EXTERNALS = {"memset", "memcpy", "memmove"}
_STATUS_OK, _STATUS_NONFINITE, _STATUS_SCRATCH, _STATUS_ARGUMENTS = 0, 1, 2, 3  # _numba_kernels.NATIVE_*

_lock = threading.Lock()
_loaded: dict = {}  # bf16 (True) / float32 (False) source: its NativeKernel, or None, once tried in this process


class Unavailable(Exception):
    """The ahead-compiled kernel cannot be built or loaded here (compiled.py falls back to numba)."""


def enabled() -> bool:
    return not os.environ.get("FP8CONV_NO_AOT") and importlib.util.find_spec("llvmlite") is not None


def entry(bf16: bool = True) -> "NativeKernel | None":
    """The loaded kernel for bf16 (uint16 bits) or float32 sources, built into the cache first if
    missing; None where it cannot be had."""
    bf16 = bool(bf16)
    if bf16 in _loaded:
        return _loaded[bf16]
    with _lock:
        if bf16 not in _loaded:
            kernel = None
            if enabled():
                try:
                    kernel = load(kcache.kernel_cache_dir(), bf16)
                except Exception:  # noqa: BLE001 - any failure here only costs speed (tests require it loads)
                    kernel = None
            _loaded[bf16] = kernel
    return _loaded[bf16]


def _llvm():
    import llvmlite.binding as ll

    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    return ll


def _target_machine(ll):
    target = ll.Target.from_triple(ll.get_process_triple())
    return target.create_target_machine(cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(),
                                        opt=3, jit=True)


def cache_key(bf16: bool) -> dict:
    """What a cached object depends on (without loading LLVM: the CPU as the kernel describes it)."""
    source = importlib.util.find_spec("fp8conv.accel._numba_kernels").origin
    return {"build": BUILD_VERSION, "source_type": "bf16" if bf16 else "float32",
            "source": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
            "numba": _version_of("numba"), "llvmlite": _version_of("llvmlite"), "machine": os.uname().machine,
            "cpu": _cpu_identity()}


def _cpu_identity() -> str:
    """The CPU's model and feature flags (/proc/cpuinfo's first processor): code built for one CPU is
    never run on another whose flags differ; LLVM's own names where /proc/cpuinfo is missing."""
    try:
        lines = []
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:  # the first processor's block ends at the first blank line
                if not line.strip():
                    break
                if line.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features", "CPU part"):
                    lines.append(line.rstrip("\n"))
        if lines:
            return "cpuinfo:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()
    except OSError:
        pass
    ll = _llvm()
    return f"llvm:{ll.get_process_triple()}:{ll.get_host_cpu_name()}:{ll.get_host_cpu_features().flatten()}"


def _version_of(package: str) -> str:
    """A package's version without importing it (numba: 0.35 s) or scanning the installed
    distributions (importlib.metadata: ~25 ms): the digest of its _version.py, which holds it."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        stamp = Path(folder) / "_version.py"
        if stamp.is_file():
            return "sha256:" + hashlib.sha256(stamp.read_bytes()).hexdigest()
    from importlib import metadata

    return metadata.version(package)


def cache_file(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"fp8conv-kernel-{digest[:24]}.o"


def load(folder: Path | None, bf16: bool) -> "NativeKernel":
    """Load the kernel for one source type from `folder`'s cache, building it there first when missing
    or unusable."""
    if folder is None:
        raise Unavailable("no writable cache folder")
    key = cache_key(bf16)
    path = cache_file(folder, key)
    found = read(path, key)
    if found is None:
        with _build_lock(folder):
            found = read(path, key)  # another process may have built it while we waited
            if found is None:
                found = build(_llvm(), bf16)
                write(path, key, *found)
    symbol, code = found
    return NativeKernel(map_object(symbol, code), bf16)


def map_object(symbol: str, code: bytes, loader: str = "auto"):
    """(keep-alive handle, address of `symbol`) of the object in executable memory: by elfload
    (x86-64, no LLVM: about 1 ms) where it can, else by llvmlite's MCJIT (loader "elf" / "llvm"
    forces one)."""
    if loader in ("auto", "elf"):
        from . import elfload

        try:
            loaded = elfload.load(code, {name: elfload.libc_address(name) for name in ALLOWED_EXTERNALS})
            return loaded, loaded.address(symbol)
        except elfload.NotLoadable:
            if loader == "elf":
                raise
    ll = _llvm()
    engine = ll.create_mcjit_compiler(ll.parse_assembly(""), _target_machine(ll))
    engine.add_object_file(ll.ObjectFileRef.from_data(code))
    engine.finalize_object()
    address = engine.get_function_address(symbol)
    if not address:
        raise Unavailable(f"{symbol} is not in the cached object")
    return engine, address


class _build_lock:
    """An exclusive flock on the cache folder's lock file: one process builds, the others wait."""

    def __init__(self, folder: Path):
        self.path = folder / "fp8conv-kernel.lock"

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise Unavailable(f"{self.path}: {exc.strerror}") from exc
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def read(path: Path, key: dict) -> tuple[str, bytes] | None:
    """(entry symbol, object code) of a cache file that is ours, closed to others and intact; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o022 or not (info.st_mode & 0o170000 == 0o100000):
            return None
        data = fh.read(16 << 20)
    if not data.startswith(MAGIC):
        return None
    header, _, code = data[len(MAGIC):].partition(b"\n")
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    if (not isinstance(meta, dict) or meta.get("key") != key or meta.get("size") != len(code)
            or meta.get("sha256") != hashlib.sha256(code).hexdigest() or not isinstance(meta.get("symbol"), str)):
        return None
    return meta["symbol"], code


def write(path: Path, key: dict, symbol: str, code: bytes) -> None:
    """Put an object into the cache atomically (a reader sees the whole file or none)."""
    meta = {"key": key, "symbol": symbol, "size": len(code), "sha256": hashlib.sha256(code).hexdigest()}
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".fp8conv-kernel-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n" + code)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError:
        pass  # a cache we cannot write only costs the next process a build


def build(ll, bf16: bool) -> tuple[str, bytes]:
    """(entry symbol, object code) of _numba_kernels.native_entry for one source type and this CPU
    (imports numba)."""
    try:
        kcache.load_numba()
        from . import _numba_kernels

        native = _numba_kernels.native_entry(bf16)
    except Exception as exc:
        raise Unavailable(f"numba: {exc}") from exc
    module = ll.parse_assembly(native.inspect_llvm())
    symbol = native.native_name
    for function in module.functions:
        if not function.is_declaration and function.name != symbol:
            function.linkage = ll.Linkage.internal
    machine = _target_machine(ll)
    builder = ll.create_pass_builder(machine, ll.PipelineTuningOptions(speed_level=3))
    builder.getModulePassManager().run(module, builder)
    module.verify()
    outside = external_symbols(module)
    if outside:
        raise Unavailable(f"the kernel still refers to {', '.join(outside[:5])}")
    return symbol, machine.emit_object(module)


def external_symbols(module) -> list[str]:
    """What an LLVM module needs from outside itself, beyond LLVM intrinsics and ALLOWED_EXTERNALS."""
    functions = {f.name for f in module.functions if f.is_declaration and not f.name.startswith("llvm.")}
    return sorted(functions - ALLOWED_EXTERNALS) + sorted(g.name for g in module.global_variables if g.is_declaration)


# _numba_kernels.native_signature() in ctypes (it cannot be read here without importing numba;
# tests/test_aot.py checks the two agree).
_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
         ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)


_SCRATCH_TYPES = (np.float64, np.float32, np.uint32)


class NativeKernel:
    """_numba_kernels.quantize_chunk's arguments in, its answer out, through the loaded machine code."""

    def __init__(self, mapped: tuple, bf16: bool):
        self.bf16 = bf16
        self._code, address = mapped  # the handle keeps the code mapped
        self._function = ctypes.CFUNCTYPE(ctypes.c_int32, *_ARGS)(address)
        self._scratch = threading.local()

    def __call__(self, src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats,
                 given) -> bool:
        rows, cols = src.shape
        _check(src, np.uint16 if self.bf16 else np.float32, (rows, cols), "src")
        _check(codes, np.uint8, (rows, cols), "codes")
        _check(scales, np.float32, scales.shape, "scales")
        _check(stats, np.float64, (5,), "stats")
        need = np.zeros(3, np.int64)
        while True:
            f64, f32, u32 = self._buffers(need)
            status = self._function(src.ctypes.data, int(bool(is_bf16)), rows, cols, tile_rows, tile_cols,
                                    float(fixed_scale), float(qmax), kind, codes.ctypes.data, scales.ctypes.data,
                                    scales.shape[0], scales.shape[1], stats.ctypes.data, int(given),
                                    f64.ctypes.data, f64.size, f32.ctypes.data, f32.size, u32.ctypes.data,
                                    u32.size, need.ctypes.data)
            if status != _STATUS_SCRATCH:
                break
        if status == _STATUS_ARGUMENTS:
            raise ValueError(f"compiled kernel: tiles {tile_rows}x{tile_cols} and scale grid {scales.shape} "
                             f"do not fit a {rows}x{cols} chunk")
        return status == _STATUS_NONFINITE

    def _buffers(self, need: np.ndarray):
        """This thread's scratch arrays, grown to `need` (element counts) where smaller."""
        held = getattr(self._scratch, "arrays", None) or tuple(np.empty(1, t) for t in _SCRATCH_TYPES)
        if any(a.size < n for a, n in zip(held, need)):
            held = tuple(a if a.size >= n else np.empty(int(n), t) for a, n, t in zip(held, need, _SCRATCH_TYPES))
        self._scratch.arrays = held
        return held


def _check(array: np.ndarray, dtype, shape, what: str) -> None:
    if (array.dtype != dtype or array.shape != tuple(shape) or not array.flags.c_contiguous
            or (what != "src" and not array.flags.writeable)):
        raise ValueError(f"compiled kernel: {what} must be a C-contiguous {np.dtype(dtype).name} array of shape "
                         f"{tuple(shape)}, not {array.dtype.name} {array.shape}")

