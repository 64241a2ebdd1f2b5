"""Atomic output folders: write into a hidden sibling, journal finished shards, rename when complete.

Beside OUT live three hidden siblings: `.OUT.fp8conv-partial` (the staging folder),
`.OUT.fp8conv-lock` (held with flock by the one run writing OUT: it dies with its process) and,
for an instant during the final rename, `.OUT.fp8conv-old`. Nothing is deleted or truncated that
a source file resolves to: every path is compared after resolving links, and staging files are
created fresh (unlinked first), never opened for writing through a link left in the folder.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import OutputError
from ..numerics.stats import ErrorStats
from .untrusted import load_json, printable

JOURNAL_NAME = "fp8conv.journal.json"
SUFFIXES = {"tmp": "fp8conv-partial", "lock": "fp8conv-lock", "old": "fp8conv-old"}


def _libc_sync_file_range():
    """Linux's sync_file_range(2) through ctypes (None elsewhere: writeback then starts at the fsync)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not Linux / glibc
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, wait for nothing


def start_writeback(fd: int, start: int, end: int) -> bool:
    """Ask the kernel to start writing bytes [start, end) of `fd` to disk now (it may wait for room
    in the disk's queue, never for the writes; what is written does not change); False where the
    system cannot."""
    if _SYNC_FILE_RANGE is None or end <= start:
        return False
    return _SYNC_FILE_RANGE(fd, start, end - start, SYNC_FILE_RANGE_WRITE) == 0


class Writeback:
    """Starts writing each finished output range to disk, on a thread of its own, as soon as a job
    reports it: the disk then works while later tensors convert instead of at the final fsync (the
    kernel alone starts only when dirty pages pass its background threshold, GBs on a big machine).
    The requests wait on the disk's queue here, not in the workers or the hashing threads.
    Advisory: a failed request changes nothing (the fsync before the rename writes everything)."""

    MAX_OPEN = 16  # files kept open between requests

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1)
        self._fds: dict[Path, int] = {}
        self._closed = False
        self._lock = threading.Lock()  # hashing threads call hashed() while close() may run

    def written(self, path: Path, start: int, end: int) -> None:
        self._submit(self._start, path, start, end)

    def hashed(self, path: Path, start: int, end: int) -> None:
        """The range is hashed: drop its pages from the page cache (POSIX_FADV_DONTNEED: those on
        disk go, writeback starts for any left), so a long run does not fill memory with output.
        On this thread, because the call waits on the disk's queue: in a hashing thread it
        delayed the hash of each shard, which ends a big run, by 0.1-0.2 s."""
        self._submit(self._drop, path, start, end)

    def _submit(self, request, path: Path, start: int, end: int) -> None:
        with self._lock:
            if not self._closed:  # after close() the fsyncs write, and clean pages are reclaimed
                self._thread.submit(request, path, start, end)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            if len(self._fds) >= self.MAX_OPEN:  # a 1000-shard run: a few shards are written at a time
                self._close_files()
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _start(self, path: Path, start: int, end: int) -> None:
        try:
            start_writeback(self._fd(path), start, end)
        except OSError:
            pass

    def _drop(self, path: Path, start: int, end: int) -> None:
        try:
            os.posix_fadvise(self._fd(path), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def close(self) -> None:
        """Drop the requests not yet made (the fsync that follows covers them); close the files."""
        with self._lock:
            self._closed = True
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._close_files()

    def _close_files(self) -> None:
        while self._fds:  # out of the table first: never closed twice (see jobs.close_handles)
            fd = self._fds.popitem()[1]
            try:
                os.close(fd)
            except OSError:  # advisory: never replaces the error or interrupt being handled
                pass


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


@contextmanager
def undone_on_failure(undo: Callable[[], None], message: Callable[[OSError], str]) -> Iterator[None]:
    """Run the body; if it fails, `undo()` first, then an OSError becomes one OutputError line (`message(exc)`)
    and anything else (a signal's exception, a bug) is raised as it was."""
    try:
        yield
    except OSError as exc:
        undo()
        raise OutputError(message(exc)) from None
    except BaseException:
        undo()
        raise


def _show(path: Path) -> str:
    return printable(str(path))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _is_plain_file(path: Path) -> bool:
    """A regular file, not a link, with no other name (a hard link could be a source file)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def _remove(path: Path) -> None:
    """Remove a folder entry without following it (a link is unlinked, never its target)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


class Staging:
    """A conversion's output: either absent, or complete (nothing half-done that looks finished)."""

    def __init__(self, out: Path, source: Path, overwrite: bool, resume: bool, run_key: str,
                 source_files: Iterable[Path] = ()) -> None:
        given = Path(os.path.abspath(out))
        if given.is_symlink() and not given.exists():
            raise OutputError(f"output {_show(given)} is a link to {_show(Path(os.readlink(given)))}, which does not exist")
        # OUT given as a link to a folder: the folder is the output (the link keeps pointing at it).
        self.out = Path(os.path.realpath(given))
        self.tmp, self.lock_path, self.old = (self.out.parent / f".{self.out.name}.{s}" for s in SUFFIXES.values())
        self.overwrite = overwrite
        self.resume = resume
        self.run_key = run_key
        self.finished: dict[str, str] = {}
        self.stats: dict[str, dict] = {}
        self._journal_lock = threading.Lock()  # shards finish on several threads
        self.notes: list[str] = []
        self._lock_fd: int | None = None
        self._check_name()
        self.check_sources([Path(source)], folder=True)
        self.check_sources(source_files)

    # ---- checks before any work ---------------------------------------------------------------

    def _check_name(self) -> None:
        ancestor = _existing_ancestor(self.out.parent)
        try:
            limit = os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        longest = max(len(os.fsencode(p.name)) for p in (self.out, self.tmp, self.lock_path, self.old))
        if longest > limit:
            raise OutputError(f"output name {_show(Path(self.out.name))} is too long: its staging folder "
                              f"{_show(Path(self.tmp.name))} would exceed the {limit}-byte file-name limit")

    def check_sources(self, files: Iterable[Path], folder: bool = False) -> None:
        """Refuse when a source file (after resolving links) lies in OUT or in a folder this run
        deletes or fills (staging, old), or when OUT lies inside the source folder."""
        for given in files:
            real = Path(os.path.realpath(given))
            if folder:
                root = real if real.is_dir() else real.parent
                if _inside(real, self.out) or (real.is_dir() and _inside(self.out, root)):
                    raise OutputError(f"output {_show(self.out)} overlaps the source {_show(given)}; "
                                      "choose a folder outside it")
            for area in (self.out, self.tmp, self.old):
                if _inside(real, area):
                    raise OutputError(f"source {_show(given)} resolves to {_show(real)}, inside {_show(area)} "
                                      "that this run would replace; choose another output folder")

    def check(self) -> None:
        """Refuse an output that cannot or must not be written, before any work (a dry run calls
        only this): not a folder, not empty, leftovers, another run writing it, no write access."""
        holder = self._holder()
        if holder is not None:
            raise OutputError(f"another fp8conv run{holder} is writing {_show(self.out)} "
                              f"(it holds {_show(self.lock_path)}); wait for it or stop it")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output {_show(self.out)} exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputError(f"output {_show(self.out)} exists and is not empty; pass --overwrite to replace it")
        if os.path.lexists(self.tmp) and not (self.resume or self.overwrite):
            raise OutputError(
                f"an interrupted run left {_show(self.tmp)}; pass --resume to continue it or --overwrite to start again"
            )
        ancestor = _existing_ancestor(self.out.parent)
        if not ancestor.is_dir():
            raise OutputError(f"cannot create {_show(self.out)}: {_show(ancestor)} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {_show(self.out)}: {_show(ancestor)} is read-only or not writable")

    def _holder(self) -> str | None:
        """' (pid N)' when another process holds the lock, None when nobody does."""
        if self._lock_fd is not None:
            return None
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return f" (pid {pid})" if pid.isdigit() else ""
        finally:
            os.close(fd)
        return None

    # ---- the lock ----------------------------------------------------------------------------

    def _acquire(self) -> None:
        """flock the lock file (one writer per OUT); the kernel releases it when the process dies."""
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    self.check()  # names the holder
                raise
            # The previous holder may have unlinked the file between our open and our flock.
            try:
                same = os.stat(self.lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.lock_path)  # still ours: unlinked before the lock is dropped
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- the run -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Take the lock, then reuse (--resume) or start the staging folder."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            raise OutputError(f"cannot create {_show(self.out)} ({exc.strerror or exc})") from None
        with undone_on_failure(self.release, lambda exc: f"cannot create {_show(self.tmp)} ({exc.strerror or exc})"):
            self.check()
            if self.resume and self.tmp.is_dir() and not self.tmp.is_symlink() and self._load_journal():
                self._keep_only_finished()
                return
            if os.path.lexists(self.tmp):
                _remove(self.tmp)
            self.tmp.mkdir()
            self._save_journal()

    def _load_journal(self) -> bool:
        path = self.tmp / JOURNAL_NAME
        if not os.path.lexists(path):
            return False
        try:
            if not _is_plain_file(path):
                raise ValueError("not a regular file")
            journal = load_json(path.read_text(encoding="utf-8"), JOURNAL_NAME)
            shards, stats = _valid_journal(journal)
        except Exception as exc:  # unreadable, not JSON, wrong shape: any garbage means start over
            self.notes.append(f"the interrupted run's journal is unusable ({printable(str(exc))}); started over")
            return False
        if journal.get("run_key") != self.run_key:
            self.notes.append("the interrupted run converted other sources or options; started over")
            return False
        self.finished, self.stats = shards, stats
        return True

    def _keep_only_finished(self) -> None:
        """Only journaled shards that are plain files survive; everything else is removed (links
        unlinked, not followed), so nothing later writes through a link into someone's file."""
        for entry in list(self.tmp.iterdir()):
            keep = entry.name == JOURNAL_NAME or (entry.name in self.finished and _is_plain_file(entry))
            if not keep:
                self.finished.pop(entry.name, None)
                _remove(entry)
        self.finished = {name: digest for name, digest in self.finished.items() if (self.tmp / name).exists()}

    def _save_journal(self) -> None:
        journal = {"run_key": self.run_key, "finished_shards": self.finished, "stats": self.stats}
        data = json.dumps(journal, indent=1, sort_keys=True)
        part = self.tmp / (JOURNAL_NAME + ".part")
        part.unlink(missing_ok=True)
        part.write_text(data)
        os.replace(part, self.tmp / JOURNAL_NAME)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def create(self, name: str) -> int:
        """A new, empty staging file opened for writing (whatever stood at that name is unlinked)."""
        path = self.tmp / name
        path.unlink(missing_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)

    def mark_finished(self, shard: str, sha256: str, stats: dict[str, dict]) -> None:
        """Record a shard (and its tensors' error stats) as complete and durable, for --resume."""
        _fsync_path(self.tmp / shard)
        with self._journal_lock:
            self.finished[shard] = sha256
            self.stats.update(stats)
            self._save_journal()

    def commit(self) -> None:
        """fsync everything, then rename the staging folder into place."""
        (self.tmp / JOURNAL_NAME).unlink(missing_ok=True)
        for path in sorted(self.tmp.rglob("*")):  # subfolders carried from SRC included
            if not path.is_symlink():
                _fsync_path(path, directory=path.is_dir())
        _fsync_path(self.tmp, directory=True)
        moved_old = False
        if self.out.exists():
            if any(self.out.iterdir()):
                if os.path.lexists(self.old):
                    _remove(self.old)
                os.rename(self.out, self.old)
                moved_old = True
            else:
                self.out.rmdir()
        os.rename(self.tmp, self.out)
        _fsync_path(self.out.parent, directory=True)
        if moved_old:
            shutil.rmtree(self.old, ignore_errors=True)
        self.release()

    def abort(self) -> None:
        if self._lock_fd is not None:  # never remove a staging folder another run holds
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()


def _valid_journal(journal: object) -> tuple[dict[str, str], dict[str, dict]]:
    """finished_shards: plain file name -> sha256 hex; stats: tensor name -> ErrorStats fields."""
    if not isinstance(journal, dict):
        raise ValueError("not an object")
    shards, stats = journal.get("finished_shards"), journal.get("stats")
    if not isinstance(shards, dict) or not isinstance(stats, dict):
        raise ValueError("no finished_shards / stats")
    for name, digest in shards.items():
        if ("/" in name or name.startswith(".") or not name.endswith(".safetensors") or not isinstance(digest, str)
                or len(digest) != 64):
            raise ValueError(f"bad shard entry {printable(name)!r}")
    fields = {f.name for f in dataclasses.fields(ErrorStats)}
    # Fields that default to None (the mse observer's pair) are left out of the JSON when unset.
    optional = {f.name for f in dataclasses.fields(ErrorStats) if f.default is None}
    for name, entry in stats.items():
        if (not isinstance(entry, dict) or not fields - optional <= set(entry) <= fields
                or len(optional & set(entry)) not in (0, len(optional))):
            raise ValueError(f"bad stats for {printable(name)!r}")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"bad stats for {printable(name)!r}")
    return dict(shards), dict(stats)
