"""What a checkpoint's quantization looks like once read: each quantized weight (codes, scale, zero
points, the scheme its shapes and config imply), the view of the whole checkpoint, and the config group
that quantizes each module. Data only; layouts/read.py builds them."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.safe_regex import PatternError, SafeRegex, compile_pattern
from ..io.safetensors import TensorInfo, printable
from ..plan.scheme import Scheme
from .base import Layout


@dataclass
class QuantizedWeight:
    """A quantized weight: its logical name and shape, the stored codes (packed into int32 or not),
    its scale, zero points, the scheme its shapes and the config imply, and the tensors that go with it."""

    name: str
    weight: TensorInfo
    scale: TensorInfo | None
    scheme: Scheme | None
    problem: str | None = None
    shape: tuple[int, ...] = ()
    packed: bool = False
    zero_point: TensorInfo | None = None
    zp_packed: bool = False
    companions: tuple[str, ...] = ()
    global_scale: TensorInfo | None = None  # NVFP4 weight_global_scale
    transposed: bool = False  # OpenAI MXFP4: codes hold the transpose [E, out, in] of the weight [E, in, out]

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape of the matrices the codes and scale grid describe ([.., out, in])."""
        if self.transposed:
            return (*self.shape[:-2], self.shape[-1], self.shape[-2])
        return tuple(self.shape)


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
    unsupported: str | None = None

    @property
    def ignored_modules(self) -> list[str] | None:
        qc = self.quant_config or {}
        for key in ("ignore", "modules_to_not_convert", "ignored_layers"):
            if isinstance(qc.get(key), list):
                return [str(m) for m in qc[key]]
        return None

    @property
    def format(self) -> Layout | None:
        """The layout object (None for a checkpoint without quantization, or one fp8conv refuses)."""
        return Layout.registry.get(self.layout)

    def refuse_unsupported(self) -> None:
        if self.unsupported:
            raise InputError(f"{self.checkpoint.root}: {self.unsupported}")


class ConfigGroups:
    """The config group of a compressed-tensors config that quantizes each module: the group that names the
    module exactly, else one whose 're:' target matches it (the order compressed-tensors and vLLM use), else
    the first group. Exact targets are indexed: mixed configs list thousands of module names."""

    def __init__(self, quant_config: dict | None) -> None:
        groups = (quant_config or {}).get("config_groups")
        usable = [g for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)] \
            if isinstance(groups, dict) else []
        self.default: dict = usable[0] if usable else {}
        self.exact: dict[str, dict] = {}
        self.patterns: list[tuple[SafeRegex, dict]] = []
        for group in usable:
            for target in group.get("targets") or []:
                if not isinstance(target, str):
                    continue
                if target.startswith("re:"):
                    try:
                        self.patterns.append((compile_pattern(target[3:]), group))
                    except PatternError as exc:
                        raise InputError(f"config.json: config_groups target {printable(repr(target))} is not a valid "
                                         f"regular expression for fp8conv ({printable(str(exc))})") from None
                else:
                    self.exact.setdefault(target, group)

    def group(self, module: str | None) -> dict:
        if module is None:
            return self.default
        if module in self.exact:
            return self.exact[module]
        return next((group for pattern, group in self.patterns if pattern.match(module)), self.default)

    def of(self, module: str | None) -> dict:
        """The weights' quantization args of the module's group."""
        return self.group(module).get("weights", {})
