"""fp8conv: our own documented layout for combinations no engine defines (e.g. e5m2): `<m>.weight`
codes one per byte and `<m>.weight_scale` as the full float32 scale grid, `quant_method: fp8conv`."""
from __future__ import annotations

from ..errors import SchemeError
from ..plan.scheme import Scheme
from .base import Layout


class NativeLayout(Layout, name="fp8conv"):
    label = "fp8conv"
    quant_method = "fp8conv"
    engine_loadable = False

    def check_scheme(self, scheme: Scheme) -> None:
        if scheme.weight_only and scheme.fmt.bits < 8:
            raise SchemeError(f"--layout {self.name} stores one code per byte; {scheme.format} is written by "
                              "--layout compressed-tensors (pack-quantized)")
        if not scheme.symmetric:
            raise SchemeError(f"--layout {self.name} has no zero points; use --layout compressed-tensors for --asymmetric")

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        return {
            "quant_method": self.quant_method,
            **scheme.to_json(),
            "scale_suffix": self.scale_suffix,
            "dequantize": "w = code * scale of its tile; tiles zero-padded at the edges",
            "ignore": unquantized_modules,
        }

    def hints(self, quant_config: dict | None, args: dict) -> dict:
        qc = quant_config or {}
        return {"granularity": qc.get("granularity"), "block": qc.get("block_size"), "group": qc.get("group_size")}
