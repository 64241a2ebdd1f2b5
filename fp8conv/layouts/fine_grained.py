"""fp8-native: fine-grained FP8 as DeepSeek-V3 and transformers write it: `<m>.weight` e4m3 codes and
`<m>.weight_scale_inv` block scales, `quant_method: fp8` with `weight_block_size`."""
from __future__ import annotations

from ..errors import SchemeError
from ..formats import FORMATS
from ..plan.scheme import Scheme
from .base import Layout
from .compressed_tensors import ENGINE_LAYOUT_HINT, check_describable, check_float_weight_only


class FineGrainedFP8(Layout, name="fp8-native"):
    label = "fine-grained FP8 (quant_method fp8)"
    transformers_loader = "FineGrainedFP8Config(dequantize=True)"
    quant_method = "fp8"
    scale_suffix = "weight_scale_inv"
    marker_suffixes = (".weight_scale_inv",)
    whole_blocks_only = True
    implicit_unquantized = ("embedding", "lm_head", "MoE router")  # not plain Linear layers in DeepSeek-style models

    def check_scheme(self, scheme: Scheme) -> None:
        check_describable(self, scheme)
        if not scheme.fmt.is_float or scheme.granularity != "block":
            raise SchemeError(f"--layout {self.name} holds only {_E4M3.name} block scales, not "
                              f"{scheme.describe()}{ENGINE_LAYOUT_HINT}")
        check_float_weight_only(scheme)

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        return {
            "quant_method": self.quant_method,
            "fmt": scheme.fmt.short_name,
            "activation_scheme": "dynamic",
            "weight_block_size": list(scheme.block_size),
            "modules_to_not_convert": unquantized_modules,
        }

    def hints(self, quant_config: dict | None, args: dict) -> dict:
        block = (quant_config or {}).get("weight_block_size")
        return {"granularity": "block" if block else "tensor", "block": block}

    def config_code_dtype(self, quant_config: dict, config_format: str | None) -> tuple[str | None, str] | None:
        named = quant_config.get("fmt", _E4M3.short_name)
        fmt = next((f for f in FORMATS.values() if f.is_float and f.bits == 8 and f.short_name == named), None)
        return (fmt.safetensors_tag if fmt else None), f"quantization_config fmt {named}"


_E4M3 = next(f for f in FORMATS.values() if f.safetensors_tag == "F8_E4M3" and f.standalone)
