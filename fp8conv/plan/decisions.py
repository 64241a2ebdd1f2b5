"""What happens to each tensor, and why: the decisions are data, recorded in the manifest."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .architecture import Architecture, module_name
from ..errors import FP8ConvError, SchemeError
from ..formats import QUANTIZABLE_TAGS
from ..io.safetensors import TensorInfo, printable
from ..io.safe_regex import PatternError, compile_pattern

QUANTIZE = "quantize"
COPY = "copy"
REQUANTIZE = "requantize"  # quantized in the source: dequantized (float32) and quantized again
CARRY = "carry"  # quantized in the source with the requested scheme: codes and scales kept as they are
DEQUANTIZE = "dequantize"
DROP = "drop"  # a source scale or activation parameter that the output does not keep
QUANTIZED_OUTPUT = frozenset({QUANTIZE, REQUANTIZE, CARRY})

@dataclass(frozen=True)
class Decision:
    """The fate of one source tensor."""

    name: str
    action: str
    reason: str

    @property
    def quantized(self) -> bool:
        """Whether the output holds this tensor as codes plus a scale."""
        return self.action in QUANTIZED_OUTPUT


class Matcher:
    """--ignore / --include patterns: a glob must match the whole tensor or module name;
    're:REGEX' must match the whole name too (re.fullmatch semantics, matched in linear time by
    fp8conv.io.safe_regex). A pattern that is not valid raises `error` (a usage error from the command line,
    an input error from a checkpoint's config)."""

    def __init__(self, patterns: tuple[str, ...] | list[str], option: str,
                 error: type[FP8ConvError] = SchemeError) -> None:
        self.patterns = tuple(patterns)
        self._compiled: list[tuple[str, object]] = []
        for pattern in self.patterns:
            if pattern.startswith("re:"):
                try:
                    self._compiled.append((pattern, compile_pattern(pattern[3:])))
                except PatternError as exc:
                    raise error(f"{option} {printable(repr(pattern))} is not a valid regular expression for fp8conv "
                                f"({printable(str(exc))})") from None
            else:
                self._compiled.append((pattern, None))

        self.option = option
        self._used: set[str] = set()

    @staticmethod
    def _matches(pattern: str, regex, names: tuple[str, str]) -> bool:
        if regex is not None:
            return any(regex.fullmatch(name) for name in names)
        return any(fnmatch.fnmatchcase(name, pattern) for name in names)

    def first_match(self, tensor_name: str) -> str | None:
        names = (tensor_name, module_name(tensor_name))
        for pattern, regex in self._compiled:
            if self._matches(pattern, regex, names):
                self._used.add(pattern)
                return pattern
        return None

    def unmatched(self, tensor_names) -> list[str]:
        """The patterns that match none of `tensor_names` (nor their module names): a typo does nothing."""
        left = [(p, r) for p, r in self._compiled if p not in self._used]
        for name in tensor_names:
            if not left:
                break
            names = (name, module_name(name))
            left = [(p, r) for p, r in left if not self._matches(p, r, names)]
        return [p for p, _ in left]

    def unmatched_warnings(self, tensor_names) -> list[str]:
        return [f"{self.option} '{printable(p)}' matches no tensor or module of SRC; it has no effect (a typo?)"
                for p in self.unmatched(tensor_names)]


def decide(info: TensorInfo, ignore: Matcher, include: Matcher, arch: Architecture | None = None) -> Decision:
    """Quantize floating 2-D `*.weight` tensors and 3-D expert stacks unless the user or the
    architecture's defaults (fp8conv.architecture) keep them; copy everything else, with the reason."""
    arch = arch or Architecture()
    name, ndim = info.name, len(info.shape)

    def copy(reason: str) -> Decision:
        return Decision(name, COPY, reason)

    if info.dtype not in QUANTIZABLE_TAGS:
        return copy(f"dtype {info.dtype} is not quantized; copied byte-for-byte")
    if ndim == 0:
        return copy("scalar tensor")
    special = arch.copy_reason(name)
    if special is not None:
        return copy(special)
    if ndim == 1:
        return copy("1-D tensor (norm or bias)")
    rule = arch.fused_experts_rule(name, info.shape) if not name.endswith(".weight") else None
    if rule is None and not name.endswith(".weight"):
        return copy("not a .weight tensor")
    if ndim > 3:
        return copy(f"{ndim}-D tensor; only 2-D weights and 3-D stacked experts are quantized")
    if info.numel == 0:
        return copy("empty tensor")
    pattern = ignore.first_match(name)
    if pattern is not None:
        return copy(f"matched --ignore {pattern}")
    rule = rule or arch.rule_for(name, info.shape)
    if rule is not None:
        pattern = include.first_match(name)
        if pattern is None:
            return copy(f"{rule.kind} kept in high precision by default: {rule.reason}"
                        + (" (--include to quantize)" if rule.includable else ""))
        if not rule.includable:
            raise SchemeError(f"--include {pattern} matches {printable(name)}, which cannot be quantized: {rule.reason}")
        return Decision(name, QUANTIZE, f"{rule.kind} quantized by --include {pattern}")
    mtp = arch.mtp_reason(name)
    if mtp is not None:
        return Decision(name, QUANTIZE, mtp)
    if ndim == 3:
        return Decision(name, QUANTIZE, "3-D stacked experts, one scale grid per expert")
    return Decision(name, QUANTIZE, "2-D weight")
