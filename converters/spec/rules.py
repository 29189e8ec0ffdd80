"""Placement rules: ``pattern : transforms`` compiled to ckpt placements for one rank.

Transforms (see docs/spec-language.md): ``split(dim)``, ``pad(dim, size, multiple)``,
``fused(dim, parts=[...], groups)``, ``replicate(policy)``, ``dtensor``. Allowed
combinations: ``split``, ``split pad``, ``pad``, ``fused``, ``fused split``,
``replicate``, ``dtensor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import Loc, SpecError
from ckptd.converters.spec.expr import Expr, Value, Var, names
from ckptd.converters.spec.patterns import Matcher, compile_pattern
from ckptd.converters.spec.scope import Scope
from ckptd.placements import Block, Fused, Placement, Replicated, Split

#: transform -> its parameters in positional order, and which are required.
TRANSFORMS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "split": (("dim",), frozenset({"dim"})),
    "pad": (("dim", "size", "multiple"), frozenset({"dim", "size"})),
    "fused": (("dim", "parts", "groups"), frozenset({"dim", "parts"})),
    "replicate": (("policy",), frozenset()),
    "dtensor": ((), frozenset()),
}
POLICIES = ("check_equal", "take_first", "average")
_ALONE = ("replicate", "dtensor")


@dataclass(frozen=True)
class Params:
    """A rule's arguments evaluated for one rank (and one key's captures)."""

    kind: str  # "split", "fused", "replicate", "dtensor"
    dim: int = 0
    count: int = 1
    index: int = 0
    size: int | None = None  # pad: canonical length of ``dim``
    multiple: int | None = None  # pad: padded length is a multiple of this
    parts: tuple[tuple[str, int], ...] = ()
    groups: int | None = None
    policy: str | None = None


@dataclass(frozen=True)
class CompiledRule:
    """One placement rule; ``args`` maps transform -> parameter -> argument."""

    rule: ast.Rule
    matcher: Matcher
    args: Mapping[str, Mapping[str, ast.Arg]]
    uses_captures: bool

    @property
    def loc(self) -> Loc:
        return self.rule.loc

    @property
    def text(self) -> str:
        return self.rule.text

    @property
    def kind(self) -> str:
        a = self.args
        return next((k for k in ("replicate", "dtensor", "fused") if k in a), "split")

    def params(self, scope: Scope, captures: Mapping[str, Value] | None = None) -> Params:
        """Evaluate the arguments (checks divisibility of fused parts)."""
        a, local = self.args, captures or {}
        if "replicate" in a:
            pol = a["replicate"].get("policy")
            return Params("replicate", policy=_policy(pol) if pol else "check_equal")
        if "dtensor" in a:
            return Params("dtensor")
        split = a.get("split")
        count = scope.eval_int(Var("tp", self.loc)) if split else 1
        index = scope.eval_int(Var("tp_rank", self.loc)) if split else 0
        if count < 1 or not 0 <= index < count:
            raise SpecError(f"tp rank {index} is not in [0, tp={count})", self.loc)
        order = [t.name for t in self.rule.transforms if t.name in a]
        dims = {t: self._int(scope, a[t]["dim"], local) for t in order}
        for t in order[1:]:
            if dims[t] != dims[order[0]]:
                raise SpecError(f"{t}(dim={dims[t]}) must use the same dim as "
                                f"{order[0]}(dim={dims[order[0]]})", _vloc(a[t]["dim"]))
        dim = next(iter(dims.values()))
        if "fused" in a:
            return self._fused(scope, local, dim, count, index, split is not None)
        size = multiple = None
        if "pad" in a:
            size = self._int(scope, a["pad"]["size"], local, positive=True)
            if "multiple" in a["pad"]:
                multiple = self._int(scope, a["pad"]["multiple"], local, positive=True)
        return Params("split", dim, count, index, size, multiple)

    def _fused(self, scope: Scope, local: Mapping[str, Value], dim: int, count: int,
               index: int, split: bool) -> Params:
        f = self.args["fused"]
        groups_arg = f.get("groups")
        groups = self._int(scope, groups_arg, local, positive=True) if groups_arg else None
        g = count if groups is None else groups
        if groups_arg and groups is not None and groups % count:
            raise SpecError(f"fused groups={groups} do not divide over tp={count} ranks",
                            _vloc(groups_arg))
        parts = []
        for p in f["parts"].value:  # type: ignore[union-attr]
            assert isinstance(p, ast.Part)
            n = scope.eval_int(p.size, local)
            if n < 0:
                raise SpecError(f"fused part {p.name!r} has negative size {n}", p.loc)
            if n % g:
                why = f"{g} groups" + (f" (tp={count})" if groups is None else "")
                raise SpecError(
                    f"fused part {p.name!r} has size {n}, which does not divide into {why}",
                    p.loc)
            parts.append((p.name, n))
        return Params("fused", dim, count, index, parts=tuple(parts), groups=groups)

    def _int(self, scope: Scope, arg: ast.Arg, local: Mapping[str, Value],
             positive: bool = False) -> int:
        assert not isinstance(arg.value, tuple)
        v = scope.eval_int(arg.value, local)
        if positive and v <= 0:
            raise SpecError(f"{arg.name or 'argument'} must be positive, got {v}", _vloc(arg))
        return v

    def placement(self, p: Params, key: str, shape: tuple[int, ...] | None,
                  part: str | None, part_loc: Loc | None) -> Placement | None:
        """The ckpt placement of ``key`` (None: no rule, e.g. DTensor-described)."""
        if part is not None:
            return self._part_block(p, key, shape, part, part_loc)
        if p.kind == "replicate":
            return Replicated()
        if p.kind == "dtensor":
            return None
        if p.kind == "fused":
            return Fused(p.dim, tuple(n for _, n in p.parts), p.index, p.count, p.groups)
        if p.multiple is not None and shape is not None and -len(shape) <= p.dim < len(shape):
            padded = shape[p.dim] * p.count
            expect = -(-(p.size or 0) // p.multiple) * p.multiple
            if padded != expect:
                pad = self.args["pad"]["multiple"]
                raise SpecError(
                    f"{key!r}: padded length {padded} on dim {p.dim} (tp={p.count} x "
                    f"{shape[p.dim]}) is not size {p.size} rounded up to a multiple of "
                    f"{p.multiple} ({expect})", _vloc(pad))
        return Split(p.dim, p.index, p.count, p.size)

    def _part_block(self, p: Params, key: str, shape: tuple[int, ...] | None, part: str,
                    part_loc: Loc | None) -> Block:
        where = part_loc or self.loc
        if p.kind != "fused":
            raise SpecError(f"{key!r} is renamed to part [{part}] but the rule at {self.loc} "
                            "is not fused(...)", where)
        names_ = [n for n, _ in p.parts]
        if part not in names_:
            raise SpecError(f"fused rule at {self.loc} has no part {part!r} "
                            f"(parts: {', '.join(names_)})", where)
        if shape is None:
            raise SpecError(f"{key!r}: the shape is needed to place part [{part}]", where)
        d = p.dim % len(shape)
        i = names_.index(part)
        size = p.parts[i][1]
        if shape[d] * p.count != size:
            raise SpecError(f"{key!r}: part {part!r} is {size} long on dim {d} but the tensor "
                            f"holds {shape[d]} x tp={p.count}", where)
        offset = sum(n for _, n in p.parts[:i]) + p.index * shape[d]
        gshape = tuple(sum(n for _, n in p.parts) if j == d else s for j, s in enumerate(shape))
        offs = tuple(offset if j == d else 0 for j in range(len(shape)))
        return Block(gshape, offs)

    def replica_policy(self, scope: Scope) -> str | None:
        return self.params(scope).policy if "replicate" in self.args else None


def compile_rule(rule: ast.Rule, scope: Scope) -> CompiledRule:
    """Check transforms, their arguments and variable names; no evaluation yet."""
    matcher = compile_pattern(rule.pattern)
    args: dict[str, dict[str, ast.Arg]] = {}
    for t in rule.transforms:
        if t.name not in TRANSFORMS:
            raise SpecError(f"unknown transform {t.name!r} (known: {', '.join(TRANSFORMS)})",
                            t.loc)
        if t.name in args:
            raise SpecError(f"{t.name} appears twice in one rule", t.loc)
        clash = [o for o in args if o in _ALONE or t.name in _ALONE or {o, t.name} == {
            "fused", "pad"}]
        if clash:
            raise SpecError(f"{t.name} cannot be combined with {clash[0]}", t.loc)
        args[t.name] = _bind(t)
    uses = False
    for targs in args.values():
        for name, arg in targs.items():
            if name == "policy":
                _policy(arg)
                continue
            for e in _exprs(arg):
                scope.check(e, matcher.captures)
                uses |= any(v.name in matcher.captures for v in names(e))
    return CompiledRule(rule, matcher, args, uses)


def _bind(t: ast.Transform) -> dict[str, ast.Arg]:
    order, required = TRANSFORMS[t.name]
    out: dict[str, ast.Arg] = {}
    for i, arg in enumerate(t.args):
        name = arg.name
        if name is None:
            if out and any(a.name is not None for a in t.args[:i]):
                raise SpecError("a positional argument follows a keyword argument", arg.loc)
            if i >= len(order):
                raise SpecError(f"{t.name} takes at most {len(order)} positional argument(s)",
                                arg.loc)
            name = order[i]
        if name not in order:
            raise SpecError(f"{t.name} has no argument {name!r} (arguments: "
                            f"{', '.join(order) or 'none'})", arg.loc)
        if name in out:
            raise SpecError(f"argument {name!r} given twice", arg.loc)
        if (name == "parts") != isinstance(arg.value, tuple):
            what = "a list [name: size, ...]" if name == "parts" else "an expression"
            raise SpecError(f"{t.name}({name}=...) must be {what}", arg.loc)
        out[name] = ast.Arg(name, arg.value, arg.loc)
    missing = [n for n in order if n in required and n not in out]
    if missing:
        raise SpecError(f"{t.name} needs {', '.join(f'{m}=' for m in missing)}", t.loc)
    if t.name == "fused":
        seen = set()
        for p in out["parts"].value:  # type: ignore[union-attr]
            assert isinstance(p, ast.Part)
            if p.name in seen:
                raise SpecError(f"fused part {p.name!r} appears twice", p.loc)
            seen.add(p.name)
        if not seen:
            raise SpecError("fused(parts=[...]) needs at least one part", out["parts"].loc)
    return out


def _exprs(arg: ast.Arg) -> list[Expr]:
    if isinstance(arg.value, tuple):
        return [p.size for p in arg.value]
    return [arg.value]


def _policy(arg: ast.Arg) -> str:
    v = arg.value
    if not isinstance(v, Var) or v.name not in POLICIES:
        loc = v.loc if not isinstance(v, tuple) else arg.loc
        raise SpecError(f"replicate policy must be one of {', '.join(POLICIES)}", loc)
    return v.name


def _vloc(arg: ast.Arg) -> Loc:
    """Where an argument's value starts."""
    return arg.loc if isinstance(arg.value, tuple) else arg.value.loc
