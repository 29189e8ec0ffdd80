"""Reading whole tensors (or boxes of them) back out of a committed universal step.

The read side of :mod:`ckptd.formats.universal_io` for tools that want tensors rather
than a trainer's state filled in place (``ckpt-convert``'s universal source, tests):
each tensor is assembled chunk by chunk on a few threads, every chunk checked against its
CRC32C by :class:`~ckptd.formats.reader.CheckpointReader`.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckptd.chunking import ChunkGrid
from ckptd.dtypes import torch_dtype
from ckptd.errors import IntegrityError
from ckptd.formats.manifest import Manifest
from ckptd.formats.reader import CheckpointReader
from ckptd.formats.storage import Storage
from ckptd.fragments import Box, TensorMeta


class UniversalReader:
    """Whole tensors (or boxes of them) out of a committed step, chunk by chunk."""

    def __init__(self, reader: CheckpointReader, workers: int = 4) -> None:
        """Wrap an opened :class:`CheckpointReader`; ``workers`` chunks are read at once."""
        self.reader = reader
        self.workers = max(1, workers)

    @classmethod
    def open(cls, storage: Storage, step: int | None = None, workers: int = 4) -> UniversalReader:
        """Open ``step`` (default: the latest committed) of the root ``storage``."""
        return cls(CheckpointReader.open(storage, step), workers)

    @property
    def step(self) -> int:
        return self.reader.step

    @property
    def manifest(self) -> Manifest:
        return self.reader.manifest

    def names(self) -> list[str]:
        """Every stored tensor name, sorted."""
        return sorted(self.reader.manifest.tensors)

    def meta(self, name: str) -> TensorMeta:
        """Name, dtype and global shape of ``name``."""
        return self.reader.record(name).meta

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, assembled chunk by chunk into one output tensor."""
        return self.read_box(name, Box.whole(self.reader.record(name).shape))

    def read_box(self, name: str, box: Box) -> torch.Tensor:
        """The region ``box`` (global coordinates) of ``name`` as a new tensor."""
        rec = self.reader.record(name)
        if not box.fits_in(rec.shape):
            raise ValueError(f"box {box} is outside tensor {name!r} of shape {list(rec.shape)}")
        out = torch.empty(box.lengths, dtype=torch_dtype(rec.dtype))
        if box.is_empty():
            return out
        grid = ChunkGrid(rec.shape, rec.chunk_shape)
        have = {c.index for c in rec.chunks}
        jobs = []
        for idx in grid.touching(box):
            if idx not in have:
                raise IntegrityError(
                    f"tensor {name!r} chunk {list(idx)} is not in the manifest of step "
                    f"{self.step} (incomplete checkpoint)"
                )
            cbox = grid.chunk_box(idx)
            inter = cbox.intersect(box)
            if inter is not None:
                jobs.append((idx, cbox, inter))

        def one(job: tuple[tuple[int, ...], Box, Box]) -> None:
            idx, cbox, inter = job
            chunk = self.reader.read_chunk(name, idx, cbox)
            src = chunk[inter.shift(cbox.offsets, -1).slices()]
            out[inter.shift(box.offsets, -1).slices()].copy_(src)

        for _ in _bounded_map(one, jobs, self.workers):
            pass
        return out


def _bounded_map(fn: Any, items: list[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on ``workers`` threads with at most ``workers`` items in flight."""
    if workers == 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-uread") as pool:
        pending: list[Future[Any]] = []
        for item in items:
            if len(pending) >= workers:
                yield pending.pop(0).result()
            pending.append(pool.submit(fn, item))
        for f in pending:
            yield f.result()
