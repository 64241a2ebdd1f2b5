"""Partitioned runs: part I of N converts a fixed 1/N of the output shards into OUT's parts area;
`merge` checks that the N parts belong together and are complete.

The parts area is a hidden sibling of OUT, `.<OUT>.fp8conv-parts/`, holding one folder per
finished part, `part-0000I-of-0000N/` (written atomically through the same staging as a whole
run, so an interrupted part resumes with --resume) with its shards and a record
(fp8conv.part.json): run identity, recipe, the shards' sha256 and sizes, their tensors' error
statistics. Which shards a part converts depends only on the plan and N, so every host agrees.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..plan.records import OutShard
from ..errors import InputError, SchemeError
from ..plan.recipe import Recipe
from ..io.untrusted import load_json, printable

RECORD_NAME = "fp8conv.part.json"
RECORD_SCHEMA = 1
MAX_PARTS = 100_000  # a part holds whole shards: more parts than that is a typo, and costs memory per part
_PART_DIR = re.compile(r"part-(\d{5,})-of-(\d{5,})")


@dataclass(frozen=True)
class Partition:
    """Part `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        """'2/8' -> Partition(2, 8); raises SchemeError for anything else."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise SchemeError(f"--partition {text!r} is not I/N (e.g. 1/4)")
        if len(match[1]) > 6 or len(match[2]) > 6 or int(match[2]) > MAX_PARTS:
            raise SchemeError(f"--partition {text!r}: N must be at most {MAX_PARTS:,}")
        index, count = int(match[1]), int(match[2])
        if not 1 <= index <= count:
            raise SchemeError(f"--partition {text!r}: I must be between 1 and N")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def parts_dir(out: Path) -> Path:
    """Where the parts of OUT live: a hidden sibling, on the same filesystem (merge hard-links)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.fp8conv-parts"


def assign(shards: list[OutShard], count: int) -> list[list[str]]:
    """Output shard names per part: largest shard first (ties by name) to the part with the fewest
    bytes so far (ties: the lower part). Depends only on the plan, so every host computes the same."""
    parts: list[list[str]] = [[] for _ in range(count)]
    loads = [(0, i) for i in range(count)]  # a heap: (bytes so far, part); O(shards x log N)
    for shard in sorted(shards, key=lambda s: (-s.nbytes, s.name)):
        load, target = heapq.heappop(loads)
        parts[target].append(shard.name)
        heapq.heappush(loads, (load + shard.nbytes, target))
    order = {shard.name: i for i, shard in enumerate(shards)}
    return [sorted(names, key=order.__getitem__) for names in parts]


@dataclass
class PartRecord:
    """What a finished part wrote, and for which run."""

    folder: Path
    partition: Partition
    run_key: str
    recipe: Recipe
    source: str
    files: dict[str, dict]
    stats: dict[str, dict]

    def to_json(self) -> dict:
        return {"schema_version": RECORD_SCHEMA, "partition": [self.partition.index, self.partition.count],
                "run_key": self.run_key, "recipe": self.recipe.to_json(), "source": self.source,
                "files": dict(sorted(self.files.items())), "stats": dict(sorted(self.stats.items()))}

    def write(self, folder: Path) -> None:
        (folder / RECORD_NAME).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def read_record(folder: Path) -> PartRecord:
    """A finished part's record; raises InputError naming the folder when absent or malformed."""
    path = folder / RECORD_NAME
    damaged = f"part {folder}: has no readable {RECORD_NAME} (not written by this fp8conv, or damaged)"
    try:
        data = load_json(path.read_bytes(), str(path))
        index, count = data["partition"]
        if not all(_is_int(v, 1, MAX_PARTS + 1) for v in (index, count)) or index > count:
            raise ValueError("partition out of range")
        record = PartRecord(folder, Partition(int(index), int(count)), str(data["run_key"]),
                            Recipe.from_json(data["recipe"], str(path)), str(data["source"]),
                            dict(data["files"]), dict(data["stats"]))
        if data["schema_version"] != RECORD_SCHEMA:
            raise ValueError("unknown schema")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, InputError):
        raise InputError(damaged) from None
    for name, meta in record.files.items():
        if (not isinstance(meta, dict) or not _is_int(meta.get("bytes"), 0, 2 ** 63)
                or not isinstance(meta.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])):
            raise InputError(f"part {folder}: {RECORD_NAME} has a damaged record of shard {printable(name)}")
    for name, stats in record.stats.items():
        problem = _stats_problem(stats)
        if problem:
            raise InputError(f"part {folder}: {RECORD_NAME} has damaged statistics of {printable(name)} ({problem})")
    if folder.name != record.partition.name:
        raise InputError(f"part {folder}: its record says it is part {record.partition.label}")
    return record


_STAT_INTS = ("elements", "saturated", "flushed_to_zero", "nonfinite")
_STAT_FLOATS = ("sum_sq_ref", "sum_sq_err", "max_abs_err", "observed_sum_sq_err", "minmax_sum_sq_err")


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _stats_problem(stats: object) -> str | None:
    """Why a record's error statistics (kernels.ErrorStats fields) cannot be summed into a report, or None."""
    if not isinstance(stats, dict):
        return "not an object"
    for key, value in stats.items():
        if key in _STAT_INTS:
            if not _is_int(value, 0, 2 ** 63):
                return f"{printable(str(key))} is not a count"
        elif key in _STAT_FLOATS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                return f"{printable(str(key))} is not a finite number >= 0"
        else:
            return f"unknown key {printable(str(key))}"
    if ("observed_sum_sq_err" in stats) != ("minmax_sum_sq_err" in stats):
        return "observed_sum_sq_err and minmax_sum_sq_err go together"
    return None


def collect(area: Path) -> list[PartRecord]:
    """The N parts of one run, in order. Raises InputError naming a missing, unfinished or foreign part.

    The run the parts area belongs to is the one most finished parts agree on (run identity and
    N; ties: the one of the lowest part); any other part is foreign."""
    if not area.is_dir():
        raise InputError(f"no parts to merge: {area} does not exist (run quantize/dequantize with --partition I/N first)")
    folders = [p for p in sorted(area.iterdir()) if _PART_DIR.fullmatch(p.name)]
    for folder in folders:
        if folder.is_symlink():
            raise InputError(f"part {folder} is a link; a part is a folder its run wrote")
    records = [read_record(p) for p in folders if p.is_dir()]
    if not records:
        raise InputError(f"no finished part in {area}")
    votes: dict[tuple[str, int], int] = {}
    for record in records:
        votes[(record.run_key, record.partition.count)] = votes.get((record.run_key, record.partition.count), 0) + 1
    best = max(votes.values())
    run_key, count = next((r.run_key, r.partition.count) for r in records
                          if votes[(r.run_key, r.partition.count)] == best)
    for record in records:
        if (record.run_key, record.partition.count) != (run_key, count):
            raise InputError(f"part {record.folder} is foreign: written by another run (different source, options or "
                             f"partition count than the other parts); remove it")
    by_index = {r.partition.index: r for r in records}
    for index in range(1, count + 1):
        if index not in by_index:
            missing = Partition(index, count)
            partial = area / f".{missing.name}.fp8conv-partial"
            state = (f"unfinished ({partial} exists: still running, or rerun it with --resume)" if partial.exists()
                     else "missing")
            raise InputError(f"part {missing.label} ({area / missing.name}) is {state}; "
                             f"run it with --partition {missing.label}")
    return [by_index[i] for i in range(1, count + 1)]


def check_against_plan(records: list[PartRecord], shards: list[OutShard]) -> None:
    """Every part holds exactly the shards the plan assigns it, at their recorded sizes."""
    expected = assign(shards, len(records))
    for record, names in zip(records, expected):
        if sorted(record.files) != sorted(names):
            raise InputError(f"part {record.folder} holds {sorted(record.files)}, the plan assigns it {names}")
        for name, meta in record.files.items():
            path = record.folder / name
            if path.is_symlink():
                raise InputError(f"part {record.folder}: shard {printable(name)} is a link, not the file the part wrote")
            if not path.is_file() or path.stat().st_size != meta.get("bytes"):
                raise InputError(f"part {record.folder}: shard {printable(name)} is missing or has the wrong size")


def check_digest(record: PartRecord, name: str, path: Path) -> None:
    """The shard at `path` (a part's, as linked into the merge) has the sha256 its part recorded; read
    without following a link (a shard replaced by one is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"part {record.folder}: shard {printable(name)} cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise InputError(f"part {record.folder}: shard {printable(name)} is not a regular file")
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != record.files[name]["sha256"]:
        raise InputError(f"part {record.folder}: shard {printable(name)} does not match the sha256 its part recorded "
                         f"(changed since the part finished); remove {record.folder} and run it again with --partition "
                         f"{record.partition.label}")
