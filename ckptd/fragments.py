"""The fragment model: logical tensors, boxes, pieces and per-rank layouts.

A *logical tensor* is a tensor as if the model ran on one device, in canonical
(unfused, unpadded) form, identified by a fully qualified name. A *piece* maps a
box of a rank's local buffer onto a box of the global tensor with the same number
of elements. Every parallel layout (TP, PP, DP, ZeRO, FSDP, fused parameters,
vocabulary padding) reduces to pieces; the planner works on nothing else.

Everything here is immutable data and pure functions: no I/O, no torch.distributed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ckptd.errors import LayoutError

Shape = tuple[int, ...]


@dataclass(frozen=True, order=True)
class Box:
    """An axis-aligned box: ``offsets[d] <= i_d < offsets[d] + lengths[d]`` on every dim."""

    offsets: Shape
    lengths: Shape

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.lengths):
            raise LayoutError(f"box rank mismatch: offsets {self.offsets} lengths {self.lengths}")
        if (self.offsets and min(self.offsets) < 0) or (self.lengths and min(self.lengths) < 0):
            raise LayoutError(f"box has a negative offset or length: {self}")

    @staticmethod
    def whole(shape: Sequence[int]) -> Box:
        """The box covering a whole tensor of ``shape``."""
        return Box((0,) * len(shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.lengths)

    @property
    def ends(self) -> Shape:
        return tuple(map(_add, self.offsets, self.lengths))

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def is_empty(self) -> bool:
        return 0 in self.lengths

    def fits_in(self, shape: Sequence[int]) -> bool:
        """True if the box lies inside a tensor of ``shape``."""
        return len(shape) == len(self.lengths) and all(
            o + n <= s for o, n, s in zip(self.offsets, self.lengths, shape)
        )

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None if the boxes do not overlap (or one is empty)."""
        offs, lens = [], []
        for a, n, b, m in zip(self.offsets, self.lengths, other.offsets, other.lengths):
            lo = a if a > b else b
            hi = min(a + n, b + m)
            if hi <= lo:
                return None
            offs.append(lo)
            lens.append(hi - lo)
        return _box(tuple(offs), tuple(lens))

    def shift(self, delta: Sequence[int], sign: int = 1) -> Box:
        """The same box translated by ``sign * delta``."""
        return Box(tuple(o + sign * d for o, d in zip(self.offsets, delta)), self.lengths)

    def slices(self) -> tuple[slice, ...]:
        """Index tuple selecting this box from an array."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.lengths))

    def to_json(self) -> list[list[int]]:
        return [list(self.offsets), list(self.lengths)]

    @staticmethod
    def from_json(obj: Sequence[Sequence[int]]) -> Box:
        offs, lens = tuple(map(int, obj[0])), tuple(map(int, obj[1]))
        if len(offs) != len(lens) or (offs and min(offs) < 0) or (lens and min(lens) < 0):
            raise LayoutError(f"invalid box {obj!r}")
        return _box(offs, lens)


def _add(a: int, b: int) -> int:
    return a + b


def _box(offsets: Shape, lengths: Shape) -> Box:
    """Construct a Box known to be valid (skips validation on hot paths)."""
    b = object.__new__(Box)
    object.__setattr__(b, "offsets", offsets)
    object.__setattr__(b, "lengths", lengths)
    return b


@dataclass(frozen=True)
class TensorMeta:
    """A logical tensor: qualified name, dtype (torch name, e.g. ``float32``), global shape."""

    name: str
    dtype: str
    shape: Shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """``local_box`` of a rank's local tensor holds ``global_box`` of logical tensor ``name``.

    Both boxes have the same number of elements. When their shapes differ (a ZeRO flat
    partition: a 1-D range of the local buffer holding an N-D box of a parameter), the
    local region must be contiguous in row-major order and is reshaped to the global box.
    """

    name: str
    global_box: Box
    local_box: Box

    def __post_init__(self) -> None:
        if self.global_box.numel != self.local_box.numel:
            raise LayoutError(
                f"piece of {self.name!r}: local box {self.local_box} has "
                f"{self.local_box.numel} elements, global box {self.global_box} has "
                f"{self.global_box.numel}"
            )

    @property
    def reshaped(self) -> bool:
        return self.global_box.lengths != self.local_box.lengths


@dataclass(frozen=True)
class LocalEntry:
    """One tensor of a rank's flattened state: its key, local shape/dtype and its pieces.

    Elements of the local tensor that no piece covers (vocabulary padding, ZeRO
    alignment padding) belong to no logical tensor: save drops them, load leaves them.
    """

    key: str
    local_shape: Shape
    dtype: str
    pieces: tuple[Piece, ...]

    def validate(self, metas: dict[str, TensorMeta]) -> None:
        """Check every piece against the local shape and its logical tensor."""
        for p in self.pieces:
            meta = metas.get(p.name)
            if meta is None:
                raise LayoutError(f"{self.key!r}: piece names unknown logical tensor {p.name!r}")
            if meta.dtype != self.dtype:
                raise LayoutError(
                    f"{self.key!r}: local dtype {self.dtype} but logical tensor "
                    f"{p.name!r} is {meta.dtype}"
                )
            if not p.global_box.fits_in(meta.shape):
                raise LayoutError(
                    f"{self.key!r}: piece {p.global_box} lies outside {p.name!r} of shape "
                    f"{meta.shape}"
                )
            if not p.local_box.fits_in(self.local_shape):
                raise LayoutError(
                    f"{self.key!r}: local box {p.local_box} lies outside local shape "
                    f"{self.local_shape}"
                )
            if p.reshaped and not is_contiguous_box(p.local_box, self.local_shape):
                raise LayoutError(
                    f"{self.key!r}: local box {p.local_box} is reshaped to {p.global_box} "
                    "but is not contiguous in the local tensor"
                )


@dataclass(frozen=True)
class RankLayout:
    """Everything one rank holds: coordinates, logical tensors it touches, local entries."""

    rank: int
    coords: tuple[tuple[str, int], ...]
    tensors: tuple[TensorMeta, ...]
    entries: tuple[LocalEntry, ...]
    _digest: str = field(default="", compare=False, repr=False)

    def meta_by_name(self) -> dict[str, TensorMeta]:
        return {m.name: m for m in self.tensors}

    def validate(self) -> None:
        """Check internal consistency of the layout (raises LayoutError)."""
        metas: dict[str, TensorMeta] = {}
        for m in self.tensors:
            if m.name in metas and metas[m.name] != m:
                raise LayoutError(f"logical tensor {m.name!r} declared twice differently")
            metas[m.name] = m
        keys = set()
        for e in self.entries:
            if e.key in keys:
                raise LayoutError(f"local key {e.key!r} appears twice on rank {self.rank}")
            keys.add(e.key)
            e.validate(metas)

    def digest(self) -> str:
        """A stable hash of the layout, used to reuse a cached global plan."""
        payload = json.dumps(layout_to_json(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def coords_key(self) -> str:
        """``"dp=0,pp=1,tp=1"`` (or ``"rank=3"`` when no coordinates were declared)."""
        if not self.coords:
            return f"rank={self.rank}"
        return ",".join(f"{k}={v}" for k, v in sorted(self.coords))


def is_contiguous_box(box: Box, shape: Sequence[int]) -> bool:
    """True if ``box`` is one contiguous run of a row-major tensor of ``shape``."""
    if box.numel == 0:
        return True
    # Leading dims of length 1, then one partial dim, then full trailing dims.
    dims = list(range(box.ndim))
    i = 0
    while i < len(dims) and box.lengths[i] == 1:
        i += 1
    if i == len(dims):
        return True
    return all(box.lengths[j] == shape[j] for j in range(i + 1, len(dims)))


def flat_range_to_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[int, Box]]:
    """Decompose the row-major flat range ``[start, stop)`` of ``shape`` into boxes.

    Returns ``(flat_offset, box)`` pairs in flat order, where ``flat_offset`` is where
    the box starts within the range. There are at most ``2 * ndim - 1`` boxes: a
    partial row, whole rows, a partial row, recursively along the dims.
    """
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    if not (0 <= start <= stop <= total):
        raise LayoutError(f"flat range [{start}, {stop}) outside tensor of {total} elements")
    out: list[tuple[int, Box]] = []
    if start == stop:
        return out
    if len(shape) == 0:
        return [(0, Box((), ()))]
    _decompose(shape, 0, start, stop, (), out, start)
    return out


def _decompose(
    shape: Shape,
    dim: int,
    start: int,
    stop: int,
    prefix: Shape,
    out: list[tuple[int, Box]],
    origin: int,
) -> None:
    """Recursive helper: ``[start, stop)`` is relative to the sub-tensor at ``prefix``."""
    inner = math.prod(shape[dim + 1 :])
    rest = len(shape) - dim - 1
    base = _flat_of(shape, prefix, dim)
    if start == stop:
        return
    first, first_off = divmod(start, inner)
    last, last_off = divmod(stop, inner)
    if rest == 0:
        out.append((base + start - origin, Box((*prefix, start), (1,) * dim + (stop - start,))))
        return
    if first == last:
        _decompose(shape, dim + 1, first_off, last_off, (*prefix, first), out, origin)
        return
    if first_off:
        _decompose(shape, dim + 1, first_off, inner, (*prefix, first), out, origin)
        first += 1
    if last > first:
        box = Box(prefix + (first,) + (0,) * rest, (1,) * dim + (last - first,) + shape[dim + 1 :])
        out.append((base + first * inner - origin, box))
    if last_off:
        _decompose(shape, dim + 1, 0, last_off, (*prefix, last), out, origin)


def _flat_of(shape: Shape, prefix: Shape, dim: int) -> int:
    """Flat offset of the sub-tensor ``prefix`` (its first ``dim`` indices)."""
    flat = 0
    for d, idx in enumerate(prefix):
        flat += idx * math.prod(shape[d + 1 :])
    return flat


def iter_pieces(layouts: Iterable[RankLayout]) -> Iterator[tuple[int, LocalEntry, Piece]]:
    """Every (rank, entry, piece) of a set of rank layouts."""
    for lay in layouts:
        for e in lay.entries:
            for p in e.pieces:
                yield lay.rank, e, p


def layout_to_json(lay: RankLayout) -> dict:
    """JSON form of a rank layout (used for digests, provenance and transport)."""
    return {
        "rank": lay.rank,
        "coords": [list(c) for c in lay.coords],
        "tensors": [[m.name, m.dtype, list(m.shape)] for m in lay.tensors],
        "entries": [
            [
                e.key,
                list(e.local_shape),
                e.dtype,
                [[p.name, p.global_box.to_json(), p.local_box.to_json()] for p in e.pieces],
            ]
            for e in lay.entries
        ],
    }


def layout_from_json(obj: dict) -> RankLayout:
    """Inverse of :func:`layout_to_json`."""
    return RankLayout(
        rank=int(obj["rank"]),
        coords=tuple((str(k), int(v)) for k, v in obj["coords"]),
        tensors=tuple(TensorMeta(n, d, tuple(s)) for n, d, s in obj["tensors"]),
        entries=tuple(
            LocalEntry(
                key=k,
                local_shape=tuple(ls),
                dtype=dt,
                pieces=tuple(Piece(n, Box.from_json(g), Box.from_json(lb)) for n, g, lb in pieces),
            )
            for k, ls, dt, pieces in obj["entries"]
        ),
    )
