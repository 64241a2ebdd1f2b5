"""compressed-tensors: `<m>.weight` + `<m>.weight_scale` (float-quantized / int-quantized, W8A8 with
dynamic activations, or weight-only group scales), or, for integer weight-only schemes,
`pack-quantized`: `<m>.weight_packed` (int32, 32 / bits codes per word), `<m>.weight_scale` (the
source dtype), `<m>.weight_shape` (int64) and, asymmetric, `<m>.weight_zero_point` (int32, packed
along the output dim) -- exactly as compressed-tensors' PackedQuantizationCompressor. The
microscaled formats (NVFP4, MXFP4, MXFP8) as llm-compressor's model-free PTQ writes them.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import SchemeError
from ..formats import MICROSCALE
from ..plan.scheme import SOURCE_SCALE, Scheme
from .base import CODES, PACK_QUANTIZED, SHAPE, ZERO_POINT, Layout, TensorSpec, packs

# The compressed-tensors formats fp8conv reads, and the dtype each stores its codes in.
CT_CODE_DTYPES = {"float-quantized": "F8_E4M3", "int-quantized": "I8", PACK_QUANTIZED: "I32",
                  **{m.ct_format: m.codec.safetensors_tag for m in MICROSCALE.values()}}
CT_FORMATS = (*CT_CODE_DTYPES, "naive-quantized", "dense", "mixed-precision")


class CompressedTensors(Layout, name="compressed-tensors"):
    label = "compressed-tensors"
    transformers_loader = "CompressedTensorsConfig(dequantize=True)"
    quant_method = "compressed-tensors"
    marker_suffixes = (".weight_scale", ".weight_packed")
    marker_order = 1
    zero_points = True
    per_module_schemes = True
    regex_ignore = True
    strict_fused_blocks = True
    moe_single_block = True

    def scale_shape(self, scheme: Scheme, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid, except the per-tensor scale (1,) (per matrix of a stack)."""
        if scheme.granularity == "tensor":
            return (*weight_shape[:-2], 1)
        return scheme.scale_shape(weight_shape)

    def weight_tensors(self, scheme: Scheme, weight_name: str, shape: tuple[int, ...],
                       scale: TensorSpec) -> list[TensorSpec]:
        if not packs(scheme):
            return super().weight_tensors(scheme, weight_name, shape, scale)
        *lead, rows, cols = shape
        matrices = math.prod(lead)
        prefix = weight_name[: -len("weight")]
        fmt = scheme.fmt
        specs = [TensorSpec(prefix + "weight_packed", CODES, "I32", (*lead, rows, fmt.packed_cols(cols)), 1, matrices),
                 scale,
                 TensorSpec(prefix + "weight_shape", SHAPE, "I64", (len(shape),), 0, 1,
                            np.array(shape, np.int64).tobytes())]
        if not scheme.symmetric:
            grid_rows, grid_cols = scheme.scale_grid(rows, cols)
            specs.append(TensorSpec(prefix + "weight_zero_point", ZERO_POINT, "I32",
                                    (*lead, fmt.packed_cols(grid_rows), grid_cols), fmt.per_word * scale.unit_rows,
                                    matrices))
        return specs

    def stored_scheme(self, scheme: Scheme, composite: bool = False) -> Scheme:
        """pack-quantized keeps scales in the dtype of the weight they scale (bf16 for a bf16 model),
        rounded before the weights are divided. So do all weights of a composite model (a vision-language
        model: config.json with a vision tower): transformers 5.17 leaves such a model's decompressed
        weights in the scales' dtype, and a float32 weight beside bf16 activations stops the forward pass
        ("self and mat2 must have the same dtype"); llm-compressor writes them so."""
        if (packs(scheme) or composite) and scheme.scale_format == "float32":
            return replace(scheme, scale_format=SOURCE_SCALE)
        return scheme

    def accepts_microscale(self, scheme: Scheme) -> bool:
        return True

    def check_scheme(self, scheme: Scheme) -> None:
        check_describable(self, scheme)
        check_float_weight_only(scheme)
        if packs(scheme) and scheme.granularity not in ("channel", "group"):
            raise SchemeError(f"compressed-tensors pack-quantized ({scheme.format} weight-only) takes --granularity "
                              f"channel or group, not {scheme.granularity}")

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        if scheme.microscale:
            return microscale_config(scheme, unquantized_modules)
        return compressed_tensors_config(scheme, unquantized_modules, groups)

    def hints(self, quant_config: dict | None, args: dict) -> dict:
        block = args.get("block_structure")
        if isinstance(block, str) and "x" in block:
            block = [int(p) for p in block.split("x")]
        return {"granularity": args.get("strategy"), "block": block, "group": args.get("group_size"),
                "symmetric": args.get("symmetric", True) is not False, "num_bits": args.get("num_bits")}

    def config_code_dtype(self, quant_config: dict, config_format: str | None) -> tuple[str | None, str] | None:
        return CT_CODE_DTYPES.get(config_format), f"its config group's format {config_format}"


ENGINE_LAYOUT_HINT = "; use --layout fp8conv (fp8conv's own layout, loaded by no engine) to write it anyway"


def check_describable(layout: Layout, scheme: Scheme) -> None:
    """The engines' own layouts (compressed-tensors, fine-grained FP8) describe FP8 as e4m3 only."""
    if scheme.fmt.is_float and scheme.fmt.safetensors_tag != CT_CODE_DTYPES["float-quantized"]:
        raise SchemeError(f"--layout {layout.name} cannot describe {scheme.format} weights{ENGINE_LAYOUT_HINT}")


def check_float_weight_only(scheme: Scheme) -> None:
    """Engines define weight-only (A16) schemes for integer formats only."""
    if scheme.weight_only and scheme.fmt.is_float:
        raise SchemeError(f"--activations none is defined for integer formats (W4A16 / W8A16), not {scheme.format}")


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
        "observer": None if scheme.observer == "minmax" else scheme.observer,  # min-max: None, as llm-compressor writes
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
