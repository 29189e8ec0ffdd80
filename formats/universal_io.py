"""Streaming writes of the universal format, one whole logical tensor at a time
(reading them back: :mod:`ckptd.formats.universal_reader`).

For tools that hold one process and a stream of whole tensors (``ckpt-convert``,
exporters), as opposed to :mod:`ckpt.saver`, which plans pieces across ranks.
What lands is the same format (docs/format.md): chunk objects and packs written by
:class:`~ckptd.formats.writer.CheckpointWriter`, the manifest, then the commit marker.

Writer call order (one process, one writer per step)::

    w = UniversalWriter(storage, step, ...)        # or UniversalWriter.resume(...)
    for name, tensor in stream:
        if not w.is_done(name):                    # skipped after a resume
            w.add(name, tensor)                    # blocks until durable (see add)
        # or w.add_ranges(name, dtype, shape, read)  # streamed chunk by chunk
    w.set_state({...})                             # optional, any time before commit
    w.commit()                                     # manifest, COMMITTED, latest

Durability and resumability: tensors are written through one
:class:`~ckptd.formats.writer.CheckpointWriter` per *sync window* (``sync_bytes``, default
256 MiB of tensor data): its thread pool encodes and puts chunks (``O_DIRECT`` in place
on local disks) while the caller fetches the next tensor; at the end of a window one
``finish`` (a single ``syncfs`` locally) makes all of them durable, ``on_durable(name)``
is called for each in ``add`` order, and their chunk records go into the sidecar
``step-N/.convert-progress.json`` (one atomic ``put`` per window). If ``on_durable``
raises, :meth:`abort` still records the tensors already reported. :meth:`UniversalWriter.resume`
reads it, re-verifies the CRC32C of every recorded chunk against the stored bytes, and
reports the verified tensors as done; chunks of tensors that were not recorded are
simply written again (their keys are deterministic, puts replace atomically). The
sidecar is deleted after the commit. Nothing here is visible to readers before the
commit marker exists.

Memory: :meth:`UniversalWriter.add` returns once the tensor's chunks are queued within
``writer_options.max_inflight_bytes`` (it waits while more are queued). The caller may
drop the tensor when ``add`` returns; queued chunks keep it alive until they are
written, and small packed tensors until their pack (at most ~64 MiB) is put. Peak:
the tensor being fetched + the in-flight budget (+ the tensor its chunks belong to).
:meth:`UniversalWriter.add_ranges` never holds a tensor whole: it reads each chunk's
bytes into a reused staging buffer and queues it, so its peak is the in-flight budget
plus the chunk being read (a whole tensor only where its chunks are not contiguous
byte ranges, which the chunk shapes chosen for whole tensors always are).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ckptd.chunking import ChunkGrid, choose_chunk_shape
from ckptd.dtypes import dtype_name, itemsize_of, torch_dtype
from ckptd.errors import CkptError, CommitConflictError, IntegrityError, InvalidKeyError
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy, crc32c, sample_sizes, sample_window
from ckptd.formats.keys import validate_key
from ckptd.formats.manifest import (
    GROUP_META_KEY,
    ChunkRecord,
    Manifest,
    TensorRecord,
    group_metadata_bytes,
)
from ckptd.formats.storage import ObjectNotFoundError, Storage
from ckptd.formats.writer import CheckpointWriter, StagingPool, WriterOptions, is_packed
from ckptd.fragments import Box
from ckptd.keys import validate_state_key
from ckptd.planner import PlanOptions

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

PROGRESS_NAME = ".convert-progress.json"
PROGRESS_VERSION = 1
SYNC_BYTES = 256 << 20


class ResumeMismatchError(CkptError, ValueError):
    """An interrupted write cannot be resumed: it was started for different inputs."""


# ------------------------------------------------------------------ shared helpers


def attach_chunks(
    records: Mapping[str, TensorRecord], chunks: Iterable[tuple[str, ChunkRecord]]
) -> dict[str, TensorRecord]:
    """Records without chunks + ``(name, chunk)`` pairs -> records with sorted chunks.

    The manifest-building step shared by every writer of a step (``ckpt.save``'s
    coordinator and :class:`UniversalWriter`).
    """
    by_name: dict[str, list[ChunkRecord]] = {n: [] for n in records}
    for name, c in chunks:
        by_name[name].append(c)
    out = {}
    for name, rec in records.items():
        cs = tuple(sorted(by_name[name], key=lambda c: c.index))
        out[name] = TensorRecord(
            rec.name, rec.dtype, rec.shape, rec.chunk_shape, rec.codec, rec.level, rec.packed, cs
        )
    return out


def commit_manifest(storage: Storage, manifest: Manifest) -> int:
    """Coordinator: put ``step-N/zarr.json``, then the commit marker; return manifest bytes.

    Call only after every chunk of the step is durable (docs/format.md §2).
    """
    data = group_metadata_bytes(manifest)
    storage.put(f"{commit_mod.step_dir(manifest.step)}/{GROUP_META_KEY}", data)
    commit_mod.commit(storage, manifest.step, {"manifest_crc32c": crc32c(data)})
    return len(data)


def tensor_record(
    name: str,
    tensor: torch.Tensor,
    policy: CodecPolicy,
    writer_options: WriterOptions,
    plan_options: PlanOptions,
) -> TensorRecord:
    """The record (without chunks) of a whole tensor written as one piece."""
    shape = tuple(int(s) for s in tensor.shape)
    return bytes_record(
        name, dtype_name(tensor.dtype), shape, _bytes_view(tensor), policy, writer_options,
        plan_options,
    )


def bytes_record(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    raw: memoryview,
    policy: CodecPolicy,
    writer_options: WriterOptions,
    plan_options: PlanOptions,
) -> TensorRecord:
    """:func:`tensor_record` of a tensor given as its raw bytes (``dtype``, row-major)."""
    cshape, _ = choose_chunk_shape(
        shape,
        itemsize_of(dtype),
        [Box.whole(shape)],
        plan_options.target_chunk_bytes,
        plan_options.min_aligned_chunk_bytes,
    )
    codec = policy.codec
    if codec == "auto":
        codec = policy.choose(*sample_sizes(raw, policy.level))
    packed = is_packed(shape, dtype, writer_options)
    return TensorRecord(name, dtype, shape, cshape, codec, policy.level, packed, ())


def chunk_ranges(
    shape: tuple[int, ...], chunk_shape: tuple[int, ...], itemsize: int
) -> Callable[[tuple[int, ...]], tuple[int, int]] | None:
    """``index -> (start, nbytes)`` of each chunk's bytes in the tensor's row-major bytes,
    or None where a chunk is not one contiguous range.

    A chunk is contiguous when its shape is 1 on the dims before some dim ``d`` and
    covers the whole tensor on the dims after it: what :func:`choose_chunk_shape` gives
    for a whole tensor (it cuts leading dims only). An edge chunk is then clipped on
    ``d`` only, so its zarr padding (zeros to the full chunk shape) follows its bytes.
    """
    nd = len(shape)
    d = next((i for i, c in enumerate(chunk_shape) if c != 1), nd)
    if any(chunk_shape[j] < shape[j] for j in range(d + 1, nd)):
        return None
    strides = [itemsize] * nd
    for j in range(nd - 2, -1, -1):
        strides[j] = strides[j + 1] * shape[j + 1]
    grid = ChunkGrid(shape, chunk_shape)

    def where(index: tuple[int, ...]) -> tuple[int, int]:
        box = grid.chunk_box(index)
        start = sum(o * st for o, st in zip(box.offsets, strides))
        return start, math.prod(box.lengths) * itemsize

    return where


def _bytes_view(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


# ------------------------------------------------------------------------- writer


class UniversalWriter:
    """Writes one step of the universal format from whole tensors (see module docstring).

    Not thread-safe: one caller thread. ``writer_options.workers`` threads encode and
    put the chunks of each tensor in parallel.
    """

    def __init__(
        self,
        storage: Storage,
        step: int,
        codec_policy: CodecPolicy | None = None,
        writer_options: WriterOptions | None = None,
        plan_options: PlanOptions | None = None,
        *,
        fingerprint: str = "",
        sync_bytes: int = SYNC_BYTES,
        on_durable: Callable[[str], None] | None = None,
    ) -> None:
        """Start writing ``step``; an uncommitted leftover of the same step is discarded.

        ``fingerprint`` identifies the inputs (stored in the sidecar; :meth:`resume`
        refuses a sidecar with another one). Raises
        :class:`~ckptd.errors.CommitConflictError` if ``step`` is already committed.
        """
        _refuse_committed(storage, step)
        storage.delete_prefix(commit_mod.step_dir(step))
        self._setup(storage, step, codec_policy, writer_options, plan_options, fingerprint)
        self.sync_bytes, self.on_durable = sync_bytes, on_durable

    def _setup(
        self,
        storage: Storage,
        step: int,
        codec_policy: CodecPolicy | None,
        writer_options: WriterOptions | None,
        plan_options: PlanOptions | None,
        fingerprint: str,
    ) -> None:
        self.storage = storage
        self.step = step
        self.policy = codec_policy or CodecPolicy()
        self.writer_options = writer_options or WriterOptions()
        self.plan_options = plan_options or PlanOptions()
        self.fingerprint = fingerprint
        self._prefix = commit_mod.step_dir(step)
        self._done: dict[str, TensorRecord] = {}
        self._next_pack_writer = 0
        self._window: CheckpointWriter | None = None
        self._window_records: dict[str, TensorRecord] = {}  # added, not yet durable
        self._window_bytes = 0
        # add_ranges' chunk buffers: the in-flight chunks and the one being read
        self._staging = StagingPool(
            self.writer_options.max_inflight_bytes + self.plan_options.target_chunk_bytes
        )
        self._unsaved = False  # _done has durable tensors the sidecar does not list
        self.sync_bytes = SYNC_BYTES
        self.on_durable = None
        self._state: dict[str, Any] = {}
        self._per_rank: dict[str, dict[str, Any]] = {}
        self._rng: dict[str, Any] = {}
        self._layout: dict[str, Any] = {"world_size": 1, "coords": ["rank=0"], "digest": ""}
        self.bytes_written = 0
        self.resumed: tuple[str, ...] = ()

    @classmethod
    def resume(
        cls,
        storage: Storage,
        step: int,
        codec_policy: CodecPolicy | None = None,
        writer_options: WriterOptions | None = None,
        plan_options: PlanOptions | None = None,
        *,
        fingerprint: str = "",
        sync_bytes: int = SYNC_BYTES,
        on_durable: Callable[[str], None] | None = None,
    ) -> UniversalWriter:
        """Continue an interrupted write of ``step`` (a fresh writer if there is none).

        Every tensor recorded in the sidecar is verified (each chunk's length and
        CRC32C against the stored bytes, plus the array metadata of unpacked tensors);
        verified ones are done (:attr:`resumed`), others are written again. Raises
        :class:`ResumeMismatchError` if the sidecar has another ``fingerprint``.
        """
        key = f"{commit_mod.step_dir(step)}/{PROGRESS_NAME}"
        _refuse_committed(storage, step)
        try:
            raw = storage.get(key)
        except ObjectNotFoundError:
            raw = None
        if raw is None:
            return cls(
                storage,
                step,
                codec_policy,
                writer_options,
                plan_options,
                fingerprint=fingerprint,
                sync_bytes=sync_bytes,
                on_durable=on_durable,
            )
        progress = parse_progress(raw, f"{storage.url}/{key}")
        if progress["fingerprint"] != fingerprint:
            raise ResumeMismatchError(
                f"{storage.url}/{commit_mod.step_dir(step)} holds an interrupted write of "
                "other inputs (or other options); delete it or overwrite it to start again"
            )
        self = cls.__new__(cls)
        self._setup(storage, step, codec_policy, writer_options, plan_options, fingerprint)
        self.sync_bytes, self.on_durable = sync_bytes, on_durable
        self._next_pack_writer = int(progress["next_pack_writer"])
        recorded = {n: TensorRecord.from_json(n, t) for n, t in progress["tensors"].items()}
        self._done = {n: r for n, r in recorded.items() if self._verify(r)}
        self.resumed = tuple(sorted(self._done))
        return self

    # ---------------------------------------------------------------- public API
    def is_done(self, name: str) -> bool:
        """Whether ``name`` was already added (durable, or verified after a resume)."""
        return name in self._done or name in self._window_records

    @property
    def done_names(self) -> frozenset[str]:
        return frozenset(self._done) | frozenset(self._window_records)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one whole tensor (CPU); durable at the end of its sync window (see module
        docstring) or at :meth:`commit`; :meth:`sync` forces it."""
        validate_state_key(name)
        validate_key(name)
        if self.is_done(name):
            raise InvalidKeyError(f"tensor {name!r} was already written to step {self.step}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        rec = tensor_record(name, t, self.policy, self.writer_options, self.plan_options)
        window = self._open_window(rec)
        if t.numel():
            if rec.packed:
                window.submit(rec, tuple(0 for _ in rec.shape), t)
            else:
                window.write_array_metadata(rec)
                grid = ChunkGrid(rec.shape, rec.chunk_shape)
                for idx in grid.indices():
                    window.submit(rec, idx, t[grid.chunk_box(idx).slices()])
        self._added(t.numel() * t.element_size())

    def add_ranges(
        self,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        read: Callable[[int, memoryview], None],
        prefetch: Callable[[int, int], None] | None = None,
    ) -> None:
        """Queue one tensor given by its raw bytes: ``read(start, out)`` fills ``out``
        with bytes ``[start, start + out.nbytes)`` of it (``dtype``, row-major,
        little-endian); ``prefetch(start, nbytes)`` hints at the next read.

        Writes what :meth:`add` writes for the same tensor, chunk by chunk through reused
        staging buffers (module docstring, "Memory"). Reads: the codec sample (codec
        ``auto``), then every chunk in order; a small (packed) tensor, or one whose
        chunks are not contiguous byte ranges, is read whole once and passed to :meth:`add`.
        """
        shape = tuple(int(s) for s in shape)
        size = itemsize_of(dtype)
        nbytes = math.prod(shape) * size
        cshape, _ = choose_chunk_shape(
            shape,
            size,
            [Box.whole(shape)],
            self.plan_options.target_chunk_bytes,
            self.plan_options.min_aligned_chunk_bytes,
        )
        ranges = chunk_ranges(shape, cshape, size)
        if ranges is None and nbytes and not is_packed(shape, dtype, self.writer_options):
            import torch  # chunks that are not byte ranges: cut from a whole tensor

            t = torch.empty(shape, dtype=torch_dtype(dtype))
            read(0, _bytes_view(t))
            self.add(name, t)
            return
        validate_state_key(name)
        validate_key(name)
        if self.is_done(name):
            raise InvalidKeyError(f"tensor {name!r} was already written to step {self.step}")
        if nbytes == 0 or is_packed(shape, dtype, self.writer_options) or ranges is None:
            # small: one chunk in a pack, read whole (as add() writes it, without torch)
            raw = memoryview(bytearray(nbytes))
            if nbytes:
                read(0, raw)
            rec = bytes_record(name, dtype, shape, raw, self.policy, self.writer_options,
                               self.plan_options)  # fmt: skip
            window = self._open_window(rec)
            if nbytes:
                window.submit(rec, tuple(0 for _ in shape), raw)
            self._added(nbytes)
            return
        codec = self.policy.codec
        if codec == "auto":  # the same sample tensor_record takes from a whole tensor
            start, n = sample_window(nbytes)
            sample = memoryview(bytearray(n))
            read(start, sample)
            codec = self.policy.choose(*sample_sizes(sample, self.policy.level))
        pol = self.policy
        rec = TensorRecord(name, dtype, shape, cshape, codec, pol.level, False, ())
        window = self._open_window(rec)
        window.write_array_metadata(rec)
        padded = math.prod(cshape) * size
        indices = list(ChunkGrid(shape, cshape).indices())
        for k, idx in enumerate(indices):
            start, n = ranges(idx)
            buf = self._staging.acquire(padded)
            try:
                read(start, buf.view[:n])
                if n < padded:  # a clipped edge chunk: zarr pads it with zeros
                    buf.view[n:] = bytes(padded - n)
            except BaseException:
                self._staging.release(buf)
                raise
            if prefetch is not None and k + 1 < len(indices):
                prefetch(*ranges(indices[k + 1]))  # read ahead while this one is written
            window.submit_bytes(rec, idx, buf.view, functools.partial(self._staging.release, buf))
        self._added(nbytes)

    def _open_window(self, rec: TensorRecord) -> CheckpointWriter:
        """The current sync window's chunk writer (started if needed), with ``rec`` in it."""
        if self._window is None:
            self._window = CheckpointWriter(
                self.storage, self.step, self._next_pack_writer, self.policy, self.writer_options
            )
        self._window_records[rec.name] = rec
        return self._window

    def _added(self, nbytes: int) -> None:
        """Count a queued tensor into the sync window; sync when the window is full."""
        self._window_bytes += nbytes
        if self._window_bytes >= self.sync_bytes:
            self.sync()

    def sync(self) -> None:
        """Make every added tensor durable, report it (``on_durable``), record it."""
        if self._window is None:
            return
        writer, self._window = self._window, None
        records, self._window_records = self._window_records, {}
        self._window_bytes = 0
        try:
            chunks = writer.finish()
        except BaseException:
            writer.abort()
            raise
        self._next_pack_writer += 1
        self.bytes_written += writer.bytes_written
        for name, rec in attach_chunks(records, chunks).items():
            self._done[name] = rec
            self._unsaved = True
            if self.on_durable is not None:
                self.on_durable(name)
        self._save_progress()

    def set_state(
        self,
        state: Mapping[str, Any],
        per_rank_state: Mapping[str, Mapping[str, Any]] | None = None,
        rng: Mapping[str, Any] | None = None,
        layout: Mapping[str, Any] | None = None,
    ) -> None:
        """Trainer state (JSON leaves), per-rank state, RNG states and layout provenance."""
        self._state = json.loads(json.dumps(dict(state)))
        if per_rank_state is not None:
            self._per_rank = json.loads(json.dumps(dict(per_rank_state)))
        if rng is not None:
            self._rng = json.loads(json.dumps(dict(rng)))
        if layout is not None:
            self._layout = json.loads(json.dumps(dict(layout)))

    def commit(self) -> int:
        """Sync, write the manifest and the commit marker; return the bytes written."""
        self.sync()
        manifest = Manifest(
            step=self.step,
            tensors=dict(self._done),
            layout=self._layout,
            rng=self._rng,
            state=self._state,
            per_rank_state=self._per_rank,
            writer="ckptd-convert",
        )
        self.bytes_written += commit_manifest(self.storage, manifest)
        self.storage.delete(f"{self._prefix}/{PROGRESS_NAME}")
        self._staging.clear()
        return self.bytes_written

    def abort(self) -> None:
        """Stop after an error; what is durable (and reported) is recorded, stays resumable."""
        if self._window is not None:
            self._window.abort()
            self._window, self._window_records, self._window_bytes = None, {}, 0
        self._staging.clear()
        if self._unsaved:
            self._save_progress()

    # ------------------------------------------------------------------ internals
    def _save_progress(self) -> None:
        doc = {
            "version": PROGRESS_VERSION,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "next_pack_writer": self._next_pack_writer,
            "tensors": {n: r.to_json() for n, r in sorted(self._done.items())},
        }
        self.storage.put(f"{self._prefix}/{PROGRESS_NAME}", json.dumps(doc).encode())
        self._unsaved = False

    def _verify(self, rec: TensorRecord) -> bool:
        """Whether every chunk of ``rec`` is stored with its recorded length and CRC32C."""
        try:
            if not rec.packed and rec.chunks:
                self.storage.get(f"{self._prefix}/{rec.name}/zarr.json")
            for c in rec.chunks:
                key = f"{self._prefix}/{c.object}"
                data = self.storage.get_range(key, c.offset, c.offset + c.length)
                if len(data) != c.length or crc32c(data) != c.crc32c:
                    return False
        except ObjectNotFoundError:
            return False
        grid = ChunkGrid(rec.shape, rec.chunk_shape)
        want = set(grid.indices()) if math.prod(rec.shape) else set()
        return {c.index for c in rec.chunks} == want


def _refuse_committed(storage: Storage, step: int) -> None:
    if commit_mod.is_committed(storage, step):
        raise CommitConflictError(
            f"step {step} is already committed in {storage.url}; a committed checkpoint is "
            "never overwritten: write another step, or delete it first"
        )


def parse_progress(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != PROGRESS_VERSION:
            raise ValueError("unknown progress version")
        doc["fingerprint"] = str(doc["fingerprint"])
        int(doc["next_pack_writer"])
        if not isinstance(doc["tensors"], dict):
            raise ValueError("tensors is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where}: progress sidecar is corrupt ({e}); delete it") from e
    return doc
