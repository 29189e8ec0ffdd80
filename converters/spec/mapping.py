"""A spec's ``rename:`` lines as a ``ckpt-convert`` name map: merges, splits, transposes.

Forward (``--rename-map NAME``), each source tensor goes through the spec's ``rename:``
lines (file order, each applied once, as in a layout; ``stage``/``on`` lines are per-rank
and not applied) and ``drop:`` patterns. A rename to ``target[part]`` makes the source
tensor that part of a fused target: the parts named by the fused rule that places the
target (``fused(dim, parts=[...])``) are concatenated on ``dim`` in the rule's order,
each checked against its size where the variables give one. ``: transpose`` swaps the
two dimensions of a 2-D tensor (Hugging Face GPT-2's Conv1D weights).

Reverse (``--rename-map reverse:NAME``), each source tensor is a target name of the
spec: the rename lines whose target matches it are read backwards. If they select
parts, the tensor is split into its fused parts (sizes from the variables: ``--var``,
a Megatron source's sidecar, or derived from the shapes), one target per part.

Every logical name must be placed by exactly one rule (or dropped); every error about
a bad merge or split names the spec line and column. Pure: no tensor data is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptd.converters.sources.base import TensorInfo
from ckptd.converters.sources.namemap import Mapped, MappedInventory, Segment
from ckptd.converters.spec import ast
from ckptd.converters.spec.compiler import CompiledSpec, compile_spec, load_spec
from ckptd.converters.spec.errors import Loc, MissingVariableError, SpecCoverageError, SpecError
from ckptd.converters.spec.expr import Var
from ckptd.converters.spec.patterns import Matcher, compile_pattern
from ckptd.converters.spec.rules import CompiledRule
from ckptd.converters.spec.shipped import load_shipped


@dataclass(frozen=True)
class _Resolved:
    """Where one source tensor goes (forward)."""

    info: TensorInfo
    name: str  # logical (target) name
    part: str | None
    stmt: ast.Rename | None  # the rename that selected the part (or the last one applied)
    transpose: bool


@dataclass(frozen=True)
class _Part:
    name: str
    size: int | None  # None: a variable it needs has no value
    loc: Loc


class SpecNameMap:
    """The rename lines of a reshard spec as a name map (see the module docstring)."""

    def __init__(self, spec: ast.Spec | str | os.PathLike, *, reverse: bool = False,
                 label: str | None = None) -> None:
        self.spec = spec
        self.reverse = reverse
        self.label = label or (spec.file if isinstance(spec, ast.Spec) else str(spec))

    @classmethod
    def load(cls, name: str, *, reverse: bool = False) -> SpecNameMap:
        """A shipped spec by name, or a ``.ckspec`` path."""
        if name.endswith(".ckspec") and (os.sep in name or os.path.exists(name)):
            return cls(load_spec(os.fspath(name)), reverse=reverse, label=name)
        return cls(load_shipped(name), reverse=reverse, label=name)

    def digest(self) -> str:
        lines = self.spec.lines if isinstance(self.spec, ast.Spec) else (str(self.spec),)
        return json.dumps(["spec", self.label, self.reverse, list(lines)])

    def compiled(self, variables: Mapping[str, int] | None = None) -> CompiledSpec:
        """The spec compiled for canonical (whole, tp=pp=1) tensors."""
        v = {k: int(x) for k, x in (variables or {}).items()}
        return compile_spec(self.spec, {**v, "tp": 1, "pp": 1, "ep": 1})

    def map_inventory(self, inventory: Sequence[TensorInfo],
                      variables: Mapping[str, int] | None = None) -> MappedInventory:
        spec = self.compiled(variables)
        if self.reverse:
            return _Reverse(spec).map(inventory)
        return _forward(spec, inventory)


# --------------------------------------------------------------------------- forward


def _forward(spec: CompiledSpec, inventory: Sequence[TensorInfo]) -> MappedInventory:
    dropped: list[str] = []
    resolved: list[_Resolved] = []
    unmatched: list[str] = []
    multiple: dict[str, list[tuple[Loc, str]]] = {}
    for info in inventory:
        if spec.dropped(info.name):
            dropped.append(info.name)
            continue
        r = _resolve(spec, info)
        hits = spec.rules_for_name(r.name)
        if not hits:
            unmatched.append(info.name if r.name == info.name else f"{info.name} -> {r.name}")
        elif len(hits) > 1:
            multiple[f"{info.name} -> {r.name}"] = [(h.loc, h.text) for h, _ in hits]
        resolved.append(r)
    if unmatched or multiple:
        raise SpecCoverageError(unmatched, multiple)
    plain: dict[str, _Resolved] = {}
    fused: dict[str, dict[str, _Resolved]] = {}
    order: list[str] = []
    for r in resolved:
        if r.name not in plain and r.name not in fused:
            order.append(r.name)
        if r.part is None:
            if r.name in plain or r.name in fused:
                _clash(spec, r, plain.get(r.name) or next(iter(fused[r.name].values())))
            plain[r.name] = r
            continue
        if r.name in plain:
            _clash(spec, r, plain[r.name])
        parts = fused.setdefault(r.name, {})
        if r.part in parts:
            _clash(spec, r, parts[r.part])
        parts[r.part] = r
    out = []
    for name in order:
        if name in plain:
            out.append(_plain(plain[name]))
        else:
            out.append(_merge(spec, name, fused[name]))
    return MappedInventory(tuple(out), tuple(dropped))


def _resolve(spec: CompiledSpec, info: TensorInfo) -> _Resolved:
    name, part, stmt, transpose, last = info.name, None, None, False, None
    with spec.located():
        for st, matcher in spec.name_renames:
            hit = matcher.search(name)
            if hit is None:
                continue
            start, end, caps = hit
            name = name[:start] + spec.render_target(st, caps) + name[end:]
            last = st
            if st.part is not None:
                part, stmt = st.part, st
            if any(o.name == "transpose" for o in st.options):
                if len(info.shape) != 2:
                    raise SpecError(f"{info.name!r} has shape {list(info.shape)}: transpose "
                                    "needs a 2-D tensor", st.options[0].loc)
                transpose = not transpose
    return _Resolved(info, name, part, stmt or last, transpose)


def _clash(spec: CompiledSpec, r: _Resolved, other: _Resolved) -> None:
    what = f"part [{r.part}] of {r.name!r}" if r.part else repr(r.name)
    loc = (r.stmt.part_loc or r.stmt.loc) if r.stmt is not None else None
    with spec.located():
        raise SpecError(f"source tensors {other.info.name!r} and {r.info.name!r} both map to "
                        f"{what}", loc)


def _shape(r: _Resolved) -> tuple[int, ...]:
    s = r.info.shape
    return (s[1], s[0]) if r.transpose else s


def _plain(r: _Resolved) -> Mapped:
    shape = _shape(r)
    target = TensorInfo(r.name, r.info.dtype, shape)
    if not r.transpose:
        return Mapped(target, (r.info.name,))
    return Mapped(target, (r.info.name,), (Segment(r.info.name, 0, 0, 0, shape[0], True),))


def _fused_rule(spec: CompiledSpec, name: str, loc: Loc | None
                ) -> tuple[CompiledRule, int, list[_Part]]:
    """The fused rule placing ``name``: (rule, dim, parts with sizes where known)."""
    rule, caps = spec.rules_for_name(name)[0]
    with spec.located():
        if rule.kind != "fused":
            raise SpecError(f"{name!r} is renamed to a part, but its rule at {rule.loc} "
                            f"({rule.text}) is not fused(...)", loc)
        dim_arg = rule.args["fused"]["dim"]
        assert not isinstance(dim_arg.value, tuple)
        dim = spec.scope.eval_int(dim_arg.value, caps)
        parts = []
        for p in rule.args["fused"]["parts"].value:  # type: ignore[union-attr]
            assert isinstance(p, ast.Part)
            try:
                size: int | None = spec.scope.eval_int(p.size, caps)
            except MissingVariableError:
                size = None
            parts.append(_Part(p.name, size, p.loc))
    return rule, dim, parts


def _merge(spec: CompiledSpec, name: str, got: dict[str, _Resolved]) -> Mapped:
    first = next(iter(got.values()))
    rule, dim, parts = _fused_rule(spec, name, first.stmt.part_loc if first.stmt else None)
    known = [p.name for p in parts]
    with spec.located():
        for r in got.values():
            if r.part not in known:
                assert r.stmt is not None
                raise SpecError(f"the fused rule for {name!r} at {rule.loc} has no part "
                                f"{r.part!r} (parts: {', '.join(known)})", r.stmt.part_loc)
        missing = [p.name for p in parts if p.name not in got and p.size != 0]
        if missing:
            have = ", ".join(f"{k} <- {g.info.name}" for k, g in got.items())
            raise SpecError(f"cannot merge {name!r}: no source tensor for part(s) "
                            f"{', '.join(missing)} (have {have})", rule.loc)
        ref = _shape(first)
        d = dim % len(ref) if ref else 0
        segments, offset, sources = [], 0, []
        for p in parts:
            res = got.get(p.name)
            if res is None:
                continue
            shape = _shape(res)
            assert res.stmt is not None
            where = res.stmt.part_loc
            if res.info.dtype != first.info.dtype:
                raise SpecError(f"cannot merge {name!r}: part {p.name!r} ({res.info.name}) is "
                                f"{res.info.dtype}, part {first.part!r} ({first.info.name}) is "
                                f"{first.info.dtype}", where)
            if len(shape) != len(ref) or any(a != b for i, (a, b) in enumerate(
                    zip(shape, ref)) if i != d):
                raise SpecError(f"cannot merge {name!r} on dim {d}: part {p.name!r} "
                                f"({res.info.name}) has shape {list(shape)}, part "
                                f"{first.part!r} ({first.info.name}) {list(ref)}", where)
            if p.size is not None and shape[d] != p.size:
                raise SpecError(f"cannot merge {name!r}: part {p.name!r} should be {p.size} "
                                f"long on dim {d} (rule at {rule.loc}), but {res.info.name} is "
                                f"{shape[d]}", where)
            segments.append(Segment(res.info.name, d, offset, 0, shape[d], res.transpose))
            sources.append(res.info.name)
            offset += shape[d]
    shape = tuple(offset if i == d else s for i, s in enumerate(ref))
    return Mapped(TensorInfo(name, first.info.dtype, shape), tuple(sources), tuple(segments))


# --------------------------------------------------------------------------- reverse


@dataclass(frozen=True)
class _Inverse:
    stmt: ast.Rename
    matcher: Matcher  # the rename's target as a source pattern
    specificity: int  # literal characters in the target


class _Reverse:
    """The rename lines read from target to source (see the module docstring)."""

    def __init__(self, spec: CompiledSpec) -> None:
        self.spec = spec
        self.inverses = [self._invert(st, m) for st, m in spec.name_renames]

    def _invert(self, st: ast.Rename, m: Matcher) -> _Inverse:
        items: list[str | ast.Capture] = []
        with self.spec.located():
            for it in st.source.items:
                if isinstance(it, str) and any(c in it for c in "*?"):
                    raise SpecError("a rename with '*' or '?' in its source cannot be "
                                    "reversed", st.source.loc)
            for it in st.target.items:
                if isinstance(it, str):
                    items.append(it)
                elif isinstance(it, Var) and it.name in m.captures:
                    items.append(ast.Capture(it.name, it.loc))
                else:
                    raise SpecError("a rename target with an expression cannot be reversed "
                                    "(only captures such as {i})", getattr(it, "loc", st.loc))
            used = {i.name for i in items if isinstance(i, ast.Capture)}
            lost = [c for c in m.captures if c not in used]
            if lost:
                raise SpecError(f"rename target does not use capture {{{lost[0]}}}: it "
                                "cannot be reversed", st.target.loc)
            inv = compile_pattern(ast.Pattern(st.target.text, tuple(items), st.target.loc))
        lit = sum(len(i) for i in items if isinstance(i, str))
        return _Inverse(st, inv, lit)

    def _candidates(self, name: str) -> list[tuple[_Inverse, str]]:
        """(inverse, source name) of every rename whose target matches ``name``."""
        out = []
        for inv in self.inverses:
            hit = inv.matcher.search(name)
            if hit is None:
                continue
            start, end, caps = hit
            src = "".join(str(caps[i.name]) if isinstance(i, ast.Capture) else str(i)
                          for i in inv.stmt.source.items)
            out.append((inv, name[:start] + src + name[end:]))
        return out

    def map(self, inventory: Sequence[TensorInfo]) -> MappedInventory:
        spec = self.spec
        unmatched, multiple = [], {}
        for info in inventory:  # the source names are logical names of the spec
            hits = [(d.loc, d.text) for d in spec.dropped(info.name)]
            hits += [(r.loc, r.text) for r, _ in spec.rules_for_name(info.name)]
            if not hits:
                unmatched.append(info.name)
            elif len(hits) > 1:
                multiple[info.name] = hits
        if unmatched or multiple:
            raise SpecCoverageError(unmatched, multiple)
        out: list[Mapped] = []
        dropped: list[str] = []
        seen: dict[str, str] = {}
        for info in inventory:
            if spec.dropped(info.name):
                dropped.append(info.name)
                continue
            for m in self._one(info):
                if m.target.name in seen:
                    with spec.located():
                        raise SpecError(f"source tensors {seen[m.target.name]!r} and "
                                        f"{info.name!r} both map back to {m.target.name!r}")
                seen[m.target.name] = info.name
                out.append(m)
        return MappedInventory(tuple(out), tuple(dropped))

    def _one(self, info: TensorInfo) -> list[Mapped]:
        spec = self.spec
        cands = self._candidates(info.name)
        if not cands:
            return [Mapped(info, (info.name,))]
        best = max(c[0].specificity for c in cands)
        cands = [c for c in cands if c[0].specificity == best]
        parted = [c for c in cands if c[0].stmt.part is not None]
        with spec.located():
            if not parted:
                if len(cands) > 1:
                    a, b = cands[0][0].stmt, cands[1][0].stmt
                    raise SpecError(f"{info.name!r} maps back ambiguously: by this line and "
                                    f"by {b.loc} ({b.text})", a.loc)
                inv, src = cands[0]
                self._check_round_trip(src, info.name, None, inv.stmt)
                transpose = any(o.name == "transpose" for o in inv.stmt.options)
                if not transpose:
                    return [Mapped(TensorInfo(src, info.dtype, info.shape), (info.name,))]
                if len(info.shape) != 2:
                    raise SpecError(f"{info.name!r} has shape {list(info.shape)}: transpose "
                                    "needs a 2-D tensor", inv.stmt.options[0].loc)
                shape = (info.shape[1], info.shape[0])
                seg = Segment(info.name, 0, 0, 0, shape[0], True)
                return [Mapped(TensorInfo(src, info.dtype, shape), (info.name,), (seg,))]
            if len(parted) != len(cands):
                plain = next(c for c in cands if c[0].stmt.part is None)[0].stmt
                raise SpecError(f"{info.name!r} maps back both whole (this line) and as "
                                f"parts (line {parted[0][0].stmt.loc})", plain.loc)
            return self._split(info, parted)

    def _split(self, info: TensorInfo, parted: list[tuple[_Inverse, str]]) -> list[Mapped]:
        spec = self.spec
        first = parted[0][0].stmt
        rule, dim, parts = _fused_rule(spec, info.name, first.part_loc)
        by_part: dict[str, tuple[_Inverse, str]] = {}
        for inv, src in parted:
            assert inv.stmt.part is not None
            if inv.stmt.part in by_part:
                raise SpecError(f"two renames produce part [{inv.stmt.part}] of {info.name!r}",
                                inv.stmt.part_loc)
            if inv.stmt.part not in [p.name for p in parts]:
                raise SpecError(f"the fused rule for {info.name!r} at {rule.loc} has no part "
                                f"{inv.stmt.part!r}", inv.stmt.part_loc)
            self._check_round_trip(src, info.name, inv.stmt.part, inv.stmt)
            by_part[inv.stmt.part] = (inv, src)
        if not info.shape:
            raise SpecError(f"{info.name!r} is a scalar; it cannot be split", rule.loc)
        d = dim % len(info.shape)
        unsized = [p.name for p in parts if p.size is None]
        if unsized:
            try:  # re-evaluate to raise the located MissingVariableError
                spec.rule_params(*spec.rules_for_name(info.name)[0])
            except MissingVariableError as e:
                raise MissingVariableError(
                    f"splitting {info.name!r} into its parts needs the model variables: "
                    f"{e.message} (pass --var NAME=VALUE)", e.loc) from None
        total = sum(p.size or 0 for p in parts)
        if total != info.shape[d]:
            raise SpecError(f"cannot split {info.name!r}: its dim {d} is {info.shape[d]} long, "
                            f"the fused parts sum to {total}", rule.loc)
        out, offset = [], 0
        for p in parts:
            size = p.size or 0
            if p.name not in by_part:
                if size:
                    raise SpecError(f"cannot split {info.name!r}: no rename produces part "
                                    f"[{p.name}]; its {size} rows would be lost", p.loc)
                continue
            inv, src = by_part[p.name]
            transpose = any(o.name == "transpose" for o in inv.stmt.options)
            shape = tuple(size if i == d else s for i, s in enumerate(info.shape))
            if transpose:
                if len(shape) != 2:
                    raise SpecError(f"{info.name!r} has shape {list(info.shape)}: transpose "
                                    "needs a 2-D tensor", inv.stmt.options[0].loc)
                shape = (shape[1], shape[0])
                seg = Segment(info.name, 1 - d, 0, offset, size, True)
            else:
                seg = Segment(info.name, d, 0, offset, size, False)
            out.append(Mapped(TensorInfo(src, info.dtype, shape), (info.name,), (seg,)))
            offset += size
        return out

    def _check_round_trip(self, src: str, name: str, part: str | None,
                          stmt: ast.Rename) -> None:
        r = _resolve(self.spec, TensorInfo(src, "float32", (1, 1)))
        if (r.name, r.part) != (name, part):
            want = name + (f"[{part}]" if part else "")
            got = r.name + (f"[{r.part}]" if r.part else "")
            raise SpecError(f"{name!r} maps back to {src!r}, but the map takes {src!r} to "
                            f"{got!r}, not {want!r}: this rename cannot be reversed", stmt.loc)
