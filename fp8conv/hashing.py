"""sha256 of a file whose byte ranges are written out of order, hashed as the written prefix grows.

Workers write tensors at offsets fixed by the header, in any order; the manifest needs each
file's sha256. Hashing the whole file after its last write leaves the CPUs idle at the end, so
this hashes every contiguous prefix as soon as it is complete, while later tensors convert.
"""
from __future__ import annotations

import hashlib
import heapq
import os
from pathlib import Path

READ_BYTES = 1 << 20  # one reused buffer this size: the copy out of the page cache stays in the CPU's cache


class PrefixHasher:
    """Feed it the byte ranges written to a file; it hashes [0, n) as far as n is contiguous."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.position = 0
        self._digest = hashlib.sha256()
        self._pending: list[tuple[int, int]] = []
        self._fd: int | None = None
        self._buffer: bytearray | None = None  # while hashing: not one per shard of a 1000-shard plan

    def written(self, start: int, end: int) -> None:
        """Record [start, end) as final; hash whatever prefix became contiguous."""
        if end > start:
            heapq.heappush(self._pending, (start, end))
        reach = self.position
        while self._pending and self._pending[0][0] <= reach:
            reach = max(reach, heapq.heappop(self._pending)[1])
        self._hash_to(reach)

    def _hash_to(self, end: int) -> None:
        if end <= self.position:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._buffer = bytearray(READ_BYTES)
        start = self.position
        view = memoryview(self._buffer)
        while self.position < end:
            n = os.preadv(self._fd, [view[:min(READ_BYTES, end - self.position)]], self.position)
            if not n:
                raise OSError(f"{self.path} is shorter than expected")
            self._digest.update(view[:n])
            self.position += n
        # Their writeback was asked for when their job reported them (outdir.Writeback, another
        # thread); DONTNEED drops the pages already on disk and starts any left, so the fsync
        # before the final rename has little left to wait for and the page cache does not fill
        # up with output during a long conversion.
        os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def hexdigest(self) -> str:
        """The file's sha256; every byte must have been reported written."""
        if self.position != self.size:
            raise AssertionError(f"{self.path}: hashed {self.position} of {self.size} bytes")  # pragma: no cover
        if self._fd is not None:
            fd, self._fd, self._buffer = self._fd, None, None  # forgotten first: never closed twice
            os.close(fd)
        return self._digest.hexdigest()
