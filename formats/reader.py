"""Reading a committed checkpoint: manifest, integrity checks, chunk decoding.

Readers only open committed steps. Every chunk's CRC32C is checked against the
manifest before it is decoded; a mismatch raises :class:`IntegrityError` naming the
tensor and the chunk. :meth:`CheckpointReader.check_objects` verifies, before any
tensor is touched, that every object a load plan needs exists with the right size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

from ckptd.dtypes import numpy_storage_dtype, torch_dtype
from ckptd.errors import IntegrityError
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import crc32c, decode
from ckptd.formats.manifest import (
    GROUP_META_KEY,
    ChunkRecord,
    Manifest,
    TensorRecord,
    parse_group_metadata,
)
from ckptd.formats.storage import ObjectNotFoundError, Storage
from ckptd.fragments import Box
from ckptd.planner import ChunkRead, StoredTensor

if TYPE_CHECKING:  # torch is imported on first chunk read: `ckpt ls` starts without it
    import torch


class CheckpointReader:
    """A committed checkpoint opened for reading."""

    def __init__(self, storage: Storage, step: int, manifest: Manifest) -> None:
        self.storage = storage
        self.step = step
        self.manifest = manifest
        self.prefix = commit_mod.step_dir(step) + "/"
        self._chunks = {
            name: {c.index: c for c in rec.chunks} for name, rec in manifest.tensors.items()
        }

    @classmethod
    def open(cls, storage: Storage, step: int | None = None) -> CheckpointReader:
        """Open ``step`` (default: the latest committed); verifies marker and manifest."""
        if step is None:
            step = commit_mod.latest_step(storage)
            if step is None:
                raise commit_mod.NotCommittedError(
                    f"no committed checkpoint under {storage.url}; save one first"
                )
        commit_mod.require_committed(storage, step)
        marker = commit_mod.read_marker(storage, step)
        key = f"{commit_mod.step_dir(step)}/{GROUP_META_KEY}"
        where = f"{storage.url}/{key}"
        try:
            data = storage.get(key)
        except ObjectNotFoundError as e:
            raise IntegrityError(f"{where}: committed checkpoint has no manifest") from e
        want = marker.get("manifest_crc32c")
        if want is not None and crc32c(data) != int(want):
            raise IntegrityError(f"{where}: manifest checksum mismatch (truncated or altered)")
        manifest = parse_group_metadata(data, where)
        if manifest.step != step:
            raise IntegrityError(f"{where}: manifest says step {manifest.step}, expected {step}")
        return cls(storage, step, manifest)

    def stored_tensors(self) -> dict[str, StoredTensor]:
        """What the load planner needs about every stored tensor."""
        return {
            name: StoredTensor(rec.meta, rec.chunk_shape, frozenset(self._chunks[name]))
            for name, rec in self.manifest.tensors.items()
        }

    def record(self, name: str) -> TensorRecord:
        return self.manifest.tensors[name]

    def check_objects(self, reads: Iterable[ChunkRead]) -> None:
        """Fail before any tensor is touched if a needed object is missing or short."""
        need: dict[str, int] = {}
        for r in reads:
            c = self._chunks[r.name][r.index]
            need[c.object] = max(need.get(c.object, 0), c.offset + c.length)
        if not need:
            return
        listed = set(self.storage.list(self.prefix.rstrip("/")))
        missing = sorted(k for k in need if self.prefix + k not in listed)
        if missing:
            raise IntegrityError(
                f"checkpoint step {self.step} under {self.storage.url} is missing "
                f"{len(missing)} object(s) needed by this load, e.g. {missing[:5]}"
            )

    def read_chunk_into(
        self, name: str, index: tuple[int, ...], dest: torch.Tensor | Sequence[torch.Tensor]
    ) -> bool:
        """Read a raw, unpadded chunk straight into contiguous ``dest`` (one tensor, or
        several that the chunk's bytes fill one after the other, e.g. consecutive row
        ranges going to different tensors); False if the chunk needs decoding or padding
        removal or the sizes do not add up (the caller then uses :meth:`read_chunk`).
        The chunk's checksum is verified over all parts."""
        # (no isinstance(dest, torch.Tensor): torch is not imported at module level here)
        dests: list[torch.Tensor] = (
            list(dest) if isinstance(dest, (list, tuple)) else [cast("torch.Tensor", dest)]
        )
        rec = self.manifest.tensors[name]
        c = self._chunks[name][index]
        nbytes = sum(d.numel() * d.element_size() for d in dests)
        if rec.codec != "raw" or c.length != nbytes or not all(d.is_contiguous() for d in dests):
            return False
        where = f"tensor {name!r} chunk {list(index)} ({self.prefix}{c.object})"
        outs = [
            memoryview(d.reshape(-1).view(torch_dtype("uint8")).numpy()).cast("B")
            for d in dests
            if d.numel()
        ]
        try:
            got = self.storage.get_into(self.prefix + c.object, c.offset, outs)
        except ObjectNotFoundError as e:
            raise IntegrityError(f"{where}: object is missing") from e
        crc = 0
        for o in outs:
            crc = crc32c(o, crc)
        if got != c.length or crc != c.crc32c:
            raise IntegrityError(f"{where}: checksum mismatch (stored bytes are corrupt)")
        return True

    def read_chunk(
        self, name: str, index: tuple[int, ...], box: Box, scratch: ScratchBuffer | None = None
    ) -> torch.Tensor:
        """Read, verify and decode one chunk; returns a tensor of ``box.lengths``.

        With ``scratch``, the stored bytes are read into it (reused memory, no fresh
        allocation to fault in per chunk) and an uncompressed chunk's tensor is a view of
        it, valid until ``scratch`` is used again.
        """
        rec = self.manifest.tensors[name]
        c: ChunkRecord = self._chunks[name][index]
        where = f"tensor {name!r} chunk {list(index)} ({self.prefix}{c.object})"
        data: bytes | memoryview
        try:
            if scratch is not None:
                view = scratch.view(c.length)
                data = view[: self.storage.get_into(self.prefix + c.object, c.offset, view)]
            elif c.packed or c.offset:
                data = self.storage.get_range(self.prefix + c.object, c.offset, c.offset + c.length)
            else:
                data = self.storage.get(self.prefix + c.object)
        except ObjectNotFoundError as e:
            raise IntegrityError(f"{where}: object is missing") from e
        if len(data) != c.length or crc32c(data) != c.crc32c:
            raise IntegrityError(f"{where}: checksum mismatch (stored bytes are corrupt)")
        itemsize = numpy_storage_dtype(rec.dtype).itemsize
        raw = decode(data, rec.codec, math.prod(rec.chunk_shape) * itemsize, where)
        full = bytes_as_tensor(raw).view(torch_dtype(rec.dtype)).reshape(rec.chunk_shape)
        if tuple(box.lengths) != tuple(rec.chunk_shape):
            full = full[tuple(slice(0, n) for n in box.lengths)]
        return full


class ScratchBuffer:
    """A reusable read buffer that grows to the largest chunk asked of it (one per
    reading thread: not thread-safe)."""

    def __init__(self) -> None:
        """An empty buffer; memory is allocated by the first :meth:`view`."""
        self._buf = bytearray()

    def view(self, nbytes: int) -> memoryview:
        """A writable view of the first ``nbytes`` (earlier contents are not kept)."""
        if len(self._buf) < nbytes:
            self._buf = bytearray(nbytes)
        return memoryview(self._buf)[:nbytes]


def bytes_as_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data`` without a copy; callers only read from it."""
    import torch

    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Read-only buffers are fine here: the tensor is only ever a copy source.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)
