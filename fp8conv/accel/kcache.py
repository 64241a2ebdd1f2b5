"""Where the compiled kernel's caches live (numba's and aot.py's), and numba's dispatcher pointed at
that folder. Its own module so that aot.py and compiled.py both use it without importing each other."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing); tried, not guessed from modes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def kernel_cache_dir() -> Path | None:
    """The folder the kernel's caches live in (numba's and aot.py's): NUMBA_CACHE_DIR, else the
    package's __pycache__ when writable, else the user's cache dir, else a private per-user
    temporary dir; None when none of them is writable."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        folder = Path(os.environ["NUMBA_CACHE_DIR"])
        return folder if _writable(folder) else None
    for folder in (Path(__file__).parent / "__pycache__",
                   Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "fp8conv" / "numba"):
        if _writable(folder):
            return folder
    return _private_tmp()


def cache_dir() -> Path | None:
    """Where numba must be pointed to cache the kernel: kernel_cache_dir() where that is not numba's
    own default (None: the package's __pycache__, or NUMBA_CACHE_DIR)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    folder = kernel_cache_dir()
    return None if folder == Path(__file__).parent / "__pycache__" else folder


def _private_tmp() -> Path | None:
    """A per-user folder in the temporary dir, refused unless it is ours and closed to others
    (numba's cache holds pickles: loading someone else's would run their code)."""
    folder = Path(tempfile.gettempdir()) / f"fp8conv-numba-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        stat = folder.lstat()
    except OSError:
        return None
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
        return None
    return folder


def load_numba():
    """numba's dispatcher of the kernel (imports numba, pointed at the kernel's cache folder)."""
    if "fp8conv.accel._numba_kernels" not in sys.modules:
        folder = cache_dir()
        if folder is not None:
            import numba

            numba.config.CACHE_DIR = str(folder)  # read when the kernel's cache is set up, at import
    from . import _numba_kernels

    return _numba_kernels
