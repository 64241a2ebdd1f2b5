"""The model card OUT/README.md: what fp8conv did to SRC, how to load it, and how it evaluated.

Hugging Face model-card convention: YAML front matter (base_model, tags, library_name, SRC's own keys
kept), then the body. SRC's README.md text is kept below ours, after ORIGINAL_MARKER, so `fp8conv card
OUT` re-renders the card (after an eval, say) from OUT alone. The card quotes the sha256 of the
manifest, so the manifest cannot list the card's bytes; verify checks that quoted digest instead.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from .. import __version__
from ..evaluate.quality import eval_table, read_eval
from ..layouts.base import Layout
from ..io.checkpoint import CARD_NAME, CONFIG_NAME, MANIFEST_NAME, REPORT_NAME
from ..errors import InputError, OutputError
from ..io.untrusted import load_json_file
from ..io.atomic import write_atomic

ORIGINAL_MARKER = "<!-- fp8conv: the source model's card follows, unchanged -->"
DIGEST_KEY = "fp8conv_manifest_sha256"


def split_front_matter(text: str) -> tuple[dict, str]:
    """('---' YAML '---' + body) -> (keys, body). Only the flat `key: value` and `key:` + `- item`
    lists of model cards are read; anything else is kept verbatim under its key."""
    match = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n?", text, re.S)
    if not match:
        return {}, text
    keys: dict[str, object] = {}
    current = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s*-\s+(.*)$", line)
        pair = re.match(r"^([A-Za-z0-9_.-]+):\s*(.*)$", line)
        if item and current is not None and isinstance(keys.get(current), list):
            keys[current].append(_unquote(item.group(1)))
        elif pair:
            current = pair.group(1)
            keys[current] = _unquote(pair.group(2)) if pair.group(2) else []
        elif current is not None:  # nested YAML we do not parse: kept as text
            prev = keys[current]
            keys[current] = (prev if isinstance(prev, str) else "") + "\n" + line
    return keys, text[match.end():]


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def _yaml(keys: dict) -> str:
    lines = ["---"]
    for key, value in keys.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_quote(v)}" for v in value]
        elif "\n" in str(value):
            lines.append(f"{key}:{value}")
        else:
            lines.append(f"{key}: {_quote(str(value))}")
    return "\n".join(lines + ["---", ""])


def _quote(value: str) -> str:
    return json.dumps(value) if re.search(r"[:#\[\]{}&*!|>'\"%@`]|^\s|\s$|^$", value) else value


def _read_json(path: Path) -> dict:
    data = load_json_file(path, "is not readable JSON; is this an fp8conv output?")
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def previous_card(out: Path) -> tuple[dict, str]:
    """(our earlier front matter, the source's card text below the marker) of OUT's README.md, if any."""
    path = Path(out) / CARD_NAME
    if not path.is_file():
        return {}, ""
    keys, body = split_front_matter(path.read_text(encoding="utf-8", errors="replace"))
    if ORIGINAL_MARKER in body:
        return keys, body.split(ORIGINAL_MARKER, 1)[1].lstrip("\n")
    if DIGEST_KEY in keys:  # ours, over a source that had no card
        return keys, ""
    return {}, path.read_text(encoding="utf-8", errors="replace")  # not ours: it is the source's card


OUR_KEYS = ("base_model", "tags", "library_name", DIGEST_KEY, "fp8conv_version", "fp8conv_command")


def render_card(out: Path, source_card: str, command: str, base_model: str, earlier: dict | None = None) -> str:
    """The whole README.md of OUT from its manifest, report, config and (if any) eval result."""
    out = Path(out)
    manifest = _read_json(out / MANIFEST_NAME)
    report = _read_json(out / REPORT_NAME)
    try:  # a source's broken config.json was copied unchanged (quantize warned): the card does without it
        config = _read_json(out / CONFIG_NAME)
    except InputError:
        config = {}
    evaluation = read_eval(out)
    src_keys, src_body = split_front_matter(source_card)
    # A re-render keeps the source's keys it merged before (its body below the marker has no front matter).
    src_keys = {**{k: v for k, v in (earlier or {}).items() if k not in OUR_KEYS or k == "tags"}, **src_keys}
    scheme = manifest.get("scheme") or {}
    layout = scheme.get("layout", "")
    fmt = scheme.get("microscale") or scheme.get("format", "")
    tags = [t for t in src_keys.get("tags", []) if isinstance(t, str)] if isinstance(src_keys.get("tags"), list) else []
    loadable = layout in Layout.registry and Layout.registry[layout].engine_loadable
    for tag in ("fp8conv", "quantized", fmt.split("_")[0], layout if loadable else ""):  # fp8_e4m3 -> fp8
        if tag and tag not in tags:
            tags.append(tag)
    ours = {"base_model": base_model, "tags": tags, "library_name": "transformers",
            DIGEST_KEY: hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest(),
            "fp8conv_version": __version__, "fp8conv_command": command}
    keys = {**ours, **{k: v for k, v in src_keys.items() if k not in ours}}  # ours first, SRC's other keys after
    decoder = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])
    body = [f"# {out.resolve().name}", "",
            f"{base_model} quantized by [fp8conv](https://pypi.org/project/fp8conv/) {__version__}: "
            f"{_scheme_text(scheme)}, {layout} layout.", "",
            *_what_was_done(manifest, report), *_provenance(command, keys[DIGEST_KEY]),
            *_load_section(layout, decoder, config), *_eval_section(evaluation)]
    if src_body.strip():
        body += ["", ORIGINAL_MARKER, "", src_body.rstrip("\n")]
    return _yaml(keys) + "\n" + "\n".join(body).rstrip("\n") + "\n"


def _scheme_text(scheme: dict) -> str:
    fmt = scheme.get("microscale") or scheme.get("format", "?")
    parts = [fmt]
    if not scheme.get("microscale"):
        if scheme.get("granularity") == "block" and scheme.get("block_size"):
            parts.append("block " + "x".join(str(b) for b in scheme["block_size"]))
        elif scheme.get("granularity") == "group":
            parts.append(f"group {scheme.get('group_size')}")
        elif scheme.get("granularity"):
            parts.append(str(scheme["granularity"]))
    parts.append("weight-only" if scheme.get("activations") == "none" else "dynamic activations")
    if scheme.get("observer"):
        parts.append(f"observer {scheme['observer']}")
    return " ".join(parts)


def _what_was_done(manifest: dict, report: dict) -> list[str]:
    tensors = manifest.get("tensors") or {}
    groups = Counter((t.get("decision"), t.get("source_dtype"), t.get("output_dtype")) for t in tensors.values())
    lines = ["## What was done", "", "| tensors | decision | dtype before | dtype after |", "| ---: | --- | --- | --- |"]
    lines += [f"| {n} | {d} | {a} | {b} |" for (d, a, b), n in sorted(groups.items(), key=lambda kv: (-kv[1], str(kv[0])))]
    kept = report.get("high_precision") or []
    if kept:  # the ignore list, one line per reason (a 30-layer model has 60 norms)
        by_reason: dict[str, list[str]] = {}
        for k in kept:
            by_reason.setdefault(str(k.get("reason")), []).append(str(k.get("name")))
        lines += ["", "Kept in high precision:", ""]
        lines += [f"- {len(names)} x {', '.join(f'`{n}`' for n in names[:3])}{', ...' if len(names) > 3 else ''}: {reason}"
                  for reason, names in by_reason.items()]
    before, after = report.get("total_bytes_before"), report.get("total_bytes_after")
    bpw = report.get("bits_per_weight")
    lines += ["", f"- bits per quantized weight (codes and scales): {bpw:.3f}" if bpw else "- bits per weight: -",
              f"- size: {_size(before)} before, {_size(after)} after"
              + (f" ({report['compression_ratio']:.2f}x smaller)" if report.get("compression_ratio") else ""),
              f"- worst relative RMS weight error: {report.get('worst_rel_rms_error', 0):.4g} "
              "(per tensor in fp8conv.report.json / fp8conv.report.html)", ""]
    return lines


def _size(n: object) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) else "?"


def _provenance(command: str, digest: str) -> list[str]:
    return ["## Provenance", "", "```bash", command, "```", "",
            f"fp8conv {__version__}; sha256 of fp8conv.manifest.json (every file's sha256 and every tensor's "
            f"decision): `{digest}`. Check the files with `fp8conv verify .`", ""]


def load_snippets(layout: str, decoder: bool, model: str = "MODEL_DIR_OR_REPO_ID") -> dict[str, str]:
    """Python snippets that load this layout: 'transformers' (any device, dequantized on load) and 'vllm'."""
    cls = "AutoModelForCausalLM" if decoder else "AutoModel"
    loader = Layout.registry[layout].transformers_loader if layout in Layout.registry else None
    if loader is None:
        return {}
    name = loader.split("(")[0]
    snippets = {"transformers": "\n".join([
        f"from transformers import {cls}, AutoTokenizer, {name}",
        "",
        f"model_id = {json.dumps(model)}",
        "# On a GPU with kernels for this scheme, drop quantization_config to run it compressed.",
        f"model = {cls}.from_pretrained(model_id, quantization_config={loader}, dtype=\"auto\")",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        *(["inputs = tokenizer(\"The river begins as a spring\", return_tensors=\"pt\")",
           "print(tokenizer.decode(model.generate(inputs.input_ids, max_new_tokens=8)[0]))"] if decoder else
          ["inputs = tokenizer([\"The river begins as a spring\"], return_tensors=\"pt\")",
           "print(model(**inputs).last_hidden_state.shape)"]),
    ])}
    if decoder:
        snippets["vllm"] = "\n".join([
            "from vllm import LLM, SamplingParams",
            "",
            f"llm = LLM(model={json.dumps(model)})",
            "print(llm.generate([\"The river begins as a spring\"], SamplingParams(max_tokens=8))[0].outputs[0].text)",
        ])
    return snippets


def _load_section(layout: str, decoder: bool, config: dict) -> list[str]:
    snippets = load_snippets(layout, decoder)
    if not snippets:
        return ["## How to load it", "", f"The {layout} layout is read by fp8conv only "
                "(`fp8conv dequantize` writes a bf16 checkpoint from it).", ""]
    lines = ["## How to load it", "", "Replace `MODEL_DIR_OR_REPO_ID` with this folder or its Hub id.", ""]
    for engine, code in snippets.items():
        lines += [f"{engine}:", "", "```python", code, "```", ""]
    return lines


def _eval_section(evaluation: dict | None) -> list[str]:
    if evaluation is None:
        return ["## Evaluation", "", "Not evaluated yet: `fp8conv eval . --against SOURCE` measures it and "
                "re-renders this card.", ""]
    verdict = "passed" if evaluation["passed"] else "FAILED"
    gate = evaluation["gate"]
    lines = ["## Evaluation", "",
             f"`fp8conv eval` ({evaluation['engine']}, text: {evaluation['text']}) {verdict} its gate "
             + (f"(mean cosine >= {gate['min_cosine']})" if evaluation["kind"] == "encoder"
                else f"(KL <= {gate['max_kl']}, top-1 >= {gate['min_top1']})") + ":", ""]
    lines += [eval_table(evaluation)] if evaluation.get("overall") else []
    lines += [f"- {r}" for r in evaluation["reasons"]]
    return lines + [""]


def write_card(out: Path, source: Path | None, command: str, base_model: str | None = None) -> Path:
    """Write (or re-render) OUT/README.md atomically; SRC's README.md, or the one kept in the old card, goes below."""
    out = Path(out)
    old_keys, kept = previous_card(out)
    if source is not None and (Path(source) / CARD_NAME).is_file():
        kept = (Path(source) / CARD_NAME).read_text(encoding="utf-8", errors="replace")
    base = base_model or old_keys.get("base_model") or (Path(source).resolve().name if source else "the source model")
    text = render_card(out, kept, command or str(old_keys.get("fp8conv_command", "unknown")), str(base), old_keys)
    return write_atomic(out / CARD_NAME, text)


def keep_source_card(out: Path, source: Path) -> Path | None:
    """--no-card: SRC's README.md copied into OUT unchanged (it stays outside the manifest, as a card would)."""
    src = Path(source) / CARD_NAME
    if not Path(source).is_dir() or not src.is_file():
        return None
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise OutputError(f"cannot write {Path(out) / CARD_NAME}: {exc.strerror or exc}") from None
    return write_atomic(Path(out) / CARD_NAME, data)


def card_digest_matches(out: Path) -> bool | None:
    """None when README.md is not an fp8conv card; else whether it quotes the manifest's current sha256."""
    keys, _ = previous_card(out)
    if DIGEST_KEY not in keys:
        return None
    return keys[DIGEST_KEY] == hashlib.sha256((Path(out) / MANIFEST_NAME).read_bytes()).hexdigest()
