"""Text that comes from a checkpoint or a user: escaped before it reaches a terminal, parsed
strictly when it is JSON. Every JSON file fp8conv reads (headers, index, config, manifest,
journal) goes through load_json, so each refusal has one cause and one exit code."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def printable(text: str) -> str:
    """Escape the characters of untrusted text that a terminal would act on (ESC, newline, ...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _no_constant(token: str):
    raise ValueError(f"{token} is not JSON")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {printable(key)!r}")
        seen[key] = value
    return seen


def load_json(text: str | bytes, label: str, what: str = "is not valid JSON") -> object:
    """Parse strict JSON: no NaN/Infinity, no duplicate keys, nesting bounded by the parser (a
    100,000-deep document is refused, not a crash). Raises InputError '<label>: <what> (<why>)'."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise InputError(f"{label}: {what} (nested too deeply)") from None
    except UnicodeDecodeError:
        raise InputError(f"{label}: {what} (not UTF-8 text)") from None
    except ValueError as exc:
        raise InputError(f"{label}: {what} ({printable(str(exc))})") from None


def load_json_file(path, what: str = "is not valid JSON") -> object:
    """load_json of a file's bytes; an unreadable file is an InputError naming it too."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({printable(exc.strerror or str(exc))})") from None
    return load_json(data, str(path), what)
