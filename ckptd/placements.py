"""Placements: how one local tensor of one rank maps onto logical tensors.

A placement turns ``(logical name, local shape, dtype)`` into logical-tensor metadata
and pieces. These are the Python layout API of design.md §2; the reshard-spec text
language compiles to the same objects. Placements are frozen dataclasses and pure.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.errors import LayoutError
from ckptd.fragments import Box, Piece, Shape, TensorMeta, flat_range_to_boxes

Resolved = tuple[tuple[TensorMeta, ...], tuple[Piece, ...]]


class Placement(ABC):
    """Base class: ``resolve`` maps a local tensor to logical tensors and pieces."""

    @abstractmethod
    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        """Return the logical tensors touched and the pieces of the local tensor."""


@dataclass(frozen=True)
class Replicated(Placement):
    """Every rank holds the whole tensor (DP replicas, norms under TP)."""

    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        meta = TensorMeta(name, dtype, tuple(local_shape))
        box = Box.whole(local_shape)
        return (meta,), (Piece(name, box, box),)


@dataclass(frozen=True)
class Block(Placement):
    """The local tensor is the box at ``offsets`` of a tensor of ``global_shape``."""

    global_shape: Shape
    offsets: Shape

    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        meta = TensorMeta(name, dtype, tuple(self.global_shape))
        gbox = Box(tuple(self.offsets), tuple(local_shape))
        if not gbox.fits_in(self.global_shape):
            raise LayoutError(f"{name!r}: block {gbox} outside global shape {self.global_shape}")
        return (meta,), (Piece(name, gbox, Box.whole(local_shape)),)


@dataclass(frozen=True)
class Split(Placement):
    """Megatron-style even split on ``dim``: rank ``index`` of ``count`` holds one slice.

    ``global_size`` is the canonical (unpadded) length of ``dim``. When it is smaller than
    ``local * count`` the tail is padding (vocabulary padding): padded rows map to
    nothing. When ``uneven`` is true the split follows ``torch.chunk`` instead (slices
    of ``ceil(global_size / count)``, the last ones shorter or empty), as DTensor does.
    """

    dim: int
    index: int
    count: int
    global_size: int | None = None
    uneven: bool = False

    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        d = _check_dim(name, self.dim, local_shape)
        if not 0 <= self.index < self.count:
            raise LayoutError(f"{name!r}: split index {self.index} not in [0, {self.count})")
        local = local_shape[d]
        if self.uneven:
            if self.global_size is None:
                raise LayoutError(f"{name!r}: an uneven split needs global_size")
            step = -(-self.global_size // self.count)
            start = min(self.index * step, self.global_size)
            expect = min(step, self.global_size - start)
            if local != expect:
                raise LayoutError(
                    f"{name!r}: rank {self.index}/{self.count} of an uneven split of "
                    f"{self.global_size} must hold {expect} on dim {d}, holds {local}"
                )
            size = self.global_size
        else:
            start = self.index * local
            size = local * self.count if self.global_size is None else self.global_size
            if size > local * self.count:
                raise LayoutError(
                    f"{name!r}: global size {size} on dim {d} exceeds {self.count} x {local}"
                )
        gshape = _with(local_shape, d, size)
        meta = TensorMeta(name, dtype, gshape)
        keep = max(0, min(local, size - start))  # rows past the canonical size are padding
        pieces: tuple[Piece, ...] = ()
        if keep > 0:
            gbox = Box(_with((0,) * len(local_shape), d, start), _with(local_shape, d, keep))
            lbox = Box((0,) * len(local_shape), _with(local_shape, d, keep))
            pieces = (Piece(name, gbox, lbox),)
        return (meta,), pieces


@dataclass(frozen=True)
class Fused(Placement):
    """A fused parameter (QKV, gate/up) split on ``dim`` over ``count`` ranks.

    Globally the canonical tensor is the parts concatenated on ``dim`` in order
    (``[Q; K; V]``). Each part is divided into ``groups`` equal groups (GQA query
    groups; default: one group per rank), and a rank holds ``groups / count``
    consecutive groups; locally, each held group stores its slice of every part in
    turn (``[q_g, k_g, v_g, q_g+1, ...]``, the Megatron GQA order). With one group per
    rank this is the simple ``[q_r; k_r; v_r]`` order.
    """

    dim: int
    parts: tuple[int, ...]
    index: int = 0
    count: int = 1
    groups: int | None = None

    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        d = _check_dim(name, self.dim, local_shape)
        groups = self.count if self.groups is None else self.groups
        if groups % self.count:
            raise LayoutError(f"{name!r}: {groups} groups do not divide over {self.count} ranks")
        for i, p in enumerate(self.parts):
            if p % groups:
                raise LayoutError(
                    f"{name!r}: fused part {i} of size {p} does not divide into {groups} groups"
                )
        per_rank = groups // self.count
        local_expect = sum(p // groups for p in self.parts) * per_rank
        if local_shape[d] != local_expect:
            raise LayoutError(
                f"{name!r}: fused local size on dim {d} is {local_shape[d]}, expected "
                f"{local_expect} for parts {list(self.parts)} over {self.count} ranks"
            )
        total = sum(self.parts)
        meta = TensorMeta(name, dtype, _with(local_shape, d, total))
        zeros = (0,) * len(local_shape)
        pieces = []
        local_off = 0
        for g in range(self.index * per_rank, (self.index + 1) * per_rank):
            part_base = 0
            for p in self.parts:
                n = p // groups
                gbox = Box(_with(zeros, d, part_base + g * n), _with(local_shape, d, n))
                lbox = Box(_with(zeros, d, local_off), _with(local_shape, d, n))
                if n:
                    pieces.append(Piece(name, gbox, lbox))
                local_off += n
                part_base += p
        return (meta,), tuple(pieces)


@dataclass(frozen=True)
class FlatParam:
    """One parameter inside a flat buffer: logical name, shape in the buffer, flat offset.

    Under tensor parallelism the buffer holds the rank's TP shard of the parameter:
    ``shape`` is the shard's shape, and ``global_shape``/``global_offsets`` say where the
    shard lies in the logical tensor (Megatron's distributed optimizer).
    """

    name: str
    shape: Shape
    offset: int
    global_shape: Shape | None = None
    global_offsets: Shape | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatShard(Placement):
    """A rank's contiguous range ``[start, start + local numel)`` of a flat buffer.

    The flat buffer concatenates the row-major flattening of ``params`` at their
    offsets (ZeRO-1/2 partitioned optimizer state, ZeRO-3/FSDP1 flat parameters);
    gaps between them are alignment padding and map to nothing. The local tensor is
    1-D. ``name`` passed to :meth:`resolve` is ignored: each param names its tensor.
    """

    params: tuple[FlatParam, ...]
    start: int

    @staticmethod
    def pack(
        params: Sequence[tuple[str, Sequence[int]] | FlatParam], start: int, align: int = 1
    ) -> FlatShard:
        """Lay ``params`` out back to back, each starting at a multiple of ``align``.

        Items are ``(name, shape)`` pairs or :class:`FlatParam` templates (whose offset is
        recomputed), the latter to place TP shards in their global tensors.
        """
        out, off = [], 0
        for item in params:
            off = -(-off // align) * align
            if isinstance(item, FlatParam):
                fp = FlatParam(item.name, item.shape, off, item.global_shape, item.global_offsets)
            else:
                fp = FlatParam(item[0], tuple(int(s) for s in item[1]), off)
            out.append(fp)
            off += fp.numel
        return FlatShard(tuple(out), start)

    @staticmethod
    def flat_size(params: Sequence[tuple[str, Sequence[int]] | FlatParam], align: int = 1) -> int:
        """Total length of the flat buffer that :meth:`pack` lays out."""
        fs = FlatShard.pack(params, 0, align)
        last = fs.params[-1] if fs.params else None
        return 0 if last is None else last.offset + last.numel

    def resolve(self, name: str, local_shape: Shape, dtype: str) -> Resolved:
        if len(local_shape) != 1:
            raise LayoutError(f"{name!r}: a flat shard must be 1-D, got shape {local_shape}")
        lo, hi = self.start, self.start + local_shape[0]
        metas, pieces = [], []
        for fp in self.params:
            metas.append(TensorMeta(fp.name, dtype, fp.global_shape or fp.shape))
            a, b = max(lo, fp.offset), min(hi, fp.offset + fp.numel)
            if a >= b:
                continue
            for rel, box in flat_range_to_boxes(fp.shape, a - fp.offset, b - fp.offset):
                gbox = box.shift(fp.global_offsets) if fp.global_offsets else box
                pieces.append(Piece(fp.name, gbox, Box((a - lo + rel,), (box.numel,))))
        return tuple(metas), tuple(pieces)


def _check_dim(name: str, dim: int, shape: Shape) -> int:
    nd = len(shape)
    if not -nd <= dim < nd:
        raise LayoutError(f"{name!r}: dim {dim} out of range for shape {shape}")
    return dim % nd


def _with(shape: Sequence[int], dim: int, value: int) -> Shape:
    out = list(shape)
    out[dim] = value
    return tuple(out)
