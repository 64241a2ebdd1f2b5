"""The layout base: every tensor a layout writes for a quantized weight (TensorSpec: name, dtype, shape,
how weight rows map onto its bytes), how a quantized chunk is encoded into those tensors and decoded
back, and the registry of layouts. Each layout is one class in its own module (compressed_tensors.py,
fine_grained.py, native.py, openai_mxfp4.py) that declares its tensors, its quantization_config, what
it refuses, how it is recognised on input and how its config is read; nothing outside layouts/ tests
a layout's name: it asks the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..errors import SchemeError
from ..formats import FORMATS, MICROSCALE
from ..formats.dtypes import DTYPE_BYTES
from ..plan.architecture import module_name
from ..plan.scheme import Scheme
from ..registry import Registered

CODES, SCALE, ZERO_POINT, SHAPE, GLOBAL_SCALE = "codes", "scale", "zero_point", "shape", "global_scale"
PACK_QUANTIZED = "pack-quantized"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a layout stores for a quantized weight, and how weight rows map onto its bytes.

    Per matrix (one expert of a 3-D stack) the tensor is `stored rows x row` ; each stored row covers
    `unit_rows` weight rows (1 for codes, the tile height for scale grids, 8 tile rows for int4 zero
    points packed along the output dim); unit_rows 0 means one record per matrix (a tensor-wide
    scale), and `data` holds the bytes of a constant tensor (weight_shape).
    """

    name: str
    role: str
    dtype: str
    shape: tuple[int, ...]
    unit_rows: int
    matrices: int = 1
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def matrix_bytes(self) -> int:
        return self.nbytes // max(self.matrices, 1)

    def row_bytes(self, weight_rows: int) -> int:
        """Bytes of one stored row (for a matrix of `weight_rows` rows)."""
        if not self.unit_rows:
            return self.matrix_bytes
        return self.matrix_bytes // max(-(-weight_rows // self.unit_rows), 1)

    def offset(self, matrix: int, first_row: int, weight_rows: int) -> int:
        """Byte offset, inside this tensor, of the stored rows that start at weight row `first_row`."""
        base = matrix * self.matrix_bytes
        if not self.unit_rows:
            return base
        return base + (first_row // self.unit_rows) * self.row_bytes(weight_rows)


def packs(scheme: Scheme) -> bool:
    """compressed-tensors pack-quantized: integer weight-only schemes."""
    return scheme.weight_only and scheme.fmt.packs_int32


class Layout(Registered):
    """One on-disk layout of quantized weights. Subclasses register themselves (`name=`) and override
    what differs from the plain form: `<m>.weight` codes and `<m>.<scale_suffix>` scale grid."""

    registry: ClassVar[dict[str, "Layout"]] = {}
    kind = "layout"
    name: ClassVar[str]
    label: ClassVar[str]  # what inspect shows
    quant_method: ClassVar[str]  # quantization_config.quant_method it writes, and is recognised by
    scale_suffix: ClassVar[str] = "weight_scale"
    marker_suffixes: ClassVar[tuple[str, ...]] = ()  # tensor endings that identify it when there is no config
    marker_order: ClassVar[int] = 0  # markers are tried in this order (more specific first)
    engine_loadable: ClassVar[bool] = True  # False: fp8conv's own layout, which no engine loads
    # The transformers quantization config that loads it on any device, dequantizing on load (None: none does).
    transformers_loader: ClassVar[str | None] = None
    zero_points: ClassVar[bool] = False  # stores zero points (asymmetric schemes), and int32-packed codes
    per_module_schemes: ClassVar[bool] = False  # --scheme overrides (one config group per scheme)
    regex_ignore: ClassVar[bool] = False  # its ignore list takes 're:' patterns (kept experts listed by one)
    fused_experts_only: ClassVar[bool] = False  # quantizes fused 3-D experts only, keeps the rest as shipped
    transposes: ClassVar[bool] = False  # the weight [.., in, out] is quantized as its transpose [.., out, in]
    hint: ClassVar[str] = ""  # what it is for, in refusals that point to it
    # What the engines' loaders do with it (plan/engines.py, verify):
    strict_fused_blocks: ClassVar[bool] = False  # vLLM: only the last part of a fused layer may hold a partial block
    whole_blocks_only: ClassVar[bool] = False  # transformers refuses a weight that does not divide into blocks
    moe_single_block: ClassVar[bool] = False  # transformers' MoE loader cannot expand block scales > one block
    implicit_unquantized: ClassVar[tuple[str, ...]] = ("embedding",)  # rule kinds its loaders keep unlisted

    # ---- writing -------------------------------------------------------------------------------

    def quantized_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The [.., out, in] matrices the scheme quantizes (rows of `in`, groups along it)."""
        if self.transposes and len(shape) >= 2:
            return (*shape[:-2], shape[-1], shape[-2])
        return tuple(shape)

    def scale_name(self, weight_name: str) -> str:
        return weight_name[: -len("weight")] + self.scale_suffix

    def scale_shape(self, scheme: Scheme, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Stored scale shape: the scale grid."""
        return scheme.scale_shape(weight_shape)

    def tensors(self, scheme: Scheme, weight_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        """Every tensor written for the quantized weight `weight_name` of `shape` (scheme resolved per tensor)."""
        *lead, rows, cols = shape
        tile_rows = scheme.tile(rows, cols)[0] if scheme.granularity != "tensor" else 0
        scale = TensorSpec(self.scale_name(weight_name), SCALE, scheme.scale_fmt.tag, self.scale_shape(scheme, shape),
                           tile_rows, math.prod(lead))
        if scheme.microscale:
            return microscale_tensors(scheme, weight_name, shape, scale)
        return self.weight_tensors(scheme, weight_name, shape, scale)

    def weight_tensors(self, scheme: Scheme, weight_name: str, shape: tuple[int, ...],
                       scale: TensorSpec) -> list[TensorSpec]:
        """The codes and scale of a (not microscaled) weight: `<m>.weight` one code per element."""
        matrices = math.prod(shape[:-2])
        return [TensorSpec(weight_name, CODES, scheme.fmt.safetensors_tag, tuple(shape), 1, matrices), scale]

    def stored_scheme(self, scheme: Scheme, composite: bool = False) -> Scheme:
        """The scheme as this layout stores it (scales in another dtype, e.g.); `composite`: the model is a
        vision-language model (config.json with a vision tower)."""
        return scheme

    def accepts_microscale(self, scheme: Scheme) -> bool:
        return False

    def check(self, scheme: Scheme) -> None:
        """Refuse combinations an engine would misread, before any byte is written."""
        if scheme.microscale:
            if not self.accepts_microscale(scheme):
                raise SchemeError(microscale_refusal(scheme))
            return
        self.check_scheme(scheme)

    def check_scheme(self, scheme: Scheme) -> None:
        """The checks of a scheme that is not microscaled."""

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        """config.json's quantization_config. `groups`: (scheme, module names) that differ from `scheme`."""
        raise NotImplementedError

    def encode(self, spec: TensorSpec, scheme: Scheme, codes: np.ndarray, scales: np.ndarray,
               zero_points: np.ndarray | None, global_scale: np.float32 | None = None) -> np.ndarray:
        """The stored form of a chunk's codes [n, cols] / scale grid rows / zero-point grid rows."""
        if spec.role == CODES:
            if scheme.microscale:
                return codes  # packed by the microscale kernel already
            return scheme.fmt.pack_codes(codes) if spec.dtype == "I32" else codes
        if spec.role == SCALE:
            return scheme.scale_fmt.store(scales)
        if spec.role == GLOBAL_SCALE:
            return np.array([global_scale], np.float32)
        if spec.role == ZERO_POINT:
            assert zero_points is not None
            return scheme.fmt.pack_codes(np.ascontiguousarray(zero_points.T)).T
        raise ValueError(f"no chunk data for {spec.role}")  # pragma: no cover

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def detect(cls, quant_config: dict | None, tensors: dict) -> "Layout | None":
        """The layout of a checkpoint: by its quant_method, else by the tensor names it holds."""
        method = (quant_config or {}).get("quant_method")
        for layout in cls.registry.values():
            if method is not None and method == layout.quant_method:
                return layout
        if method is not None:
            return None
        for layout in sorted(cls.registry.values(), key=lambda lay: lay.marker_order):
            if layout.marker_suffixes and any(n.endswith(layout.marker_suffixes) for n in tensors):
                return layout
        return None

    def hints(self, quant_config: dict | None, args: dict) -> dict:
        """What the config says of a weight's scheme: granularity, block, group, symmetric, num_bits."""
        return {}

    def reads_blocks(self, name: str) -> bool:
        """Whether `name` is a weight this layout stores in a form of its own (read by layouts/read.py)."""
        return False

    def config_code_dtype(self, quant_config: dict, config_format: str | None) -> tuple[str | None, str] | None:
        """(the codes' dtype the config implies, where it says so), or None when it says nothing."""
        return None


def get_layout(name: str) -> Layout:
    try:
        return Layout.registry[name]
    except KeyError:
        raise SchemeError(f"unknown layout {name!r}; choose one of {', '.join(Layout.registry)}") from None


def microscale_refusal(scheme: Scheme) -> str:
    """The refusal of a microscaled scheme by a layout that does not write it: names those that do."""
    writers = [layout for layout in Layout.registry.values() if layout.accepts_microscale(scheme)]
    first = f"--layout {writers[0].name} ({MICROSCALE[scheme.microscale].ct_format})" if writers else "no layout"
    also = "".join(f", or --layout {w.name} ({w.hint})" for w in writers[1:])
    return f"{scheme.microscale} is written only by {first}{also}"


def decode_codes(raw: np.ndarray, fmt_name: str, packed: bool, cols: int) -> np.ndarray:
    """Stored codes (rows of int32 words, or of e2m1 nibble pairs, when packed) -> codes [n, cols]."""
    return FORMATS[fmt_name].unpack_codes(raw, cols) if packed else raw


def microscale_tensors(scheme: Scheme, weight_name: str, shape: tuple[int, ...], scale: TensorSpec) -> list[TensorSpec]:
    """compressed-tensors nvfp4-pack-quantized / mxfp4-pack-quantized / mxfp8-quantized: e2m1 codes two per
    byte in `weight_packed` (or e4m3 codes in `weight`), the uint8 / e4m3 group scales in `weight_scale`
    and, NVFP4, the float32 `weight_global_scale` [1] (per matrix of a 3-D stack)."""
    *lead, rows, cols = shape
    matrices = math.prod(lead)
    prefix = weight_name[: -len("weight")]
    micro = MICROSCALE[scheme.microscale]
    if micro.packed:
        codes = TensorSpec(prefix + "weight_packed", CODES, "U8", (*lead, rows, cols // 2), 1, matrices)
    else:
        codes = TensorSpec(weight_name, CODES, scheme.fmt.safetensors_tag, tuple(shape), 1, matrices)
    specs = [codes, replace(scale, unit_rows=1)]
    if micro.global_scale:
        specs.append(TensorSpec(prefix + "weight_global_scale", GLOBAL_SCALE, "F32", (*lead, 1), 0, matrices))
    return specs


def decode_zero_points(raw: np.ndarray, fmt_name: str, packed: bool, grid_rows: int) -> np.ndarray:
    """Stored zero points -> [grid_rows, grid_cols] float32 (packed ones along dim 0, as compressed-tensors)."""
    if packed:
        raw = FORMATS[fmt_name].unpack_codes(np.ascontiguousarray(raw.T), grid_rows).T
    return np.asarray(raw[:grid_rows], np.float32)


def unquantized_linear_modules(decisions: dict, tensors: dict) -> list[str]:
    """Module names of 2-D `.weight` tensors left in high precision (what engines must not expect in FP8)."""
    names = []
    for name, decision in decisions.items():
        info = tensors[name]
        if not decision.quantized and name.endswith(".weight") and len(info.shape) == 2:
            names.append(module_name(name))
    return sorted(names)
