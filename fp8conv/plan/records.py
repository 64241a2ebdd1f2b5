"""The conversion plan as a record: every tensor's decision and scheme, every output shard and the tensors
its layout writes. plan/conversion.py builds it; the runner, the manifest and the report read it."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..layouts import CODES, Layout, TensorSpec
from .decisions import DEQUANTIZE, DROP, Decision
from ..layouts.read import QuantizedWeight
from ..io.safetensors import OutEntry, TensorInfo
from .scheme import Scheme


@dataclass
class OutShard:
    name: str
    entries: list[OutEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class ConversionPlan:
    """For `quantize`, scheme and layout are set; for `dequantize`, out_dtype (and layout is None)."""

    scheme: Scheme | None
    layout: Layout | None
    tensors: dict[str, TensorInfo]
    decisions: dict[str, Decision]
    source_shard: dict[str, str]
    shards: list[OutShard]
    outputs: dict[str, list[TensorSpec]]  # quantized source tensor -> every tensor its layout writes
    schemes: dict[str, Scheme]  # quantized source tensor -> its scheme (scale format resolved)
    source_quant: dict[str, QuantizedWeight]
    warnings: list[str]
    unquantized_modules: list[str]
    out_dtype: str | None = None
    # Modules the engines build that have no tensor of their own (a tied lm_head): kept, with the reason.
    tensorless_modules: dict[str, str] = field(default_factory=dict)
    global_scales: dict[str, list] = field(default_factory=dict)  # NVFP4: per matrix, set before the jobs run
    # What the pre-flight refuses (a real run raises, a dry run lists them and exits 2).
    refusals: list[str] = field(default_factory=list)
    # --scheme overrides: (scheme, module names) written as extra config_groups.
    scheme_groups: list[tuple[Scheme, list[str]]] = field(default_factory=list)
    # Every engine finding, one per tensor (warnings / refusals hold them grouped by rule).
    findings: list[dict] = field(default_factory=list)

    @property
    def shard_of_output(self) -> dict[str, str]:
        return {e.name: shard.name for shard in self.shards for e in shard.entries}

    @property
    def origin(self) -> dict[str, str]:
        """Output tensor name -> the source tensor it comes from."""
        names = {}
        for name, decision in self.decisions.items():
            if decision.action == DROP:
                continue
            if decision.quantized:
                names.update({spec.name: name for spec in self.outputs[name]})
            elif decision.action == DEQUANTIZE:
                names[self.source_quant[name].name] = name
            else:
                names[name] = name
        return names

    def spec(self, name: str, role: str) -> TensorSpec | None:
        return next((s for s in self.outputs.get(name, []) if s.role == role), None)

    def output_dtype(self, name: str) -> str | None:
        action = self.decisions[name].action
        if action == DROP:
            return None
        if self.decisions[name].quantized:
            spec = self.spec(name, CODES)
            assert spec is not None
            return spec.dtype
        if action == DEQUANTIZE:
            return self.out_dtype or "BF16"
        return self.tensors[name].dtype
