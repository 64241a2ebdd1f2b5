"""Start-up: `fp8conv --version`, `--help` and `inspect` of headers import neither ml_dtypes (1-2 s on a
loaded machine) nor tqdm; a conversion imports them where it uses them. Checked on the modules a fresh
process loaded, not timed (speed goes in bench/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
PROBE = """
import json, sys
sys.argv = ["fp8conv", *json.loads(sys.argv[1])]
from fp8conv import cli
try:
    cli.main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"modules": sorted(m for m in ("ml_dtypes", "tqdm", "numba", "llvmlite") if m in sys.modules)}),
      file=sys.stderr)
"""


def loaded_modules(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    return json.loads(result.stderr.strip().splitlines()[-1])["modules"]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["quantize", "--help"],
                                  ["inspect", str(SAMPLES / "llama-tiny")]])
def test_light_commands_import_no_heavy_module(args):
    assert loaded_modules(*args) == []


def test_a_conversion_imports_ml_dtypes_and_never_numba(tmp_path):
    assert loaded_modules("quantize", str(SAMPLES / "llama-tiny"), "-o", str(tmp_path / "out"), "-q") == ["ml_dtypes"]
