"""Atomic output folders: write into a hidden sibling, journal finished shards, rename when complete."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

from .errors import OutputError

JOURNAL_NAME = "fp8conv.journal.json"


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class Staging:
    """A conversion's output: either absent, or complete (nothing half-done that looks finished)."""

    def __init__(self, out: Path, source: Path, overwrite: bool, resume: bool, run_key: str) -> None:
        self.out = Path(os.path.abspath(out))
        self.tmp = self.out.parent / f".{self.out.name}.fp8conv-partial"
        self.overwrite = overwrite
        self.resume = resume
        self.run_key = run_key
        self.finished: dict[str, str] = {}
        self.stats: dict[str, dict] = {}
        self._journal_lock = threading.Lock()  # shards finish on several threads
        src = Path(source).resolve()
        src_root = src if src.is_dir() else src.parent
        real_out = self.out.resolve()
        if real_out == src or (src.is_dir() and _inside(real_out, src_root)) or _inside(src, real_out):
            raise OutputError(f"output {out} overlaps the source {source}; choose a folder outside it")

    def check(self) -> None:
        """Refuse an existing output before any work (a dry run calls only this)."""
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output {self.out} exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputError(f"output {self.out} exists and is not empty; pass --overwrite to replace it")
        if self.tmp.exists() and not (self.resume or self.overwrite):
            raise OutputError(
                f"an interrupted run left {self.tmp}; pass --resume to continue it or --overwrite to start again"
            )

    def prepare(self) -> None:
        self.check()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists() and self.resume and self._load_journal():
                return
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            self._save_journal()
        except OSError as exc:
            raise OutputError(f"cannot create {self.tmp} ({exc.strerror or exc})") from None

    def _load_journal(self) -> bool:
        try:
            journal = json.loads((self.tmp / JOURNAL_NAME).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(journal, dict) or journal.get("run_key") != self.run_key:
            return False
        shards, stats = journal.get("finished_shards"), journal.get("stats")
        if not isinstance(shards, dict) or not isinstance(stats, dict):
            return False
        self.finished, self.stats = dict(shards), dict(stats)
        return True

    def _save_journal(self) -> None:
        journal = {"run_key": self.run_key, "finished_shards": self.finished, "stats": self.stats}
        data = json.dumps(journal, indent=1, sort_keys=True)
        part = self.tmp / (JOURNAL_NAME + ".part")
        part.write_text(data)
        os.replace(part, self.tmp / JOURNAL_NAME)

    def path(self, name: str) -> Path:
        return self.tmp / name

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
        for path in self.tmp.iterdir():
            _fsync_path(path)
        _fsync_path(self.tmp, directory=True)
        old = None
        if self.out.exists():
            if any(self.out.iterdir()):
                old = self.out.parent / f".{self.out.name}.fp8conv-old"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(self.out, old)
            else:
                self.out.rmdir()
        os.rename(self.tmp, self.out)
        _fsync_path(self.out.parent, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
