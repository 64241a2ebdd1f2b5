"""A checkpoint on disk: its shards, the index that ties tensors to shards, and its other files."""
from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping
from pathlib import Path

from .sidefiles import OTHER_WEIGHTS, check_readable, other_weights, subfolder_files
from ..errors import InputError
from .safetensors import Header, TensorInfo, read_header
from ..report.findings import cut
from .untrusted import load_json, printable

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "fp8conv.manifest.json"
REPORT_NAME = "fp8conv.report.json"
REPORT_HTML_NAME = "fp8conv.report.html"
CARD_NAME = "README.md"  # the model card fp8conv.report.card writes (SRC's own card is merged into it, not copied)


@dataclass
class Checkpoint:
    """Shards in order, every tensor's location, and the non-weight files beside them."""

    root: Path
    shards: list[Header]
    index: dict | None = None
    extra_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # files beside the weights left out, and why
    _tensors: Mapping[str, TensorInfo] | None = field(default=None, init=False, repr=False, compare=False)
    _shard_of: Mapping[str, Path] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor by name, built once (callers ask per tensor: rebuilding it each time was quadratic)."""
        if self._tensors is None:
            self._tensors = MappingProxyType({name: info for shard in self.shards for name, info in shard.tensors.items()})
        return self._tensors

    def shard_of(self) -> Mapping[str, Path]:
        if self._shard_of is None:
            self._shard_of = MappingProxyType({name: shard.path for shard in self.shards for name in shard.tensors})
        return self._shard_of

    @property
    def files(self) -> list[Path]:
        """Every file this checkpoint is read from: shards, index, side files."""
        index = [self.root / INDEX_NAME] if self.index is not None else []
        return [shard.path for shard in self.shards] + index + list(self.extra_files)

    @property
    def total_bytes(self) -> int:
        return sum(shard.file_size for shard in self.shards)

    def read_json(self, name: str) -> dict | None:
        """A JSON object file of the checkpoint folder, or None when absent; raises when corrupt."""
        path = self.root / name
        if not _is_file(path):
            return None
        data = load_json(_read_text(path), printable(str(path)), "not readable JSON")
        if not isinstance(data, dict):
            raise InputError(f"{printable(str(path))}: is not a JSON object")
        return data


def _read_text(path: Path) -> bytes | str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{printable(str(path))}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{printable(str(path))}: not readable JSON (not UTF-8 text)") from None


def _safe_shard_name(name: object, index_path: Path) -> str:
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise InputError(f"{printable(str(index_path))}: shard name {printable(str(name))} is not a .safetensors file name")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"{printable(str(index_path))}: shard name {printable(name)} tries to leave the checkpoint folder")
    return name


def _load_index(root: Path) -> tuple[dict, list[str]]:
    index_path = root / INDEX_NAME
    index = load_json(_read_text(index_path), printable(str(index_path)), "not readable JSON")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{printable(str(index_path))}: has no weight_map object")
    if not weight_map:
        raise InputError(f"{printable(str(index_path))}: weight_map is empty (a checkpoint with no tensors)")
    shard_names: list[str] = []
    for tensor, shard in weight_map.items():
        name = _safe_shard_name(shard, index_path)
        if name not in shard_names:
            shard_names.append(name)
    for name in shard_names:
        if not _is_file(root / name):
            raise InputError(f"{printable(str(index_path))}: names shard {printable(name)}, which is missing")
    return index, sorted(shard_names)


def _check_index_agrees(index: dict, shards: list[Header], index_path: Path) -> None:
    weight_map: dict[str, str] = index["weight_map"]
    for shard in shards:
        for name in shard.tensors:
            listed = weight_map.get(name)
            if listed is None:
                raise InputError(f"{printable(str(shard.path))}: tensor {printable(name)} is not listed in {INDEX_NAME}")
            if listed != shard.path.name:
                raise InputError(f"{printable(str(index_path))}: tensor {printable(name)} is listed in {printable(listed)} but stored in {printable(shard.path.name)}")
    stored = {name for shard in shards for name in shard.tensors}
    for name, shard in weight_map.items():
        if name not in stored:
            raise InputError(f"{printable(str(index_path))}: tensor {printable(name)} is missing from shard {printable(shard)}")


def _check_unique(shards: list[Header]) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in seen:
                raise InputError(f"tensor {printable(name)} is stored twice: in {printable(seen[name].name)} and {printable(shard.path.name)}")
            seen[name] = shard.path


def _list_folder(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise InputError(f"{printable(str(path))}: cannot read the folder ({exc.strerror or exc})") from None


def _stat_mode(path: Path) -> int | None:
    """The file type bits of `path` (links followed), None when it does not exist; any other failure to
    look (no search permission on a folder, a name past the file-name limit, EIO) is an input error."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"{printable(str(path))}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # an embedded NUL
        raise InputError(f"{printable(str(path))}: not a usable path ({exc})") from None


def _is_file(path: Path) -> bool:
    mode = _stat_mode(path)
    return mode is not None and stat.S_ISREG(mode)


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a .safetensors file, a folder with an index, or a folder of shards; validate every
    header, and check up front that every other file of the folder can be read."""
    path = Path(path)
    mode = _stat_mode(path)
    if mode is not None and stat.S_ISREG(mode):
        if path.suffix != ".safetensors":
            raise InputError(f"{printable(str(path))}: not a .safetensors file or a checkpoint folder")
        checkpoint = Checkpoint(path.parent, [read_header(path)])
        _refuse_empty(checkpoint, path)
        return checkpoint
    if mode is None or not stat.S_ISDIR(mode):
        raise InputError(f"{printable(str(path))}: no such file or folder")
    entries = [p for p in _list_folder(path) if _is_file(p)]
    index = None
    found = [p.name for p in entries if p.name.endswith(".safetensors")]
    if any(p.name == INDEX_NAME for p in entries):
        index, names = _load_index(path)
    else:
        names = found
        if not names:
            others = [p.name for p in entries if other_weights(p.name)]
            raise InputError(f"{printable(str(path))}: no .safetensors files and no {INDEX_NAME}"
                             + (f" (it holds {cut(others, 'ls lists all')}: fp8conv reads safetensors only; "
                                "save the model with safe_serialization=True first)" if others else ""))
    shards = [read_header(path / name) for name in names]
    _check_unique(shards)
    if index is not None:
        _check_index_agrees(index, shards, path / INDEX_NAME)
    checkpoint = Checkpoint(path, shards, index)
    _refuse_empty(checkpoint, path)
    for entry in entries:
        if entry.name in names or entry.name == INDEX_NAME:
            continue
        if entry.name.endswith(".safetensors"):
            checkpoint.skipped.append((entry, f"not listed in {INDEX_NAME} (not converted)"))
        elif other_weights(entry.name):
            checkpoint.skipped.append((entry, OTHER_WEIGHTS))
        else:
            check_readable(entry)
            checkpoint.extra_files.append(entry)
    carried, skipped = subfolder_files(path)
    checkpoint.extra_files += carried
    checkpoint.skipped += skipped
    return checkpoint


def _refuse_empty(checkpoint: Checkpoint, path: Path) -> None:
    if not any(shard.tensors for shard in checkpoint.shards):
        raise InputError(f"{printable(str(path))}: holds no tensors (an empty weight_map or empty shards)")
