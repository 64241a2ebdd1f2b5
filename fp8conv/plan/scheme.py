"""A validated quantization scheme: element format x granularity x tile size x scale format x symmetry."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SchemeError
from ..formats import DEFAULT_FORMAT, FORMATS, MICROSCALE, SCALE_FORMATS, ElementFormat, ScaleFormat, format_choices

GRANULARITIES = ("block", "channel", "group", "tensor")
ACTIVATIONS = ("dynamic", "none")
OBSERVERS = ("minmax", "mse", "hqq", "expanded")
MAX_TILE = 1 << 16
# scale_format "source": the scale is stored in the dtype of the weight it scales (what
# compressed-tensors does for pack-quantized); Scheme.for_source() makes it concrete per tensor.
SOURCE_SCALE = "source"
_SCALE_OF_SOURCE = {"BF16": "bf16", "F16": "fp16", "F32": "float32"}


# Where the command line offers `--observer mse` (#28, bench/QUALITY.md): only for the schemes where it
# was never worse than min-max in mean KL / embedding loss on any development or evaluation pair, or where
# it writes min-max's bytes (E8M0 scales keep the min-max exponent). Everywhere else it lost on some pair,
# or was not shown not to, and is refused with the alternative that did not lose.
# Today that is every microscaled preset (the table in formats/microscaled.py; a preset added there is offered
# mse too, so measure it before adding it) and the grid schemes a format's `mse_offered` names (INT4
# symmetric groups).
MSE_OFFERED = tuple(MICROSCALE)


def mse_refusal(scheme: "Scheme") -> "str | None":
    """The one-line reason the command line refuses --observer mse for a scheme, or None where it is offered."""
    if scheme.observer != "mse" or scheme.microscale in MSE_OFFERED:
        return None
    if scheme.microscale is None and scheme.fmt.mse_offered(scheme.granularity, scheme.symmetric):
        return None
    integer = not scheme.fmt.is_float
    other = "--observer hqq --asymmetric, or --observer minmax" if integer and scheme.fmt.bits == 4 else "--observer minmax"
    plain = Scheme(**{**scheme.__dict__, "observer": "minmax"}).describe()
    return (f"--observer mse is not offered for {plain}: on the evaluation models and texts of "
            f"bench/QUALITY.md it was worse than min-max on some, or not shown never to be; use {other}")


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized. Every granularity is a 2-D tile of (rows, cols) sharing a scale
    (and, when asymmetric, a zero point).

    activations: "dynamic" (the W8A8 schemes engines quantize activations for at run time) or
    "none" (weight-only: W4A16 / W8A16).
    """

    format: str = DEFAULT_FORMAT
    granularity: str = "block"
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128
    symmetric: bool = True
    activations: str | None = None  # None: "none" for int4 (no engine runs W4A8), "dynamic" otherwise
    scale_format: str = "float32"
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SchemeError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.observer not in OBSERVERS:
            raise SchemeError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if self.observer == "mse" and self.granularity == "tensor":
            raise SchemeError("the mse observer chooses one scale per tile; use it with block, channel or group granularity")
        if self.observer == "hqq" and (self.fmt.is_float or self.symmetric or self.granularity not in ("channel", "group")):
            raise SchemeError("the hqq observer fits a scale and a zero point per group: use it with an integer format, "
                              "--asymmetric and --granularity group or channel")
        sizes = (*self.block_size, self.group_size)
        if len(self.block_size) != 2 or any(not isinstance(s, int) or s <= 0 or s > MAX_TILE for s in sizes):
            raise SchemeError(f"block and group sizes must be integers in 1..{MAX_TILE}, got {sizes}")
        if self.activations is None:
            weight_only = self.fmt.weight_only or self._scale_is_microscale
            object.__setattr__(self, "activations", "none" if weight_only or not self.symmetric else "dynamic")
        if self.activations not in ACTIVATIONS:
            raise SchemeError(f"unknown activations {self.activations!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.scale_format != SOURCE_SCALE and self.scale_format not in SCALE_FORMATS:
            raise SchemeError(f"unknown scale format {self.scale_format!r}")
        self._check_microscale()
        if self.fmt.weight_only and self.activations != "none":
            raise SchemeError(f"{self.format} is weight-only (W{self.fmt.bits}A16): no engine quantizes activations to "
                              f"{self.format}; use --activations none")
        if not self.symmetric:
            if self.fmt.is_float:
                raise SchemeError(f"--asymmetric applies to integer formats, not {self.format}")
            if self.activations != "none" or self.granularity not in ("channel", "group"):
                raise SchemeError("--asymmetric (zero points) is defined for weight-only integer schemes with "
                                  "--granularity channel or group; add --activations none / pick one of them")

    def _check_microscale(self) -> None:
        micro = self.microscale
        if self.observer == "expanded" and (micro is None or not SCALE_FORMATS[self.scale_format].global_scale):
            # MXFP4 (E8M0 exponents -1..+1) lost to min-max on every decoder evaluation pair (bench/QUALITY.md).
            raise SchemeError("the expanded observer searches NVFP4 group scales: use it with --format nvfp4 (on MXFP4 "
                              "it was worse than min-max end to end: bench/QUALITY.md)")
        if micro is None:
            if not self.fmt.standalone:
                hosts = " or ".join(f"--format {m.name}" for m in MICROSCALE.values() if m.element == self.format)
                raise SchemeError(f"{self.format} weights are written as {hosts}")
            return
        m = MICROSCALE[micro]
        if (self.format, self.granularity, self.group_size) != (m.element, "group", m.group):
            raise SchemeError(f"{micro} is {m.element} in groups of {m.group} along the input dim; "
                              f"drop --granularity / --group-size / --block-size (got {self.granularity})")
        if not self.symmetric or self.activations != "none":
            raise SchemeError(f"{micro} is symmetric and weight-only (A16): no --asymmetric / --activations dynamic")

    @property
    def microscale(self) -> str | None:
        """nvfp4 / mxfp4 / mxfp8 when the scale format is a microscaling one, else None."""
        for m in MICROSCALE.values():
            if m.scale_format == self.scale_format and m.element == self.format and m.group == self.group_size:
                return m.name
        if self._scale_is_microscale:
            raise SchemeError(f"scale format {self.scale_format} with {self.format} group {self.group_size} is "
                              "none of nvfp4 / mxfp4 / mxfp8")
        return None

    @property
    def _scale_is_microscale(self) -> bool:
        return self.scale_format in SCALE_FORMATS and SCALE_FORMATS[self.scale_format].microscale

    @property
    def global_scale(self) -> bool:
        """Scales relative to a per-tensor float32 global scale (NVFP4)."""
        return self._scale_is_microscale and SCALE_FORMATS[self.scale_format].global_scale

    @property
    def max_rel_error(self) -> float:
        """verify's default limit of the relative RMS error for this scheme."""
        return MICROSCALE[self.microscale].max_rel_error if self.microscale else self.fmt.max_rel_error

    @property
    def fmt(self) -> ElementFormat:
        return FORMATS[self.format]

    @property
    def scale_fmt(self) -> ScaleFormat:
        if self.scale_format == SOURCE_SCALE:
            raise SchemeError("internal: scale format 'source' not resolved for a tensor")  # pragma: no cover
        return SCALE_FORMATS[self.scale_format]

    @property
    def weight_only(self) -> bool:
        return self.activations == "none"

    @property
    def full_range(self) -> bool:
        """Integer weight-only schemes use the whole code range [qmin, qmax] (compressed-tensors'
        W4A16 / W8A16); the others the symmetric range [-qmax, qmax] (FP8; INT8 W8A8)."""
        return self.weight_only and not self.fmt.is_float

    @property
    def code_range(self) -> tuple[float, float]:
        fmt = self.fmt
        return (fmt.qmin if self.full_range or not self.symmetric else -fmt.qmax, fmt.qmax)

    @property
    def symmetric_divisor(self) -> float:
        """scale = amax / this: qmax, or (qmax - qmin) / 2 over the full range (7.5 int4, 127.5 int8)."""
        lo, hi = self.code_range
        return (hi - lo) / 2 if self.full_range else hi

    def for_source(self, source_tag: str) -> "Scheme":
        """The scheme with a concrete scale format for a weight stored as `source_tag`."""
        if self.scale_format != SOURCE_SCALE:
            return self
        from dataclasses import replace

        return replace(self, scale_format=_SCALE_OF_SOURCE.get(source_tag, "bf16"))

    def tile(self, rows: int, cols: int) -> tuple[int, int]:
        """The (rows, cols) of the tile that shares one scale, for a 2-D weight of this shape."""
        if self.granularity == "block":
            return self.block_size
        if self.granularity == "channel":
            return (1, max(cols, 1))
        if self.granularity == "group":
            return (1, self.group_size)
        return (max(rows, 1), max(cols, 1))

    def scale_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the 2-D scale grid: ceil(rows / tile_rows) x ceil(cols / tile_cols)."""
        tile_rows, tile_cols = self.tile(rows, cols)
        return (-(-rows // tile_rows), -(-cols // tile_cols))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Scale grid for a 2-D weight, or [E, ...] grids for 3-D stacked experts."""
        *lead, rows, cols = shape
        return (*lead, *self.scale_grid(rows, cols))

    def describe(self) -> str:
        observed = f", {self.observer} observer" if self.observer != "minmax" else ""
        if self.microscale:
            return (f"{self.microscale} ({self.format} group {self.group_size}, {self.scale_format} scales) "
                    f"weight-only{observed}")
        if self.granularity == "block":
            text = f"{self.format} block {self.block_size[0]}x{self.block_size[1]}"
        elif self.granularity == "group":
            text = f"{self.format} group {self.group_size}"
        else:
            text = f"{self.format} {self.granularity}"
        if not self.symmetric:
            text += " asymmetric"
        if self.weight_only:
            text += " weight-only"
        return text + observed

    def to_json(self) -> dict:
        data = {
            "format": self.format,
            "granularity": self.granularity,
            "block_size": list(self.block_size) if self.granularity == "block" else None,
            "group_size": self.group_size if self.granularity == "group" else None,
        }
        # Keys the first release did not write appear only when they differ from it (its bytes are pinned).
        if not self.symmetric or self.weight_only or self.scale_format != "float32":
            data.update(symmetric=self.symmetric, activations=self.activations, scale_format=self.scale_format)
        if self.microscale:
            data["microscale"] = self.microscale
        if self.observer != "minmax":
            data["observer"] = self.observer
        return data


def microscale_scheme(name: str) -> Scheme:
    """The scheme of --format nvfp4 / mxfp4 / mxfp8."""
    m = MICROSCALE[name]
    return Scheme(format=m.element, granularity="group", group_size=m.group, activations="none",
                  scale_format=m.scale_format)


def parse_block_size(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '128x64' -> (128, 64)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise SchemeError(f"block size {text!r} is not N or NxM (e.g. 128 or 128x64)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise SchemeError(f"block size {text!r} is not N or NxM (e.g. 128 or 128x64)")
    return values  # type: ignore[return-value]


def default_granularity(fmt: str, granularity: str | None) -> str:
    """The granularity asked for, else the format's own (groups for int4 and the microscaled formats,
    blocks for the others); an unknown format is left to Scheme to refuse."""
    if granularity:
        return granularity
    if fmt in MICROSCALE:
        return "group"
    return FORMATS[fmt].default_granularity if fmt in FORMATS else "block"


def parse_spec(spec: str) -> Scheme:
    """'FORMAT[:GRANULARITY[:SIZE]][:asym]' -> Scheme: 'fp8_e4m3:block:128', 'int8:channel', 'int4:group:32:asym'.

    SIZE is the block (N or NxM) for block granularity and the group length for group granularity."""
    parts = spec.split(":")
    asymmetric = parts[-1] == "asym"
    if asymmetric:
        parts = parts[:-1]
    if not parts or not parts[0] or len(parts) > 3:
        raise SchemeError(f"scheme {spec!r} is not FORMAT[:GRANULARITY[:SIZE]][:asym], e.g. fp8_e4m3:block:128 or int8:channel")
    fmt = parts[0]
    choices = format_choices()
    if fmt not in choices:
        raise SchemeError(f"scheme {spec!r}: unknown format {fmt!r}; choose one of {', '.join(choices)}")
    if fmt in MICROSCALE:
        if len(parts) > 1 or asymmetric:
            raise SchemeError(f"scheme {spec!r}: {fmt} fixes its groups and scales; give it alone")
        return microscale_scheme(fmt)
    granularity = default_granularity(fmt, parts[1] if len(parts) > 1 else None)
    sizes: dict = {}
    if len(parts) == 3:
        if granularity == "block":
            sizes["block_size"] = parse_block_size(parts[2])
        elif granularity == "group":
            try:
                sizes["group_size"] = int(parts[2])
            except ValueError:
                raise SchemeError(f"scheme {spec!r}: group size {parts[2]!r} is not an integer") from None
        else:
            raise SchemeError(f"scheme {spec!r}: a size applies to block or group granularity, not {granularity}")
    return Scheme(format=fmt, granularity=granularity, symmetric=not asymmetric, **sizes)


def parse_override(text: str) -> tuple[str, Scheme]:
    """'PATTERN=SPEC' (--scheme) -> (pattern, scheme); the pattern uses the --ignore syntax."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise SchemeError(f"--scheme {text!r} is not PATTERN=SPEC, e.g. 're:.*down_proj=int8:channel'")
    return pattern, parse_spec(spec)
