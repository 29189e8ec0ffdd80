"""Compile a parsed spec for one rank into ``ckpt.Layout`` objects.

``compile_spec(spec, variables, coords)`` checks every statement (transforms, names,
arithmetic, fused part divisibility) and returns a :class:`CompiledSpec`, whose
:meth:`~CompiledSpec.layout_for` builds the rank's :class:`SpecLayout` from its keys.

Matching: a key is first renamed (``rename``, ``stage``, ``on <axis>`` lines in file
order, each applied once at its leftmost match), then the optional ``prefix`` is
removed and the placement rules are matched against the whole remaining name. Drop
patterns are matched against the key (prefix removed) before any rename.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import (
    Loc,
    MissingVariableError,
    SpecCoverageError,
    SpecError,
)
from ckptd.converters.spec.expr import Value
from ckptd.converters.spec.patterns import Matcher, check_target, compile_pattern, render
from ckptd.converters.spec.rules import CompiledRule, Params, compile_rule
from ckptd.converters.spec.scope import AXES, Scope
from ckptd.layout import Layout

SpecSource = str | os.PathLike | ast.Spec
#: options after ``rename: a -> b :`` (name maps only; a layout cannot transpose)
RENAME_OPTIONS = ("transpose",)


@dataclass(frozen=True)
class SpecLayout(Layout):
    """A :class:`ckpt.Layout` plus what the spec says beyond placements.

    ``dropped``: keys excluded by ``drop`` rules (also in ``exclude``, so save and load
    skip them). ``policies``: key -> replica policy of keys placed
    by ``replicate`` (enforcing it is the converter's job).
    """

    dropped: tuple[str, ...] = ()
    policies: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Rename:
    stmt: ast.Rename
    matcher: Matcher


@dataclass(frozen=True)
class SpecRename:
    """``Layout.rename`` of a compiled spec: local key -> logical name."""

    spec: CompiledSpec

    def __call__(self, key: str) -> str:
        return self.spec.logical_name(key)


class CompiledSpec:
    """A spec compiled for one rank (``coords``) under one set of variables."""

    def __init__(
        self,
        specs: list[ast.Spec],
        variables: Mapping[str, int],
        coords: Mapping[str, int],
        prefix: str,
    ) -> None:
        self.specs = specs
        self.file = specs[0].file if specs else "<string>"
        self.coords = {str(k): int(v) for k, v in coords.items()}
        self.prefix = prefix
        self._lines = {s.file: s.lines for s in specs}
        self._variables = dict(variables)
        self.scope = Scope(self._variables, self.coords)
        self._param_cache: dict[int, Params] = {}
        stmts = [st for s in specs for st in s.statements]
        rules: list[CompiledRule] = []
        renames: list[_Rename] = []
        drops: list[tuple[Matcher, ast.Drop]] = []
        with self._located():
            self.scope.declare(stmts)
            for st in stmts:
                if isinstance(st, ast.Rule):
                    rules.append(compile_rule(st, self.scope))
                elif isinstance(st, ast.Rename):
                    renames.append(self._compile_rename(st))
                elif isinstance(st, ast.Drop):
                    drops += [(compile_pattern(p), st) for p in st.patterns]
        self.rules = tuple(rules)
        self._renames = tuple(renames)
        self._drops = tuple(drops)
        with self._located():
            for r in self.rules:  # evaluate now where nothing depends on a key
                if not r.uses_captures:
                    self._params(r, {}, eager=True)

    # ------------------------------------------------------------------ names
    def logical_name(self, key: str) -> str:
        """The logical (global) name of local ``key`` after every rename rule."""
        return self.resolve(key)[0]

    def resolve(self, key: str) -> tuple[str, str | None]:
        """``(logical name, fused part or None)`` of ``key``."""
        name, part, _ = self._resolve(key)
        return name, part

    def _resolve(self, key: str) -> tuple[str, str | None, Loc | None]:
        name, part, part_loc = key, None, None
        with self._located():
            for r in self._renames:
                hit = r.matcher.search(name)
                if hit is None:
                    continue
                name = self._resolve_one(r, name, hit)
                if r.stmt.part is not None:
                    part, part_loc = r.stmt.part, r.stmt.part_loc
        return name, part, part_loc

    @property
    def name_renames(self) -> tuple[tuple[ast.Rename, Matcher], ...]:
        """The ``rename:`` lines (not ``stage``/``on``) in file order, with matchers."""
        return tuple((r.stmt, r.matcher) for r in self._renames if r.stmt.axis is None)

    def rules_for_name(self, name: str) -> list[tuple[CompiledRule, dict[str, Value]]]:
        """Placement rules matching the logical ``name`` itself (no renaming)."""
        s = self._strip(name)
        return [(r, caps) for r in self.rules if (caps := r.matcher.fullmatch(s)) is not None]

    def rule_params(self, rule: CompiledRule, caps: Mapping[str, Value]) -> Params:
        """``rule``'s arguments evaluated with ``caps`` (``MissingVariableError`` if a
        variable it needs has no value)."""
        return self._params(rule, caps)

    def render_target(self, stmt: ast.Rename, caps: Mapping[str, Value]) -> str:
        """The target of rename ``stmt`` for a source match's captures."""
        with self._located():
            return render(stmt.target, lambda n, loc: self.scope.lookup(n, loc, caps))

    def located(self) -> _AddSource:
        """Context manager adding the source line under a located SpecError."""
        return self._located()

    def _strip(self, name: str) -> str:
        return name[len(self.prefix) :] if name.startswith(self.prefix) else name

    def in_scope(self, key: str) -> bool:
        """True if ``key`` is under ``prefix`` (other keys are left to ckpt.layout)."""
        return key.startswith(self.prefix)

    def dropped(self, key: str) -> list[ast.Drop]:
        """The drop statements that match ``key``."""
        s = self._strip(key)
        return [d for m, d in self._drops if m.fullmatch(s) is not None]

    def matching_rules(self, key: str) -> list[tuple[CompiledRule, dict[str, Value]]]:
        """Placement rules matching ``key``'s logical name, with their captures."""
        name = self._strip(self.logical_name(key))
        out = []
        for r in self.rules:
            caps = r.matcher.fullmatch(name)
            if caps is not None:
                out.append((r, caps))
        return out

    def replica_policy(self, key: str) -> str | None:
        """The ``replicate(policy=...)`` of the rule for ``key``, or None."""
        hits = self.matching_rules(key)
        if not hits or hits[0][0].kind != "replicate":
            return None
        return self._params(*hits[0]).policy

    # --------------------------------------------------------------- coverage
    def coverage(self, names: Iterable[str]) -> tuple[list[str], dict[str, list[tuple[Loc, str]]]]:
        """``(unmatched, multiply matched -> rule locations and texts)`` of ``names``.

        Names outside ``prefix`` are skipped (optimizer state follows its parameter).
        A name must be matched by exactly one placement or drop rule.
        """
        unmatched, multiple = [], {}
        for n in names:
            if not self.in_scope(n):
                continue
            hits = [(d.loc, d.text) for d in self.dropped(n)]
            hits += [(r.loc, r.text) for r, _ in self.matching_rules(n)]
            if not hits:
                unmatched.append(n)
            elif len(hits) > 1:
                multiple[n] = hits
        return unmatched, multiple

    def check_coverage(self, names: Iterable[str]) -> None:
        """Raise :class:`SpecCoverageError` unless each name matches exactly one rule."""
        unmatched, multiple = self.coverage(names)
        if unmatched or multiple:
            raise SpecCoverageError(unmatched, multiple)

    # ----------------------------------------------------------------- layout
    def layout_for(
        self,
        keys: Iterable[str],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        *,
        strict: bool = True,
    ) -> SpecLayout:
        """The rank's layout for its local ``keys`` (``shapes``: local shapes, optional).

        With ``strict`` the keys under ``prefix`` must pass :meth:`check_coverage`.
        Shapes are needed for keys renamed to a fused part, and to check ``pad``
        multiples; other placements resolve shapes later in ``ckpt.layout``.
        """
        keys = list(keys)
        if strict:
            self.check_coverage(keys)
        shapes = shapes or {}
        rules, dropped, policies = {}, [], {}
        for key in keys:
            if not self.in_scope(key):
                continue
            if self.dropped(key):
                dropped.append(key)
                continue
            hits = self.matching_rules(key)
            if not hits:
                continue
            rule, caps = hits[0]
            params = self._params(rule, caps)
            _, part, part_loc = self._resolve(key)
            self._check_no_transpose(key)
            shape = shapes.get(key)
            with self._located():
                pl = rule.placement(
                    params, key, tuple(shape) if shape is not None else None, part, part_loc
                )
            if pl is not None:
                rules[key] = pl
            if params.policy is not None:
                policies[key] = params.policy
        rename = SpecRename(self) if self._renames else None
        return SpecLayout(
            rules=rules,
            rename=rename,
            coords=dict(self.coords),
            exclude=tuple(dropped),
            dropped=tuple(dropped),
            policies=policies,
        )

    def _check_no_transpose(self, key: str) -> None:
        name = key
        for r in self._renames:
            hit = r.matcher.search(name)
            if hit is None:
                continue
            if r.stmt.options:
                raise SpecError(
                    f"{key!r} is renamed with ': {r.stmt.options[0].name}', which "
                    "only a name map (ckpt-convert --rename-map) can apply, not a "
                    "layout",
                    r.stmt.options[0].loc,
                )
            name = self._resolve_one(r, name, hit)

    def _resolve_one(self, r: _Rename, name: str, hit: tuple[int, int, dict[str, Value]]) -> str:
        start, end, caps = hit
        if r.stmt.axis_var is not None:
            caps[r.stmt.axis_var] = int(self.coords.get(r.stmt.axis or "", 0))
        new = render(r.stmt.target, functools.partial(self.scope.lookup, local=caps))
        return name[:start] + new + name[end:]

    def with_coords(self, coords: Mapping[str, int]) -> CompiledSpec:
        """The same spec compiled for another rank."""
        return CompiledSpec(self.specs, self._variables, coords, self.prefix)

    @property
    def variables(self) -> dict[str, int]:
        """Every variable with a value (given, defaults, ``let``, built-in sizes)."""
        return self.scope.resolved()

    # ---------------------------------------------------------------- helpers
    def _compile_rename(self, st: ast.Rename) -> _Rename:
        m = compile_pattern(st.source)
        check_target(st.target)
        for t in st.options:
            if t.name not in RENAME_OPTIONS:
                raise SpecError(
                    f"unknown rename option {t.name!r} (known: {', '.join(RENAME_OPTIONS)})", t.loc
                )
            if t.args:
                raise SpecError(f"{t.name} takes no arguments", t.args[0].loc)
        if st.axis is not None and st.axis not in AXES:
            raise SpecError(f"unknown parallel axis {st.axis!r} (axes: {', '.join(AXES)})", st.loc)
        local = set(m.captures) | ({st.axis_var} if st.axis_var else set())
        for item in st.target.items:
            if not isinstance(item, str):
                self.scope.check(item, local)  # type: ignore[arg-type]
        return _Rename(st, m)

    def _params(self, rule: CompiledRule, caps: Mapping[str, Value], eager: bool = False) -> Params:
        """Evaluate ``rule``'s arguments; with ``eager``, missing variables are deferred."""
        cacheable = not rule.uses_captures
        if cacheable and id(rule) in self._param_cache:
            return self._param_cache[id(rule)]
        with self._located():
            try:
                params = rule.params(self.scope, caps)
            except MissingVariableError:
                if eager:
                    return Params("deferred")
                raise
        if cacheable:
            self._param_cache[id(rule)] = params
        return params

    def _located(self) -> _AddSource:
        return _AddSource(self._lines)


class _AddSource:
    """Context manager: re-raise a SpecError with the source line under its location."""

    def __init__(self, lines: Mapping[str, tuple[str, ...]]) -> None:
        self.lines = lines

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:  # never suppresses: a located error is re-raised with its source line
        if isinstance(e, SpecError) and e.loc is not None and "\n    " not in str(e):
            src = self.lines.get(e.loc.file, ())
            if 0 < e.loc.line <= len(src):
                raise type(e)(e.message, e.loc, src[e.loc.line - 1]) from None


def compile_spec(
    spec: SpecSource | Iterable[SpecSource],
    variables: Mapping[str, int] | None = None,
    coords: Mapping[str, int] | None = None,
    *,
    prefix: str = "",
) -> CompiledSpec:
    """Compile spec text, a path, a parsed :class:`~ast.Spec`, or a list of them.

    ``variables``: model config and parallel sizes (``tp``, ``pp``, ``dp``, ``ep``;
    default 1). ``coords``: this rank's coordinates ``{"tp": r, "pp": s, ...}``
    (default 0). ``prefix``: removed from keys before matching (``"model."`` when the
    model sits under that key in the state); keys outside it are left alone.
    A ``str`` is a path if it ends in ``.ckspec`` and has no newline and no ``:``
    (which every statement has); otherwise it is spec text.
    """
    if isinstance(spec, (str, os.PathLike, ast.Spec)):
        sources: list[SpecSource] = [spec]
    else:
        sources = list(spec)
    specs: list[ast.Spec] = []
    for s in sources:
        _expand(load_spec(s), specs, [])
    return CompiledSpec(specs, dict(variables or {}), dict(coords or {}), prefix)


def load_spec(source: SpecSource) -> ast.Spec:
    """Parse ``source`` (text, path, or an already parsed spec)."""
    if isinstance(source, ast.Spec):
        return source
    # Imported here: lark takes ~0.1-0.15 s to import, which every ``ckpt-convert`` run
    # paid even when no spec is parsed (the HF/DeepSpeed/universal paths).
    from ckptd.converters.spec.parser import parse_spec

    if isinstance(source, os.PathLike) or (
        "\n" not in source and ":" not in source and source.strip().endswith(".ckspec")
    ):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"cannot read spec {str(path)!r}: {e.strerror or e}") from None
        return parse_spec(text, str(path), str(path))
    return parse_spec(source)


def _expand(spec: ast.Spec, out: list[ast.Spec], stack: list[str]) -> None:
    """Depth-first: included specs come before the statements after the include."""
    from ckptd.converters.spec.shipped import find_include

    key = spec.path or spec.file
    if key in stack:
        raise SpecError(f"include cycle: {' -> '.join([*stack, key])}")
    own: list[ast.Statement] = []
    for st in spec.statements:
        if isinstance(st, ast.Include):
            if own:
                out.append(ast.Spec(spec.file, tuple(own), spec.lines, spec.path))
                own = []
            try:
                inc = find_include(st.target, spec.path)
            except SpecError as e:
                src = spec.lines[st.loc.line - 1] if st.loc.line <= len(spec.lines) else None
                raise SpecError(e.message, st.loc, src) from None
            _expand(inc, out, [*stack, key])
        else:
            own.append(st)
    out.append(ast.Spec(spec.file, tuple(own), spec.lines, spec.path))
