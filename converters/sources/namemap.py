"""Name maps: how source tensor names become target names (``--rename-map FILE.json``).

Two JSON forms (the reshard-spec language's name maps will plug in as a third kind of
:class:`NameMap`):

- a plain object ``{"old.name": "new.name", "dropped.name": null}``: exact names; a
  ``null`` value drops the tensor; names not listed are kept;
- ``{"rules": [{"pattern": REGEX, "replace": TEMPLATE}, {"pattern": REGEX, "drop":
  true}]}``: the first rule whose pattern matches the *whole* name applies
  (``re.fullmatch``; ``\\1``/``\\g<name>`` in the template); unmatched names are kept.
  An optional ``"names"`` object of exact renames is tried before the rules.

A reshard spec's ``rename:`` lines are the third kind (``--rename-map NAME|FILE.ckspec``,
:class:`~ckptd.converters.spec.mapping.SpecNameMap`): they can merge several source
tensors into one fused target (``rename: a -> b[part]``), split one into several
(the same spec read backwards, ``--rename-map reverse:NAME``) and transpose.

Every name map turns the source inventory into :class:`Mapped` target tensors
(``map_inventory``); a target is the source tensor as is, or is put together from
:class:`Segment` s of one or more sources. :class:`Assembler` executes them streaming:
a merged tensor is allocated once and each part is read straight into its slice
(``Source.read_into``); the parts of a split share one read of their source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ckptd.converters.sources.base import PlanError, TensorInfo, raw_bytes
from ckptd.dtypes import torch_dtype

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

if TYPE_CHECKING:
    from ckptd.converters.sources.base import Source

_DROP = object()


@dataclass(frozen=True)
class Rule:
    """One regex rule: ``replace`` is a ``re`` template; ``None`` drops the tensor."""

    pattern: re.Pattern[str]
    replace: str | None


@dataclass(frozen=True)
class NameMap:
    """Exact renames, then regex rules (see the module docstring). Immutable."""

    names: tuple[tuple[str, str | None], ...] = ()
    rules: tuple[Rule, ...] = field(default=())

    def apply(self, name: str) -> str | None:
        """The target name of ``name``, or ``None`` if it is dropped."""
        exact = dict(self.names)
        if name in exact:
            return exact[name]
        for r in self.rules:
            m = r.pattern.fullmatch(name)
            if m is not None:
                return None if r.replace is None else m.expand(r.replace)
        return name

    def digest(self) -> str:
        """A stable text form (part of a plan's fingerprint)."""
        rules = [[r.pattern.pattern, r.replace] for r in self.rules]
        return json.dumps([sorted(self.names, key=lambda kv: kv[0]), rules])

    def map_inventory(
        self, inventory: Sequence[TensorInfo], variables: Mapping[str, int] | None = None
    ) -> MappedInventory:
        """One-to-one: each kept source tensor becomes one target tensor, as is."""
        out, dropped = [], []
        for info in inventory:
            new = self.apply(info.name)
            if new is None:
                dropped.append(info.name)
            else:
                out.append(Mapped(TensorInfo(new, info.dtype, info.shape), (info.name,)))
        return MappedInventory(tuple(out), tuple(dropped))


# ------------------------------------------------------------- mapped inventories


@dataclass(frozen=True)
class Segment:
    """``target.narrow(dim, offset, length) = S.narrow(dim, source_offset, length)``,
    where ``S`` is the source tensor, transposed (2-D) first if ``transpose``."""

    source: str
    dim: int
    offset: int
    source_offset: int
    length: int
    transpose: bool = False


@dataclass(frozen=True)
class Mapped:
    """A target tensor and where it comes from: ``segments`` (in ``sources`` order)
    tile its ``dim``; no segments means the one source tensor, whole and unchanged."""

    target: TensorInfo
    sources: tuple[str, ...]
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class MappedInventory:
    """Every target tensor (in the order it is best written) and the dropped sources."""

    tensors: tuple[Mapped, ...]
    dropped: tuple[str, ...]


class NameMapLike(Protocol):
    """What ``build_plan`` needs of a name map (JSON or spec-driven)."""

    def map_inventory(
        self, inventory: Sequence[TensorInfo], variables: Mapping[str, int] | None = None
    ) -> MappedInventory: ...

    def digest(self) -> str: ...


class Assembler:
    """Builds target tensors from a source, holding at most one source tensor.

    ``fetch(target_name, info)`` is called by a target once per tensor. A plain move reads
    its source; a merge allocates the target and reads each part into its slice; a
    split keeps the last source tensor read, so that consecutive parts of one fused
    tensor (the plan lists them together) read it once.
    """

    def __init__(self, source: Source, moves: Mapping[str, tuple[str, tuple[Segment, ...]]]):
        self.source = source
        self.moves = moves  # target name -> (source name, segments)
        self._last: tuple[str, torch.Tensor] | None = None
        self._assembled: tuple[str, memoryview] | None = None  # for fetch_range

    def fetch_range(self, target: str, info: TensorInfo, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + out.nbytes)`` of the target tensor's raw data.

        A plain move reads just that range from the source (:meth:`Source.read_range`);
        a merged, split or transposed tensor is assembled whole once (memory: one tensor,
        as for :meth:`fetch`) and dropped after its last byte was asked for.
        """
        source, segments = self.moves[target]
        if not segments:
            self._last = None
            self.source.read_range(source, start, out)
            return
        if self._assembled is None or self._assembled[0] != target:
            self._assembled = None
            self._assembled = (target, raw_bytes(self.fetch(target, info)))
        raw = self._assembled[1]
        end = start + out.nbytes
        out[:] = raw[start:end]
        if end >= raw.nbytes:
            self._assembled = None

    def _whole(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (name, self.source.read(name))
        return self._last[1]

    def prefetch(self, target: str, start: int, nbytes: int) -> None:
        """Pass a read-ahead hint to the source (plain moves only; see Source.prefetch)."""
        source, segments = self.moves[target]
        if not segments:
            self.source.prefetch(source, start, nbytes)

    def fetch(self, target: str, info: TensorInfo) -> torch.Tensor:
        """The whole target tensor ``target`` (see the class docstring)."""
        source, segments = self.moves[target]
        if not segments:
            self._last = None
            return self.source.read(source)
        if len(segments) == 1 and tuple(_seg_shape(segments[0], info.shape)) == info.shape:
            sg = segments[0]  # a split part, or a whole transposed tensor
            t = self._whole(sg.source)
            t = t.t() if sg.transpose else t
            return t.narrow(sg.dim, sg.source_offset, sg.length).contiguous()
        self._last = None
        import torch

        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        for sg in segments:
            dst = out.narrow(sg.dim, sg.offset, sg.length)
            read_into = getattr(self.source, "read_into", None)
            if read_into is not None and not sg.transpose and dst.is_contiguous():
                read_into(sg.source, dst)  # a whole source part straight into its slice
            else:
                t = self.source.read(sg.source)
                t = t.t() if sg.transpose else t
                dst.copy_(t.narrow(sg.dim, sg.source_offset, sg.length))
                del t
        return out


def _seg_shape(sg: Segment, shape: tuple[int, ...]) -> list[int]:
    out = list(shape)
    out[sg.dim] = sg.length
    return out


def load_name_map(path: str) -> NameMapLike:
    """A ``--rename-map`` value: a JSON file, or a reshard spec (a shipped name or a
    ``.ckspec`` path; ``reverse:`` before it applies the spec backwards)."""
    reverse = path.startswith("reverse:")
    target = path.removeprefix("reverse:")
    if reverse or target.endswith(".ckspec") or re.fullmatch(r"[A-Za-z0-9_]+", target):
        from ckptd.converters.spec.mapping import SpecNameMap

        return SpecNameMap.load(target, reverse=reverse)
    return load_json_name_map(path)


def load_json_name_map(path: str) -> NameMap:
    """Parse a ``--rename-map`` JSON file; errors name the file and the bad entry."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise PlanError(f"{path}: cannot read the rename map: {e}") from e
    except ValueError as e:
        raise PlanError(f"{path}: rename map is not valid JSON: {e}") from e
    return parse_name_map(doc, path)


def parse_name_map(doc: object, where: str = "rename map") -> NameMap:
    """Build a :class:`NameMap` from its JSON document."""
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a JSON object")
    if "rules" not in doc:
        return NameMap(names=_exact(doc, where))
    extra = set(doc) - {"rules", "names"}
    if extra:
        raise PlanError(f"{where}: unknown keys {sorted(extra)} (expected 'rules', 'names')")
    rules = []
    if not isinstance(doc["rules"], list):
        raise PlanError(f"{where}: 'rules' must be a list")
    for i, r in enumerate(doc["rules"]):
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str):
            raise PlanError(f"{where}: rule {i} needs a string 'pattern'")
        try:
            pat = re.compile(r["pattern"])
        except re.error as e:
            raise PlanError(f"{where}: rule {i}: bad pattern {r['pattern']!r}: {e}") from e
        if r.get("drop") is True:
            rules.append(Rule(pat, None))
        elif isinstance(r.get("replace"), str):
            rules.append(Rule(pat, r["replace"]))
        else:
            raise PlanError(f"{where}: rule {i} needs a string 'replace' or \"drop\": true")
    return NameMap(names=_exact(doc.get("names", {}), where), rules=tuple(rules))


def _exact(doc: object, where: str) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in doc.items()
    ):
        raise PlanError(f"{where}: exact renames must map names to names or null")
    return tuple(doc.items())
