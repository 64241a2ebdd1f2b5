"""Output layouts: every tensor a layout writes for a quantized weight (name, dtype, shape), how a
quantized chunk is encoded into those tensors and decoded back, and the quantization_config
engines read. A layout's writer and reader live here together, under one name.

- compressed-tensors: `<m>.weight` + `<m>.weight_scale` (float-quantized / int-quantized, W8A8 with
  dynamic activations, or weight-only group scales), or, for integer weight-only schemes,
  `pack-quantized`: `<m>.weight_packed` (int32, 32 / bits codes per word), `<m>.weight_scale`
  (the source dtype), `<m>.weight_shape` (int64) and, asymmetric, `<m>.weight_zero_point` (int32,
  packed along the output dim) -- exactly as compressed-tensors' PackedQuantizationCompressor.
- fp8-native: `<m>.weight_scale_inv`, `quant_method: fp8` with `weight_block_size` (DeepSeek-V3 /
  transformers fine-grained FP8); block granularity and e4m3 only.
- fp8conv: our own documented layout for combinations no engine defines (e.g. e5m2):
  `<m>.weight_scale` as the full float32 scale grid, `quant_method: fp8conv`.
- openai-mxfp4: the form gpt-oss ships in (`quant_method: mxfp4`), for fused 3-D experts only:
  `<x>` [E, in, out] becomes `<x>_blocks` uint8 [E, out, in/32, 16] (the transpose [E, out, in],
  e2m1 codes two per byte, element 2k in the low nibble) and `<x>_scales` uint8 [E, out, in/32]
  (E8M0, 2^(s-127)); every other tensor is kept as in the source. Same numerics as
  compressed-tensors mxfp4 (fp8conv.microscale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import SchemeError
from ..formats import FORMATS, MICROSCALE, SAFETENSORS_DTYPES
from ..plan.architecture import module_name
from ..plan.scheme import SOURCE_SCALE, Scheme

OPENAI_MXFP4 = "openai-mxfp4"
LAYOUTS = ("compressed-tensors", "fp8-native", "fp8conv", OPENAI_MXFP4)
DEFAULT_LAYOUT = LAYOUTS[0]
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
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize

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


@dataclass(frozen=True)
class Layout:
    name: str
    scale_suffix: str

    @property
    def fused_experts_only(self) -> bool:
        """openai-mxfp4 quantizes the fused 3-D experts (gpt-oss) and keeps every other tensor as shipped."""
        return self.name == OPENAI_MXFP4

    @property
    def transposes(self) -> bool:
        """Whether the weight [.., in, out] is quantized as its transpose [.., out, in] (groups along in)."""
        return self.name == OPENAI_MXFP4

    def quantized_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The [.., out, in] matrices the scheme quantizes (rows of `in`, groups along it)."""
        if self.transposes and len(shape) >= 2:
            return (*shape[:-2], shape[-1], shape[-2])
        return tuple(shape)

    def scale_name(self, weight_name: str) -> str:
        return weight_name[: -len("weight")] + self.scale_suffix

    def scale_shape(self, scheme: Scheme, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Stored scale shape: the scale grid, except compressed-tensors' per-tensor scale (1,)."""
        if self.name == "compressed-tensors" and scheme.granularity == "tensor":
            return (*weight_shape[:-2], 1)
        return scheme.scale_shape(weight_shape)

    def tensors(self, scheme: Scheme, weight_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        """Every tensor written for the quantized weight `weight_name` of `shape` (scheme resolved per tensor)."""
        if self.name == OPENAI_MXFP4:
            return openai_mxfp4_tensors(weight_name, shape)
        *lead, rows, cols = shape
        matrices = math.prod(lead)
        prefix = weight_name[: -len("weight")]
        fmt = scheme.fmt
        tile_rows = scheme.tile(rows, cols)[0] if scheme.granularity != "tensor" else 0
        scale = TensorSpec(self.scale_name(weight_name), SCALE, scheme.scale_fmt.tag, self.scale_shape(scheme, shape),
                           tile_rows, matrices)
        if scheme.microscale:
            return microscale_tensors(scheme, weight_name, shape, scale)
        if not (self.name == "compressed-tensors" and packs(scheme)):
            return [TensorSpec(weight_name, CODES, fmt.safetensors_tag, tuple(shape), 1, matrices), scale]
        specs = [TensorSpec(prefix + "weight_packed", CODES, "I32", (*lead, rows, fmt.packed_cols(cols)), 1, matrices),
                 scale,
                 TensorSpec(prefix + "weight_shape", SHAPE, "I64", (len(shape),), 0, 1,
                            np.array(shape, np.int64).tobytes())]
        if not scheme.symmetric:
            grid_rows, grid_cols = scheme.scale_grid(rows, cols)
            specs.append(TensorSpec(prefix + "weight_zero_point", ZERO_POINT, "I32",
                                    (*lead, fmt.packed_cols(grid_rows), grid_cols), fmt.per_word * tile_rows, matrices))
        return specs

    def stored_scheme(self, scheme: Scheme) -> Scheme:
        """The scheme as this layout stores it: compressed-tensors pack-quantized keeps scales in the
        dtype of the weight they scale (bf16 for a bf16 model), rounded before the weights are divided."""
        if self.name == "compressed-tensors" and packs(scheme) and scheme.scale_format == "float32":
            return replace(scheme, scale_format=SOURCE_SCALE)
        return scheme

    def check(self, scheme: Scheme) -> None:
        """Refuse combinations an engine would misread, before any byte is written."""
        if self.name == OPENAI_MXFP4:
            if scheme.microscale != "mxfp4":
                raise SchemeError(f"--layout {OPENAI_MXFP4} writes OpenAI's MXFP4 (the form gpt-oss ships in) and takes "
                                  f"--format mxfp4 only, not {scheme.describe()}")
            return
        if scheme.microscale:
            if self.name != "compressed-tensors":
                also = f", or --layout {OPENAI_MXFP4} (gpt-oss experts)" if scheme.microscale == "mxfp4" else ""
                raise SchemeError(f"{scheme.microscale} is written only by --layout compressed-tensors "
                                  f"({MICROSCALE[scheme.microscale].ct_format}){also}")
            return
        if self.name == "fp8conv":
            if scheme.weight_only and scheme.fmt.bits < 8:
                raise SchemeError(f"--layout fp8conv stores one code per byte; {scheme.format} is written by "
                                  "--layout compressed-tensors (pack-quantized)")
            if not scheme.symmetric:
                raise SchemeError("--layout fp8conv has no zero points; use --layout compressed-tensors for --asymmetric")
            return
        hint = "; use --layout fp8conv (fp8conv's own layout, loaded by no engine) to write it anyway"
        if scheme.format == "fp8_e5m2":
            raise SchemeError(f"--layout {self.name} cannot describe fp8_e5m2 weights{hint}")
        if self.name == "fp8-native" and (scheme.format != "fp8_e4m3" or scheme.granularity != "block"):
            raise SchemeError(f"--layout fp8-native holds only fp8_e4m3 block scales, not {scheme.describe()}{hint}")
        if scheme.weight_only and scheme.fmt.is_float:
            raise SchemeError(f"--activations none is defined for integer formats (W4A16 / W8A16), not {scheme.format}")
        if packs(scheme) and scheme.granularity not in ("channel", "group"):
            raise SchemeError(f"compressed-tensors pack-quantized ({scheme.format} weight-only) takes --granularity "
                              f"channel or group, not {scheme.granularity}")

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        """`groups`: (scheme, module names) that differ from `scheme` (compressed-tensors only)."""
        if self.name == OPENAI_MXFP4:
            # transformers (Mxfp4Config) and vLLM (Mxfp4Config) read these two keys; both quantize only the
            # fused experts, transformers skipping the modules listed (gpt-oss's own config lists attention,
            # router, embeddings and head the same way, as globs).
            return {"quant_method": "mxfp4", "modules_to_not_convert": unquantized_modules}
        if self.name == "compressed-tensors" and scheme.microscale:
            return microscale_config(scheme, unquantized_modules)
        if self.name == "compressed-tensors":
            return compressed_tensors_config(scheme, unquantized_modules, groups)
        if self.name == "fp8-native":
            return {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(scheme.block_size),
                "modules_to_not_convert": unquantized_modules,
            }
        return {
            "quant_method": "fp8conv",
            **scheme.to_json(),
            "scale_suffix": self.scale_suffix,
            "dequantize": "w = code * scale of its tile; tiles zero-padded at the edges",
            "ignore": unquantized_modules,
        }

    # ---- writer and reader of one chunk of rows --------------------------------------------------

    def encode(self, spec: TensorSpec, scheme: Scheme, codes: np.ndarray, scales: np.ndarray,
               zero_points: np.ndarray | None, global_scale: np.float32 | None = None) -> np.ndarray:
        """The stored form of a chunk's codes [n, cols] / scale grid rows / zero-point grid rows."""
        if spec.role == CODES:
            if scheme.microscale:
                return codes  # packed by the microscale kernel already
            return scheme.fmt.pack_int32(codes) if spec.dtype == "I32" else codes
        if spec.role == SCALE:
            return scheme.scale_fmt.store(scales)
        if spec.role == GLOBAL_SCALE:
            return np.array([global_scale], np.float32)
        if spec.role == ZERO_POINT:
            assert zero_points is not None
            return scheme.fmt.pack_int32(np.ascontiguousarray(zero_points.T)).T
        raise ValueError(f"no chunk data for {spec.role}")  # pragma: no cover


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


def openai_mxfp4_tensors(weight_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
    """OpenAI MXFP4 (gpt-oss): fused experts `<x>` [E, in, out] -> `<x>_blocks` uint8 [E, out, in/32, 16] and
    `<x>_scales` uint8 [E, out, in/32] (what transformers' Mxfp4HfQuantizer and vLLM's gpt_oss loader read)."""
    *lead, rows_in, cols_out = shape
    matrices = math.prod(lead)
    group = MICROSCALE["mxfp4"].group
    return [TensorSpec(weight_name + OPENAI_BLOCKS, CODES, "U8", (*lead, cols_out, rows_in // group, group // 2), 1,
                       matrices),
            TensorSpec(weight_name + OPENAI_SCALES, SCALE, "U8", (*lead, cols_out, rows_in // group), 1, matrices)]


OPENAI_BLOCKS, OPENAI_SCALES = "_blocks", "_scales"


def decode_zero_points(raw: np.ndarray, fmt_name: str, packed: bool, grid_rows: int) -> np.ndarray:
    """Stored zero points -> [grid_rows, grid_cols] float32 (packed ones along dim 0, as compressed-tensors)."""
    if packed:
        raw = FORMATS[fmt_name].unpack_int32(np.ascontiguousarray(raw.T), grid_rows).T
    return np.asarray(raw[:grid_rows], np.float32)


LAYOUT_BY_NAME = {
    "compressed-tensors": Layout("compressed-tensors", "weight_scale"),
    "fp8-native": Layout("fp8-native", "weight_scale_inv"),
    "fp8conv": Layout("fp8conv", "weight_scale"),
    OPENAI_MXFP4: Layout(OPENAI_MXFP4, OPENAI_SCALES),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUT_BY_NAME[name]
    except KeyError:
        raise SchemeError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


def _quant_args(scheme: Scheme, strategy: str, dynamic: bool, group_size: int | None, block: list[int] | None) -> dict:
    args = {
        "num_bits": scheme.fmt.bits,
        "type": "float" if scheme.fmt.is_float else "int",
        "symmetric": scheme.symmetric,
        "strategy": strategy,
        "group_size": group_size,
        "block_structure": block,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else scheme.observer,
        "observer_kwargs": {},
    }
    if not scheme.symmetric:
        args["zp_dtype"] = "torch.int8"
    return args


def compression_format(scheme: Scheme) -> str:
    if packs(scheme):
        return PACK_QUANTIZED
    return "float-quantized" if scheme.fmt.is_float else "int-quantized"


def _config_group(scheme: Scheme, targets: list[str]) -> dict:
    granularity = scheme.granularity
    weights = _quant_args(
        scheme,
        granularity,
        dynamic=False,
        group_size=scheme.group_size if granularity == "group" else None,
        block=list(scheme.block_size) if granularity == "block" else None,
    )
    if scheme.weight_only:
        activations = None
    elif granularity == "block":
        activations = _quant_args(scheme, "group", True, scheme.block_size[1], None)
    elif granularity in ("channel", "tensor"):
        activations = _quant_args(scheme, "token", True, None, None)
    else:
        activations = None
    return {"targets": targets, "weights": weights, "input_activations": activations, "output_activations": None,
            "format": compression_format(scheme)}


def compressed_tensors_config(scheme: Scheme, unquantized_modules: list[str],
                              groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
    """W8A8 with dynamic activations where engines define it (FP8_DYNAMIC, FP8_BLOCK, INT8 W8A8);
    group scales are weight-only (W8A16), since no engine quantizes activations per group of weights;
    integer weight-only schemes are pack-quantized W4A16 / W8A16.

    `groups` (--scheme overrides) become further config_groups targeting modules by exact name, which
    vLLM and compressed-tensors prefer over the default group's class target "Linear"; the top-level
    format is "mixed-precision" when the groups' formats differ."""
    config_groups = {"group_0": _config_group(scheme, ["Linear"])}
    for i, (override, modules) in enumerate(groups, 1):
        config_groups[f"group_{i}"] = _config_group(override, list(modules))
    formats = {group["format"] for group in config_groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": unquantized_modules,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def microscale_config(scheme: Scheme, unquantized_modules: list[str]) -> dict:
    """The quantization_config llm-compressor's model_free_ptq writes for NVFP4A16 / MXFP4A16 / MXFP8A16
    (compressed-tensors 0.19 serialization; the group is named after the preset, as it names it)."""
    micro = MICROSCALE[scheme.microscale]
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": micro.group,
        "num_bits": scheme.fmt.bits,
        "observer": "mse" if scheme.observer == "mse" else None,  # min-max: None, as llm-compressor writes
        "observer_kwargs": {},
        "scale_dtype": "torch.float8_e4m3fn" if micro.global_scale else "torch.uint8",
        "strategy": "tensor_group" if micro.global_scale else "group",
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }
    return {
        "config_groups": {
            micro.preset: {
                "format": micro.ct_format,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": micro.ct_format,
        "global_compression_ratio": None,
        "ignore": unquantized_modules,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
    }


def unquantized_linear_modules(decisions: dict, tensors: dict) -> list[str]:
    """Module names of 2-D `.weight` tensors left in high precision (what engines must not expect in FP8)."""
    names = []
    for name, decision in decisions.items():
        info = tensors[name]
        if not decision.quantized and name.endswith(".weight") and len(info.shape) == 2:
            names.append(module_name(name))
    return sorted(names)
