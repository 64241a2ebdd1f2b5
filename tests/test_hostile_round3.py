"""Reliability round 3 (issue #26): hostile quantized sources, parts, patterns and report files.

One test (or table) per defect class; every fixture is built here, byte by byte where fp8conv's own
writer would refuse to write it. Each test failed on 554170f."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from helpers import load_all, read_json, run_cli
from stfile import entry, write

pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("error::RuntimeWarning")]  # no numpy warning leaks

ROOT = Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)
ROWS = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 96, "up_proj": 96, "down_proj": 64}


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file written by hand (float32 / bf16 / int arrays), independent of fp8conv's writer."""
    tags = {np.dtype(np.float32): "F32", BF16: "BF16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
            np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = entry(tags[array.dtype], list(array.shape), offset, offset + len(data))
        blobs.append(data)
        offset += len(data)
    return write(path, header, b"".join(blobs))


def llama(root: Path, members=tuple(ROWS), cols: int = 64, seed: int = 0, dtype=BF16) -> Path:
    """One Llama decoder layer, one shard, bf16 (different amax per member)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    tensors = {}
    for i, member in enumerate(members):
        kind = "self_attn" if member in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        tensors[f"model.layers.0.{kind}.{member}.weight"] = \
            (rng.standard_normal((ROWS[member], cols)) * 0.02 * (1 + i)).astype(np.float32).astype(dtype)
    save(root / "model.safetensors", tensors)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return root


def tensor_bytes(folder: Path, name: str) -> tuple[Path, int, int]:
    """(file, absolute offset, length) of a tensor, read from the headers by hand."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if name in header:
            begin, end = header[name]["data_offsets"]
            return path, 8 + n + begin, end - begin
    raise KeyError(name)


def patch(folder: Path, name: str, data: bytes, at: int = 0) -> None:
    """Overwrite bytes of tensor `name` in place (same length), and drop the manifest that vouched for it."""
    path, offset, length = tensor_bytes(folder, name)
    assert at + len(data) <= length
    with open(path, "r+b") as handle:
        handle.seek(offset + at)
        handle.write(data)
    (Path(folder) / "fp8conv.manifest.json").unlink(missing_ok=True)


def read_tensor(folder: Path, name: str) -> bytes:
    path, offset, length = tensor_bytes(folder, name)
    return path.read_bytes()[offset : offset + length]


def quantized(tmp_path: Path, *options: str, name: str = "q", **kwargs) -> Path:
    src = llama(tmp_path / f"{name}-src", **kwargs)
    out = tmp_path / name
    run_cli("quantize", src, "-o", out, "-q", *options)
    return out


Q = "model.layers.0.self_attn.q_proj."
K = "model.layers.0.self_attn.k_proj."
V = "model.layers.0.self_attn.v_proj."
F32 = np.float32


def one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("fp8conv: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("fp8conv: error: "), result.stderr
    assert "Traceback" not in result.output and "RuntimeWarning" not in result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def usage_error(result, *needles: str) -> None:
    """Exit 2 with the reason (click's usage format or one fp8conv line; #25 unifies the two)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# ---- class 1: nothing is loaded from a kernel cache ----------------------------------------------------

def test_no_kernel_cache_is_read_or_written(tmp_path):
    """554170f loaded numba's index/pickle files from NUMBA_CACHE_DIR (shared folders included) without an
    owner check. The C kernels of #29 replaced the JIT and its cache: a run imports no numba and touches
    neither NUMBA_CACHE_DIR nor XDG_CACHE_HOME, even when a FIFO waits there (opening it would block)."""
    src = llama(tmp_path / "src")
    cache, xdg = tmp_path / "numba-cache", tmp_path / "xdg"
    for folder in (cache, xdg / "fp8conv" / "numba"):
        folder.mkdir(parents=True)
        os.mkfifo(folder / "planted.nbi")
        (folder / "planted.nbc").write_bytes(b"\x80\x04 not a pickle anyone should load")
    before = {p: p.stat().st_mtime_ns for p in (*cache.rglob("*"), *xdg.rglob("*"))}
    code = ("import sys; from fp8conv.cli import main; sys.argv = ['fp8conv', 'quantize', sys.argv[1], '-o', sys.argv[2], "
            "'--format', 'mxfp8', '-q']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'numba' not in sys.modules, 'numba imported'")
    result = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=float(os.environ.get("FP8CONV_TEST_HANG_S", 300)), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(cache),
                                 "XDG_CACHE_HOME": str(xdg)})
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in (*cache.rglob("*"), *xdg.rglob("*"))} == before


# ---- class 2: bad quantized sources are refused by carry as by dequantize --------------------------

@pytest.mark.parametrize("value", [0.0, float("nan"), -1.0, float("inf")])
def test_nvfp4_bad_global_scale_refused_by_carry_dequantize_and_verify(tmp_path, value):
    out = quantized(tmp_path, "--format", "nvfp4")
    patch(out, Q + "weight_global_scale", np.array([value], F32).tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning in-process fails the test
        for command in (["quantize", out, "-o", tmp_path / "again", "--format", "nvfp4"],
                        ["dequantize", out, "-o", tmp_path / "deq"]):
            result = run_cli(*command, expect=None)
            one_line_error(result, 3, Q + "weight_global_scale", "global scale")
            assert Q + "weight_scale " not in result.stderr  # blamed on the tensor that holds the bad value
            assert not (tmp_path / "again").exists() and not (tmp_path / "deq").exists()
        verified = run_cli("verify", out, expect=1)
        compared = run_cli("verify", out, "--against", tmp_path / "q-src", expect=1)
    for result in (verified, compared):
        assert f"{Q}weight_global_scale holds 1 NVFP4 global scale(s)" in result.stdout
        assert "RuntimeWarning" not in result.output


def test_nvfp4_tiny_global_scale_that_makes_group_scales_inf_refused(tmp_path):
    out = quantized(tmp_path, "--format", "nvfp4")
    patch(out, Q + "weight_global_scale", np.array([1e-45], F32).tobytes())
    result = run_cli("quantize", out, "-o", tmp_path / "again", "--format", "nvfp4", expect=None)
    one_line_error(result, 3, Q + "weight_global_scale", "Inf or 0")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_e8m0_nan_code_refused_by_carry(tmp_path, fmt):
    out = quantized(tmp_path, "--format", fmt)
    patch(out, Q + "weight_scale", b"\xff", at=5)
    for command in (["quantize", out, "-o", tmp_path / "again", "--format", fmt], ["dequantize", out, "-o", tmp_path / "d"]):
        one_line_error(run_cli(*command, expect=None), 3, Q + "weight_scale", "E8M0", "255")
    assert "E8M0 scale code(s) 255" in run_cli("verify", out, expect=1).stdout


@pytest.mark.parametrize("code", [0x7F, 0xFF, 0x80 | 0x38, 0x00])  # NaN, -NaN, -1.0, zero
def test_nvfp4_bad_group_scale_codes_refused_by_carry(tmp_path, code):
    out = quantized(tmp_path, "--format", "nvfp4")
    patch(out, Q + "weight_scale", bytes([code]), at=3)
    one_line_error(run_cli("quantize", out, "-o", tmp_path / "again", "--format", "nvfp4", expect=None), 3,
                   Q + "weight_scale")


@pytest.mark.parametrize("value", [float("nan"), -0.5, 0.0])
def test_fp8_nan_or_negative_scale_refused_by_carry(tmp_path, value):
    out = quantized(tmp_path, "--format", "fp8_e4m3", "--granularity", "channel")
    patch(out, Q + "weight_scale", np.array([value], F32).tobytes(), at=4 * 7)
    result = run_cli("quantize", out, "-o", tmp_path / "again", "--format", "fp8_e4m3", "--granularity", "channel",
                     expect=None)
    one_line_error(result, 3, Q + "weight_scale", "NaN, Inf or <= 0")


def _global_scales(folder: Path, prefixes) -> list[bytes]:
    return [read_tensor(folder, p + "weight_global_scale") for p in prefixes]


def test_nvfp4_fused_partners_with_different_global_scales_are_requantized_together(tmp_path):
    out = quantized(tmp_path, "--format", "nvfp4")
    shared = _global_scales(out, (Q, K, V))
    assert len(set(shared)) == 1  # written as vLLM needs
    patch(out, K + "weight_global_scale", np.array([np.frombuffer(shared[0], F32)[0] * 2], F32).tobytes())
    again = tmp_path / "again"
    result = run_cli("quantize", out, "-o", again, "--format", "nvfp4", "--json")
    paths = {row["name"]: row["path"] for row in json.loads(result.stdout)["tensors"]}
    assert {paths[p + "weight"] for p in (Q, K, V)} == {"requantize"}
    assert paths["model.layers.0.self_attn.o_proj.weight"] == "carry"
    assert len(set(_global_scales(again, (Q, K, V)))) == 1
    verified = run_cli("verify", again, expect=0)
    assert "different NVFP4 global" not in verified.output


def test_partly_nvfp4_source_gets_one_global_scale_per_fused_set(tmp_path):
    """q_proj NVFP4 in the source, k/v bf16: the output's q/k/v share one global scale."""
    full = llama(tmp_path / "src")
    nvfp4 = tmp_path / "nvfp4"
    run_cli("quantize", full, "-o", nvfp4, "--format", "nvfp4", "-q")
    mixed = {n: t for n, t in load_all(nvfp4).items() if not n.startswith((K, V))}
    mixed.update({n: t for n, t in load_all(full).items() if n.startswith((K, V))})
    only_q = tmp_path / "only-q"
    only_q.mkdir()
    save(only_q / "model.safetensors", mixed)
    (only_q / "config.json").write_text((nvfp4 / "config.json").read_text())
    out = tmp_path / "out"
    run_cli("quantize", only_q, "-o", out, "--format", "nvfp4", "-q")
    assert len(set(_global_scales(out, (Q, K, V)))) == 1
    assert "different NVFP4 global" not in run_cli("verify", out, expect=0).output


# ---- class 3: same-format re-quantization is a carry --------------------------------------------

@pytest.mark.parametrize("options", [
    ("--format", "int4", "--granularity", "group", "--group-size", "32", "--asymmetric"),
    ("--format", "int4", "--granularity", "group", "--group-size", "32"),
    ("--format", "int8", "--granularity", "channel", "--asymmetric"),
    ("--format", "int8", "--granularity", "group", "--group-size", "32", "--asymmetric"),
])
def test_same_format_requantization_is_a_carry(tmp_path, options):
    first = quantized(tmp_path, *options, dtype=np.dtype(np.float32))  # float32 scales
    second = tmp_path / "second"
    report = json.loads(run_cli("quantize", first, "-o", second, *options, "--json").stdout)
    weights = {f"model.layers.0.{'self_attn' if m in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{m}.weight": m
               for m in ROWS}
    rows = {row["name"]: row for row in report["tensors"]}
    assert set(rows) == set(weights)  # the weight's own name, never weight_packed
    for name, member in weights.items():
        assert rows[name]["path"] == "carry" and rows[name]["shape"] == [ROWS[member], 64]
        assert rows[name]["rel_rms_error"] == 0
    a, b = load_all(first), load_all(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


# ---- class 4 / 11: zero points ----------------------------------------------------------------------

def int8_asymmetric(root: Path, zero_points: np.ndarray) -> Path:
    """compressed-tensors int-quantized INT8, symmetric: false, unpacked zero points as given."""
    root.mkdir()
    rng = np.random.default_rng(7)
    codes = rng.integers(-128, 128, (8, 16)).astype(np.int8)
    scales = np.full((8, 1), 0.01, F32)
    save(root / "model.safetensors", {"m.weight": codes, "m.weight_scale": scales, "m.weight_zero_point": zero_points})
    args = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel", "dynamic": False}
    (root / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}}}))
    return root


@pytest.mark.parametrize("value, dtype", [(100000, np.int32), (-129, np.int64), (128, np.int32)])
def test_out_of_range_zero_point_refused(tmp_path, value, dtype):
    zp = np.zeros((8, 1), dtype)
    zp[3, 0] = value
    src = int8_asymmetric(tmp_path / "src", zp)
    one_line_error(run_cli("dequantize", src, "-o", tmp_path / "d", expect=None), 3, "m.weight_zero_point",
                   "outside -128..127")
    assert "m.weight_zero_point holds 1 zero point(s) outside -128..127" in run_cli("verify", src, expect=1).stdout
    one_line_error(run_cli("quantize", src, "-o", tmp_path / "q", expect=None), 3, "m.weight_zero_point")
    ok = int8_asymmetric(tmp_path / "ok", np.full((8, 1), 127, dtype))
    run_cli("dequantize", ok, "-o", tmp_path / "d-ok")


def test_symmetric_config_with_zero_points_fails_verify(tmp_path):
    out = quantized(tmp_path, "--format", "int4", "--granularity", "group", "--group-size", "32", "--asymmetric")
    config = read_json(out / "config.json")
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["symmetric"] = True
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    result = run_cli("verify", out, expect=1)
    assert "has a weight_zero_point, but its config group says symmetric: true" in result.stdout
    one_line_error(run_cli("dequantize", out, "-o", tmp_path / "d", expect=None), 3, "symmetric: true")


# ---- class 5: merge ----------------------------------------------------------------------------------

def _parts(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    names = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        name = f"model.layers.{i}.mlp.down_proj.weight"
        save(src / shard, {name: (rng.standard_normal((64, 64)) * 0.02).astype(np.float32).astype(BF16)})
        names[name] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        run_cli("quantize", src, "-o", out, "--partition", part, "-q")
    area = tmp_path / ".out.fp8conv-parts"
    return src, out, area


def test_merge_refuses_a_flipped_byte_in_a_part(tmp_path):
    _, out, area = _parts(tmp_path)
    shard = next((area / "part-00001-of-00002").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    one_line_error(run_cli("merge", out, expect=None), 3, "does not match the sha256 its part recorded", shard.name)
    assert not out.exists()


def test_merge_refuses_a_shard_replaced_by_a_link(tmp_path):
    _, out, area = _parts(tmp_path)
    shard = next((area / "part-00002-of-00002").glob("*.safetensors"))
    kept = tmp_path / "elsewhere.safetensors"
    shard.rename(kept)
    shard.symlink_to(kept)
    one_line_error(run_cli("merge", out, expect=None), 3, "is a link")
    assert not out.exists()


@pytest.mark.parametrize("damage", [
    lambda r: r["stats"].update({next(iter(r["stats"])): {"elements": 1, "bogus": 2}}),
    lambda r: r["stats"].update({next(iter(r["stats"])): {"elements": "many"}}),
    lambda r: r["stats"].update({next(iter(r["stats"])): {"sum_sq_err": -1.0}}),
    lambda r: r["stats"].update({next(iter(r["stats"])): {"elements": 10 ** 400}}),
    lambda r: r.update(partition=[1, 10 ** 12]),
    lambda r: r["files"].update({next(iter(r["files"])): {"sha256": "x", "bytes": 1}}),
    lambda r: r["files"].update({next(iter(r["files"])): {"sha256": "0" * 64, "bytes": -1}}),
])
def test_merge_refuses_damaged_part_records(tmp_path, damage):
    _, out, area = _parts(tmp_path)
    record_path = area / "part-00001-of-00002" / "fp8conv.part.json"
    record = json.loads(record_path.read_text())
    damage(record)
    record_path.write_text(json.dumps(record))
    one_line_error(run_cli("merge", out, expect=None), 3, "part-00001-of-00002")


def test_merge_refuses_nan_in_a_part_record(tmp_path):
    _, out, area = _parts(tmp_path)
    record_path = area / "part-00001-of-00002" / "fp8conv.part.json"
    text = record_path.read_text()
    record = json.loads(text)
    name = next(iter(record["stats"]))
    record["stats"][name]["sum_sq_err"] = 12345.5
    record_path.write_text(json.dumps(record).replace("12345.5", "NaN"))
    one_line_error(run_cli("merge", out, expect=None), 3, "part-00001-of-00002")


@pytest.mark.parametrize("partition", ["1/1000000000", "1/100001", "99999999999999999999/99999999999999999999"])
def test_absurd_partition_count_refused_at_once(tmp_path, partition):
    src = llama(tmp_path / "src")
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--partition", partition, expect=None)
    usage_error(result, "--partition", "at most 100,000")


# ---- class 6: patterns are matched in linear time; --ray fails fast ------------------------------------

def _run_bounded(*args: str, env=None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; the timeout only stops a hang from stalling the suite (no timing asserted)."""
    return subprocess.run([sys.executable, "-m", "fp8conv", *map(str, args)], capture_output=True, text=True,
                          timeout=float(os.environ.get("FP8CONV_TEST_HANG_S", 300)), env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)


def _long_name_checkpoint(root: Path, config_pattern: str) -> Path:
    root.mkdir()
    name = "a" * 3000 + "!.weight"  # re.match / fullmatch start at the a's: (a|aa)+ backtracks exponentially
    w = np.zeros((32, 32), BF16)
    save(root / "model.safetensors", {name: w})
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": [config_pattern],
        "config_groups": {"group_0": {"targets": [config_pattern], "weights": {"num_bits": 8, "type": "float"}}}}}))
    return root


@pytest.mark.parametrize("pattern", ["re:(a|aa)+$", "re:(a+)+b", "re:.*a.*a.*a.*a.*b"])
def test_backtracking_patterns_in_a_config_do_not_hang_inspect_or_verify(tmp_path, pattern):
    src = _long_name_checkpoint(tmp_path / "src", pattern)
    for command in (["inspect", src], ["verify", src]):
        result = _run_bounded(*command)
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--ignore", "--include", "--scheme"])
def test_backtracking_user_patterns_do_not_hang_the_dry_run(tmp_path, option):
    src = tmp_path / "src"
    src.mkdir()
    save(src / "model.safetensors", {"a" * 3000 + ".weight": np.zeros((32, 32), BF16)})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    value = "re:(a|aa)+$" + ("=int8" if option == "--scheme" else "")
    result = _run_bounded("quantize", src, "-o", tmp_path / "out", option, value, "--dry-run")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("pattern", ["re:(a)\\1", "re:(?=a)b", "re:a++", "re:(?:a{100}){1000}"])
def test_patterns_the_linear_matcher_cannot_run_are_usage_errors(tmp_path, pattern):
    src = llama(tmp_path / "src")
    usage_error(run_cli("quantize", src, "-o", tmp_path / "o", "--ignore", pattern, "--dry-run", expect=None), "--ignore")


@pytest.mark.parametrize("address", ["garbage:notaport", "127.0.0.1:1", "host:0", "127.0.0.1:99999", "[::1]"])
def test_ray_bad_or_dead_address_fails_fast_with_one_line(tmp_path, address):
    pytest.importorskip("ray")
    src = llama(tmp_path / "src")
    result = _run_bounded("quantize", src, "-o", tmp_path / "out", "--ray", address, "-q")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("fp8conv: warning:")]
    assert len(lines) == 1 and lines[0].startswith("fp8conv: error: --ray"), result.stderr
    assert not (tmp_path / "out").exists()


# ---- class 7: no internal errors -----------------------------------------------------------------------

@pytest.mark.parametrize("index", ["①", "٣", "9" * 5000, "0" * 30 + "1"])
def test_odd_layer_indices_render_in_the_html_report(tmp_path, index):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    save(src / "model.safetensors", {f"model.layers.{index}.mlp.proj.weight": rng.standard_normal((32, 32)).astype(BF16),
                                     "model.layers.2.mlp.proj.weight": rng.standard_normal((32, 32)).astype(BF16)})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run_cli("quantize", src, "-o", tmp_path / "out", "-q")
    assert "heatmap" in (tmp_path / "out" / "fp8conv.report.html").read_text()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_weights_near_float32_max_do_not_crash_quantize(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    w = np.full((32, 64), 0.01, F32)
    w[0, 0] = 3.0e38
    save(src / "model.safetensors", {"model.layers.0.mlp.proj.weight": w})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning either
        result = run_cli("quantize", src, "-o", tmp_path / "out", "--format", fmt, "-q", expect=None)
    assert result.exit_code in (0, 3), result.output
    if result.exit_code == 3:  # codes that decode to Inf are refused, naming the tensor
        one_line_error(result, 3, "model.layers.0.mlp.proj.weight", fmt)
    else:
        report = read_json(tmp_path / "out" / "fp8conv.report.json")
        assert all(row["rel_rms_error"] is not None for row in report["tensors"])


REPORT_DAMAGE = [
    ("tensors", 0, "rel_rms_error", 1e300), ("tensors", 0, "rel_rms_error", 1e-300), ("tensors", 0, "sqnr_db", 1.7e308),
    ("tensors", 0, "sqnr_db", 10 ** 400), ("tensors", 0, "max_abs_error", "x"), ("tensors", 0, "rel_rms_error", -1),
    ("bytes_before", "BF16", None, "x"), ("bytes_after", "U8", None, 10 ** 400), ("total_bytes_after", None, None, 10 ** 30),
    ("bytes_before", "BF16", None, -(10 ** 19)), ("tensors", 0, "flushed_fraction", 10 ** 19),
    ("compression_ratio", None, None, 10 ** 400), ("tensors", 1, "rel_rms_error", 1e-300),
]


@pytest.mark.parametrize("where", REPORT_DAMAGE, ids=[f"{w[0]}-{w[2]}-{str(w[3])[:8]}" for w in REPORT_DAMAGE])
def test_report_command_on_hostile_numbers(tmp_path, where):
    out = quantized(tmp_path, "--format", "mxfp4")
    path = out / "fp8conv.report.json"
    report = json.loads(path.read_text())
    key, sub, field, value = where
    if field is not None:
        report[key][sub][field] = value
    elif sub is not None:
        report[key][sub] = value
    else:
        report[key] = value
    if where[:3] == ("tensors", 1, "rel_rms_error"):
        report["tensors"][0]["rel_rms_error"] = 1e300
    path.write_text(json.dumps(report))
    result = run_cli("report", out, "--html", tmp_path / "page.html", expect=None)
    assert result.exit_code in (0, 3), result.output
    if result.exit_code == 3:
        one_line_error(result, 3, "fp8conv.report.json")


# ---- class 8: exit codes and messages ------------------------------------------------------------------

def test_invalid_regex_in_a_checkpoint_config_is_an_input_error(tmp_path):
    out = quantized(tmp_path, "--format", "fp8_e4m3")
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = ["re:["]
    (out / "config.json").write_text(json.dumps(config))
    verified = run_cli("verify", out, expect=None)
    one_line_error(verified, 3, "re:[")
    config["quantization_config"]["ignore"] = []
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["targets"] = ["re:("]
    (out / "config.json").write_text(json.dumps(config))
    for command in (["inspect", out], ["dequantize", out, "-o", tmp_path / "d"]):
        one_line_error(run_cli(*command, expect=None), 3, "re:(")


CONFIG_DAMAGE = [
    (("config_groups",), 3.5), (("format",), []), (("config_groups", "group_0", "targets"), "Linear"),
    (("config_groups", "group_0", "weights", "group_size"), 10 ** 400), (("config_groups", "group_0", "weights", "group_size"), 1e300),
    (("config_groups", "group_0", "weights", "block_structure"), "1e999x5"),
    (("config_groups", "group_0", "weights", "block_structure"), [128, 0]),
    (("config_groups", "group_0", "weights", "num_bits"), [4]), (("config_groups", "group_0", "format"), {}),
    (("ignore",), [1, 2]), (("config_groups", "group_0", "weights", "symmetric"), "no"),
]


@pytest.mark.parametrize("where, value", CONFIG_DAMAGE, ids=[f"{'.'.join(w)}={str(v)[:8]}" for w, v in CONFIG_DAMAGE])
def test_hostile_quantization_config_values_are_input_errors(tmp_path, where, value):
    """Every field fp8conv reads from quantization_config is type- and range-checked when the checkpoint opens."""
    out = quantized(tmp_path, "--format", "int4", "--granularity", "group", "--group-size", "32", "--asymmetric")
    config = read_json(out / "config.json")
    target = config["quantization_config"]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (out / "config.json").write_text(json.dumps(config))
    for command in (["inspect", out], ["verify", out], ["dequantize", out, "-o", tmp_path / "d"],
                    ["quantize", out, "-o", tmp_path / "requantized", "--format", "int8"]):
        one_line_error(run_cli(*command, expect=None), 3, "quantization_config")


def test_mx_overflow_dequantized_names_the_weight_without_warnings(tmp_path):
    out = quantized(tmp_path, "--format", "mxfp4")
    # the largest E8M0 exponent under the largest e2m1 code: 6 x 2^127 is Inf in float32
    codes = read_tensor(out, Q + "weight_packed")
    patch(out, Q + "weight_packed", b"\x77" * 16)
    patch(out, Q + "weight_scale", b"\xfe")
    assert codes != read_tensor(out, Q + "weight_packed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_cli("dequantize", out, "-o", tmp_path / "d", "--dtype", "fp32", expect=None)
    one_line_error(result, 3, Q + "weight:", "Inf")
    assert "weight_packed" not in result.stderr and "wider" not in result.stderr
    bf16 = run_cli("dequantize", out, "-o", tmp_path / "d16", "--dtype", "bf16", expect=None)
    one_line_error(bf16, 3, Q + "weight:")


def test_over_long_path_components_get_the_documented_codes(tmp_path):
    src = llama(tmp_path / "src")
    long = tmp_path / ("x" * 300)
    one_line_error(run_cli("quantize", src, "-o", long, "-q", expect=None), 4)
    one_line_error(run_cli("quantize", src, "-o", long / "inner", "-q", expect=None), 4)
    one_line_error(run_cli("quantize", long, "-o", tmp_path / "o", "-q", expect=None), 3)
    one_line_error(run_cli("inspect", long, expect=None), 3)
    one_line_error(run_cli("verify", long, expect=None), 3)
    one_line_error(run_cli("report", long, expect=None), 3)
    one_line_error(run_cli("dequantize", long, "-o", tmp_path / "d", expect=None), 3)


def test_unsearchable_source_folder_is_an_input_error(tmp_path, monkeypatch):
    """A folder without search permission (mode 0644): its entries cannot be stat'ed (EACCES). Root
    ignores the mode bits, so the denial is injected where the kernel would give it."""
    src = llama(tmp_path / "src")
    real_stat = os.stat

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(src) + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    one_line_error(run_cli("quantize", src, "-o", tmp_path / "out", "-q", expect=None), 3, "Permission denied")
    one_line_error(run_cli("inspect", src, expect=None), 3, "Permission denied")


# ---- class 9: cost follows data ---------------------------------------------------------------------

def test_empty_tensors_start_no_jobs(tmp_path, monkeypatch):
    """An empty tensor is a header entry: no job is sent to a worker for it (10^6 of them took > 300 s)."""
    from fp8conv.run import pipeline

    src = tmp_path / "src"
    src.mkdir()
    header = {f"model.layers.{i}.mlp.proj.weight": entry("BF16", [0, 64], 0, 0) for i in range(2000)}
    write(src / "model.safetensors", header)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    seen = []
    interleave = pipeline._interleave

    def counting(jobs_by_shard, sizes):
        seen.extend(job for jobs in jobs_by_shard.values() for job in jobs)
        return interleave(jobs_by_shard, sizes)

    monkeypatch.setattr(pipeline, "_interleave", counting)
    run_cli("quantize", src, "-o", tmp_path / "out", "-q")
    assert seen == []
    assert set(load_all(tmp_path / "out")) == set(header)


def test_planning_reads_each_header_entry_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Cost follows data: the plan of n tensors visits the header entries O(n) times (a per-tensor rebuild
    of the name -> tensor map made 10^5 empty tensors take minutes)."""
    from fp8conv.io import checkpoint as checkpoint_module

    visits = [0]

    class Counting(dict):
        def items(self):
            for item in dict.items(self):
                visits[0] += 1
                yield item

        def __iter__(self):
            for key in dict.__iter__(self):
                visits[0] += 1
                yield key

    read_header = checkpoint_module.read_header

    def counted(path, *args, **kwargs):
        header = read_header(path, *args, **kwargs)
        object.__setattr__(header, "tensors", Counting(header.tensors))  # Header is frozen
        return header

    monkeypatch.setattr(checkpoint_module, "read_header", counted)
    n = 3000
    src = tmp_path / "src"
    src.mkdir()
    write(src / "model.safetensors", {f"model.layers.{i}.mlp.proj.weight": entry("BF16", [0, 64], 0, 0) for i in range(n)})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run_cli("quantize", src, "-o", tmp_path / "out", "-q")
    assert visits[0] < 50 * n, visits[0]  # a rebuild per tensor: n^2 = 9 million


def test_heatmap_cost_is_linear_in_cells(monkeypatch):
    """The heatmap looked each cell's row up with list.index (quadratic: 100k one-per-layer tensors took
    minutes). Count the equality tests on row keys: a key part that counts them replaces the row kind."""
    from fp8conv.report import html_page as html_report

    class Counted(int):
        compared = 0

        def __eq__(self, other):
            Counted.compared += 1
            return int.__eq__(self, other)

        __hash__ = int.__hash__

    heat_cell = html_report.heat_cell

    def counted(name):
        key, module, member = heat_cell(name)
        return (Counted(key[0]), *key[1:]), module, member

    monkeypatch.setattr(html_report, "heat_cell", counted)
    n = 3000
    rows = [{"name": f"model.layers.{i}.mlp.proj.weight", "rel_rms_error": 0.01 + i * 1e-6} for i in range(n)]
    page = html_report._heatmap_section(rows)
    assert page.count('class="cell"') == n
    assert Counted.compared < 40 * n  # sorting: n log n; list.index per cell: n^2 / 2 = 4.5 million


# ---- class 10: patterns that match nothing -----------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--ignore", "*.q_porj"), ("--include", "re:lm_haed"),
                                           ("--scheme", "re:.*gate_pro=int8"), ("--ignore", "re:model\\.layer\\.0\\..*")])
def test_patterns_that_match_nothing_are_warned_about(tmp_path, option, value):
    src = llama(tmp_path / "src")
    result = run_cli("quantize", src, "-o", tmp_path / "out", option, value, "-q")
    pattern = value.split("=")[0] if option == "--scheme" else value
    assert f"warning: {option} '{pattern}' matches no tensor or module of SRC" in result.stderr
    used = run_cli("quantize", src, "-o", tmp_path / "out2", "--ignore", "*.o_proj", "-q")
    assert "matches no tensor" not in used.stderr


# ---- class 11: README promises --------------------------------------------------------------------------

def test_readme_describes_the_fp8_without_scale_refusal(tmp_path):
    readme = " ".join(" ".join(p.read_text() for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))).split())
    assert "tensors already in FP8: copied byte-for-byte" not in readme
    assert "one without a scale tensor is refused (exit 3)" in readme
    src = tmp_path / "src"
    src.mkdir()
    codes = np.zeros((32, 32), np.uint8)
    write(src / "model.safetensors", {"model.layers.0.mlp.proj.weight": entry("F8_E4M3", [32, 32], 0, codes.nbytes)},
          codes.tobytes())
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(run_cli("quantize", src, "-o", tmp_path / "out", "-q", expect=None), 3, "model.layers.0.mlp.proj.weight")


# ---- the linear-time matcher means what re means --------------------------------------------------------

@pytest.mark.unit
def test_safe_regex_agrees_with_re_on_random_patterns():
    """Python's re is the oracle: 400 random patterns (groups, alternation, classes, greedy and lazy repeats,
    anchors, inline flags) x 30 random names x match / fullmatch / search."""
    import random
    import re

    from fp8conv.io.safe_regex import PatternError, compile_pattern

    rng = random.Random(7)
    atoms = ["a", "b", ".", "\\.", "[ab]", "[^a]", "\\d", "\\w", "\\s", "x", "(a|b)", "(?:ab|a)", "[a-c]", "\\D",
             "(?i:A)", "$", "^", "\\Z", "\\A"]
    quantifiers = ["", "*", "+", "?", "*?", "+?", "{2}", "{1,3}", "{0,2}?"]

    def pattern(depth=0):
        out = ""
        for _ in range(rng.randint(1, 4)):
            if depth < 2 and rng.random() < 0.2:
                inner = pattern(depth + 1) + ("|" + pattern(depth + 1) if rng.random() < 0.4 else "")
                atom = "(" + ("?:" if rng.random() < 0.5 else "") + inner + ")"
            else:
                atom = rng.choice(atoms)
            out += atom + (rng.choice(quantifiers) if atom not in ("$", "^", "\\Z", "\\A") else "")
        return out

    checked = 0
    for _ in range(400):
        text = pattern()
        try:
            oracle = re.compile(text)
        except re.error:
            continue
        try:
            ours = compile_pattern(text)
        except PatternError:
            continue
        checked += 1
        for _ in range(30):
            name = "".join(rng.choice("ab.x1 \nAB_") for _ in range(rng.randint(0, 7)))
            for mode in ("match", "fullmatch", "search"):
                assert (getattr(oracle, mode)(name) is not None) == getattr(ours, mode)(name), (text, name, mode)
    assert checked > 300
