"""Hostile input, interrupted runs and failing disks: one-line errors, no half-written output."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stfile
from conftest import tree_digest
from fp8conv.run import jobs
from fp8conv.io.checkpoint import open_checkpoint
from fp8conv.errors import InputError
from helpers import load_all, read_json, run_cli

ROOT = Path(__file__).resolve().parent.parent


def bf16_bytes(rng, shape) -> bytes:
    return (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16).tobytes()


def sharded_model(root: Path, shards: int = 4, rows: int = 1024, cols: int = 1024) -> Path:
    """A bf16 model of `shards` shards with an index, one 2-D weight and one norm per shard."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        w, n = bf16_bytes(rng, (rows, cols)), bf16_bytes(rng, (cols,))
        stfile.write(root / name, {f"layers.{i}.proj.weight": stfile.entry("BF16", [rows, cols], 0, len(w)),
                                   f"layers.{i}.norm.weight": stfile.entry("BF16", [cols], len(w), len(w) + len(n))}, w + n)
        weight_map.update({f"layers.{i}.proj.weight": name, f"layers.{i}.norm.weight": name})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} exists"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"temporaries left: {leftovers}"


# ---- hostile indexes ----------------------------------------------------------------------------

def index_case(root: Path, case: str) -> str:
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    if case == "invalid json":
        index_path.write_text("{not json")
        return "not readable JSON"
    if case == "no weight_map":
        index_path.write_text(json.dumps({"metadata": {}}))
        return "has no weight_map object"
    if case == "missing shard":
        (root / "model-00002-of-00004.safetensors").unlink()
        return "names shard model-00002-of-00004.safetensors, which is missing"
    if case == "listed but absent":
        wm["layers.0.ghost.weight"] = "model-00001-of-00004.safetensors"
        index_path.write_text(json.dumps(index))
        return "tensor layers.0.ghost.weight is missing from shard model-00001-of-00004.safetensors"
    if case == "stored but unlisted":
        del wm["layers.0.norm.weight"]
        index_path.write_text(json.dumps(index))
        return "tensor layers.0.norm.weight is not listed in model.safetensors.index.json"
    if case == "listed in another shard":
        wm["layers.0.norm.weight"] = "model-00002-of-00004.safetensors"
        index_path.write_text(json.dumps(index))
        return "is listed in model-00002-of-00004.safetensors but stored in model-00001-of-00004.safetensors"
    if case == "tensor in two shards":
        data = (root / "model-00001-of-00004.safetensors").read_bytes()
        (root / "model-00002-of-00004.safetensors").write_bytes(data)
        return "is stored twice"
    if case == "parent path":
        wm["layers.0.norm.weight"] = "../x.safetensors"
        index_path.write_text(json.dumps(index))
        return "tries to leave the checkpoint folder"
    if case == "absolute path":
        wm["layers.0.norm.weight"] = "/etc/x.safetensors"
        index_path.write_text(json.dumps(index))
        return "tries to leave the checkpoint folder"
    raise AssertionError(case)


INDEX_CASES = ["invalid json", "no weight_map", "missing shard", "listed but absent", "stored but unlisted",
               "listed in another shard", "tensor in two shards", "parent path", "absolute path"]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_hostile_index_refused(tmp_path, case):
    src = sharded_model(tmp_path / "src", rows=16, cols=16)
    message = index_case(src, case)
    before = tree_digest(src)
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, expect=3)
    assert result.stderr.startswith("fp8conv: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert_no_output(out)
    assert tree_digest(src) == before


@pytest.mark.parametrize("case", sorted(__import__("test_safetensors_io").HOSTILE))
def test_hostile_shard_through_cli(tmp_path, case):
    from test_safetensors_io import HOSTILE

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(HOSTILE[case][0])
    before = tree_digest(src)
    result = run_cli("quantize", src, "-o", tmp_path / "out", expect=3)
    assert result.stderr.count("\n") == 1 and str(src / "model.safetensors") in result.stderr
    assert HOSTILE[case][2] in result.stderr
    assert_no_output(tmp_path / "out")
    assert tree_digest(src) == before


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12))
def test_fuzz_index_never_crashes(tmp_path_factory, index):
    root = tmp_path_factory.mktemp("idx")
    stfile.write(root / "model.safetensors", {"a.weight": stfile.entry("F32", [1], 0, 4)}, b"\0" * 4)
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        open_checkpoint(root)
    except InputError as exc:
        assert "\n" not in str(exc)


# ---- weights ------------------------------------------------------------------------------------

def nonfinite_model(root: Path) -> Path:
    root.mkdir()
    w = np.full((4, 8), 0.5, np.float32)
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -np.inf
    stfile.write(root / "model.safetensors", {"bad.weight": stfile.entry("F32", [4, 8], 0, w.nbytes)}, w.tobytes())
    return root


def test_nonfinite_weights_refused(tmp_path):
    src = nonfinite_model(tmp_path / "src")
    result = run_cli("quantize", src, "-o", tmp_path / "out", expect=3)
    assert "tensor bad.weight holds 1 NaN and 2 Inf values" in result.stderr
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("granularity", ["block", "tensor", "channel"])
def test_nonfinite_allowed_maps_as_documented(tmp_path, granularity):
    src = nonfinite_model(tmp_path / "src")
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out, "--allow-nonfinite", "--granularity", granularity)
    codes = load_all(out)["bad.weight"].astype(np.float32)
    assert codes[0, 0] == 0 and codes[1, 1] == 448 and codes[2, 2] == -448
    assert codes[3, 3] == 448  # 0.5 is the finite amax of its tile
    assert read_json(out / "fp8conv.report.json")["tensors"][0]["nonfinite_values"] == 3


def test_empty_zero_size_and_scalar_tensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    header = {"empty.weight": stfile.entry("BF16", [0, 16], 0, 0), "zero.weight": stfile.entry("F32", [16, 0], 0, 0),
              "scalar": stfile.entry("F32", [], 0, 4), "w.weight": stfile.entry("F32", [2, 2], 4, 20)}
    stfile.write(src / "model.safetensors", header, np.arange(5, dtype=np.float32).tobytes())
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out)
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest["empty.weight"]["reason"] == "empty tensor"
    assert manifest["scalar"]["reason"] == "scalar tensor"
    assert manifest["w.weight"]["decision"] == "quantize"
    assert load_all(out)["scalar"] == np.float32(0)


@pytest.mark.parametrize("config", [None, "{broken"])
def test_missing_or_broken_config_still_converts(tmp_path, config):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT / "sample_models" / "bert-tiny-fp32", src)
    if config is None:
        (src / "config.json").unlink()
    else:
        (src / "config.json").write_text(config)
    result = run_cli("quantize", src, "-o", tmp_path / "out")
    assert "quantization_config NOT written" in result.stderr
    assert (tmp_path / "out" / "fp8conv.manifest.json").exists()


def test_hf_cache_symlinks_are_followed(sample, tmp_path):
    src = sample("llama-tiny")
    cache = tmp_path / "hub" / "models--x--llama"
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = cache / "blobs" / f"sha{i}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    out = tmp_path / "out"
    run_cli("quantize", snapshot, "-o", out)
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    run_cli("verify", out, "--against", snapshot, "--engine", "transformers")  # vLLM refuses 704-row gate_proj in block 128


# ---- output faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only or not writable")])
def test_write_failure_leaves_nothing(sample, tmp_path, monkeypatch, code, reason):
    src = sample("llama-tiny")
    calls = {"n": 0}
    real = jobs.write_at

    def failing(fd, offset, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(code, os.strerror(code))
        real(fd, offset, data)

    monkeypatch.setattr(jobs, "write_at", failing)
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, "--workers", "1", expect=4)
    assert reason in result.stderr and "partial output removed" in result.stderr
    assert_no_output(out)


def test_out_equal_to_source_refused(sample):
    src = sample("llama-tiny")
    assert "overlaps the source" in run_cli("quantize", src, "-o", src, "--overwrite", expect=4).stderr


def test_source_inside_out_refused(sample, tmp_path):
    src = sample("llama-tiny")
    result = run_cli("quantize", src, "-o", tmp_path, "--overwrite", expect=4)
    assert "overlaps the source" in result.stderr


# ---- signals and resume (real processes) --------------------------------------------------------

HOOKED_CLI = """
import os, signal, sys, time
from fp8conv.io import outdir
sig = getattr(signal, sys.argv[1])
# As from a terminal: a shell running the suite in the background hands its children SIGINT ignored,
# which Python (and fp8conv) rightly honour; this test is about what an interactive Ctrl-C does.
signal.signal(signal.SIGINT, signal.default_int_handler)
original = outdir.Staging.mark_finished
import threading
first = threading.Lock()
def mark_then_signal(self, *args, **kwargs):
    original(self, *args, **kwargs)
    if first.acquire(blocking=False):  # shards finish on several helper threads: signal once, after the first
        os.kill(os.getpid(), sig)
        time.sleep(1)  # journaling runs on a helper thread: hold it so the main thread sees the signal mid-run
outdir.Staging.mark_finished = mark_then_signal
from fp8conv.cli import main
sys.argv = ["fp8conv"] + sys.argv[2:]
main()
"""


def run_hooked(signal_name: str, *args) -> subprocess.CompletedProcess:
    """Run the CLI in a real process that sends itself `signal_name` right after the first shard is journaled."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", HOOKED_CLI, signal_name, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    src = sharded_model(tmp_path / "src")
    before = tree_digest(src)
    killed = run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".out.fp8conv-partial"
    assert not (tmp_path / "out").exists() and partial.is_dir()
    refused = run_cli("quantize", src, "-o", tmp_path / "out", expect=4)
    assert "pass --resume to continue it" in refused.stderr
    resumed = run_cli("quantize", src, "-o", tmp_path / "out", "--resume", "--workers", "2")
    assert re.search(r"resumed: reused [1-9]\d* finished shard\(s\), sha256-checked", resumed.stderr)  # those journaled
    run_cli("quantize", src, "-o", tmp_path / "clean", "--workers", "1")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")
    assert not partial.exists() and tree_digest(src) == before


def test_resume_redoes_a_corrupted_finished_shard(tmp_path):
    src = sharded_model(tmp_path / "src", shards=2, rows=64, cols=64)
    run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    partial = tmp_path / ".out.fp8conv-partial"
    finished = json.loads((partial / "fp8conv.journal.json").read_text())["finished_shards"]
    assert finished
    for name in finished:  # shards finish on threads of their own: whichever were journaled
        shard = partial / name
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    resumed = run_cli("quantize", src, "-o", tmp_path / "out", "--resume")
    assert "reused" not in resumed.stderr
    run_cli("quantize", src, "-o", tmp_path / "clean")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")


@pytest.mark.parametrize("signal_name,code,word", [("SIGINT", 130, "interrupted (SIGINT)"),
                                                    ("SIGTERM", 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_signals_remove_temporaries(tmp_path, signal_name, code, word, workers):
    src = sharded_model(tmp_path / "src", rows=256, cols=256)
    result = run_hooked(signal_name, "quantize", src, "-o", tmp_path / "out", "--workers", workers, "-q")
    assert result.returncode == code, result.stderr
    assert result.stderr == f"fp8conv: error: {word}; partial output removed\n"
    assert_no_output(tmp_path / "out")


def test_close_handles_never_closes_a_descriptor_twice(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside close_handles (SIGINT lands between two bytecodes), then the
    cleanup's second close_handles: each descriptor is closed once. A second close of a number that
    the writeback or hashing threads have opened since would close their file (seen as a rare
    'Bad file descriptor' instead of the interrupt's exit 130)."""
    fds = [os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY) for name in ("a", "b", "c")]
    closed: list[int] = []

    def interrupted_close(fd: int) -> None:
        os.close(fd)  # raises EBADF if this descriptor was closed before
        closed.append(fd)
        if len(closed) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "_writers", {str(tmp_path / n): fd for n, fd in zip("abc", fds)})
    monkeypatch.setattr(jobs, "os", type("Os", (), {"close": staticmethod(interrupted_close)}))
    with pytest.raises(KeyboardInterrupt):
        jobs.close_handles()
    jobs.close_handles()
    assert sorted(closed) == sorted(fds) and not jobs._writers
