"""Files fp8conv adds to a finished OUT after the run: the eval and sensitivity results (listed in the manifest,
shown in the HTML report) and the model card re-rendered to quote the manifest that now lists them."""
from __future__ import annotations

import json
from pathlib import Path

from . import html_page as html_report
from .card import CARD_NAME, write_card
from ..errors import InputError
from ..evaluate.quality import EVAL_NAME, read_eval
from ..evaluate.sensitivity import SENSITIVITY_NAME, read_sensitivity
from ..io.checkpoint import MANIFEST_NAME, REPORT_HTML_NAME, REPORT_NAME
from ..io.safetensors import sha256_of
from ..io.untrusted import load_json_file
from ..io.atomic import write_atomic


def record_eval(out: Path, data: dict) -> list[Path]:
    """Write OUT/fp8conv.eval.json, re-render the HTML report with it, list both in the manifest (when OUT
    has one: an fp8conv output), re-render an fp8conv card. Returns the files written."""
    return _record(Path(out), EVAL_NAME, data)


def record_sensitivity(out: Path, data: dict) -> list[Path]:
    """Write OUT/fp8conv.sensitivity.json (fp8conv sensitivity --record), as record_eval does the eval's."""
    return _record(Path(out), SENSITIVITY_NAME, data)


def check_recordable(out: Path) -> None:
    """Refuse (before any work) to record into a folder that is not an fp8conv output."""
    if not (Path(out) / REPORT_NAME).is_file() or not (Path(out) / MANIFEST_NAME).is_file():
        raise InputError(f"{out}: not an fp8conv output (no {REPORT_NAME} / {MANIFEST_NAME}) to record the result in")


def _record(out: Path, name: str, data: dict) -> list[Path]:
    written = [_write(out / name, json.dumps(data, indent=2, allow_nan=False) + "\n")]
    if (out / REPORT_NAME).is_file():
        page = html_report.render_conversion(html_report.load_report(out), read_eval(out), read_sensitivity(out))
        written.append(_write(out / REPORT_HTML_NAME, page))
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = load_json_file(manifest_path, "is not readable JSON")
        if not isinstance(manifest, dict):
            raise InputError(f"{manifest_path}: not a JSON object")
        files = manifest.setdefault("files", {})
        for path in written:
            files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        manifest["files"] = dict(sorted(files.items()))
        _write(manifest_path, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        if (out / CARD_NAME).is_file():
            written.append(write_card(out, None, ""))
    return written


def _write(path: Path, text: str) -> Path:
    return write_atomic(path, text)
