"""Self-registering classes: a subclass declared with `name=` puts one instance of itself into its
family's `registry` (formats/codec.py's ElementFormat, layouts/base.py's Layout). Importing the module
that defines a subclass is all it takes to add one (gguf-py's quants.py does the same)."""
from __future__ import annotations

from typing import ClassVar


class Registered:
    """Base of a family; the family class defines `registry: ClassVar[dict] = {}` and `kind`."""

    registry: ClassVar[dict]
    kind: ClassVar[str] = "entry"  # what one is called, in repr
    name: ClassVar[str]

    def __init_subclass__(cls, name: str = "", **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            cls.registry[name] = cls()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"
