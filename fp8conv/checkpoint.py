"""A checkpoint on disk: its shards, the index that ties tensors to shards, and its other files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .safetensors_io import Header, TensorInfo, read_header
from .untrusted import load_json, printable

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "fp8conv.manifest.json"
REPORT_NAME = "fp8conv.report.json"
REPORT_HTML_NAME = "fp8conv.report.html"


@dataclass
class Checkpoint:
    """Shards in order, every tensor's location, and the non-weight files beside them."""

    root: Path
    shards: list[Header]
    index: dict | None = None
    extra_files: list[Path] = field(default_factory=list)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {name: info for shard in self.shards for name, info in shard.tensors.items()}

    def shard_of(self) -> dict[str, Path]:
        return {name: shard.path for shard in self.shards for name in shard.tensors}

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
        if not path.is_file():
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
        raise InputError(f"{index_path}: shard name {printable(str(name))} is not a .safetensors file name")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"{index_path}: shard name {printable(name)} tries to leave the checkpoint folder")
    return name


def _load_index(root: Path) -> tuple[dict, list[str]]:
    index_path = root / INDEX_NAME
    index = load_json(_read_text(index_path), printable(str(index_path)), "not readable JSON")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: has no weight_map object")
    shard_names: list[str] = []
    for tensor, shard in weight_map.items():
        name = _safe_shard_name(shard, index_path)
        if name not in shard_names:
            shard_names.append(name)
    for name in shard_names:
        if not (root / name).is_file():
            raise InputError(f"{index_path}: names shard {printable(name)}, which is missing")
    return index, sorted(shard_names)


def _check_index_agrees(index: dict, shards: list[Header], index_path: Path) -> None:
    weight_map: dict[str, str] = index["weight_map"]
    for shard in shards:
        for name in shard.tensors:
            listed = weight_map.get(name)
            if listed is None:
                raise InputError(f"{shard.path}: tensor {printable(name)} is not listed in {INDEX_NAME}")
            if listed != shard.path.name:
                raise InputError(f"{index_path}: tensor {printable(name)} is listed in {printable(listed)} but stored in {shard.path.name}")
    stored = {name for shard in shards for name in shard.tensors}
    for name, shard in weight_map.items():
        if name not in stored:
            raise InputError(f"{index_path}: tensor {printable(name)} is missing from shard {printable(shard)}")


def _check_unique(shards: list[Header]) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in seen:
                raise InputError(f"tensor {printable(name)} is stored twice: in {seen[name].name} and {shard.path.name}")
            seen[name] = shard.path


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a .safetensors file, a folder with an index, or a folder of shards; validate every header."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file or a checkpoint folder")
        return Checkpoint(path.parent, [read_header(path)])
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    index = None
    if (path / INDEX_NAME).exists():
        index, names = _load_index(path)
    else:
        names = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        if not names:
            raise InputError(f"{path}: no .safetensors files and no {INDEX_NAME}")
    shards = [read_header(path / name) for name in names]
    _check_unique(shards)
    if index is not None:
        _check_index_agrees(index, shards, path / INDEX_NAME)
    weight_files = set(names) | {INDEX_NAME}
    extras = sorted(p for p in path.iterdir() if p.is_file() and p.name not in weight_files and not p.name.endswith(".safetensors"))
    return Checkpoint(path, shards, index, extras)
