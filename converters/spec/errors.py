"""Errors of the reshard-spec language: every one names the file, line and column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptd.errors import CkptError


@dataclass(frozen=True)
class Loc:
    """A position in a spec: file name (or ``<string>``), 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SpecError(CkptError, ValueError):
    """A spec cannot be parsed or compiled; ``file``, ``line`` and ``column`` say where.

    The message reads ``file:line:col: what went wrong`` followed, when the source text
    is known, by the offending line and a caret under the column.
    """

    def __init__(self, message: str, loc: Loc | None = None, source_line: str | None = None):
        self.message = message
        self.loc = loc
        self.file = loc.file if loc else None
        self.line = loc.line if loc else None
        self.column = loc.column if loc else None
        text = f"{loc}: {message}" if loc else message
        if loc and source_line is not None:
            text += f"\n    {source_line.rstrip()}\n    {' ' * (loc.column - 1)}^"
        super().__init__(text)


class MissingVariableError(SpecError):
    """A declared variable has no value (pass it in ``variables`` or as ``--var k=v``)."""


class SpecCoverageError(SpecError):
    """Tensor names matched by no rule, or by more than one rule.

    ``unmatched`` lists names no rule matches; ``multiple`` maps a name to the
    locations and texts of every rule that matches it.
    """

    def __init__(
        self,
        unmatched: Sequence[str],
        multiple: Mapping[str, Sequence[tuple[Loc, str]]],
        limit: int = 20,
    ) -> None:
        self.unmatched = list(unmatched)
        self.multiple = {k: list(v) for k, v in multiple.items()}
        lines = []
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} name(s) matched by no rule:")
            lines += [f"  {n}" for n in self.unmatched[:limit]]
            if len(self.unmatched) > limit:
                lines.append(f"  ... ({len(self.unmatched) - limit} more)")
        if self.multiple:
            lines.append(f"{len(self.multiple)} name(s) matched by more than one rule:")
            for name, rules in list(self.multiple.items())[:limit]:
                lines.append(f"  {name}:")
                lines += [f"    {loc}: {text}" for loc, text in rules]
            if len(self.multiple) > limit:
                lines.append(f"  ... ({len(self.multiple) - limit} more)")
        lines.append("add a rule (or a drop: line) for each unmatched name; make overlapping "
                     "patterns disjoint")
        super().__init__("\n".join(lines))
