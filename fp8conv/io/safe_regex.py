"""Regular expressions from a checkpoint file or the user, matched in time linear in the name.

Python's `re` backtracks: `(a|aa)+$` against a 40-character name takes minutes, and `.*a.*a.*a.*b`
grows as the fourth power of the name's length. A pattern that comes from a checkpoint's
config.json (ignore lists, config_groups targets) or from the command line (--ignore, --include,
--scheme, inspect --tensors) is therefore parsed by `re`'s own parser and compiled into a
Thompson automaton, run as a lazily built DFA: every name costs O(len(name) x pattern size) in
the worst case and one dict lookup per character once the DFA states it visits exist.

What the automaton cannot express is refused with PatternError (the caller picks the exit code):
back-references, look-ahead / look-behind, conditionals, atomic groups and possessive repeats,
word boundaries, MULTILINE / LOCALE flags, and patterns that expand to more than MAX_STATES
states (`a{1000}{1000}`). Everything else (literals, classes, `.`, `\\d \\w \\s`, alternation,
groups, greedy and lazy repeats, `^ $ \\A \\Z`, IGNORECASE, DOTALL, ASCII) means what `re` means.
"""
from __future__ import annotations

import re
import sys

if sys.version_info >= (3, 11):
    from re import _constants as C
    from re import _parser as P
else:  # pragma: no cover - Python 3.10
    import sre_constants as C
    import sre_parse as P

MAX_STATES = 20_000
_DFA_CACHE = 4096  # DFA states kept per pattern; the cache restarts past it (linear time still holds)


class PatternError(ValueError):
    """The pattern is not valid or uses a construct the linear-time matcher refuses."""


class _Node:
    __slots__ = ("kind", "pred", "out", "out2")

    def __init__(self, kind: str, pred=None, out=None, out2=None) -> None:
        self.kind, self.pred, self.out, self.out2 = kind, pred, out, out2  # kind: char, split, begin, end, endz, match


def _category(cat, ascii_only: bool):
    name = str(cat)
    digit = (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal
    word = (lambda c: c.isascii() and (c.isalnum() or c == "_")) if ascii_only else (lambda c: c.isalnum() or c == "_")
    space = (lambda c: c in " \t\n\r\f\v") if ascii_only else str.isspace
    table = {"CATEGORY_DIGIT": digit, "CATEGORY_WORD": word, "CATEGORY_SPACE": space}
    for key, pred in table.items():
        if name == key:
            return pred
        if name == key.replace("CATEGORY_", "CATEGORY_NOT_"):
            return lambda c, p=pred: not p(c)
    raise PatternError(f"character category {name} is not supported")


class _Builder:
    def __init__(self, flags: int) -> None:
        self.count = 0
        self.flags = flags

    def _new(self, *args) -> _Node:
        self.count += 1
        if self.count > MAX_STATES:
            raise PatternError(f"the pattern expands to more than {MAX_STATES} states")
        return _Node(*args)

    def _casefold(self, pred, flags: int):
        if not flags & re.IGNORECASE:
            return pred
        return lambda c: pred(c) or pred(c.lower()) or pred(c.upper())

    def _set(self, items, flags: int):
        ascii_only = bool(flags & re.ASCII)
        negate, tests = False, []
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                tests.append(lambda c, ch=chr(av): c == ch)
            elif op is C.RANGE:
                tests.append(lambda c, lo=chr(av[0]), hi=chr(av[1]): lo <= c <= hi)
            elif op is C.CATEGORY:
                tests.append(_category(av, ascii_only))
            else:
                raise PatternError(f"class item {op} is not supported")
        pred = self._casefold(lambda c: any(t(c) for t in tests), flags)
        return (lambda c: not pred(c)) if negate else pred

    def seq(self, items, flags: int, out: _Node) -> _Node:
        """The start node of `items` (a parsed subpattern) whose exit leads to `out`."""
        node = out
        for op, av in reversed(list(items)):
            node = self.item(op, av, flags, node)
        return node

    def item(self, op, av, flags: int, out: _Node) -> _Node:
        if op is C.LITERAL:
            return self._new("char", self._casefold(lambda c, ch=chr(av): c == ch, flags), out)
        if op is C.NOT_LITERAL:
            pred = self._casefold(lambda c, ch=chr(av): c == ch, flags)
            return self._new("char", lambda c: not pred(c), out)
        if op is C.ANY:
            return self._new("char", (lambda c: True) if flags & re.DOTALL else (lambda c: c != "\n"), out)
        if op is C.IN:
            return self._new("char", self._set(av, flags), out)
        if op is C.BRANCH:
            starts = [self.seq(alt, flags, out) for alt in av[1]]
            node = starts[-1]
            for start in reversed(starts[:-1]):
                node = self._new("split", None, start, node)
            return node
        if op is C.SUBPATTERN:
            _, add, remove, sub = av
            if (add | remove) & (re.MULTILINE | re.LOCALE):
                raise PatternError("MULTILINE and LOCALE flags are not supported")
            return self.seq(sub, (flags | add) & ~remove, out)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, sub = av
            return self._repeat(low, high, sub, flags, out)
        if op is C.AT:
            kinds = {C.AT_BEGINNING: "begin", C.AT_BEGINNING_STRING: "begin", C.AT_END: "end", C.AT_END_STRING: "endz"}
            if av not in kinds:
                raise PatternError(f"anchor {av} (word boundaries) is not supported")
            return self._new(kinds[av], None, out)
        raise PatternError(f"{str(op).lower()} (back-references, look-arounds, atomic groups, possessive "
                           "repeats) is not supported")

    def _repeat(self, low: int, high: int, sub, flags: int, out: _Node) -> _Node:
        if high == C.MAXREPEAT:
            loop = self._new("split")
            loop.out = self.seq(sub, flags, loop)
            loop.out2 = out
            node = loop
            for _ in range(low):
                node = self.seq(sub, flags, node)
            return node
        node = out
        for _ in range(high - low):
            node = self._new("split", None, self.seq(sub, flags, node), out)
        for _ in range(low):
            node = self.seq(sub, flags, node)
        return node


class _State:
    __slots__ = ("nodes", "next", "accepts")

    def __init__(self, nodes: frozenset, accepts: bool) -> None:
        self.nodes, self.next, self.accepts = nodes, {}, accepts


class SafeRegex:
    """A compiled pattern with re's match / fullmatch / search answered as booleans in linear time."""

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise PatternError("is not a string")
        try:
            parsed = P.parse(pattern, 0)
        except (re.error, RecursionError, OverflowError) as exc:
            raise PatternError(str(exc) if not isinstance(exc, RecursionError) else "nested too deeply") from None
        flags = parsed.state.flags
        if flags & (re.MULTILINE | re.LOCALE):
            raise PatternError("MULTILINE and LOCALE flags are not supported")
        builder = _Builder(flags)
        self.pattern = pattern
        try:
            self._start = builder.seq(parsed, flags, _Node("match"))
            anywhere = builder._new("split")
            anywhere.out = self._start
            anywhere.out2 = builder._new("char", lambda c: True, anywhere)
        except RecursionError:
            raise PatternError("nested too deeply") from None
        self._anywhere = anywhere
        self._cache: dict[tuple, _State] = {}

    # -- the DFA: states are sets of char nodes plus anchors still waiting on their position ----------
    def _closure(self, roots, at_start: bool, at_end: bool, before_final_nl: bool, mode: bool) -> _State:
        seen, stack, nodes, accepts = set(), list(roots), [], False
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            kind = node.kind
            if kind == "split":
                stack.append(node.out2)
                stack.append(node.out)
            elif kind == "match":
                accepts = True
            elif kind == "char":
                nodes.append(node)
            elif kind == "begin":
                if at_start:
                    stack.append(node.out)
            elif kind == "end":
                if at_end or before_final_nl:
                    stack.append(node.out)
            elif kind == "endz":
                if at_end:
                    stack.append(node.out)
        key = (mode, frozenset(id(n) for n in nodes), accepts)  # search states carry other transitions
        state = self._cache.get(key)
        if state is None:
            if len(self._cache) >= _DFA_CACHE:
                self._cache.clear()
            state = self._cache[key] = _State(tuple(nodes), accepts)
        return state

    def _run(self, text: str, start, full: bool, anywhere: bool) -> bool:
        n = len(text)
        # the middle of the name: no anchor can hold there, so one cached transition per character
        state = self._closure([start], True, n == 0, n == 1 and text == "\n", anywhere)
        for i, ch in enumerate(text):
            if state.accepts and not full:
                return True
            if not state.nodes and not anywhere:
                return False
            middle = i < n - 2  # the next position is neither the end nor just before a final newline
            nxt = state.next.get(ch) if middle else None
            if nxt is None:
                roots = [node.out for node in state.nodes if node.pred(ch)]
                if anywhere:
                    roots.append(self._anywhere)
                pos = i + 1
                nxt = self._closure(roots, False, pos == n, pos == n - 1 and text[-1] == "\n", anywhere)
                if middle:
                    state.next[ch] = nxt
            state = nxt
        return state.accepts

    def fullmatch(self, text: str) -> bool:
        return self._run(text, self._start, True, False)

    def match(self, text: str) -> bool:
        return self._run(text, self._start, False, False)

    def search(self, text: str) -> bool:
        return self._run(text, self._anywhere, False, True)


_COMPILED: dict[str, SafeRegex] = {}


def compile_pattern(pattern: str) -> SafeRegex:
    """The linear-time matcher of `pattern` (cached); raises PatternError naming what is wrong."""
    regex = _COMPILED.get(pattern)
    if regex is None:
        regex = SafeRegex(pattern)
        if len(_COMPILED) < 1024:
            _COMPILED[pattern] = regex
    return regex
