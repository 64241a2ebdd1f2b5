"""Process set-up of the command line (commands/console.numpy_without_blas_threads): numpy loaded with one
OpenBLAS thread unless the user chose otherwise, and the environment left as the user gave it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = ("import json, os, sys, fp8conv.cli; assert 'numpy' in sys.modules;"
         "print(json.dumps([os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task'))]))")


def probe(**env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env})
    return json.loads(result.stdout)


def test_the_command_line_loads_numpy_with_no_blas_threads_and_leaves_the_environment():
    assert probe() == [None, 1]  # one thread: no OpenBLAS threads; the variable is gone again


def test_the_users_setting_is_kept():
    assert probe(OPENBLAS_NUM_THREADS="3")[0] == "3"
