"""Build a rank's :class:`RankLayout` from its flattened state and a declared layout.

Where a tensor is a DTensor its placements say everything. For plain per-rank tensors
(Megatron-style TP, ZeRO flat partitions, pipeline stages) a :class:`Layout` declares
placements by key (exact key or fnmatch pattern) and an optional rename (pipeline
stage renumbering). Keys without a rule are replicated. Optimizer state tensors with
the same local shape as their parameter inherit the parameter's placement.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard

import torch

from ckptd.dtypes import dtype_name
from ckptd.errors import InvalidKeyError, LayoutError
from ckptd.fragments import LocalEntry, RankLayout, TensorMeta
from ckptd.keys import validate_state_key
from ckptd.placements import Block, Placement, Replicated
from ckptd.statedict import FlatState

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

Rename = Callable[[str], str]


@dataclass(frozen=True)
class LayerOffset:
    """Pipeline-stage renaming: local ``layers.{i}`` is global ``layers.{i + offset}``."""

    offset: int
    segment: str = "layers"

    def __call__(self, key: str) -> str:
        return _segment_pattern(self.segment).sub(
            lambda m: f"{m.group(1)}{self.segment}.{int(m.group(2)) + self.offset}", key
        )


@functools.cache
def _segment_pattern(segment: str) -> re.Pattern[str]:
    return re.compile(rf"(^|\.){re.escape(segment)}\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class Layout:
    """How this rank's plain tensors map onto logical tensors.

    ``rules`` maps an exact key or an fnmatch pattern to a :class:`Placement`; exact keys
    win, then the first matching pattern in insertion order. ``rename`` maps a local key
    to its logical name. ``coords`` are the rank's parallel coordinates (``tp``, ``pp``,
    ``dp`` ...), used to key per-rank state such as RNG.
    """

    rules: Mapping[str, Placement] = field(default_factory=dict)
    rename: Rename | None = None
    coords: Mapping[str, int] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # keys or fnmatch patterns neither saved nor loaded

    def excludes(self, key: str) -> bool:
        """True if ``key`` is excluded (exact key or pattern)."""
        return any(key == p or fnmatch.fnmatchcase(key, p) for p in self.exclude)

    def placement_for(self, key: str) -> Placement | None:
        """The rule for ``key`` (exact match first, then patterns), or None."""
        if key in self.rules:
            return self.rules[key]
        for pat, pl in self.rules.items():
            if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(key, pat):
                return pl
        return None

    def logical_name(self, key: str) -> str:
        return self.rename(key) if self.rename is not None else key


def build_rank_layout(flat: FlatState, layout: Layout | None, rank: int) -> RankLayout:
    """Resolve every tensor of ``flat`` to pieces; validate the result."""
    layout = layout or Layout()
    metas: dict[str, TensorMeta] = {}
    entries = []
    for key, t in flat.tensors.items():
        if layout.exclude and layout.excludes(key):
            continue
        local, placement = _local_and_placement(key, t, flat, layout)
        dtype = dtype_name(local.dtype)
        name = layout.logical_name(key)
        try:
            tmetas, pieces = placement.resolve(name, tuple(local.shape), dtype)
        except LayoutError as e:
            raise LayoutError(f"state key {key!r}: {e}") from None
        for m in tmetas:
            # A logical name (from a rename or a FlatParam) becomes a storage key segment:
            # hold it to the state-key rules here, so an unsafe one fails before any write.
            try:
                validate_state_key(m.name)
            except InvalidKeyError as e:
                raise InvalidKeyError(
                    f"state key {key!r} maps to an unsafe logical name: {e}"
                ) from None
            if metas.setdefault(m.name, m) != m:
                raise LayoutError(
                    f"state key {key!r}: logical tensor {m.name!r} declared as "
                    f"{m.dtype}{list(m.shape)} and as {metas[m.name].dtype}"
                    f"{list(metas[m.name].shape)}"
                )
        entries.append(LocalEntry(key, tuple(local.shape), dtype, pieces))
    coords = tuple(sorted((str(k), int(v)) for k, v in layout.coords.items()))
    lay = RankLayout(rank, coords, tuple(metas.values()), tuple(entries))
    lay.validate()
    return lay


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself (a view; never a copy)."""
    if _is_dtensor(t):
        return t._local_tensor  # to_local() would detach through autograd; same storage
    return t


def _local_and_placement(
    key: str, t: torch.Tensor, flat: FlatState, layout: Layout
) -> tuple[torch.Tensor, Placement]:
    if _is_dtensor(t):
        return t._local_tensor, _dtensor_placement(key, t)
    pl = layout.placement_for(key)
    if pl is None and key in flat.param_of:
        param_key = flat.param_of[key]
        param = flat.tensors.get(param_key)
        if param is not None and tuple(param.shape) == tuple(t.shape):
            pl = layout.placement_for(param_key)
    return t, pl or Replicated()


def _is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    # No DTensor can exist unless its module was imported: looking it up instead of
    # importing it spares every save and load of a plain-tensor job the ~1.5 s import.
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _dtensor_placement(key: str, t: DTensor) -> Placement:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if isinstance(p, Partial):
            raise LayoutError(f"{key!r}: a Partial DTensor must be reduced before saving")
        if not isinstance(p, (Shard, Replicate)):
            raise LayoutError(f"{key!r}: unsupported DTensor placement {p}")
    if all(isinstance(p, Replicate) for p in t.placements):
        return Replicated()
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return Block(tuple(t.shape), tuple(int(o) for o in offsets))
