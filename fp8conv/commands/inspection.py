"""fp8conv inspect: what is in a checkpoint, from headers only (data only with --stats)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..io.checkpoint import open_checkpoint
from ..formats import format_of_tag
from ..numerics.kernels import load_float32
from ..plan.decisions import Matcher, module_name
from ..layouts.read import LAYOUT_LABELS, CheckpointView, Readers, matrix_chunks, open_view
from ..run.reading import dequantized_chunks
from ..io.safetensors import READ_CHUNK_BYTES, TensorInfo

CHUNK_BYTES = READ_CHUNK_BYTES
FLOAT_SOURCES = ("bfloat16", "float16", "float32")  # dtype names: ml_dtypes is imported only where read


def inspect_checkpoint(path: Path, pattern: str | None = None, with_stats: bool = False,
                       progress: Callable[[int], None] = lambda n: None) -> dict:
    checkpoint = open_checkpoint(path)
    view = open_view(checkpoint)
    tensors = checkpoint.tensors
    shard_of = checkpoint.shard_of()
    scale_names = {name for qw in view.weights.values() for name in qw.companions}
    by_dtype: Counter[str] = Counter()
    for info in tensors.values():
        by_dtype[info.dtype] += info.nbytes
    high_precision = sorted(module_name(n) for n, i in tensors.items()
                            if n.endswith(".weight") and len(i.shape) >= 2 and n not in view.weights and format_of_tag(i.dtype) is None)
    summary = {
        "path": str(path),
        "shards": [{"name": s.path.name, "bytes": s.file_size, "tensors": len(s.tensors)} for s in checkpoint.shards],
        "tensor_count": len(tensors),
        "parameter_count": sum(math.prod(view.weights[n].shape) if n in view.weights and view.weights[n].shape
                               else i.numel for n, i in tensors.items() if n not in scale_names),
        "bytes_per_dtype": dict(sorted(by_dtype.items())),
        "total_bytes": sum(by_dtype.values()),
        "layout": view.layout,
        "layout_label": LAYOUT_LABELS[view.layout],
        "quantization_config": view.quant_config,
        "schemes": dict(Counter(qw.scheme.describe() for qw in view.weights.values() if qw.scheme)),
        "quantized_modules": sorted(module_name(qw.name) for qw in view.weights.values()),
        "high_precision_modules": high_precision,
        "scale_shapes": dict(Counter(f"{list(qw.shape or qw.weight.shape)} -> {list(qw.scale.shape)} {qw.scale.dtype}"
                                     for qw in view.weights.values() if qw.scale is not None)),
        "problems": {n: qw.problem for n, qw in view.weights.items() if qw.problem},
        "unsupported": view.unsupported,
        "written_by": _writer(view),
    }
    if pattern is not None:
        matcher = Matcher([pattern], "--tensors")
        summary["tensors"] = [
            _tensor_row(info, shard_of[name].name, view, scale_names)
            for name, info in sorted(tensors.items()) if pattern == "*" or matcher.first_match(name)
        ]
    if with_stats:
        summary["stats"] = _stats(checkpoint, view, scale_names, progress)
    return summary


def _writer(view: CheckpointView) -> str | None:
    if view.manifest and view.manifest.get("tool") == "fp8conv":
        return f"fp8conv {view.manifest.get('tool_version')}"
    return None


def _tensor_row(info: TensorInfo, shard: str, view: CheckpointView, scale_names: set[str]) -> dict:
    qw = view.weights.get(info.name)
    role = "quantized" if qw else ("scale" if info.name in scale_names else "high precision")
    row = {"name": info.name, "dtype": info.dtype, "shape": list(info.shape), "bytes": info.nbytes, "shard": shard, "role": role}
    if qw and qw.scale is not None:
        row["scale"] = {"name": qw.scale.name, "shape": list(qw.scale.shape), "dtype": qw.scale.dtype,
                        "scheme": qw.scheme.describe() if qw.scheme else None}
    return row


def _stats(checkpoint, view: CheckpointView, scale_names: set[str], progress) -> dict:
    """min/max/absmax, NaN/Inf counts and zero fraction per tensor (quantized ones dequantized)."""
    out = {}
    with Readers(checkpoint) as readers:
        for name, info in sorted(checkpoint.tensors.items()):
            qw = view.weights.get(name)
            if qw is not None and qw.scheme is not None:
                chunks = (c for _, _, c in dequantized_chunks(readers, qw, CHUNK_BYTES))
            else:
                chunks = _raw_float_chunks(readers, info)
            out[name] = _summarize(chunks, info.numel)
            progress(info.nbytes)
    return out


def _raw_float_chunks(readers: Readers, info: TensorInfo):
    """Stored values as floats, chunk by chunk (1-D and scalar tensors in one piece)."""
    if len(info.shape) >= 2:
        chunks = (raw for _, _, raw in matrix_chunks(readers, info.as_rows(), 1, CHUNK_BYTES))
    else:
        chunks = iter([readers.read(info).reshape(1, -1)])
    for raw in chunks:
        if raw.dtype.name in FLOAT_SOURCES:
            buf = np.empty(raw.shape, np.float32)
            load_float32(buf, raw)
            yield buf
        else:
            yield raw.astype(np.float64)


def _summarize(chunks, numel: int) -> dict:
    lo, hi, nan, inf, zeros = math.inf, -math.inf, 0, 0, 0
    for values in chunks:
        finite = values[np.isfinite(values)]
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
        zeros += int(np.count_nonzero(values == 0))
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    has = math.isfinite(lo)
    return {"min": lo if has else None, "max": hi if has else None, "absmax": max(abs(lo), abs(hi)) if has else None,
            "nan": nan, "inf": inf, "zero_fraction": zeros / numel if numel else 0.0}
