"""What a conversion does, as data: the options that decide the output bytes.

A partitioned run writes its recipe into every part, so `fp8conv merge` (on any host) plans the
same conversion again, and a Ray task receives it instead of a command line. Not in it: anything
that cannot change the output (--workers, --overwrite, --resume, paths).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import InputError, SchemeError
from ..layouts import DEFAULT_LAYOUT
from .scheme import Scheme

QUANTIZE = "quantize"
DEQUANTIZE = "dequantize"


@dataclass(frozen=True)
class Recipe:
    """quantize: scheme, layout, ignore/include, allow_nonfinite; dequantize: out_dtype (a safetensors tag)."""

    command: str = QUANTIZE
    scheme: Scheme = field(default_factory=Scheme)
    layout: str = DEFAULT_LAYOUT
    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    allow_nonfinite: bool = False
    out_dtype: str = "BF16"
    max_shard_size: int | None = None
    schemes: tuple[tuple[str, Scheme], ...] = ()  # --scheme PATTERN=SPEC overrides, first match wins
    # Pre-flight only (refusals before the first byte, checked by whoever plans the whole run): they
    # never change the output bytes, so they are not part of the recorded recipe.
    tp: int = 1
    engines: tuple[str, ...] = ()
    # Why the scheme is not the one asked for (fp8conv.run.fitting: the default tile made to fit the model):
    # the run's first warning, recorded with the recipe so a part, its merge and --resume say the same.
    note: str = ""

    def to_json(self) -> dict:
        common = {"command": self.command, "max_shard_size": self.max_shard_size}
        if self.command == DEQUANTIZE:
            return {**common, "out_dtype": self.out_dtype}
        return {**common, "scheme": _scheme_json(self.scheme), "layout": self.layout, "ignore": list(self.ignore),
                "include": list(self.include), "allow_nonfinite": self.allow_nonfinite,
                "schemes": [[pattern, _scheme_json(s)] for pattern, s in self.schemes], "note": self.note}

    @classmethod
    def from_json(cls, data: object, where: str) -> "Recipe":
        """Raises InputError naming `where` when the record is not a recipe this version writes."""
        try:
            _require(isinstance(data, dict) and data["command"] in (QUANTIZE, DEQUANTIZE))
            size = data["max_shard_size"]
            _require(size is None or (isinstance(size, int) and size > 0))
            if data["command"] == DEQUANTIZE:
                _require(isinstance(data["out_dtype"], str))
                return cls(DEQUANTIZE, out_dtype=data["out_dtype"], max_shard_size=size)
            scheme = _scheme_from_json(data["scheme"])
            _require(all(isinstance(p, str) for p in data["ignore"] + data["include"]))
            _require(all(isinstance(o, list) and len(o) == 2 and isinstance(o[0], str) for o in data["schemes"]))
            schemes = tuple((pattern, _scheme_from_json(s)) for pattern, s in data["schemes"])
            note = data.get("note", "")
            _require(isinstance(note, str))
            return cls(QUANTIZE, scheme, str(data["layout"]), tuple(data["ignore"]), tuple(data["include"]),
                       bool(data["allow_nonfinite"]), max_shard_size=size, schemes=schemes, note=note)
        except (ValueError, KeyError, TypeError, SchemeError):
            raise InputError(f"{where}: not a conversion recipe written by this version of fp8conv") from None


def _scheme_json(scheme: Scheme) -> dict:
    data = {f.name: getattr(scheme, f.name) for f in fields(Scheme)}
    data["block_size"] = list(data["block_size"])
    return data


def _scheme_from_json(data: object) -> Scheme:
    _require(isinstance(data, dict) and set(data) == {f.name for f in fields(Scheme)})
    return Scheme(**{**data, "block_size": tuple(data["block_size"])})


def _require(condition: bool) -> None:
    if not condition:
        raise ValueError("malformed recipe")
