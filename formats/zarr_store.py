"""zarr-python reads ckptd checkpoints: a read-only ``zarr.abc.store.Store``.

A committed checkpoint ``ROOT/step-NNNNNNNNN/`` is a zarr v3 group. Tensors larger
than the pack threshold are ordinary zarr v3 arrays (``<name>/zarr.json`` and chunk
objects ``<name>/c/i/j``) that any zarr v3 reader opens directly. Small tensors are
*packed*: their array metadata lives only in the manifest and their (single) chunk is
a byte range of a ``packs/*.pack`` object. :class:`CheckpointStore` presents the
whole checkpoint as one plain zarr hierarchy:

- the group ``zarr.json`` and every unpacked object are passed through;
- ``<name>/zarr.json`` of a packed tensor is synthesized from its manifest record
  (:func:`ckptd.formats.zarr_meta.array_metadata`);
- ``<name>/c...`` of a packed tensor is served from its pack byte range;
- listing is derived from the manifest, so ``zarr.open_group(store=..., mode="r")``
  enumerates every tensor; ``COMMITTED`` and ``packs/`` are not part of the hierarchy.

Every chunk is checked against its CRC32C from the manifest before zarr sees it
(``verify=True``); a mismatch raises :class:`~ckptd.errors.IntegrityError` naming the
tensor and the chunk, and a chunk the manifest lists but storage lacks is an error,
never silently the fill value. Only committed steps can be opened.

dtypes numpy lacks are stored as their bits: ``bfloat16`` as ``uint16``, ``float8_*``
as ``uint8``; the array attribute ``ckpt_dtype`` names the real dtype. View them with
``torch.from_numpy(arr).view(torch.bfloat16)``, or use :func:`read_tensor`::

    g = open_zarr("/ckpts/run-7")          # latest committed step
    w = g["model.layers.0.weight"][...]    # numpy array (uint16 bits if bfloat16)
    t = read_tensor(g["model.layers.0.weight"])  # torch tensor in its real dtype

The ``Storage`` API is synchronous; each store call runs it in a worker thread
(``asyncio.to_thread``) so zarr's concurrent chunk fetches overlap.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from ckptd.chunking import chunk_key
from ckptd.dtypes import torch_dtype
from ckptd.errors import IntegrityError
from ckptd.formats.chunkcodec import crc32c
from ckptd.formats.manifest import GROUP_META_KEY, Manifest
from ckptd.formats.reader import CheckpointReader
from ckptd.formats.storage import ObjectNotFoundError, Storage, open_storage
from ckptd.formats.zarr_meta import array_metadata_bytes

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

__all__ = ["CheckpointStore", "open_zarr", "read_tensor"]


@dataclass(frozen=True)
class _Entry:
    """Where the bytes of one store key come from."""

    object: str | None  # key relative to the step directory; None: synthesized
    offset: int = 0
    length: int | None = None  # stored bytes; None: the whole object, size unknown
    crc32c: int | None = None  # checked before serving (chunks only)
    data: bytes | None = None  # synthesized content
    packed: bool = False  # a byte range of a pack object
    what: str = ""  # names the tensor/chunk in errors


class CheckpointStore(Store):
    """A read-only zarr v3 store over one committed checkpoint step of a ``Storage``.

    Opening reads the commit marker and the manifest (checked against the marker's
    CRC32C) once; the key set is then fixed. Safe to share between threads; every
    method only reads. ``close()`` closes the storage only if ``owns_storage``.
    """

    supports_writes: bool = False
    supports_deletes: bool = False
    supports_listing: bool = True

    def __init__(
        self,
        storage: Storage,
        step: int | None = None,
        *,
        verify: bool = True,
        owns_storage: bool = False,
        read_only: bool = True,
    ) -> None:
        """Open ``step`` (default: the latest committed) of ``storage``.

        Raises :class:`~ckptd.errors.NotCommittedError` if there is no such committed
        step and :class:`~ckptd.errors.IntegrityError` if its manifest is damaged.
        """
        if not read_only:
            raise ValueError("CheckpointStore is read-only; checkpoints are written by ckpt.save")
        super().__init__(read_only=True)
        reader = CheckpointReader.open(storage, step)
        self.storage = storage
        self.step = reader.step
        self.manifest: Manifest = reader.manifest
        self.prefix = reader.prefix  # "step-NNNNNNNNN/"
        self.verify = verify
        self.owns_storage = owns_storage
        self._entries = _entries(self.manifest)
        self._keys = sorted(self._entries)

    # ------------------------------------------------------------------ identity
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CheckpointStore)
            and other.storage is self.storage
            and other.step == self.step
        )

    def __hash__(self) -> int:
        return hash((id(self.storage), self.step))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.url!r}, step={self.step})"

    def with_read_only(self, read_only: bool = False) -> CheckpointStore:
        """A new store over the same checkpoint; only ``read_only=True`` is possible."""
        if not read_only:
            raise ValueError("CheckpointStore is read-only; checkpoints are written by ckpt.save")
        return CheckpointStore(self.storage, self.step, verify=self.verify)

    def close(self) -> None:
        """Close the store (and the storage, if this store opened it)."""
        super().close()
        if self.owns_storage:
            self.storage.close()

    # ---------------------------------------------------------------------- reads
    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """Return the bytes of ``key`` (or a range of them); ``None`` if not in the hierarchy."""
        await self._ensure_open()
        data = await asyncio.to_thread(self._read, key, byte_range)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        """Fetch several (key, range) pairs concurrently, in order."""
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is part of the checkpoint's zarr hierarchy (no I/O)."""
        return key in self._entries

    async def getsize(self, key: str) -> int:
        """Stored size of ``key`` in bytes; raises ``FileNotFoundError`` if absent."""
        entry = self._entries.get(key)
        if entry is None:
            raise FileNotFoundError(key)
        if entry.data is not None:
            return len(entry.data)
        if entry.length is not None:
            return entry.length
        assert entry.object is not None
        return await asyncio.to_thread(self.storage.size, self.prefix + entry.object)

    # -------------------------------------------------------------------- listing
    async def list(self) -> AsyncIterator[str]:
        """Every key of the hierarchy, sorted."""
        for key in self._keys:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        """Every key starting with ``prefix``, sorted."""
        for key in self._keys:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        """Immediate children (keys and pseudo-directories) of ``prefix``."""
        prefix = prefix.rstrip("/")
        start = prefix + "/" if prefix else ""
        seen: set[str] = set()
        for key in self._keys:
            if key.startswith(start) and key != prefix:
                child = key[len(start) :].split("/", 1)[0]
                if child not in seen:
                    seen.add(child)
                    yield child

    # --------------------------------------------------------------- read-only API
    async def set(self, key: str, value: Buffer) -> None:
        """Always fails: the store is read-only."""
        self._check_writable()

    async def delete(self, key: str) -> None:
        """Always fails: the store is read-only."""
        self._check_writable()

    @property
    def supports_consolidated_metadata(self) -> bool:
        """Metadata cannot be consolidated into a read-only checkpoint."""
        return False

    # ------------------------------------------------------------------ internals
    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.data is not None:
            return _slice(entry.data, byte_range)
        assert entry.object is not None
        obj = self.prefix + entry.object
        try:
            if entry.length is None:  # a whole object of unknown size: metadata
                if byte_range is None:
                    return self.storage.get(obj)
                return _slice(self.storage.get(obj), byte_range)
            if entry.crc32c is None or not self.verify:
                start, end = _bounds(entry.length, byte_range)
                return self.storage.get_range(obj, entry.offset + start, entry.offset + end)
            if entry.packed:
                data = self.storage.get_range(obj, entry.offset, entry.offset + entry.length)
            else:  # a whole chunk object (like CheckpointReader.read_chunk)
                data = self.storage.get(obj)
        except ObjectNotFoundError as e:
            raise IntegrityError(f"{entry.what} ({obj}): object is missing") from e
        if len(data) != entry.length or crc32c(data) != entry.crc32c:
            raise IntegrityError(
                f"{entry.what} ({obj}): checksum mismatch (stored bytes are corrupt)"
            )
        return _slice(data, byte_range)


def _entries(manifest: Manifest) -> dict[str, _Entry]:
    """The store's key set, derived from the manifest alone."""
    out: dict[str, _Entry] = {GROUP_META_KEY: _Entry(GROUP_META_KEY, what="group metadata")}
    for name, rec in manifest.tensors.items():
        meta_key = f"{name}/{GROUP_META_KEY}"
        if rec.packed:
            out[meta_key] = _Entry(None, data=array_metadata_bytes(rec), what=f"tensor {name!r}")
        else:
            out[meta_key] = _Entry(meta_key, what=f"tensor {name!r} array metadata")
        for c in rec.chunks:
            what = f"tensor {name!r} chunk {list(c.index)}"
            packed = c.packed or c.offset > 0
            out[f"{name}/{chunk_key(c.index)}"] = _Entry(
                c.object, c.offset, c.length, c.crc32c, packed=packed, what=what
            )
    return out


def _bounds(size: int, byte_range: ByteRequest | None) -> tuple[int, int]:
    """``[start, end)`` of ``byte_range`` within an object of ``size`` bytes."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(max(byte_range.end, byte_range.start), size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte range {byte_range!r}")


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    start, end = _bounds(len(data), byte_range)
    return data[start:end]


def open_zarr(
    root_or_storage: str | os.PathLike[str] | Storage,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
) -> zarr.Group:
    """Open a committed checkpoint as a read-only :class:`zarr.Group`.

    ``root_or_storage`` is a checkpoint root (path or fsspec URL; ``storage_options``
    go to the filesystem, e.g. S3 ``endpoint_url``) or an open ``Storage``; ``step``
    defaults to the latest committed. A storage opened here is closed by
    ``group.store.close()``.
    """
    if isinstance(root_or_storage, Storage):
        store = CheckpointStore(root_or_storage, step, verify=verify)
    else:
        storage = open_storage(root_or_storage, **(storage_options or {}))
        try:
            store = CheckpointStore(storage, step, verify=verify, owns_storage=True)
        except BaseException:
            storage.close()
            raise
    return zarr.open_group(store=store, mode="r")


def read_tensor(array: zarr.Array) -> torch.Tensor:
    """Read a whole array as a torch tensor in its real dtype (attribute ``ckpt_dtype``)."""
    import torch

    data = np.array(array[...], order="C", copy=True)  # writable, C order, 0-d kept
    dtype = array.attrs.get("ckpt_dtype")
    tensor = torch.from_numpy(data)
    if isinstance(dtype, str) and tensor.dtype != torch_dtype(dtype):
        tensor = tensor.view(torch_dtype(dtype))
    return tensor
