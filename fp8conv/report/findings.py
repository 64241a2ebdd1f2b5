"""Many near-identical findings said once: one line per rule, with its count and the first few
tensors in natural order (layers.2 before layers.10); the full list stays in the JSON outputs."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..io.untrusted import printable

SHOWN = 3  # tensors named on a grouped line


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: layers.2 < layers.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def cut(names: list[str], where: str, shown: int = SHOWN) -> str:
    """'a, b, c and 57 more (where)' in natural order; every name when there are few."""
    ordered = sorted(names, key=natural_key)
    listed = ", ".join(printable(n) for n in ordered[:shown])
    return listed if len(ordered) <= shown else f"{listed} and {len(ordered) - shown} more ({where})"


@dataclass(frozen=True)
class Finding:
    """One tensor breaking one rule: `rule` is the same sentence for every tensor that breaks it."""

    engine: str
    rule: str
    tensor: str
    message: str

    def to_json(self) -> dict:
        return {"engine": self.engine, "rule": self.rule, "tensor": self.tensor, "message": self.message}


def grouped(findings: list[Finding], where: str) -> list[str]:
    """One line per (engine, rule), in the order first met: 'engine: rule (N tensors: a, b, c and N more (where));
    e.g. <the first tensor's own message>'; a rule broken once is that tensor's message."""
    by_rule: dict[tuple[str, str], list[Finding]] = {}
    for finding in findings:
        by_rule.setdefault((finding.engine, finding.rule), []).append(finding)
    lines = []
    for (engine, rule), members in by_rule.items():
        if len(members) == 1:
            lines.append(f"{engine}: {members[0].message}")
            continue
        first = min(members, key=lambda f: natural_key(f.tensor))
        lines.append(f"{engine}: {rule} ({len(members)} tensors: {cut([f.tensor for f in members], where)}); "
                     f"e.g. {first.message}")
    return lines
