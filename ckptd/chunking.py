"""Chunk grids: how a logical tensor is cut into stored chunks.

Pure functions. The grid is regular (zarr v3 ``regular`` chunk grid). It is aligned to
the boundaries of the pieces written at save time when that keeps chunks reasonably
large, so that every chunk has exactly one writer; otherwise chunks follow a target
size and boundary chunks are assembled from several ranks (see planner.Transfer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import reduce

from ckptd.fragments import Box, Shape, _box

DEFAULT_TARGET_CHUNK_BYTES = 32 << 20
DEFAULT_MIN_ALIGNED_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ChunkGrid:
    """A regular grid of ``chunk_shape`` over a tensor of ``shape`` (edge chunks clipped)."""

    shape: Shape
    chunk_shape: Shape

    @property
    def grid_shape(self) -> Shape:
        return tuple(-(-s // c) if c else 0 for s, c in zip(self.shape, self.chunk_shape))

    @property
    def n_chunks(self) -> int:
        return math.prod(self.grid_shape)

    def chunk_box(self, index: Sequence[int]) -> Box:
        """The box of the tensor that chunk ``index`` covers (clipped at the edges)."""
        offs = tuple(i * c for i, c in zip(index, self.chunk_shape))
        lens = tuple(min(c, s - o) for o, c, s in zip(offs, self.chunk_shape, self.shape))
        return _box(offs, lens)

    def indices(self) -> Iterator[tuple[int, ...]]:
        """Every chunk index in row-major order."""
        return itertools.product(*(range(n) for n in self.grid_shape))

    def touching(self, box: Box) -> Iterator[tuple[int, ...]]:
        """Indices of the chunks that intersect ``box``."""
        if box.is_empty():
            return iter(())
        ranges = [
            range(o // c, (o + n - 1) // c + 1)
            for o, n, c in zip(box.offsets, box.lengths, self.chunk_shape)
        ]
        return itertools.product(*ranges)


def chunk_key(index: Sequence[int]) -> str:
    """zarr v3 default chunk key (``c/0/1``; ``c`` for a 0-d array)."""
    return "/".join(["c", *(str(i) for i in index)])


def choose_chunk_shape(
    shape: Shape,
    itemsize: int,
    boxes: Iterable[Box],
    target_bytes: int = DEFAULT_TARGET_CHUNK_BYTES,
    min_aligned_bytes: int = DEFAULT_MIN_ALIGNED_CHUNK_BYTES,
) -> tuple[Shape, bool]:
    """Pick a chunk shape for a tensor written as ``boxes``; returns (shape, aligned).

    Aligned: per dim, the chunk length divides every box boundary, so no chunk spans two
    writers. The largest aligned chunk is the gcd of the boundaries; it is cut down to
    ``target_bytes`` along the leading dims. If the aligned chunk would be smaller than
    ``min_aligned_bytes`` (uneven or flat-partition boundaries), fall back to a
    target-sized grid that ignores the boundaries.
    """
    if len(shape) == 0:
        return (), True
    if math.prod(shape) == 0:
        return tuple(max(1, s) for s in shape), True
    total = math.prod(shape) * itemsize
    gcds = list(shape)
    for b in boxes:
        for d, (o, e) in enumerate(zip(b.offsets, b.ends)):
            gcds[d] = reduce(math.gcd, (gcds[d], o, e))
    aligned = _shrink_to(tuple(gcds), itemsize, target_bytes, divisors=True)
    nbytes = math.prod(aligned) * itemsize
    if nbytes >= min(min_aligned_bytes, total):
        return aligned, True
    return _shrink_to(tuple(shape), itemsize, target_bytes, divisors=False), False


def _shrink_to(limit: Shape, itemsize: int, target: int, divisors: bool) -> Shape:
    """Largest chunk within ``limit`` of at most ``target`` bytes, cut on leading dims.

    With ``divisors`` each length must divide its limit (to stay aligned); without, any
    length works (edge chunks are clipped).
    """
    out = list(limit)
    for d in range(len(out)):
        inner = math.prod(out[d + 1 :]) * itemsize
        if math.prod(out) * itemsize <= target:
            break
        want = max(1, target // max(1, inner))
        if want >= out[d]:
            continue
        out[d] = _largest_divisor_leq(out[d], want) if divisors else want
    return tuple(out)


def _largest_divisor_leq(n: int, k: int) -> int:
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            for cand in (i, n // i):
                if best < cand <= k:
                    best = cand
        i += 1
    return best
