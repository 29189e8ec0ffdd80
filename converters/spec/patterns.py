"""Name patterns: matching keys against source patterns and rendering rename targets.

A source pattern is matched either whole (rule and drop patterns: the whole name,
after the optional prefix is removed) or as a run of whole dot-separated segments
anywhere in a key (rename sources), so that ``layers.{i}`` also renames the
``layers.3`` inside ``optim.state.layers.3.mlp.fc1.weight.exp_avg``. ``*`` matches
any characters (dots included), ``?`` one character, ``{x}`` one segment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import Loc, SpecError
from ckptd.converters.spec.expr import Value, evaluate


@dataclass(frozen=True)
class Matcher:
    """A compiled source pattern; ``captures`` are the names it binds, in order."""

    pattern: ast.Pattern
    whole: re.Pattern[str]
    anywhere: re.Pattern[str]
    captures: tuple[str, ...]

    def fullmatch(self, name: str) -> dict[str, Value] | None:
        """Captures if the whole ``name`` matches, else None."""
        m = self.whole.fullmatch(name)
        return None if m is None else _values(m)

    def search(self, key: str) -> tuple[int, int, dict[str, Value]] | None:
        """The leftmost run of whole segments of ``key`` that matches: (start, end, captures)."""
        m = self.anywhere.search(key)
        return None if m is None else (m.start(), m.end(), _values(m))


def compile_pattern(p: ast.Pattern) -> Matcher:
    """Compile a source pattern; a capture used twice is an error."""
    parts, caps = [], []
    for item in p.items:
        if isinstance(item, ast.Capture):
            if item.name in caps:
                raise SpecError(f"capture {{{item.name}}} appears twice in the pattern", item.loc)
            caps.append(item.name)
            parts.append(f"(?P<{item.name}>[^.]+)")
        else:
            assert isinstance(item, str)
            parts.append("".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in item))
    body = "".join(parts)
    anywhere = re.compile(rf"(?:^|(?<=\.)){body}(?=\.|$)")
    return Matcher(p, re.compile(body), anywhere, tuple(caps))


def render(target: ast.Pattern, lookup: Callable[[str, Loc], Value]) -> str:
    """Render a rename target, evaluating its ``{expr}`` items with ``lookup``."""
    out = []
    for item in target.items:
        if isinstance(item, str):
            out.append(item)
        else:
            out.append(str(evaluate(item, lookup)))  # type: ignore[arg-type]
    return "".join(out)


def check_target(target: ast.Pattern) -> None:
    """Targets are concrete names: no wildcards."""
    for item in target.items:
        if isinstance(item, str) and any(c in item for c in "*?"):
            raise SpecError("a rename target may not contain '*' or '?'", target.loc)


def _values(m: re.Match[str]) -> dict[str, Value]:
    return {k: int(v) if v.isdigit() else v for k, v in m.groupdict().items()}


