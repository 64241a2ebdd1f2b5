"""fp8conv verify: integrity, structure, numerics and engine checks of any quantized checkpoint.

A checkpoint with no quantized weight fails (exit 1, structure: "nothing is quantized")."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..plan.architecture import Architecture
from ..plan.engines import DEFAULT_ENGINES, fused_constraints, kept_experts_constraints, weight_constraints
from ..report.card import CARD_NAME, card_digest_matches
from ..io.checkpoint import MANIFEST_NAME, Checkpoint, open_checkpoint
from ..errors import InputError
from ..numerics.kernels import load_float32
from ..numerics.stats import ErrorStats
from ..plan.decisions import Matcher, module_name
from ..plan.fusion import fused_sets
from ..layouts import Layout
from ..layouts.read import SCALE_SUFFIXES, AUX_SUFFIXES, CheckpointView, ConfigGroups, QuantizedWeight, Readers, matrix_chunks, open_view
from ..run.reading import dequantized_chunks
from ..report.manifest import error_metrics
from ..io.safetensors import READ_CHUNK_BYTES, printable, sha256_of
from ..layouts.source_checks import source_problems

CHUNK_BYTES = READ_CHUNK_BYTES
CHECKS = ("integrity", "structure", "numerics", "engines")


@dataclass
class Finding:
    check: str
    message: str
    tensor: str | None = None
    fatal: bool = True
    rule: str | None = None  # the same sentence for every tensor breaking one engine rule (shown grouped)


@dataclass
class VerifyResult:
    path: Path
    layout: str
    findings: list[Finding] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)
    compared: bool = False

    def fail(self, check: str, message: str, tensor: str | None = None, rule: str | None = None) -> None:
        self.findings.append(Finding(check, message, tensor, rule=rule))

    def warn(self, check: str, message: str, tensor: str | None = None, rule: str | None = None) -> None:
        self.findings.append(Finding(check, message, tensor, fatal=False, rule=rule))

    @property
    def passed(self) -> bool:
        return not any(f.fatal for f in self.findings)

    def status(self, check: str) -> str:
        return "fail" if any(f.fatal and f.check == check for f in self.findings) else "pass"

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "layout": self.layout,
            "passed": self.passed,
            "checks": {c: self.status(c) for c in CHECKS},
            "findings": [f.__dict__ for f in self.findings],
            "compared_against_source": self.compared,
            "tensors": self.tensors,
        }


@dataclass(frozen=True)
class VerifyOptions:
    against: Path | None = None
    max_rel_error: float | None = None
    tp: int = 1
    engines: tuple[str, ...] = DEFAULT_ENGINES


def verify_checkpoint(path: Path, options: VerifyOptions, progress: Callable[[int], None] = lambda n: None) -> VerifyResult:
    """Run every check; raises InputError only when the checkpoint cannot be opened at all."""
    checkpoint = open_checkpoint(path)
    source = open_checkpoint(options.against) if options.against is not None else None
    view = open_view(checkpoint)
    view.refuse_unsupported()
    result = VerifyResult(Path(path), view.layout)
    if not view.weights:
        # A pipeline that runs verify after quantize must not pass on the unconverted folder.
        result.fail("structure", "nothing is quantized: no weight here has codes and a scale in a layout fp8conv "
                    "reads (compressed-tensors, fine-grained FP8, fp8conv); is this the source folder? "
                    "fp8conv quantize writes a quantized one")
    _check_integrity(checkpoint, view, result, progress)
    _check_structure(view, result)
    with Readers(checkpoint) as readers:
        bad_sources = _check_numerics(view, readers, result, progress)
        if source is not None:
            result.compared = True
            with Readers(source) as source_readers:
                _compare(view, readers, source, source_readers, options, result, progress, bad_sources)
    _check_engines(view, options, result)
    return result


def total_work(path: Path, against: Path | None) -> int:
    """Bytes the progress bar will count: hashing plus reading (plus the source when comparing)."""
    checkpoint = open_checkpoint(path)
    work = 2 * checkpoint.total_bytes
    if against is not None:
        work += open_checkpoint(against).total_bytes
    return work


# ---- 1. integrity -----------------------------------------------------------------------------


def _check_integrity(checkpoint: Checkpoint, view: CheckpointView, result: VerifyResult, progress) -> None:
    """Headers and index were validated on open; here every file is checked against the manifest."""
    manifest = view.manifest
    if manifest is None:
        if (checkpoint.root / MANIFEST_NAME).exists():
            result.fail("integrity", f"{MANIFEST_NAME} is not readable JSON")
        progress(checkpoint.total_bytes)
        return
    files = manifest.get("files")
    if not isinstance(files, dict):
        result.fail("integrity", f"{MANIFEST_NAME} has no files map")
        return
    for rel, record in sorted(files.items()):
        target = checkpoint.root / rel
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or not target.is_file() or target.is_symlink():
            result.fail("integrity", f"file {printable(rel)} listed in the manifest is missing")
            continue
        digest = sha256_of(target)
        if target.suffix == ".safetensors":
            progress(target.stat().st_size)
        if not isinstance(record, dict) or record.get("sha256") != digest:
            result.fail("integrity", f"file {printable(rel)} does not match its sha256 in the manifest")
    _check_card(checkpoint.root, files, result)
    for path in sorted(p for p in checkpoint.root.rglob("*") if not p.is_dir() or p.is_symlink()):
        rel = path.relative_to(checkpoint.root).as_posix()
        if rel not in (MANIFEST_NAME, CARD_NAME) and rel not in files:
            result.fail("integrity", f"{printable(rel)} is in the folder but not in the manifest: "
                        "nothing vouches for its bytes")


def _check_card(root: Path, files: dict, result: VerifyResult) -> None:
    """The model card quotes the manifest's sha256 (so the manifest cannot list it): that quote is checked."""
    if CARD_NAME in files or not (root / CARD_NAME).is_file():
        return
    matches = card_digest_matches(root)
    if matches is None:
        result.warn("integrity", f"{CARD_NAME} is not an fp8conv model card and not in the manifest: nothing vouches for it")
    elif not matches:
        result.warn("integrity", f"{CARD_NAME} quotes another manifest's sha256: re-render it with `fp8conv card`")


# ---- 2. structure -----------------------------------------------------------------------------


def _expects_quantized(name: str, shape: tuple[int, ...], layout: Layout, arch: Architecture) -> bool:
    """A high-precision Linear weight an engine would load as FP8 unless the config ignores it.

    Embeddings are never Linear; fine-grained FP8 loaders also keep lm_head and MoE routers
    (not plain Linear layers in DeepSeek-style models) in high precision without listing them.
    """
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    rule = arch.rule_for(name, shape)
    return rule is None or rule.kind not in layout.implicit_unquantized


def _check_structure(view: CheckpointView, result: VerifyResult) -> None:
    if view.config_problem:
        result.fail("structure", view.config_problem)
    for qw in view.weights.values():
        if qw.problem:
            result.fail("structure", f"{printable(qw.name)} {qw.problem}", qw.name)
    for scale in view.orphan_scales:
        result.fail("structure", f"orphan scale {printable(scale)}: no quantized weight uses it", scale)
    if view.format is None:
        return
    if view.quant_config is None:
        result.fail("structure", "quantized tensors but config.json has no quantization_config: engines would misread them")
        return
    _check_config_format(view, result)
    ignored = view.ignored_modules or []
    matcher = Matcher(ignored, f"{view.checkpoint.root}: config.json quantization_config ignore entry", InputError)
    tensors = view.checkpoint.tensors
    for qw in view.weights.values():
        if matcher.first_match(qw.name):
            result.fail("structure", f"{printable(qw.name)} is quantized but the quantization_config lists it as ignored", qw.name)
    arch = Architecture.from_config(view.config)
    if view.format.fused_experts_only:
        # Both engines quantize only the fused experts here (vLLM every experts layer, whatever the config lists):
        # one left in high precision would be read as MXFP4 blocks that do not exist.
        for name, info in tensors.items():
            if arch.openai_mxfp4_expert(name, info.shape):
                result.fail("structure", f"{printable(name)} is high precision, but vLLM reads every experts layer of "
                            "an mxfp4 checkpoint as MXFP4 (<x>_blocks / <x>_scales)", name)
        return
    if not view.format.engine_loadable:
        return
    for name, info in tensors.items():
        if name in view.weights or info.dtype not in ("BF16", "F16", "F32") or not _expects_quantized(name, info.shape, view.format, arch):
            continue
        if not matcher.first_match(name):
            result.fail("structure", f"{printable(name)} is high precision but not ignored in quantization_config: "
                        "an engine would expect it in FP8", name)
            continue
        for loaded_as in arch.loader_names(module_name(name))[1:]:
            if not matcher.first_match(loaded_as):
                result.fail("structure", f"{printable(name)} is ignored under its checkpoint name only: transformers "
                            f"names the module {printable(loaded_as)} in memory and would expect it quantized", name)
    for module in arch.tied_heads(tensors):
        if not matcher.first_match(module):
            result.fail("structure", f"{module} is tied to the input embedding (no tensor of its own) but "
                        "quantization_config does not ignore it: transformers would load it as quantized with a "
                        "scale that does not exist (garbage logits)", module)


def _check_config_format(view: CheckpointView, result: VerifyResult) -> None:
    """Each quantized weight's stored codes have the dtype its format says: compressed-tensors' format of the
    config group that targets the module (mixed-precision configs give each group its own), else the top level."""
    qc = view.quant_config or {}
    groups = ConfigGroups(qc)
    for name, qw in view.weights.items():
        implied = view.format.config_code_dtype(qc, groups.group(module_name(qw.name)).get("format") or qc.get("format"))
        if implied is None:
            return
        expected, said = implied
        if expected is not None and qw.weight.dtype != expected:
            result.fail("structure", f"{printable(name)} is {qw.weight.dtype} but {said} stores {expected}", name)


# ---- 3. numerics ------------------------------------------------------------------------------


def _bad_codes(codes: np.ndarray, dtype: str) -> int:
    bits = codes.view(np.uint8)
    if dtype == "F8_E4M3":
        return int(np.count_nonzero((bits & 0x7F) == 0x7F))
    if dtype == "F8_E5M2":
        return int(np.count_nonzero((bits & 0x7C) == 0x7C))
    return 0


def _check_numerics(view: CheckpointView, readers: Readers, result: VerifyResult, progress) -> set[str]:
    """No NaN/Inf codes; scales, global scales and zero points as fp8conv.source_checks wants them."""
    bad_sources = set()
    for weight, tensor, problem in source_problems(view, view.weights):
        result.fail("numerics", f"{printable(tensor)} {problem}", tensor)
        bad_sources.add(weight)
    for name, qw in sorted(view.weights.items()):
        bad_codes = 0
        for _, _, codes in matrix_chunks(readers, qw.weight.as_rows(), 1, CHUNK_BYTES):
            bad_codes += _bad_codes(codes, qw.weight.dtype)
            progress(codes.nbytes)
        if bad_codes:
            result.fail("numerics", f"{printable(name)} holds {bad_codes} NaN/Inf codes", name)
    quantized_bytes = sum(qw.weight.nbytes for qw in view.weights.values())
    progress(view.checkpoint.total_bytes - quantized_bytes)
    return bad_sources


def _compare(view: CheckpointView, readers: Readers, source: Checkpoint, source_readers: Readers,
             options: VerifyOptions, result: VerifyResult, progress, bad_sources: set[str] = frozenset()) -> None:
    """Dequantize every quantized tensor and compare with the source; all others bit-identical (a weight
    whose scales or zero points failed the numerics check is not dequantized: it already failed)."""
    src_tensors = source.tensors
    by_logical = {qw.name: qw for qw in view.weights.values()}
    out_tensors = {name: info for name, info in view.checkpoint.tensors.items() if name not in view.weights}
    out_tensors.update({qw.name: qw.weight for qw in view.weights.values()})
    for name in sorted(src_tensors):
        if name not in out_tensors:
            result.fail("numerics", f"{printable(name)} is in the source but missing from the output", name)
    aux = tuple("." + s for s in SCALE_SUFFIXES + AUX_SUFFIXES)
    companions = {c for qw in view.weights.values() for c in qw.companions}
    for name in sorted(out_tensors):
        if name not in src_tensors and not name.endswith(aux) and name not in companions:
            result.fail("numerics", f"{printable(name)} is in the output but not in the source", name)
    for name in sorted(set(src_tensors) & set(out_tensors)):
        src, out = src_tensors[name], out_tensors[name]
        qw = by_logical.get(name)
        shape = qw.shape if qw is not None and qw.shape else out.shape
        if src.shape != tuple(shape):
            result.fail("numerics", f"{printable(name)} has shape {list(shape)}, the source {list(src.shape)}", name)
        elif qw is not None and qw.scheme is not None and qw.weight.name not in bad_sources:
            _compare_quantized(qw, readers, src, source_readers, options, result)
        elif qw is None and (src.dtype != out.dtype or not _same_bytes(readers, out, source_readers, src)):
            result.fail("numerics", f"{printable(name)} is not bit-identical to the source", name)
        progress(src.nbytes)
    result.tensors.sort(key=lambda r: (-r["rel_rms_error"], r["name"]))


def _same_bytes(readers: Readers, a, source_readers: Readers, b) -> bool:
    step = CHUNK_BYTES
    for start in range(0, a.nbytes, step):
        n = min(step, a.nbytes - start)
        if readers.of(a.name).read_bytes(a.start + start, n) != source_readers.of(b.name).read_bytes(b.start + start, n):
            return False
    return True


def _compare_quantized(qw: QuantizedWeight, readers: Readers, src, source_readers: Readers, options: VerifyOptions,
                       result: VerifyResult) -> None:
    stats = ErrorStats()
    cols = src.shape[-1]
    for e, r0, deq in dequantized_chunks(readers, qw, CHUNK_BYTES):
        rows = deq.shape[0]
        offset = src.start + (e * src.shape[-2] + r0) * cols * src.np_dtype.itemsize
        raw = source_readers.of(src.name).read_array(offset, (rows, cols), src.np_dtype, src.name)
        ref = np.empty((rows, cols), np.float32)
        load_float32(ref, raw)
        err = (ref.astype(np.float64) - deq).ravel()
        stats.elements += err.size
        stats.sum_sq_ref += float(np.dot(ref.ravel().astype(np.float64), ref.ravel()))
        stats.sum_sq_err += float(np.dot(err, err))
        stats.max_abs_err = max(stats.max_abs_err, float(np.abs(err).max(initial=0)))
    metrics = error_metrics(stats)
    limit = options.max_rel_error if options.max_rel_error is not None else \
        qw.scheme.max_rel_error
    result.tensors.append({"name": qw.name, "scheme": qw.scheme.describe(), "limit": limit,
                           **{k: metrics[k] for k in ("rel_rms_error", "sqnr_db", "max_abs_error")}})
    if not math.isfinite(metrics["rel_rms_error"]) or metrics["rel_rms_error"] > limit:
        result.fail("numerics", f"{printable(qw.name)} relative RMS error {metrics['rel_rms_error']:.4g} exceeds {limit:g}", qw.name)


# ---- 4. engines -------------------------------------------------------------------------------


def _check_engines(view: CheckpointView, options: VerifyOptions, result: VerifyResult) -> None:
    """Constraints vLLM and transformers enforce when loading (fp8conv.engines); findings fail for the
    engines asked for and are warnings for the others."""
    if view.format is not None and not view.format.engine_loadable:
        result.warn("engines", f"layout {view.layout} is fp8conv's own: no engine loads it (dequantize it, or re-quantize)")
        return
    def report(engine: str, message: str, tensor: str | None = None, rule: str | None = None) -> None:
        (result.fail if engine in options.engines else result.warn)("engines", f"{engine}: {message}", tensor,
                                                                     f"{engine}: {rule}" if rule else None)

    arch = Architecture.from_config(view.config)
    by_logical = {qw.name: qw for qw in view.weights.values()}
    found = []
    for qw in sorted(by_logical.values(), key=lambda q: q.name):
        if qw.scheme is not None:
            found += weight_constraints(qw.name, qw.matrix_shape, qw.scheme, view.format, options.tp, arch)
    schemes: dict[str, str | None] = {}
    tensors = view.checkpoint.tensors
    for name in set(tensors) | set(by_logical):
        shape = by_logical[name].shape if name in by_logical else tensors[name].shape
        if len(shape) >= 2 and (name.endswith(".weight") or arch.fused_experts_rule(name, shape)):
            qw = by_logical.get(name)
            schemes[module_name(name)] = qw.scheme.describe() if qw is not None and qw.scheme is not None else None
    found += fused_constraints(schemes, arch)
    if view.format is not None and view.format.regex_ignore:
        found += kept_experts_constraints(schemes, view.ignored_modules or [], arch)
    for constraint in found:
        report(constraint.engine, constraint.message, constraint.tensor, constraint.rule or None)
    _check_global_scales(view, report)
    if any(qw.scheme is not None and qw.scheme.granularity == "block" and qw.scheme.fmt.is_float for qw in view.weights.values()):
        result.warn("engines", "vllm: the CPU backend loads block FP8 only with AMX (Sapphire Rapids or newer); GPUs with compute capability >= 8.9 run it natively")


def _check_global_scales(view: CheckpointView, report) -> None:
    """NVFP4: vLLM runs a fused q/k/v or gate/up matrix with one global scale, so its parts must carry the same."""
    by_logical = {qw.name: qw for qw in view.weights.values() if qw.global_scale is not None}
    if not by_logical:
        return
    with Readers(view.checkpoint) as readers:
        for group in fused_sets(list(by_logical)):
            values = {tuple(readers.read(by_logical[n].global_scale).astype(np.float32).ravel().tolist()) for n in group}
            if len(values) > 1:
                report("vllm", f"fused parts {', '.join(printable(n) for n in group)} carry different NVFP4 global "
                       "scales (the fused layer has one)", group[0])
