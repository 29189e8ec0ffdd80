"""Variables of a compiled spec: declared ``vars``, ``let`` definitions, built-ins.

Built-ins: the parallel sizes ``tp``, ``pp``, ``dp``, ``ep`` (default 1) and the rank's
coordinates ``tp_rank``, ``pp_rank``, ``dp_rank``, ``ep_rank`` (from ``coords``,
default 0). Values come from a plain dict (a model config, ``--var k=v`` through
:func:`parse_vars`). A declared variable without a value fails only where it is
used, so one spec serves models that use only some of its rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import Loc, MissingVariableError, SpecError
from ckptd.converters.spec.expr import Expr, Value, check_names, evaluate

AXES = ("tp", "pp", "dp", "ep")
BUILTINS = frozenset(AXES) | frozenset(f"{a}_rank" for a in AXES)


def parse_vars(items: Iterable[str]) -> dict[str, int]:
    """Parse ``["tp=4", "pp=2,ep=2", ...]`` (``--var`` options) into a dict of integers."""
    out: dict[str, int] = {}
    for item in items:
        for kv in str(item).split(","):
            if not kv.strip():
                continue
            k, sep, v = kv.partition("=")
            k, v = k.strip(), v.strip()
            if not sep or not k.isidentifier():
                raise SpecError(f"--var {kv!r}: expected NAME=INTEGER, e.g. tp=4")
            try:
                out[k] = int(v, 0)
            except ValueError:
                raise SpecError(f"--var {kv!r}: value {v!r} is not an integer") from None
    return out


@dataclass
class Scope:
    """Resolves variable names to values for one rank (``coords``)."""

    values: Mapping[str, int]
    coords: Mapping[str, int]
    decls: dict[str, ast.VarDecl] = field(default_factory=dict)
    lets: dict[str, ast.Let] = field(default_factory=dict)
    _cache: dict[str, int] = field(default_factory=dict)
    _busy: set[str] = field(default_factory=set)

    def declare(self, stmts: Iterable[ast.Statement]) -> None:
        """Register every ``vars`` and ``let`` statement; check ``let`` bodies in order."""
        stmts = list(stmts)
        for s in stmts:
            if isinstance(s, ast.VarDecl):
                prev = self.decls.get(s.name)
                if prev is not None and prev.default is not None and s.default is not None:
                    raise SpecError(f"variable {s.name!r} already has a default ({prev.loc})",
                                    s.loc)
                if prev is None or s.default is not None:
                    self.decls[s.name] = s
        for s in stmts:
            if isinstance(s, ast.VarDecl) and s.default is not None:
                check_names(s.default, self.known)
            if isinstance(s, ast.Let):
                if s.name in self.lets or s.name in self.decls or s.name in BUILTINS:
                    raise SpecError(f"{s.name!r} is already defined", s.loc)
                check_names(s.expr, self.known)
                self.lets[s.name] = s

    def known(self, name: str, local: Iterable[str] = ()) -> bool:
        return name in BUILTINS or name in self.decls or name in self.lets or name in local

    def check(self, e: Expr, local: Iterable[str] = ()) -> None:
        """Raise at the first name of ``e`` that is neither a variable nor in ``local``."""
        local = frozenset(local)
        check_names(e, lambda n: self.known(n, local))

    def lookup(self, name: str, loc: Loc, local: Mapping[str, Value] | None = None) -> Value:
        """The value of ``name``; ``local`` (captures) shadows everything."""
        if local and name in local:
            return local[name]
        if name in self._cache:
            return self._cache[name]
        if name.endswith("_rank") and name[:-5] in AXES:
            return int(self.coords.get(name[:-5], 0))
        if name in self._busy:
            raise SpecError(f"variable {name!r} is defined in terms of itself", loc)
        self._busy.add(name)
        try:
            value = self._resolve(name, loc)
        finally:
            self._busy.discard(name)
        self._cache[name] = value
        return value

    def _resolve(self, name: str, loc: Loc) -> int:
        if name in self.lets:
            return self.eval_int(self.lets[name].expr)
        if name in self.values:
            return int(self.values[name])
        decl = self.decls.get(name)
        if decl is not None and decl.default is not None:
            return self.eval_int(decl.default)
        if name in AXES:
            return 1
        where = f" (declared at {decl.loc})" if decl else ""
        raise MissingVariableError(f"variable {name!r} has no value{where}; pass {name}=...",
                                   loc)

    def eval(self, e: Expr, local: Mapping[str, Value] | None = None) -> Value:
        return evaluate(e, lambda n, loc: self.lookup(n, loc, local))

    def eval_int(self, e: Expr, local: Mapping[str, Value] | None = None) -> int:
        v = self.eval(e, local)
        if not isinstance(v, int):
            raise SpecError(f"expected an integer, got {v!r}", e.loc)
        return v

    def resolved(self) -> dict[str, int]:
        """Every variable that has a value (config, defaults, lets, built-ins)."""
        out = {}
        for name in [*AXES, *self.decls, *self.lets]:
            try:
                out[name] = int(self.lookup(name, Loc("<scope>", 0, 0)))
            except SpecError:
                continue
        return out
