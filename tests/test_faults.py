"""Round 2 of hostile conditions (issue #16): dying workers, concurrent writers, links into the
output, closed pipes, extreme values. Process-level cases run the real CLI in a subprocess."""
from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import stfile
from conftest import tree_digest
from helpers import load_all, read_json, run_cli
from test_reliability import assert_no_output, sharded_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (python3 -m fp8conv)."""
    return subprocess.run([sys.executable, "-m", "fp8conv", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kwargs)


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith("fp8conv: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---- a worker that dies ---------------------------------------------------------------------------

KILL_WORKER = """
import os, signal, sys, ctypes
from fp8conv.run import pipeline
how = sys.argv[1]
real = pipeline.run_job
def dying(job):
    if job.name.startswith("layers.2."):
        if how == "segfault":
            ctypes.string_at(0)  # a real segmentation fault
        os.kill(os.getpid(), getattr(signal, how))
    return real(job)
pipeline.run_job = dying
from fp8conv.cli import main
sys.argv = ["fp8conv"] + sys.argv[2:]
main()
"""


@pytest.mark.parametrize("how,word", [("SIGKILL", "killed by SIGKILL"), ("SIGTERM", "killed by SIGTERM"),
                                      ("segfault", "killed by SIGSEGV")])
def test_dead_worker_is_noticed_cleaned_up_and_named(tmp_path, how, word):
    src = sharded_model(tmp_path / "src", rows=64, cols=64)
    before = tree_digest(src)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", KILL_WORKER, how, "quantize", src, "-o", tmp_path / "out",
                             "--workers", "2", "-q"], capture_output=True, text=True, env=ENV, timeout=120)
    assert time.monotonic() - started < 30
    one_line_error(result, 71, "a worker process (pid ", word, "partial output removed")
    assert_no_output(tmp_path / "out")
    assert tree_digest(src) == before


def test_runner_reraises_worker_errors_and_stops_the_rest():
    from fp8conv.run.runner import run_parallel

    seen = []
    with pytest.raises(ZeroDivisionError):
        run_parallel(lambda x: 1 // x, [1, 2, 0, 3, 4], 2, lambda i, v: seen.append(v))
    results = {}
    run_parallel(lambda x: x * x, list(range(20)), 3, results.__setitem__)
    assert results == {i: i * i for i in range(20)}


STARTING_WORKER_SIGNALLED = """
import os, signal, sys, time
from fp8conv.errors import WorkerDied
from fp8conv.run.runner import run_parallel

def parent_handler(signum, frame):  # what the CLI installs: a forked worker must not run it
    raise RuntimeError("the parent's SIGTERM handler ran in a worker")

signal.signal(signal.SIGTERM, parent_handler)

def starting():
    os.kill(os.getpid(), signal.SIGTERM)  # as the parent's _stop does while this worker still starts
    time.sleep(10)

try:
    run_parallel(abs, [1], 1, lambda index, value: None, initializer=starting)
except WorkerDied as exc:
    print(exc)
"""


def test_worker_signalled_while_starting_dies_by_the_signal_quietly():
    """A forked worker does not inherit the parent's Python SIGTERM handler (it would raise in the
    worker and print a traceback): signalled before its first job, it dies by SIGTERM, silently."""
    result = subprocess.run([sys.executable, "-c", STARTING_WORKER_SIGNALLED], capture_output=True, text=True,
                            env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "killed by SIGTERM" in result.stdout, result.stdout


# ---- one writer per OUT ---------------------------------------------------------------------------

# The first writer stops after journaling its first shard (holding OUT's lock), says so on a pipe and
# waits on another for the test's go: explicit synchronisation, whatever the machine's speed.
HELD_RUN = """
import os, sys
from fp8conv.io import outdir
original = outdir.Staging.mark_finished
def held(self, *args, **kwargs):
    original(self, *args, **kwargs)
    if not getattr(held, "told", False):
        held.told = True
        os.write(int(os.environ["FP8CONV_TEST_READY_FD"]), b"journaled\\n")
        os.read(int(os.environ["FP8CONV_TEST_GO_FD"]), 1)
outdir.Staging.mark_finished = held
from fp8conv.cli import main
sys.argv = ["fp8conv"] + sys.argv[1:]
main()
"""

# Held jobs (in the workers, which inherit the patch at fork): each waits on a pipe the test holds, so
# the workers stay alive until the test closes it, whatever the kernel's start-up costs.
HELD_JOBS = """
import os, sys
from fp8conv.run import pipeline
original = pipeline.run_job
def held(job):
    os.read(int(os.environ["FP8CONV_TEST_GO_FD"]), 1)
    return original(job)
pipeline.run_job = held
from fp8conv.cli import main
sys.argv = ["fp8conv"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("second", [["--resume"], ["--overwrite"], []])
def test_second_writer_on_the_same_out_is_refused(tmp_path, second):
    src = sharded_model(tmp_path / "src", shards=6, rows=64, cols=64)
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    env = {**ENV, "FP8CONV_TEST_READY_FD": str(ready_w), "FP8CONV_TEST_GO_FD": str(go_r)}
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, "quantize", str(src), "-o", str(out), "--workers", "1",
                              "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             pass_fds=(ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    try:
        readable, _, _ = select.select([ready_r], [], [], 120)
        # EOF here (b"") means the first run ended before journaling a shard: its stderr says why.
        assert readable and os.read(ready_r, 64) == b"journaled\n", first.stderr.read() if first.poll() is not None else ""
        result = cli("quantize", src, "-o", out, *second, "-q")
        one_line_error(result, 4, f"another fp8conv run (pid {first.pid}) is writing", "fp8conv-lock")
        os.write(go_w, b"g")
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
        os.close(ready_r)
        os.close(go_w)
    assert first.returncode == 0, stderr
    clean = tmp_path / "clean"
    run_cli("quantize", src, "-o", clean, "--workers", "1", "-q")
    assert tree_digest(out) == tree_digest(clean)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # lock file and staging gone


def test_lock_left_by_a_killed_run_does_not_block(tmp_path):
    """flock dies with its process: a SIGKILLed run's lock file is stale, not held."""
    from test_reliability import run_hooked

    src = sharded_model(tmp_path / "src", shards=2, rows=64, cols=64)
    killed = run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    assert killed.returncode == -signal.SIGKILL and (tmp_path / ".out.fp8conv-lock").exists()
    assert "resumed" in cli("quantize", src, "-o", tmp_path / "out", "--resume", "-q").stderr
    assert not (tmp_path / ".out.fp8conv-lock").exists()


# ---- never delete or truncate what a source file resolves to -------------------------------------

def test_overwrite_refuses_sources_that_link_into_out(sample, tmp_path):
    real = sample("llama-tiny")
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "linked"
    src.mkdir()
    for f in real.iterdir():  # OUT holds the bytes; SRC only links to them
        (out / f.name).write_bytes(f.read_bytes())
        (src / f.name).symlink_to(out / f.name)
    before = tree_digest(out)
    result = cli("quantize", src, "-o", out, "--overwrite", "--granularity", "channel")  # no pre-flight warning
    one_line_error(result, 4, "resolves to", "inside")
    assert tree_digest(out) == before and tree_digest(src) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_staging_folder_that_links_to_the_source_is_unlinked_not_emptied(sample, tmp_path, flag):
    src = sample("llama-tiny")
    before = tree_digest(src)
    (tmp_path / ".out.fp8conv-partial").symlink_to(src)
    result = cli("quantize", src, "-o", tmp_path / "out", flag, "-q")
    assert result.returncode == 0, result.stderr
    assert tree_digest(src) == before and not os.path.lexists(tmp_path / ".out.fp8conv-partial")


def test_resume_never_writes_through_links_left_in_staging(tmp_path):
    from test_reliability import run_hooked

    src = sharded_model(tmp_path / "src", shards=3, rows=64, cols=64)
    before = tree_digest(src)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 100)
    run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    staging = tmp_path / ".out.fp8conv-partial"
    shard = staging / "model-00002-of-00003.safetensors"
    shard.unlink(missing_ok=True)
    shard.symlink_to(src / "model-00002-of-00003.safetensors")  # a link to a source shard
    (staging / "config.json").symlink_to(victim)
    os.link(src / "model-00003-of-00003.safetensors", staging / "model-00003-of-00003.safetensors.tmp")
    resumed = cli("quantize", src, "-o", tmp_path / "out", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert tree_digest(src) == before and victim.read_bytes() == b"precious" * 100
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())
    run_cli("quantize", src, "-o", tmp_path / "clean", "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")


@pytest.mark.parametrize("journal", ["{not json", "[" * 100000 + "]" * 100000, '{"run_key": 1, "finished_shards": [], "stats": {}}',
                                     '{"run_key": "x", "finished_shards": {"a.safetensors": 3}, "stats": {}}',
                                     '{"run_key": "x", "finished_shards": {}, "stats": {"w": {"elements": "many"}}}',
                                     '{"run_key": "x", "finished_shards": {"../../etc.safetensors": "' + "0" * 64 + '"}, "stats": {}}',
                                     '{"a": NaN}'])
def test_garbage_journal_on_resume_starts_over(tmp_path, journal):
    src = sharded_model(tmp_path / "src", shards=2, rows=32, cols=32)
    staging = tmp_path / ".out.fp8conv-partial"
    staging.mkdir()
    (staging / "fp8conv.journal.json").write_text(journal)
    result = cli("quantize", src, "-o", tmp_path / "out", "--resume", "-q")
    assert result.returncode == 0, result.stderr
    assert "journal is unusable" in result.stderr and "started over" in result.stderr
    assert all(line.startswith("fp8conv: warning: ") for line in result.stderr.splitlines())
    run_cli("quantize", src, "-o", tmp_path / "clean", "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")


# ---- OUT checked before a byte of SRC is read -----------------------------------------------------

def corrupt_source(root: Path) -> Path:
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"\x01\x02")
    return root


def test_out_link_to_an_empty_folder_is_written_through(sample, tmp_path):
    src = sample("llama-tiny")
    target = tmp_path / "disk" / "empty"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    result = cli("quantize", src, "-o", link, "-q", "--granularity", "channel")  # no pre-flight warning
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and (target / "fp8conv.manifest.json").is_file()
    assert run_cli("verify", link, "--against", src).exit_code == 0


@pytest.mark.parametrize("case", ["file", "dangling link", "not empty", "name too long", "parent is a file"])
def test_out_refused_before_reading_the_source(tmp_path, case):
    src = corrupt_source(tmp_path / "src")  # reading it would fail with exit 3
    out = tmp_path / "out"
    fragment = {"file": "exists and is not a folder", "dangling link": "which does not exist",
                "not empty": "exists and is not empty", "name too long": "file-name limit",
                "parent is a file": "is not a folder"}[case]
    if case == "file":
        out.write_text("x")
    elif case == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    elif case == "not empty":
        out.mkdir()
        (out / "keep").write_text("x")
    elif case == "name too long":
        out = tmp_path / ("o" * 250)
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    for command in (["quantize"], ["dequantize"]):
        one_line_error(cli(*command, src, "-o", out), 4, fragment)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- closed streams -------------------------------------------------------------------------------

def test_stdout_closed_by_its_reader_is_quiet(tmp_path, sample):
    """`fp8conv ... --json | head -c 10`: the reader is gone before anything is written."""
    src = sample("llama-tiny")
    for args in (["inspect", src, "--json"], ["verify", src, "--json"], ["quantize", src, "-o", tmp_path / "out", "--json",
                                                                           "--granularity", "channel"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        result = subprocess.run([sys.executable, "-m", "fp8conv", *map(str, args)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
        os.close(write_end)
        assert (result.returncode, result.stderr) == (141, ""), args
    assert (tmp_path / "out" / "fp8conv.manifest.json").is_file()  # the work itself finished


@pytest.mark.parametrize("closed", ["stderr", "stdout", "both"])
def test_closed_stderr_or_stdout_never_fails_a_run(tmp_path, closed):
    src = sharded_model(tmp_path / "src", shards=2, rows=32, cols=32)
    (src / "config.json").unlink()  # a warning goes to stderr
    redirect = {"stderr": "2>&-", "stdout": ">&-", "both": ">&- 2>&-"}[closed]
    command = f"{sys.executable} -m fp8conv quantize {src} -o {tmp_path / 'out'} {redirect}"
    result = subprocess.run(["bash", "-c", command], env=ENV, timeout=120)
    assert result.returncode == 0
    run_cli("quantize", src, "-o", tmp_path / "clean", "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")
    # an error with stderr closed: still the documented code
    assert subprocess.run(["bash", "-c", f"{sys.executable} -m fp8conv inspect {tmp_path / 'nowhere'} 2>&-"],
                          env=ENV, timeout=60).returncode == 3


# ---- documented codes where exit 70 was ---------------------------------------------------------

DEEP = "[" * 100000 + "]" * 100000


def test_deeply_nested_json_in_a_header_or_index_is_corrupt_input(tmp_path):
    src = tmp_path / "header"
    src.mkdir()
    stfile.write(src / "model.safetensors", '{"a": ' + DEEP + "}")
    one_line_error(cli("inspect", src), 3, "header is not valid JSON (nested too deeply)")
    src = sharded_model(tmp_path / "index", shards=1, rows=8, cols=8)
    (src / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    one_line_error(cli("quantize", src, "-o", tmp_path / "out"), 3, "nested too deeply")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("config", ['{"a": ' + DEEP + "}", '{"model_type": "llama", "rope_theta": NaN}',
                                    '{"x": Infinity}', '{"a": 1, "a": 2}'])
def test_config_json_that_is_not_strict_json_is_copied_with_a_warning(tmp_path, config):
    src = sharded_model(tmp_path / "src", shards=1, rows=8, cols=8)
    (src / "config.json").write_text(config)
    result = cli("quantize", src, "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "config.json: not readable JSON" in result.stderr and "quantization_config NOT written" in result.stderr
    assert (tmp_path / "out" / "config.json").read_text() == config
    assert run_cli("verify", tmp_path / "out", expect=None).exit_code == 1  # no quantization_config: fails, no crash


@pytest.mark.parametrize("size", ["inf", "1e400", "-inf", "nan", "0", "-5GB", "5GiB"])
def test_bad_max_shard_size_is_a_usage_error(tmp_path, size):
    src = sharded_model(tmp_path / "src", shards=1, rows=8, cols=8)
    result = cli("quantize", src, "-o", tmp_path / "out", "--max-shard-size", size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("limit", ["nan", "inf"])
def test_max_rel_error_must_be_finite(sample, limit):
    """NaN would make every comparison pass: `rel > nan` is False."""
    assert cli("verify", sample("llama-tiny"), "--max-rel-error", limit).returncode == 2


# ---- untrusted names escaped in every message -----------------------------------------------------

def test_shard_and_path_names_are_escaped_in_messages(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    evil = "evil\x1b[31m\nname.safetensors"
    (src / evil).write_bytes(b"\x01")  # too short: the error names the file
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w.weight": evil}}))
    for args in (["quantize", src, "-o", tmp_path / "out"], ["inspect", src], ["verify", src]):
        result = cli(*args)
        one_line_error(result, 3, "evil\\x1b[31m\\nname.safetensors")
        assert "\x1b" not in result.stderr
    (src / evil).unlink()
    result = cli("inspect", src)
    one_line_error(result, 3, "names shard evil\\x1b[31m\\nname.safetensors, which is missing")


# ---- unreadable sources, refused up front -----------------------------------------------------------

def without_root_privileges(args: list[str]) -> list[str]:
    """Root reads anything: drop the capabilities that bypass file permissions for the child."""
    if os.geteuid() != 0:
        return args
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *args]


@pytest.mark.parametrize("what", ["tokenizer.json", "config.json", "folder"])
def test_unreadable_source_is_refused_before_any_work(tmp_path, what):
    src = sharded_model(tmp_path / "src", shards=2, rows=32, cols=32)
    (src / "tokenizer.json").write_text("{}")
    target = src if what == "folder" else src / what
    target.chmod(0)
    try:
        for command in (["quantize", src, "-o", tmp_path / "out"], ["dequantize", src, "-o", tmp_path / "out"]):
            result = subprocess.run(without_root_privileges([sys.executable, "-m", "fp8conv", *map(str, command)]),
                                    capture_output=True, text=True, env=ENV, timeout=120)
            one_line_error(result, 3, str(target), "ermission denied")
            assert_no_output(tmp_path / "out")
    finally:
        target.chmod(0o755)


# ---- empty models, unlisted shards, other weight formats ------------------------------------------

def test_empty_weight_map_or_no_tensors_is_refused(tmp_path):
    src = sharded_model(tmp_path / "src", shards=1, rows=8, cols=8)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    for command in (["quantize", src, "-o", tmp_path / "out"], ["verify", src], ["inspect", src]):
        one_line_error(cli(*command), 3, "weight_map is empty")
    empty = tmp_path / "empty"
    empty.mkdir()
    stfile.write(empty / "model.safetensors", {"__metadata__": {"format": "pt"}})
    one_line_error(cli("quantize", empty, "-o", tmp_path / "out"), 3, "holds no tensors")
    assert_no_output(tmp_path / "out")


def test_unlisted_shards_and_other_weight_formats_are_left_out_with_a_warning(tmp_path):
    src = sharded_model(tmp_path / "src", shards=2, rows=32, cols=32)
    (src / "consolidated.safetensors").write_bytes((src / "model-00001-of-00002.safetensors").read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / "tokenizer.json").write_text("{}")
    result = cli("quantize", src, "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "not carried into the output" in line)
    assert "consolidated.safetensors: not listed in model.safetensors.index.json (not converted)" in warning
    assert "pytorch_model.bin: weights in another format (fp8conv reads safetensors only)" in warning
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" in names and not names & {"consolidated.safetensors", "pytorch_model.bin"}


# ---- extreme values end to end, both kernel paths ---------------------------------------------------

def single_tensor_model(root: Path, array: np.ndarray, dtype: str, name: str = "layer.weight") -> Path:
    root.mkdir(parents=True)
    data = array.tobytes()
    stfile.write(root / "model.safetensors", {name: stfile.entry(dtype, list(array.shape), 0, len(data))}, data)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


@pytest.mark.parametrize("case", ["all subnormal f32", "bf16 near 1e38"])
@pytest.mark.parametrize("granularity", ["block", "channel", "tensor"])
def test_extreme_values_convert_identically_on_both_kernel_paths(tmp_path, case, granularity):
    rng = np.random.default_rng(1)
    if case == "all subnormal f32":
        w = (rng.integers(-50, 50, (64, 64)) * 2.0 ** -149).astype(np.float32)
        src = single_tensor_model(tmp_path / "src", w, "F32")
    else:
        w = (rng.standard_normal((64, 64)) * 1e38).clip(-3.3e38, 3.3e38).astype(ml_dtypes.bfloat16)
        src = single_tensor_model(tmp_path / "src", w, "BF16")
    outputs = []
    for backend in ("native", "numpy"):
        out = tmp_path / f"out-{backend}"
        env = {**ENV, "FP8CONV_BACKEND": backend}
        result = subprocess.run([sys.executable, "-m", "fp8conv", "quantize", src, "-o", out, "--granularity",
                                 granularity, "-q", "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)["tensors"][0]
        assert all(math.isfinite(report[k]) for k in ("rel_rms_error", "max_abs_error"))
        outputs.append(load_all(out))
    for name in outputs[0]:
        assert outputs[0][name].tobytes() == outputs[1][name].tobytes(), name
    scales = outputs[0]["layer.weight_scale"]
    assert (scales > 0).all() and np.isfinite(scales).all()
    assert run_cli("verify", tmp_path / "out-native", "--against", src, expect=None).exit_code in (0, 1)


def test_dequantize_to_fp16_refuses_values_beyond_its_range(tmp_path):
    w = np.full((4, 8), 0.5, np.float32)
    w[1, 2] = 70000.0  # beyond fp16's 65504 after dequantization
    src = single_tensor_model(tmp_path / "src", w, "F32")
    run_cli("quantize", src, "-o", tmp_path / "fp8", "--granularity", "channel", "-q")
    result = cli("dequantize", tmp_path / "fp8", "-o", tmp_path / "out", "--dtype", "fp16")
    one_line_error(result, 3, "tensor layer.weight: 1 dequantized values (rows 0..3)", "largest finite F16 (65504)",
                   "use a wider --dtype")
    assert_no_output(tmp_path / "out")
    assert cli("dequantize", tmp_path / "fp8", "-o", tmp_path / "bf16", "--dtype", "bf16").returncode == 0
    assert float(load_all(tmp_path / "bf16")["layer.weight"].astype(np.float32)[1, 2]) == pytest.approx(70000, rel=0.07)


# ---- cost follows the data, not declared dims or tile sizes -------------------------------------------

def test_inspect_stats_on_huge_empty_tensors_is_instant(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    header = {"a.weight": stfile.entry("BF16", [2**62, 0], 0, 0), "b.weight": stfile.entry("F32", [2**40, 0, 2**20], 0, 0),
              "c.weight": stfile.entry("F32", [2, 2], 0, 16)}
    stfile.write(src / "model.safetensors", header, b"\0" * 16)
    (src / "config.json").write_text("{}")
    started = time.monotonic()
    # verify on SRC itself: nothing there is quantized, so it fails (exit 1) without reading the data.
    for command, code in ((["inspect", src, "--stats", "--json"], 0), (["verify", src], 1),
                          (["quantize", src, "-o", tmp_path / "out"], 0)):
        result = cli(*command, "-q")
        assert result.returncode == code, result.stderr
    assert time.monotonic() - started < 60
    run_cli("verify", tmp_path / "out", "--against", src)


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("shape,granularity,block", [((50000, 1, 1), "block", "128"), ((50000, 1, 1), "tensor", None),
                                                     ((3000, 4, 6), "block", "2x4"), ((3000, 3, 6), "block", "2x4"),
                                                     ((2000, 5, 8), "group", None), ((2000, 8, 3), "channel", None)])
def test_many_small_experts_cost_what_their_bytes_cost(tmp_path, backend, shape, granularity, block):
    """One job per few MB of experts, not per expert; codes and grids per expert as the reference says."""
    from reference import reference_quantize

    rng = np.random.default_rng(2)
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    src = single_tensor_model(tmp_path / "src", w, "F32", "model.layers.0.mlp.experts.down_proj.weight")
    options = ["--granularity", granularity] + (["--block-size", block] if block else []) + (
        ["--group-size", "4"] if granularity == "group" else [])
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fp8conv", "quantize", src, "-o", tmp_path / "out", "-q", *options],
                            capture_output=True, text=True, env={**ENV, "FP8CONV_BACKEND": backend}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    out = load_all(tmp_path / "out")
    codes, scales = out["model.layers.0.mlp.experts.down_proj.weight"], out["model.layers.0.mlp.experts.down_proj.weight_scale"]
    tile = tuple(int(x) for x in block.split("x")) * (2 if "x" not in block else 1) if block else (128, 128)
    for e in range(0, shape[0], 97):
        ref_codes, ref_scales, _ = reference_quantize(w[e], "fp8_e4m3", granularity, tile[:2], 4)
        assert codes[e].view(np.uint8).tolist() == ref_codes.tolist(), e
        assert scales[e].reshape(-1).tolist() == ref_scales.reshape(-1).tolist(), e


def test_huge_block_on_a_tiny_weight_allocates_what_the_weight_needs(tmp_path):
    import tracemalloc

    from fp8conv import dequantize_tensor, quantize_tensor
    from reference import reference_quantize

    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    tracemalloc.start()
    try:
        q = quantize_tensor(w, granularity="block", block_size=65536, backend="numpy")  # windows sized by the tile
        deq = dequantize_tensor(q.codes, q.scales, granularity="block", block_size=65536)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    ref_codes, ref_scales, ref_deq = reference_quantize(w, "fp8_e4m3", "block", (65536, 65536))
    assert q.codes.view(np.uint8).tolist() == ref_codes.tolist() and q.scales.tolist() == ref_scales.tolist()
    np.testing.assert_array_equal(deq, ref_deq.astype(np.float32))
    src = single_tensor_model(tmp_path / "src", w, "F32")
    result = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "fp8conv", "quantize", src, "-o",
                             tmp_path / "out", "--block-size", "65536", "-q", "--workers", "1"],
                            capture_output=True, text=True, env={**ENV, "FP8CONV_BACKEND": "numpy"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stderr.strip().splitlines()[-1]) < 400_000  # KB: no 16 GB buffers


# ---- outputs our own reader would refuse are never written ----------------------------------------

def test_output_header_over_the_reader_limit_is_refused_before_writing(tmp_path):
    """A legal 60 MB tensor name: its scale's name doubles the output header past 100 MB."""
    name = "m" * 60_000_000 + ".weight"
    w = np.ones((2, 2), np.float32)
    src = single_tensor_model(tmp_path / "src", w, "F32", name)
    assert cli("inspect", src, "-q").returncode == 0  # the source itself is valid
    result = cli("quantize", src, "-o", tmp_path / "out", "-q")
    one_line_error(result, 3, "output shard model.safetensors would have a", "over the 100000000-byte safetensors limit")
    assert len(result.stderr) < 1000
    assert_no_output(tmp_path / "out")


# ---- verify: every file in OUT vouched for by the manifest -----------------------------------------

def test_verify_fails_on_files_the_manifest_does_not_cover(tmp_path):
    src = sharded_model(tmp_path / "src", shards=2, rows=32, cols=32)
    out = tmp_path / "out"
    run_cli("quantize", src, "-o", out, "-q")
    run_cli("verify", out, "--against", src)
    manifest = read_json(out / "fp8conv.manifest.json")
    shard = "model-00002-of-00002.safetensors"
    del manifest["files"][shard]  # then its bytes could be anything
    (out / "fp8conv.manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", out, "--json", expect=1)
    findings = [f["message"] for f in json.loads(result.stdout)["findings"] if f["fatal"]]
    assert findings == [f"{shard} is in the folder but not in the manifest: nothing vouches for its bytes"]
    run_cli("quantize", src, "-o", tmp_path / "out2", "-q")
    (tmp_path / "out2" / "extra.safetensors.bak").write_bytes(b"x")
    assert "extra.safetensors.bak is in the folder but not in the manifest" in run_cli("verify", tmp_path / "out2", expect=1).stdout


# ---- --resume keyed on more than name, size and mtime ----------------------------------------------

@pytest.mark.parametrize("edit", ["data", "header"])
def test_resume_notices_a_source_edited_in_place_with_its_mtime_restored(tmp_path, edit):
    from test_reliability import run_hooked

    src = sharded_model(tmp_path / "src", shards=2, rows=64, cols=64)
    run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    shard = src / "model-00001-of-00002.safetensors"  # finished and journaled by the killed run
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    if edit == "data":
        data[-200:-100] = bytes(100)
    else:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8:8 + length]))
        reordered = json.dumps(dict(reversed(list(header.items())))).encode()  # same tensors, other bytes
        assert len(reordered) == length and reordered != bytes(data[8:8 + length])
        data[8:8 + length] = reordered
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns and shard.stat().st_size == stat.st_size
    resumed = cli("quantize", src, "-o", tmp_path / "out", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert "reused" not in resumed.stderr and "started over" in resumed.stderr
    run_cli("quantize", src, "-o", tmp_path / "clean", "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")


# ---- more hostile conditions -----------------------------------------------------------------------

def children_of(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def test_workers_die_with_a_sigkilled_parent(tmp_path):
    """No orphaned workers burning CPU after the OOM killer takes the parent (PDEATHSIG)."""
    src = sharded_model(tmp_path / "src", shards=6, rows=64, cols=64)
    go_r, go_w = os.pipe()
    parent = subprocess.Popen([sys.executable, "-c", HELD_JOBS, "quantize", str(src), "-o", str(tmp_path / "out"),
                               "--workers", "2", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**ENV, "FP8CONV_TEST_GO_FD": str(go_r)}, pass_fds=(go_r,))
    os.close(go_r)
    try:
        try:
            deadline = time.monotonic() + 60
            while len(children_of(parent.pid)) < 2:
                assert time.monotonic() < deadline and parent.poll() is None
                time.sleep(0.05)
            workers = children_of(parent.pid)
        finally:
            parent.kill()
            parent.communicate()
        # The workers are held on the pipe: only PDEATHSIG can end them before it closes.
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.05)
    finally:
        os.close(go_w)  # a worker that outlived its parent finishes its job and exits instead of lingering


def test_more_shards_than_cached_handles(tmp_path, monkeypatch):
    from fp8conv.run import jobs

    monkeypatch.setattr(jobs, "MAX_OPEN", 3)
    src = sharded_model(tmp_path / "src", shards=9, rows=16, cols=16)
    run_cli("quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q")
    run_cli("verify", tmp_path / "out", "--against", src)


def test_a_read_error_on_the_source_is_blamed_on_the_source(tmp_path, monkeypatch):
    import errno as errno_

    from fp8conv.io import safetensors as safetensors_io

    src = sharded_model(tmp_path / "src", shards=2, rows=16, cols=16)

    def failing(self, buffer):
        raise OSError(errno_.EIO, "Input/output error")

    class Failing(safetensors_io.TensorReader):
        def __init__(self, path):
            super().__init__(path)
            self._fh = type("F", (), {"seek": lambda s, o: None, "readinto": failing, "close": lambda s: None})()

    monkeypatch.setattr("fp8conv.run.jobs.TensorReader", Failing)
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--workers", "1", "-q", expect=3)
    assert "cannot read tensor" in result.stderr and "Input/output error" in result.stderr
    assert_no_output(tmp_path / "out")


def test_a_source_file_named_like_the_journal_is_refused_not_lost(tmp_path):
    src = sharded_model(tmp_path / "src", shards=1, rows=8, cols=8)
    (src / "fp8conv.journal.json").write_text("{}")
    one_line_error(cli("quantize", src, "-o", tmp_path / "out"), 3, "named like fp8conv's own journal")
    assert_no_output(tmp_path / "out")


def test_index_with_a_duplicate_key_is_refused(tmp_path):
    """json.loads keeps the last of two keys: which shard holds the tensor would be a guess."""
    src = sharded_model(tmp_path / "src", shards=2, rows=8, cols=8)
    index = src / "model.safetensors.index.json"
    text = index.read_text().replace('"weight_map": {', '"weight_map": {"layers.0.proj.weight": "model-00002-of-00002.safetensors", ', 1)
    index.write_text(text)
    one_line_error(cli("quantize", src, "-o", tmp_path / "out"), 3, "duplicate key 'layers.0.proj.weight'")
    assert_no_output(tmp_path / "out")


def test_read_only_parent_is_refused_before_reading_the_source(tmp_path):
    src = corrupt_source(tmp_path / "src")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = subprocess.run(without_root_privileges([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o",
                                                         str(parent / "out")]), capture_output=True, text=True, env=ENV,
                                timeout=120)
        one_line_error(result, 4, "is read-only or not writable")
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


SHRINK_SOURCE = """
import os, sys
from fp8conv.run import pipeline
real = pipeline.run_job
def shrinking(job):
    if job.name.startswith("layers.2.") and os.path.getsize(job.source.path) > 100:
        os.truncate(job.source.path, 100)  # another process rewrites the source under us
    return real(job)
pipeline.run_job = shrinking
from fp8conv.cli import main
sys.argv = ["fp8conv"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_source_that_shrinks_mid_run_is_blamed_on_the_source(tmp_path, workers):
    src = sharded_model(tmp_path / "src", shards=4, rows=64, cols=64)
    result = subprocess.run([sys.executable, "-c", SHRINK_SOURCE, "quantize", src, "-o", tmp_path / "out", "--workers",
                             workers, "-q"], capture_output=True, text=True, env=ENV, timeout=120)
    one_line_error(result, 3, "model-00003-of-00004.safetensors", "truncated")
    assert_no_output(tmp_path / "out")


def test_a_fork_failure_is_not_blamed_on_the_output(tmp_path, monkeypatch):
    import errno as errno_
    import multiprocessing.process

    def no_fork(self):
        raise OSError(errno_.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_fork)
    src = sharded_model(tmp_path / "src", shards=2, rows=16, cols=16)
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--workers", "2", "-q", expect=71)
    assert "cannot start a worker process (Resource temporarily unavailable); try fewer --workers" in result.stderr
    assert_no_output(tmp_path / "out")


def test_journal_stats_of_the_mse_observer_are_accepted_as_a_pair():
    """The mse observer's two optional statistics (left out when unset) pass the strict journal check
    together, never one without the other."""
    from fp8conv.numerics.kernels import ErrorStats
    from fp8conv.io.outdir import _valid_journal

    plain = ErrorStats(elements=4).to_json()
    observed = dict(plain, observed_sum_sq_err=1.0, minmax_sum_sq_err=2.0)
    for stats in (plain, observed):
        assert _valid_journal({"finished_shards": {}, "stats": {"w": stats}})[1] == {"w": stats}
    for stats in (dict(plain, observed_sum_sq_err=1.0), dict(plain, unknown=1.0), {"elements": 4}):
        with pytest.raises(ValueError, match="bad stats"):
            _valid_journal({"finished_shards": {}, "stats": {"w": stats}})
