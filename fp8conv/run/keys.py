"""The keys that identify a run: across hosts (parts, merge) and on this host (--resume)."""
from __future__ import annotations

import hashlib

from ..io.checkpoint import Checkpoint
from ..plan.records import ConversionPlan


def run_key(checkpoint: Checkpoint, plan: ConversionPlan, allow_nonfinite: bool) -> str:
    """Identifies a run (for --resume, and the parts of a partitioned run): the source's shard
    names, sizes and headers, the decisions and the output layout.

    Nothing that differs between hosts sharing SRC and OUT (no mtimes, hostnames or absolute
    paths), and not --workers: the output bytes never depend on it."""
    digest = hashlib.sha256()
    for shard in checkpoint.shards:
        tensors = sorted((i.name, i.dtype, i.shape, i.start, i.end) for i in shard.tensors.values())
        digest.update(repr((shard.path.name, shard.file_size, sorted(shard.metadata.items()), tensors)).encode())
    layout = plan.layout.name if plan.layout else None
    described = [repr(plan.scheme), sorted((n, repr(s)) for n, s in plan.schemes.items()), layout, plan.out_dtype,
                 allow_nonfinite, plan.warnings,
                 sorted((n, d.action, d.reason) for n, d in plan.decisions.items()),
                 [(s.name, [(e.name, e.dtype, e.shape) for e in s.entries]) for s in plan.shards]]
    digest.update(repr(described).encode())
    return digest.hexdigest()


def resume_key(checkpoint: Checkpoint, key: str) -> str:
    """The key a staging journal is resumed under: the run's key plus, for each source file, what
    this host sees of it beyond its name and bytes: mtime, inode and ctime. The ctime cannot be set
    back by a user (restoring an edited file's mtime sets it), so an in-place edit since the
    interrupted run starts over instead of mixing old and new shards. Local only: a part's record
    and `merge` compare the host-independent run key (another host's copy of SRC is a different
    inode; there a resumed part just starts over)."""
    digest = hashlib.sha256(key.encode())
    for shard in checkpoint.shards:
        info = shard.path.stat()
        digest.update(f"{shard.path.name}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}:{info.st_ctime_ns}:".encode())
    return digest.hexdigest()
