"""Reading any checkpoint's quantization: which weights are quantized, with which scales, zero points
and scheme, and the one routine that reads them back as float32 rows.

Understands compressed-tensors (`float-quantized`, `int-quantized` with or without zero points,
`pack-quantized` W4A16 / W8A16), fine-grained FP8 (`<m>.weight_scale_inv`, quant_method fp8,
weight_block_size), OpenAI MXFP4 (gpt-oss's fused experts `<x>_blocks` / `<x>_scales`, quant_method
mxfp4) and fp8conv's own layout, whoever wrote them. Anything else that is quantized
(GPTQ / AWQ `qweight`, bitsandbytes, an unknown quant_method or compressed-tensors format) is
reported as unsupported: it is refused, never copied through.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io.checkpoint import CONFIG_NAME, MANIFEST_NAME, Checkpoint
from ..errors import FP8ConvError, InputError
from ..formats import FORMATS, MICROSCALE, format_of_tag, integer_format, microscale_of_tags
from ..io.safetensors import TensorInfo, TensorReader
from ..plan.scheme import GRANULARITIES, Scheme, microscale_scheme
from .base import Layout
from .config_checks import quant_config_problem
from .view import CheckpointView, ConfigGroups, QuantizedWeight  # noqa: F401  (re-exported)
from .compressed_tensors import CT_FORMATS, CompressedTensors
from .openai_mxfp4 import OPENAI_BLOCKS, OPENAI_SCALES, OpenAIMXFP4

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
AUX_SUFFIXES = ("weight_zero_point", "weight_shape", "input_scale", "input_zero_point", "weight_g_idx", "output_scale",
                "k_scale", "v_scale", "input_global_scale", "weight_global_scale")
GPTQ_AWQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
BNB_SUFFIXES = (".absmax", ".quant_map", ".SCB", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")

NONE, UNSUPPORTED = "none", "unsupported"  # view.layout of a checkpoint without quantization / one fp8conv refuses
LAYOUT_LABELS = {NONE: "none (high precision)", **{n: lay.label for n, lay in Layout.registry.items()},
                 UNSUPPORTED: "unsupported quantization"}
KNOWN_METHODS = tuple(layout.quant_method for layout in Layout.registry.values())


_ZERO_POINT_BUT_SYMMETRIC = ("has a weight_zero_point, but its config group says symmetric: true, so engines would "
                             "ignore the zero points (the config does not match the tensors)")


def _layout_of(quant_config: dict | None, tensors: dict[str, TensorInfo]) -> str:
    layout = Layout.detect(quant_config, tensors)
    return layout.name if layout is not None else NONE


def _unsupported(quant_config: dict | None, tensors: dict[str, TensorInfo]) -> str | None:
    """Why fp8conv cannot read this checkpoint's quantization, or None."""
    qc = quant_config or {}
    method = qc.get("quant_method")
    if any(n.endswith(BNB_SUFFIXES) for n in tensors) or method == "bitsandbytes":
        return "holds bitsandbytes-quantized weights, which fp8conv does not read; load it with bitsandbytes instead"
    if any(n.endswith((".qweight", ".qzeros")) for n in tensors):
        return (f"holds GPTQ/AWQ packed weights (qweight/qzeros, quant_method {method!r}), which fp8conv does not read; "
                "dequantize them with their own tool first")
    if method is not None and method not in KNOWN_METHODS:
        return (f"quantization_config.quant_method {method!r} is not one fp8conv reads "
                f"({', '.join(KNOWN_METHODS)}); refusing rather than copying its tensors through")
    if method == CompressedTensors.quant_method:
        formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()
                                        if isinstance(g, dict)}
        unknown = sorted(str(f) for f in formats - {None, *CT_FORMATS})
        if unknown:
            return (f"compressed-tensors format {unknown[0]!r} is not one fp8conv reads ({', '.join(CT_FORMATS[:3])}); "
                    "refusing rather than copying its tensors through")
    return None


def _hints(layout: str, quant_config: dict | None, args: dict | None = None) -> dict:
    found = Layout.registry.get(layout)
    if found is None:
        return {}
    return found.hints(quant_config, ConfigGroups(quant_config).of(None) if args is None else args)


def infer_scheme(fmt_name: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], hints: dict,
                 symmetric: bool = True, weight_only: bool = False) -> Scheme:
    """The scheme whose scale grid the stored scale shape is; raises FP8ConvError when none fits."""
    *lead, rows, cols = weight_shape
    per_matrix = math.prod(scale_shape) // max(math.prod(lead), 1) if scale_shape else 1
    granularity = hints.get("granularity")
    if granularity not in GRANULARITIES:
        granularity = "tensor" if per_matrix == 1 else ("channel" if tuple(scale_shape[-2:]) == (rows, 1) else "block")
        if granularity == "block" and (weight_only or not symmetric) and scale_shape[-2] == rows:
            granularity = "group"  # weight-only schemes have no blocks
    block = hints.get("block") or [128, 128]
    group = hints.get("group") or 128
    if granularity == "block" and not hints.get("block") and len(scale_shape) >= 2:
        block = [_infer_tile(rows, scale_shape[-2]), _infer_tile(cols, scale_shape[-1])]
    if granularity == "group" and not hints.get("group") and scale_shape:
        group = _infer_tile(cols, scale_shape[-1])
    scheme = Scheme(format=fmt_name, granularity=granularity, block_size=(int(block[0]), int(block[1])),
                    group_size=int(group), symmetric=symmetric, activations="none" if weight_only or not symmetric else None)
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


def _read_small(checkpoint: Checkpoint, info: TensorInfo) -> np.ndarray:
    with TensorReader(checkpoint.shard_of()[info.name]) as reader:
        return reader.read_rows(info)


def _packed_weight(view: CheckpointView, name: str, info: TensorInfo, hints: dict) -> QuantizedWeight:
    """compressed-tensors pack-quantized: weight_packed (int32), weight_shape, weight_scale, weight_zero_point."""
    tensors = view.checkpoint.tensors
    prefix = name[: -len("weight_packed")]
    logical = prefix + "weight"
    scale = tensors.get(prefix + "weight_scale")
    entry = QuantizedWeight(logical, info, scale, None, packed=True,
                            companions=tuple(prefix + s for s in SCALE_SUFFIXES + AUX_SUFFIXES if prefix + s in tensors))
    shape_info = tensors.get(prefix + "weight_shape")
    if info.dtype != "I32" or shape_info is None or shape_info.dtype not in ("I64", "I32") or len(shape_info.shape) != 1:
        entry.problem = "needs an int32 weight_packed and an int weight_shape tensor"
        return entry
    shape = tuple(int(v) for v in _read_small(view.checkpoint, shape_info).tolist())
    entry.shape = shape
    bits = hints.get("num_bits")
    if view.quant_config is None and len(shape) >= 2:  # no config: the packed width tells the bits
        fits = [f.bits for f in FORMATS.values() if f.packs_int32 and info.shape[-1] == f.packed_cols(shape[-1])]
        bits = fits[0] if len(fits) == 1 else None
    fmt = integer_format(bits) if isinstance(bits, int) else None
    if view.format is None or not view.format.zero_points or fmt is None:
        readable = " and ".join(str(f.bits) for f in FORMATS.values() if f.packs_int32)
        entry.problem = f"is pack-quantized with num_bits {bits!r}; fp8conv reads {readable}"
        return entry
    if len(shape) not in (2, 3) or tuple(info.shape) != (*shape[:-1], fmt.packed_cols(shape[-1])):
        entry.problem = f"weight_packed {list(info.shape)} does not hold weight_shape {list(shape)} at {bits} bits"
        return entry
    if scale is None:
        entry.problem = "has no weight_scale tensor"
        return entry
    symmetric = hints["symmetric"] if view.quant_config is not None else prefix + "weight_zero_point" not in tensors
    if symmetric and prefix + "weight_zero_point" in tensors:
        entry.problem = _ZERO_POINT_BUT_SYMMETRIC
        return entry
    if not symmetric:
        entry.zero_point, entry.zp_packed = tensors.get(prefix + "weight_zero_point"), True
        if entry.zero_point is None:
            entry.problem = "is asymmetric but has no weight_zero_point"
            return entry
    try:
        entry.scheme = infer_scheme(fmt.name, shape, scale.shape, hints, symmetric, weight_only=True)
    except FP8ConvError as exc:
        entry.problem = str(exc)
        return entry
    if entry.zero_point is not None:
        *lead, rows, cols = shape
        grid = entry.scheme.scale_grid(rows, cols)
        expected = (*lead, fmt.packed_cols(grid[0]), grid[1])
        if entry.zero_point.dtype != "I32" or tuple(entry.zero_point.shape) != expected:
            entry.problem = (f"weight_zero_point {entry.zero_point.dtype} {list(entry.zero_point.shape)} is not the "
                             f"packed int32 {list(expected)} its scales need")
    return entry


def _microscale_of(view: CheckpointView, codes_tag: str, scale: TensorInfo | None, has_global: bool) -> str | None:
    """nvfp4 / mxfp4 / mxfp8 from the config's format, or (no config) from the stored dtypes."""
    qc = view.quant_config or {}
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)}
    for micro in MICROSCALE.values():
        if micro.ct_format in formats:
            return micro.name
    if view.quant_config is not None or scale is None:
        return None
    return microscale_of_tags(codes_tag, scale.dtype, has_global)


def _microscale_weight(view: CheckpointView, name: str, info: TensorInfo, micro_name: str) -> QuantizedWeight:
    """nvfp4-pack-quantized / mxfp4-pack-quantized (`weight_packed` uint8, two e2m1 per byte) and
    mxfp8-quantized (`weight` float8_e4m3fn): uint8 / e4m3 `weight_scale` per group, NVFP4 `weight_global_scale`."""
    tensors = view.checkpoint.tensors
    micro = MICROSCALE[micro_name]
    prefix = name[: -len("weight_packed")] if name.endswith(".weight_packed") else name[: -len("weight")]
    scale = tensors.get(prefix + "weight_scale")
    companions = tuple(prefix + s for s in SCALE_SUFFIXES + AUX_SUFFIXES if prefix + s in tensors)
    cols_stored = info.shape[-1] if len(info.shape) >= 2 else 0
    shape = (*info.shape[:-1], cols_stored * 2) if micro.packed else tuple(info.shape)
    entry = QuantizedWeight(prefix + "weight", info, scale, None, shape=shape, packed=micro.packed, companions=companions)
    scheme = microscale_scheme(micro_name)
    expected_codes = micro.codec.safetensors_tag
    if info.dtype != expected_codes or len(info.shape) not in (2, 3):
        entry.problem = f"is {micro_name} but its codes are {info.dtype} {list(info.shape)}, not {expected_codes} 2-D or 3-D"
    elif scale is None:
        entry.problem = "has no weight_scale tensor"
    elif scale.dtype != scheme.scale_fmt.tag or tuple(scale.shape) != scheme.scale_shape(shape):
        entry.problem = (f"weight_scale {scale.dtype} {list(scale.shape)} is not the {scheme.scale_fmt.tag} "
                         f"{list(scheme.scale_shape(shape))} of {micro_name}")
    elif micro.global_scale:
        entry.global_scale = tensors.get(prefix + "weight_global_scale")
        gs = entry.global_scale
        if gs is None or gs.dtype != "F32" or gs.numel != max(math.prod(shape[:-2]), 1):
            entry.problem = "needs a float32 weight_global_scale, one per matrix"
    if entry.problem is None:
        entry.scheme = scheme
    return entry


def _openai_weight(view: CheckpointView, name: str, info: TensorInfo) -> QuantizedWeight:
    """OpenAI MXFP4 (quant_method mxfp4): `<x>_blocks` uint8 [E, out, in/32, 16] (two e2m1 codes a byte, element 2k
    in the low nibble) and `<x>_scales` uint8 [E, out, in/32] (E8M0) hold the weight `<x>` [E, in, out] transposed."""
    logical = name[: -len(OPENAI_BLOCKS)]
    scale = view.checkpoint.tensors.get(logical + OPENAI_SCALES)
    scheme = microscale_scheme(OpenAIMXFP4.microscale)
    group = scheme.group_size
    entry = QuantizedWeight(logical, info, scale, None, packed=True, transposed=True,
                            companions=(logical + OPENAI_SCALES,) if scale is not None else ())
    if info.dtype != "U8" or len(info.shape) != 4 or info.shape[-1] != group // 2:
        entry.problem = f"is OpenAI MXFP4 but its blocks are {info.dtype} {list(info.shape)}, not U8 [E, out, in/32, 16]"
        return entry
    experts, out, groups, _ = info.shape
    entry.shape = (experts, groups * group, out)
    if scale is None:
        entry.problem = f"has no {OPENAI_SCALES[1:]} tensor"
    elif scale.dtype != "U8" or tuple(scale.shape) != (experts, out, groups):
        entry.problem = f"scales {scale.dtype} {list(scale.shape)} are not the U8 {[experts, out, groups]} its blocks need"
    else:
        entry.scheme = scheme
    return entry


def _quantized_weight(view: CheckpointView, name: str, info: TensorInfo,
                      hints: dict) -> tuple[QuantizedWeight, tuple[str, ...]] | None:
    """The quantized weight stored under `name` and the scale tensors it uses, or None when `name` is not one."""
    tensors = view.checkpoint.tensors
    prefix = name[: name.rfind(".") + 1]
    if view.format is not None and view.format.reads_blocks(name):
        entry = _openai_weight(view, name, info)
        return entry, entry.companions
    micro = None
    if name.endswith((".weight_packed", ".weight")) and info.dtype in ("U8", "F8_E4M3"):
        micro = _microscale_of(view, info.dtype, tensors.get(prefix + "weight_scale"),
                               prefix + "weight_global_scale" in tensors)
    if micro is not None:
        entry = _microscale_weight(view, name, info, micro)
        return entry, entry.companions
    if name.endswith(".weight_packed"):
        entry = _packed_weight(view, name, info, hints)
        return entry, entry.companions
    fmt = format_of_tag(info.dtype)
    if fmt is None or not name.endswith(".weight") or len(info.shape) < 2:
        return None
    return _plain_weight(view, name, info, fmt.name, hints)


def _plain_weight(view: CheckpointView, name: str, info: TensorInfo, fmt_name: str,
                  hints: dict) -> tuple[QuantizedWeight, tuple[str, ...]]:
    """`<m>.weight` codes one per element with `<m>.weight_scale` / `weight_scale_inv` (and zero points)."""
    tensors = view.checkpoint.tensors
    prefix = name[:-6]
    scale = next((tensors[prefix + s] for s in SCALE_SUFFIXES if prefix + s in tensors), None)
    companions = tuple(prefix + s for s in SCALE_SUFFIXES + AUX_SUFFIXES if prefix + s in tensors)
    entry = QuantizedWeight(name, info, scale, None, shape=info.shape, companions=companions)
    zero_points = view.format is not None and view.format.zero_points
    symmetric = hints.get("symmetric", True) or not zero_points
    if view.quant_config is None and zero_points and prefix + "weight_zero_point" in tensors:
        symmetric = False
    if scale is None:
        entry.problem = "has no weight_scale / weight_scale_inv tensor"
        return entry, ()
    if symmetric and zero_points and prefix + "weight_zero_point" in tensors:
        entry.problem = _ZERO_POINT_BUT_SYMMETRIC
        return entry, ()
    if scale.dtype not in ("F32", "BF16", "F16"):
        entry.problem = f"scale {scale.name} has dtype {scale.dtype}, expected F32 (or BF16/F16)"
        return entry, (scale.name,)
    try:
        entry.scheme = infer_scheme(fmt_name, info.shape, scale.shape, hints, symmetric)
    except FP8ConvError as exc:
        entry.problem = str(exc)
    if not symmetric:
        entry.zero_point = tensors.get(prefix + "weight_zero_point")
        if entry.zero_point is None:
            entry.problem = "is asymmetric (symmetric: false) but has no weight_zero_point"
        elif tuple(entry.zero_point.shape) != tuple(scale.shape) or entry.zero_point.dtype not in ("I8", "I32", "I64"):
            entry.problem = (f"weight_zero_point {entry.zero_point.dtype} {list(entry.zero_point.shape)} does "
                             f"not match its scale {list(scale.shape)}")
    return entry, (scale.name,)


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
    problem = quant_config_problem(quant_config) if quant_config is not None else None
    if problem:  # checked before any field reaches arithmetic
        raise InputError(f"{checkpoint.root}: {problem}")
    try:
        manifest = checkpoint.read_json(MANIFEST_NAME)
    except InputError:
        manifest = None
    tensors = checkpoint.tensors
    unsupported = _unsupported(quant_config, tensors)
    layout = "unsupported" if unsupported else _layout_of(quant_config, tensors)
    view = CheckpointView(checkpoint, config, quant_config, layout, manifest=manifest, config_problem=config_problem,
                          unsupported=unsupported)
    if unsupported:
        return view
    used_scales: set[str] = set()
    group_args = ConfigGroups(quant_config)
    for name, info in tensors.items():
        # per module: a mixed-precision compressed-tensors config gives each config group its own scheme
        hints = _hints(layout, quant_config, group_args.of(name.rpartition(".weight")[0]))
        found = _quantized_weight(view, name, info, hints)
        if found is not None:
            view.weights[name], used = found
            used_scales.update(used)
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

    def path(self, tensor_name: str) -> Path:
        return self._paths[tensor_name]

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
    scales = readers.read(qw.scale)
    *lead, rows, cols = qw.matrix_shape
    matrices = math.prod(lead)
    if qw.scheme.microscale:
        gs = readers.read(qw.global_scale).astype(np.float32).reshape(-1) if qw.global_scale is not None else None
        grids = scales.reshape(matrices, *qw.scheme.scale_grid(rows, cols))
        return np.stack([qw.scheme.scale_fmt.values(g, None if gs is None else gs[e]) for e, g in enumerate(grids)])
    scales = scales.astype(np.float32)
    if qw.scheme.granularity == "tensor":
        return scales.reshape(matrices, 1, 1)
    return scales.reshape(matrices, *qw.scheme.scale_grid(rows, cols))


def matrix_chunks(readers: Readers, info: TensorInfo, tile_rows: int, chunk_bytes: int):
    """(matrix index, first row, rows) of a 2-D or stacked 3-D tensor, in chunks of whole tiles."""
    if info.numel == 0:
        return  # cost follows the data: a valid [2**62, 0] tensor has nothing to read
    *lead, rows, cols = info.shape
    row_bytes = max(cols * info.np_dtype.itemsize, 1)
    step = max(tile_rows, (chunk_bytes // row_bytes) // tile_rows * tile_rows)
    for e in range(math.prod(lead)):
        for r0 in range(0, rows, step):
            offset = info.start + (e * rows + r0) * row_bytes
            n = min(step, rows - r0)
            yield e, r0, readers.of(info.name).read_array(offset, (n, cols), info.np_dtype, info.name)
