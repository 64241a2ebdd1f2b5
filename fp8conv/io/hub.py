"""Hugging Face hub ids where a user types a checkpoint path: `fp8conv quantize org/name -o OUT`.

A path that exists is always the path. Otherwise a name shaped like a hub id (`org/name`, optionally
`org/name@revision`) is resolved through huggingface_hub's snapshot_download (the optional extra
`fp8conv[hub]`), which downloads it or, offline (HF_HUB_OFFLINE=1), finds it in the local HF cache
(HF_HOME / HF_HUB_CACHE), as every Hugging Face tool does. Only the files a conversion reads or carries
are fetched: no weights in other formats.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError, MissingExtra
from .untrusted import printable

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?")
NOT_FETCHED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite"]


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and not text.startswith((".", "/"))


def resolve(text: str | Path) -> Path:
    """The local folder for a path or a hub id; raises MissingExtra / InputError in one line."""
    path = Path(text)
    if path.exists() or path.is_symlink() or not looks_like_hub_id(str(text)):
        return path
    repo_id, _, revision = str(text).partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtra(f"{printable(str(text))}: no such file or folder; to read it as a Hugging Face hub id, "
                           "pip install 'fp8conv[hub]'") from None
    try:
        folder = snapshot_download(repo_id=repo_id, revision=revision or None, ignore_patterns=NOT_FETCHED)
    except Exception as exc:  # the hub's own errors: offline and not cached, no such repo, gated, network
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{printable(str(text))}: no such file or folder, and the Hugging Face hub could not "
                         f"provide it ({type(exc).__name__}: {printable(reason)})") from None
    return Path(folder)
