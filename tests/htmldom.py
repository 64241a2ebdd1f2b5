"""A tiny DOM built with html.parser, to read the HTML report back (from the file or a browser's --dump-dom)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list = field(default_factory=list)  # Node or str

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["Node"]:
        found = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if cls is not None and cls not in node.attrs.get("class", "").split():
                continue
            if all(node.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                found.append(node)
        return found

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "Node":
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag} class={cls} {attrs}> in the page"
        return found[0]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs})
        self.tags.append(tag)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.stack[-1].children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> tuple[Node, list[str]]:
    """(document root, every tag name met, in order)."""
    builder = _Builder()
    builder.feed(page)
    builder.close()
    return builder.root, builder.tags


def number(text: str) -> tuple[float, float]:
    """A number as the page writes it ('2.7280%', '1,474,560', '31.28') -> (value, half a unit of its last
    digit), percentages as fractions."""
    match = re.search(r"-?[\d,]*\.?\d+(?:e[-+]?\d+)?%?", text.strip())
    assert match, f"no number in {text!r}"
    token = match.group(0)
    percent = token.endswith("%")
    digits = token.rstrip("%").replace(",", "")
    mantissa = digits.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(digits.split("e")[1]) if "e" in digits else 0
    value, half = float(digits), 0.5 * 10.0 ** (exponent - decimals)
    return (value / 100, half / 100) if percent else (value, half)


def equals(text: str, expected: float) -> bool:
    """Whether the number written in text is `expected` rounded to the digits shown."""
    value, half = number(text)
    return abs(value - expected) <= half * (1 + 1e-9) + 1e-15
