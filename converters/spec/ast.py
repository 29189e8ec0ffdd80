"""Statements of a parsed spec (the output of :mod:`ckptd.converters.spec.parser`)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.converters.spec.errors import Loc
from ckptd.converters.spec.expr import Expr


@dataclass(frozen=True)
class Capture:
    """``{name}`` in a source pattern: matches one dotted segment."""

    name: str
    loc: Loc


@dataclass(frozen=True)
class Pattern:
    """A name pattern: literal text (``*``, ``?`` wildcards) and captures or expressions.

    In a source pattern the items are ``str`` and :class:`Capture`; in a rename target
    they are ``str`` and expressions (``{i + first_layer(s)}``).
    """

    text: str
    items: tuple[str | Capture | Expr, ...]
    loc: Loc


@dataclass(frozen=True)
class Part:
    """One part of a fused parameter: ``q: heads * head_dim``."""

    name: str
    size: Expr
    loc: Loc


@dataclass(frozen=True)
class Arg:
    """A transform argument; ``name`` is None for a positional one."""

    name: str | None
    value: Expr | tuple[Part, ...]
    loc: Loc


@dataclass(frozen=True)
class Transform:
    name: str
    args: tuple[Arg, ...]
    loc: Loc


@dataclass(frozen=True)
class Rule:
    """``pattern : transform transform ...``"""

    pattern: Pattern
    transforms: tuple[Transform, ...]
    loc: Loc
    text: str


@dataclass(frozen=True)
class Rename:
    """``rename: a -> b``, ``stage {s}: a -> b`` or ``on <axis> {r}: a -> b``.

    ``axis``/``axis_var`` bind the rank's coordinate on ``axis`` (``pp`` for ``stage``)
    to ``axis_var`` in the target. ``part`` selects a part of a fused target tensor.
    ``options``: the transforms after a second ``:`` (``transpose``), for name maps.
    """

    source: Pattern
    target: Pattern
    axis: str | None
    axis_var: str | None
    part: str | None
    part_loc: Loc | None
    loc: Loc
    text: str
    options: tuple[Transform, ...] = ()


@dataclass(frozen=True)
class Drop:
    patterns: tuple[Pattern, ...]
    loc: Loc
    text: str


@dataclass(frozen=True)
class VarDecl:
    name: str
    default: Expr | None
    loc: Loc


@dataclass(frozen=True)
class Let:
    name: str
    expr: Expr
    loc: Loc


@dataclass(frozen=True)
class Include:
    target: str
    loc: Loc


Statement = Rule | Rename | Drop | VarDecl | Let | Include


@dataclass(frozen=True)
class Spec:
    """A parsed spec file: its statements in order, and its source lines (for errors)."""

    file: str
    statements: tuple[Statement, ...]
    lines: tuple[str, ...]
    path: str | None = None
