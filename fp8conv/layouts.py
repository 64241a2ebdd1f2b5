"""Output layouts: how scales are named and shaped, and the quantization_config engines read.

- compressed-tensors: `<m>.weight_scale`, `quant_method: compressed-tensors` (vLLM, transformers).
- fp8-native: `<m>.weight_scale_inv`, `quant_method: fp8` with `weight_block_size` (DeepSeek-V3 /
  transformers fine-grained FP8); block granularity and e4m3 only.
- fp8conv: our own documented layout for combinations no engine defines (e.g. e5m2):
  `<m>.weight_scale` as the full float32 scale grid, `quant_method: fp8conv`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SchemeError
from .plan import module_name
from .scheme import Scheme

LAYOUTS = ("compressed-tensors", "fp8-native", "fp8conv")


@dataclass(frozen=True)
class Layout:
    name: str
    scale_suffix: str

    def scale_name(self, weight_name: str) -> str:
        return weight_name[: -len("weight")] + self.scale_suffix

    def scale_shape(self, scheme: Scheme, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Stored scale shape: the scale grid, except compressed-tensors' per-tensor scale (1,)."""
        if self.name == "compressed-tensors" and scheme.granularity == "tensor":
            return (*weight_shape[:-2], 1)
        return scheme.scale_shape(weight_shape)

    def check(self, scheme: Scheme) -> None:
        """Refuse combinations an engine would misread, before any byte is written."""
        if self.name == "fp8conv":
            return
        hint = "; use --layout fp8conv (fp8conv's own layout, loaded by no engine) to write it anyway"
        if scheme.format == "fp8_e5m2":
            raise SchemeError(f"--layout {self.name} cannot describe fp8_e5m2 weights{hint}")
        if self.name == "fp8-native" and (scheme.format != "fp8_e4m3" or scheme.granularity != "block"):
            raise SchemeError(f"--layout fp8-native holds only fp8_e4m3 block scales, not {scheme.describe()}{hint}")

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str]) -> dict:
        if self.name == "compressed-tensors":
            return compressed_tensors_config(scheme, unquantized_modules)
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


LAYOUT_BY_NAME = {
    "compressed-tensors": Layout("compressed-tensors", "weight_scale"),
    "fp8-native": Layout("fp8-native", "weight_scale_inv"),
    "fp8conv": Layout("fp8conv", "weight_scale"),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUT_BY_NAME[name]
    except KeyError:
        raise SchemeError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


def _quant_args(scheme: Scheme, strategy: str, dynamic: bool, group_size: int | None, block: list[int] | None) -> dict:
    return {
        "num_bits": 8,
        "type": "float" if scheme.fmt.is_float else "int",
        "symmetric": True,
        "strategy": strategy,
        "group_size": group_size,
        "block_structure": block,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def compressed_tensors_config(scheme: Scheme, unquantized_modules: list[str]) -> dict:
    """W8A8 with dynamic activations where engines define it (FP8_DYNAMIC, FP8_BLOCK, INT8 W8A8);
    group scales are weight-only (W8A16), since no engine quantizes activations per group of weights."""
    granularity = scheme.granularity
    weights = _quant_args(
        scheme,
        granularity,
        dynamic=False,
        group_size=scheme.group_size if granularity == "group" else None,
        block=list(scheme.block_size) if granularity == "block" else None,
    )
    if granularity == "block":
        activations = _quant_args(scheme, "group", True, scheme.block_size[1], None)
    elif granularity in ("channel", "tensor"):
        activations = _quant_args(scheme, "token", True, None, None)
    else:
        activations = None
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if scheme.fmt.is_float else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
                "format": "float-quantized" if scheme.fmt.is_float else "int-quantized",
            }
        },
        "ignore": unquantized_modules,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def unquantized_linear_modules(decisions: dict, tensors: dict) -> list[str]:
    """Module names of 2-D `.weight` tensors left in high precision (what engines must not expect in FP8)."""
    names = []
    for name, decision in decisions.items():
        info = tensors[name]
        if not decision.quantized and name.endswith(".weight") and len(info.shape) == 2:
            names.append(module_name(name))
    return sorted(names)
