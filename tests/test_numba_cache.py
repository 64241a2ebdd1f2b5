"""The kernel's disk caches (numba's, and aot.py's object) work from a read-only install: the second
run loads, not compiles, and loads the object without importing numba."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PROBE = """
import json, sys
import numpy as np
from fp8conv.accel import aot, compiled
compiled.preload()
native, numba_at_preload = aot.entry() is not None, "numba" in sys.modules
dispatcher = compiled.load_numba().quantize_chunk
dispatcher(np.zeros((1, 1), np.uint16), True, 1, 1, np.float32(0), np.float32(448), 0, np.empty((1, 1), np.uint8),
           np.empty((1, 1), np.float32), np.zeros(5), False)
stats = dispatcher.stats
print(json.dumps({"dir": str(compiled.cache_dir()), "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values()), "native": native, "numba_at_preload": numba_at_preload}))
"""


def read_only_copy(base: Path) -> Path:
    """fp8conv copied under base and made read-only for everyone (directories r-x, files r--)."""
    target = base / "install"
    shutil.copytree(ROOT / "fp8conv", target / "fp8conv", ignore=shutil.ignore_patterns("__pycache__"))
    for path in sorted(target.rglob("*"), reverse=True) + [target]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return target


def probe(install: Path, home: Path, tmp: Path, read_only: list[Path]) -> dict:
    """Load the kernel in a fresh process that sees `read_only` folders as read-only. File modes do
    that for a normal user; root ignores them, so as root the folders are bind-mounted read-only in
    a mount namespace of the process's own (writes fail with EROFS, as on a read-only install)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "XDG_"))}
    env.update(PYTHONPATH=str(install), HOME=str(home), TMPDIR=str(tmp), FP8CONV_NO_NUMBA="")
    command = [sys.executable, "-c", PROBE]
    if os.getuid() == 0:
        mounts = " && ".join(f"mount --bind {p} {p} && mount -o remount,ro,bind {p}" for p in read_only)
        command = ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$0" "$@"', *command]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(tmp), timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("home_writable", [True, False])
def test_read_only_install_caches_the_kernel_once(home_writable):
    base = Path(tempfile.mkdtemp(prefix="fp8ro"))
    try:
        install = read_only_copy(base)
        home, tmp = base / "home", base / "tmp"
        for folder in (home, tmp):
            folder.mkdir()
            folder.chmod(0o700 if (folder == tmp or home_writable) else 0o500)
        read_only = [install] if home_writable else [install, home]
        first = probe(install, home, tmp, read_only)
        second = probe(install, home, tmp, read_only)
        expected = home / ".cache" / "fp8conv" / "numba" if home_writable else tmp / f"fp8conv-numba-{os.getuid()}"
        assert first["dir"] == second["dir"] == str(expected)
        assert first["misses"] >= 1 and first["hits"] == 0  # compiled, and saved ...
        assert second["misses"] == 0 and second["hits"] >= 1  # ... then loaded, not compiled again
        assert list(expected.rglob("*.nbi")), "no numba index in the fallback cache dir"
        assert first["native"] and second["native"] and not second["numba_at_preload"]
        assert len(list(expected.glob("fp8conv-kernel-*.o"))) == 1, "the ahead-compiled object is not cached there"
        assert not list(install.rglob("*.o"))
        assert not list(install.rglob("__pycache__/*.nbi"))
        if not home_writable:
            assert stat.S_IMODE(expected.stat().st_mode) == 0o700
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
