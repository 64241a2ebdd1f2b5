"""Round 2 of hostile conditions (issue #16): dying workers, concurrent writers, links into the
output, closed pipes, extreme values. Process-level cases run the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
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
from fp8conv import pipeline
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
    from fp8conv.runner import run_parallel

    seen = []
    with pytest.raises(ZeroDivisionError):
        run_parallel(lambda x: 1 // x, [1, 2, 0, 3, 4], 2, lambda i, v: seen.append(v))
    results = {}
    run_parallel(lambda x: x * x, list(range(20)), 3, results.__setitem__)
    assert results == {i: i * i for i in range(20)}
