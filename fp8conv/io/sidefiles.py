"""The rest of the model folder: every file and subfolder of SRC that is not a weight shard goes into
OUT (tokenizer, generation config, sentence-transformers' 1_Pooling/, ...), recorded in the manifest
with its sha256. What is deliberately left out (weights in another format, hidden folders, links to
folders) is named in one warning.

README.md is not copied here: it is the model card's (fp8conv.report.card merges SRC's into it).
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..report.findings import cut
from .untrusted import printable

# Weights of other formats: never carried (they would hold the unconverted model).
OTHER_WEIGHT_GLOBS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.gguf",
                      "*.h5", "*.msgpack", "*.onnx", "*.safetensors.index.json")
OTHER_WEIGHTS = "weights in another format (fp8conv reads safetensors only)"


def other_weights(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in OTHER_WEIGHT_GLOBS)


def subfolder_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under SRC's subfolders, carried as files (safetensors included), and what is not carried, why."""
    carried: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for top in sorted(p for p in _entries(root) if p.is_dir() or p.is_symlink()):
        if top.is_file():
            continue
        if top.name.startswith("."):
            skipped.append((top, "hidden folder"))
            continue
        if top.is_symlink():
            skipped.append((top, "a link to a folder (not followed)"))
            continue
        for folder, dirs, files in os.walk(top, onerror=_unreadable):
            base = Path(folder)
            for name in sorted(dirs):
                if name.startswith(".") or (base / name).is_symlink():
                    skipped.append((base / name, "hidden folder" if name.startswith(".") else
                                    "a link to a folder (not followed)"))
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (base / d).is_symlink())
            for name in sorted(files):
                path = base / name
                if other_weights(name) and not name.endswith(".safetensors.index.json"):
                    skipped.append((path, OTHER_WEIGHTS))
                elif path.is_file():
                    check_readable(path)
                    carried.append(path)
    return carried, skipped


def _entries(root: Path) -> list[Path]:
    try:
        return sorted(root.iterdir())
    except OSError as exc:
        raise InputError(f"{printable(str(root))}: cannot read the folder ({exc.strerror or exc})") from None


def _unreadable(exc: OSError) -> None:
    raise InputError(f"{printable(str(exc.filename))}: cannot read the folder ({exc.strerror or exc})")


def check_readable(path: Path) -> None:
    """Refuse a file this process cannot open for reading, naming it."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"{printable(str(path))}: cannot read ({exc.strerror or exc})") from None


def not_carried_warning(root: Path, skipped: list[tuple[Path, str]]) -> list[str]:
    """One line naming what SRC holds that OUT will not, grouped by reason."""
    if not skipped:
        return []
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(_relative(root, path) + ("/" if path.is_dir() else ""))
    listed = "; ".join(f"{cut(names, 'fp8conv quantize --dry-run --json lists all')}: {reason}"
                       for reason, names in by_reason.items())
    return [f"not carried into the output: {listed}"]


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def carry(root: Path, files: list[Path], target_of, reserved: tuple[str, ...]) -> None:
    """Copy SRC's side files into the staging folder (`target_of(relative name)` -> Path): real files
    in OUT even when SRC holds links. `reserved` names are OUT's own (manifest, report, model card)."""
    for path in files:
        rel = _relative(root, path)
        if rel in reserved:
            continue
        target = target_of(rel)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
