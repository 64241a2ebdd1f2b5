"""Reading any checkpoint's quantization: which weights are quantized, with which scales and scheme.

Understands compressed-tensors (`<m>.weight_scale`, quant_method compressed-tensors),
fine-grained FP8 (`<m>.weight_scale_inv`, quant_method fp8, weight_block_size) and fp8conv's
own layout, whoever wrote them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import CONFIG_NAME, MANIFEST_NAME, Checkpoint
from .errors import FP8ConvError, InputError
from .formats import format_of_tag
from .kernels import dequantize_rows
from .safetensors_io import TensorInfo, TensorReader
from .scheme import Scheme

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
AUX_SUFFIXES = ("weight_zero_point", "input_scale", "input_zero_point", "weight_g_idx", "output_scale", "k_scale", "v_scale")

LAYOUT_LABELS = {
    "none": "none (high precision)",
    "compressed-tensors": "compressed-tensors",
    "fine-grained-fp8": "fine-grained FP8 (quant_method fp8)",
    "fp8conv": "fp8conv",
}


@dataclass
class QuantizedWeight:
    """A quantized weight, its scale and the scheme that its shapes and the config imply."""

    name: str
    weight: TensorInfo
    scale: TensorInfo | None
    scheme: Scheme | None
    problem: str | None = None


@dataclass
class CheckpointView:
    checkpoint: Checkpoint
    config: dict | None
    quant_config: dict | None
    layout: str
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    orphan_scales: list[str] = field(default_factory=list)
    manifest: dict | None = None
    config_problem: str | None = None

    @property
    def ignored_modules(self) -> list[str] | None:
        qc = self.quant_config or {}
        for key in ("ignore", "modules_to_not_convert", "ignored_layers"):
            if isinstance(qc.get(key), list):
                return [str(m) for m in qc[key]]
        return None


def _layout_of(quant_config: dict | None, tensors: dict[str, TensorInfo]) -> str:
    method = (quant_config or {}).get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "fp8":
        return "fine-grained-fp8"
    if method == "fp8conv":
        return "fp8conv"
    if any(n.endswith(".weight_scale_inv") for n in tensors):
        return "fine-grained-fp8"
    if any(n.endswith(".weight_scale") for n in tensors):
        return "compressed-tensors"
    return "none"


def _weight_args(quant_config: dict | None) -> dict:
    """The weights' quantization args of a compressed-tensors config (first config group)."""
    groups = (quant_config or {}).get("config_groups")
    if isinstance(groups, dict):
        for group in groups.values():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                return group["weights"]
    return {}


def _hints(layout: str, quant_config: dict | None) -> dict:
    qc = quant_config or {}
    if layout == "fine-grained-fp8":
        block = qc.get("weight_block_size")
        return {"granularity": "block" if block else "tensor", "block": block}
    if layout == "fp8conv":
        return {"granularity": qc.get("granularity"), "block": qc.get("block_size"), "group": qc.get("group_size")}
    args = _weight_args(qc)
    block = args.get("block_structure")
    if isinstance(block, str) and "x" in block:
        block = [int(p) for p in block.split("x")]
    return {"granularity": args.get("strategy"), "block": block, "group": args.get("group_size")}


def infer_scheme(fmt_name: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], hints: dict) -> Scheme:
    """The scheme whose scale grid the stored scale shape is; raises FP8ConvError when none fits."""
    *lead, rows, cols = weight_shape
    per_matrix = math.prod(scale_shape) // max(math.prod(lead), 1) if scale_shape else 1
    granularity = hints.get("granularity")
    if granularity not in ("block", "channel", "group", "tensor"):
        granularity = "tensor" if per_matrix == 1 else ("channel" if tuple(scale_shape[-2:]) == (rows, 1) else "block")
    block = hints.get("block") or [128, 128]
    group = hints.get("group") or 128
    if granularity == "block" and not hints.get("block") and len(scale_shape) >= 2:
        block = [_infer_tile(rows, scale_shape[-2]), _infer_tile(cols, scale_shape[-1])]
    if granularity == "group" and not hints.get("group") and scale_shape:
        group = _infer_tile(cols, scale_shape[-1])
    scheme = Scheme(format=fmt_name, granularity=granularity, block_size=(int(block[0]), int(block[1])), group_size=int(group))
    grid = scheme.scale_shape(weight_shape)
    fits = tuple(scale_shape) == grid or (granularity == "tensor" and per_matrix == 1 and
                                          tuple(scale_shape[: len(lead)]) == tuple(lead))
    if not fits:
        raise FP8ConvError(f"scale shape {list(scale_shape)} does not fit weight {list(weight_shape)} under {scheme.describe()} (expected {list(grid)})")
    return scheme


def _infer_tile(length: int, count: int) -> int:
    """The power-of-two-ish tile that gives `count` tiles over `length` (128 when it fits)."""
    if count <= 0:
        return 128
    for tile in (128, 64, 256, 32, 16, 512, 1024):
        if -(-length // tile) == count:
            return tile
    return -(-length // count)


def open_view(checkpoint: Checkpoint) -> CheckpointView:
    """Classify every tensor of a checkpoint: quantized weights with scales, orphans, the rest."""
    config_problem = None
    try:
        config = checkpoint.read_json(CONFIG_NAME)
    except InputError as exc:
        config, config_problem = None, str(exc)
    quant_config = config.get("quantization_config") if config else None
    if quant_config is not None and not isinstance(quant_config, dict):
        config_problem, quant_config = "config.json: quantization_config is not an object", None
    try:
        manifest = checkpoint.read_json(MANIFEST_NAME)
    except InputError:
        manifest = None
    tensors = checkpoint.tensors
    layout = _layout_of(quant_config, tensors)
    view = CheckpointView(checkpoint, config, quant_config, layout, manifest=manifest, config_problem=config_problem)
    hints = _hints(layout, quant_config)
    used_scales: set[str] = set()
    for name, info in tensors.items():
        fmt = format_of_tag(info.dtype)
        if fmt is None or not name.endswith(".weight") or len(info.shape) < 2:
            continue
        scale = next((tensors[name[:-6] + s] for s in SCALE_SUFFIXES if name[:-6] + s in tensors), None)
        entry = QuantizedWeight(name, info, scale, None)
        if scale is None:
            entry.problem = "has no weight_scale / weight_scale_inv tensor"
        elif scale.dtype not in ("F32", "BF16", "F16"):
            entry.problem = f"scale {scale.name} has dtype {scale.dtype}, expected F32 (or BF16/F16)"
            used_scales.add(scale.name)
        else:
            used_scales.add(scale.name)
            try:
                entry.scheme = infer_scheme(fmt.name, info.shape, scale.shape, hints)
            except FP8ConvError as exc:
                entry.problem = str(exc)
        view.weights[name] = entry
    view.orphan_scales = sorted(
        n for n in tensors if n.endswith(SCALE_SUFFIXES) and n not in used_scales
    )
    return view


class Readers:
    """One open TensorReader per shard file, closed together."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._paths = checkpoint.shard_of()
        self._open: dict = {}

    def of(self, tensor_name: str) -> TensorReader:
        path = self._paths[tensor_name]
        if path not in self._open:
            self._open[path] = TensorReader(path)
        return self._open[path]

    def read(self, info: TensorInfo, first: int = 0, stop: int | None = None):
        return self.of(info.name).read_rows(info, first, stop)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def __enter__(self) -> "Readers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scale_grids(readers: Readers, qw: QuantizedWeight):
    """The float32 scale grids of a quantized weight, one 2-D grid per matrix: [E, gr, gc]."""
    assert qw.scale is not None and qw.scheme is not None
    scales = readers.read(qw.scale).astype(np.float32)
    *lead, rows, cols = qw.weight.shape
    matrices = math.prod(lead)
    if qw.scheme.granularity == "tensor":
        return scales.reshape(matrices, 1, 1)
    return scales.reshape(matrices, *qw.scheme.scale_grid(rows, cols))


def matrix_chunks(readers: Readers, info: TensorInfo, tile_rows: int, chunk_bytes: int):
    """(matrix index, first row, rows) of a 2-D or stacked 3-D tensor, in chunks of whole tiles."""
    *lead, rows, cols = info.shape
    row_bytes = max(cols * info.np_dtype.itemsize, 1)
    step = max(tile_rows, (chunk_bytes // row_bytes) // tile_rows * tile_rows)
    for e in range(math.prod(lead)):
        for r0 in range(0, rows, step):
            offset = info.start + (e * rows + r0) * row_bytes
            n = min(step, rows - r0)
            yield e, r0, readers.of(info.name).read_array(offset, (n, cols), info.np_dtype, info.name)


def dequantized_chunks(readers: Readers, qw: QuantizedWeight, chunk_bytes: int):
    """(matrix index, first row, float32 rows) of w' = q * scale, chunk by chunk."""
    scheme = qw.scheme
    assert scheme is not None
    grids = scale_grids(readers, qw)
    rows, cols = qw.weight.shape[-2:]
    tile_rows = rows if scheme.granularity == "tensor" else scheme.tile(rows, cols)[0]
    tile_rows = max(tile_rows, 1)
    for e, r0, codes in matrix_chunks(readers, qw.weight, 1 if scheme.granularity == "tensor" else tile_rows, chunk_bytes):
        if scheme.granularity == "tensor":
            grid = grids[e]
        else:
            g0 = r0 // tile_rows
            grid = grids[e][g0 : g0 + -(-codes.shape[0] // tile_rows)]
        yield e, r0, dequantize_rows(codes, grid, scheme)
