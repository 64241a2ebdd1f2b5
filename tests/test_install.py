"""Installing fp8conv: with a C compiler the extension is built; without one (CC=false) the install still
succeeds and conversions run on the numpy kernels, with one warning line saying how to get the fast path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_all
from test_faults import single_tensor_model
from reference import reference_quantize

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def install(tmp_path: Path, env: dict) -> tuple[Path, subprocess.CompletedProcess]:
    """pip install a copy of the project (its build files, not a build of the working tree) into a target folder."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "fp8conv", project / "fp8conv",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--no-deps", "--no-build-isolation", "--no-cache-dir", "--target", str(target),
                             str(project)], capture_output=True, text=True, env=env, timeout=600)
    return target, result


def built(target: Path) -> list[Path]:
    return [p for p in (target / "fp8conv" / "accel").glob("_native*") if p.suffix in (".so", ".pyd")]


def run_installed(target: Path, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fp8conv", *map(str, args)], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(target)}, cwd=target, timeout=300)


def test_install_without_a_compiler_runs_on_numpy_with_one_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FP8CONV_BACKEND")}
    target, result = install(tmp_path, {**env, "CC": "false"})
    assert result.returncode == 0, result.stderr
    assert not built(target), "the extension was built with CC=false"
    w = np.random.default_rng(4).standard_normal((96, 160)).astype(np.float32)
    src = single_tensor_model(tmp_path / "src", w, "F32")
    run = run_installed(target, "quantize", src, "-o", tmp_path / "out", "-q", env=env)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "C kernels are not built" in line]
    assert len(warnings) == 1 and "pip install" in warnings[0], run.stderr
    out = load_all(tmp_path / "out")
    codes, scales, _ = reference_quantize(w, "fp8_e4m3", "block")
    assert out["layer.weight"].view(np.uint8).tolist() == codes.tolist()
    assert out["layer.weight_scale"].tolist() == scales.tolist()
    forced = run_installed(target, "quantize", src, "-o", tmp_path / "out2", "-q", env={**env, "FP8CONV_BACKEND": "native"})
    assert forced.returncode != 0 and "native backend is not built" in forced.stderr


def test_install_with_a_compiler_builds_the_extension(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FP8CONV_BACKEND", "CC")}
    target, result = install(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert built(target), "no extension built"
    check = subprocess.run([sys.executable, "-c", "from fp8conv.accel import native; print(native.AVAILABLE, native._native.__file__)"],
                           capture_output=True, text=True, env={**env, "PYTHONPATH": str(target)}, cwd=target)
    assert check.stdout.split()[0] == "True" and check.stdout.split()[1].startswith(str(target)), check.stdout


def test_the_avx2_build_equals_the_numpy_reference(tmp_path):
    """The extension built without its AVX-512 kernels (CFLAGS=-DFP8CONV_NO_AVX512: what a CPU without AVX-512 runs,
    e.g. the AVX2 pruned mse search) passes the observers' backend-equality tests (compiled search == numpy
    reference, bit for bit, on edge weights; brute force) on a host with AVX-512, where the suite's own build runs the
    AVX-512 kernels instead. A host without AVX-512 runs the AVX2 ones in every other test already."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if "avx512f" not in flags or "avx512vl" not in flags:
        pytest.skip("this CPU has no AVX-512: the suite's own build already runs the AVX2 kernels in the other tests")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FP8CONV_BACKEND", "CC")}
    env["CFLAGS"] = (env.get("CFLAGS", "") + " -DFP8CONV_NO_AVX512").strip()
    target, result = install(tmp_path, env)
    assert result.returncode == 0 and built(target), result.stderr
    assert b"mse_tiles_avx512" not in built(target)[0].read_bytes(), "CFLAGS did not reach the build"
    env["PYTHONPATH"] = str(target)
    check = subprocess.run([sys.executable, "-c", "from fp8conv.accel import native; print(native._native.__file__)"],
                           capture_output=True, text=True, env=env, cwd=target)
    assert check.stdout.strip().startswith(str(target)), check.stdout + check.stderr
    tests = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tests / "test_observers.py"), str(tests / "test_microscale_observer.py"),
                          "-k", "compiled or native or brute_force or property"],
                         capture_output=True, text=True, env=env, cwd=target, timeout=1200)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
