"""Target: Hugging Face safetensors, sharded with ``model.safetensors.index.json``.

Shards are filled greedily in plan order up to ``max_shard_size`` (a larger tensor gets
a shard of its own), as ``transformers`` does; one shard is ``model.safetensors`` with
no index. A safetensors file is its header and then every tensor's raw bytes at offsets
the header gives, so the whole file is known from the plan: each shard is written into
``.<name>.partial`` as consecutive windows of ``WINDOW_BYTES`` (the header and the pieces
of the tensors under each window, read from the source straight into an aligned buffer
with :meth:`Fetch.range`, written with ``O_DIRECT`` by :mod:`.windows` on
:func:`writer_threads` threads (``--workers N``: ``N // 2``) while the next window is
read; the file is allocated up front). No tensor is ever held whole: memory
is a few windows. Then the shard is cut to its size, fdatasync'd and renamed; the index
is written once every shard is renamed, then the marker ``.ckpt-convert-complete``.

Durability is batched: after every ``SYNC_BYTES`` of a shard (and at its end) the shard
is fdatasync'd once and the sidecar ``.ckpt-convert-progress.json`` records the
CRC32C of each window written so far; only then are the tensors that lie wholly in
those windows reported done. A crash loses at most one batch.

Resume: a rerun of the same plan verifies the recorded windows of each shard (finished
or partial) against the bytes on disk, keeps the verified prefix, reports the tensors
wholly inside it as resumed, and rewrites from the first window that is missing or does
not match. A shard whose every window verifies and whose file has its final size was
synced completely (the last batch is recorded only after the file is cut to its size
and fdatasync'd): it is only renamed if the rename was interrupted.
"""

from __future__ import annotations

import bisect
import functools
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import crc32c as _crc

from ckptd.converters.sources.base import SourceState, TensorInfo, raw_bytes
from ckptd.converters.sources.safetensors_header import build_header
from ckptd.converters.targets.base import (
    COMPLETE_MARKER,
    PROGRESS_NAME,
    Existing,
    Fetch,
    OnDone,
    Target,
    TargetLayout,
    WriteOutcome,
    atomic_write,
    fsync_dir,
    local_path,
    remove_outputs,
)
from ckptd.converters.targets.windows import WindowWriter

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Window and batch sizes. Module constants (read at each write) rather than options:
# they tune speed and memory, not the output; the sidecar records the window size, and
# a resume with another size starts the shard over. Tests shrink them.
WINDOW_BYTES = 16 << 20  # 3 windows in flight: ~48 MiB, whatever the tensor sizes
SYNC_BYTES = 256 << 20  # one fdatasync + sidecar update per this many bytes of a shard
PROGRESS_VERSION = 2
MAX_WRITERS = 8  # writer threads at most, whatever --workers says (memory: writers + 1 windows)


def writer_threads(workers: int) -> int:
    """Writer threads for ``--workers N``: ``N // 2`` (at least 1, at most
    :data:`MAX_WRITERS`). The default ``--workers 4`` gives the two writers this target
    was measured with; ``--workers 1`` writes on one thread (slow disks, shared hosts).
    The other half of the workers is the reading side: the calling thread fills the
    next window while the writers write, and the kernel reads ahead on the source files
    (``Fetch.prefetch``)."""
    return max(1, min(MAX_WRITERS, workers // 2))


def shard_tensors(tensors: Sequence[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy sharding in order: start a new shard when the next tensor would overflow."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards, as ``transformers`` names them."""
    return (
        [SINGLE_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a CPU tensor without a copy (if it is contiguous)."""
    return raw_bytes(t)


@dataclass(frozen=True)
class _Extent:
    """Bytes ``[offset, offset + nbytes)`` of a shard hold tensor ``name`` (None: header)."""

    name: str | None
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class _ShardFile:
    """The bytes of one shard, known from the plan: the header, then every tensor."""

    header: bytes
    extents: tuple[_Extent, ...]  # the header's first, then one per tensor, in file order
    starts: tuple[int, ...]  # each extent's offset (for bisection)

    @classmethod
    def build(cls, group: Sequence[TensorInfo], meta: dict[str, str]) -> _ShardFile:
        """Lay out ``group`` (in order) behind its header."""
        header, offsets = build_header(list(group), meta)
        tensors = [_Extent(t.name, off, t.nbytes) for t, off in zip(group, offsets)]
        extents = (_Extent(None, 0, len(header)), *tensors)
        return cls(header, extents, tuple(e.offset for e in extents))

    @property
    def size(self) -> int:
        return self.extents[-1].end

    def tensor_end(self, i: int) -> int:
        """Where the ``i``-th tensor's bytes end."""
        return self.extents[1 + i].end

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[_Extent, int, int]]:
        """The extents under file bytes ``[lo, hi)``, each with its part ``[a, b)`` there."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.extents) and self.extents[i].offset < hi:
            e = self.extents[i]
            a, b = max(lo, e.offset), min(hi, e.end)
            if a < b:
                yield e, a, b
            i += 1


class HFTarget(Target):
    """Writes a directory of safetensors shards with an index (see module docstring)."""

    format = "hf"

    def _dir(self) -> str:
        return local_path(self.path, "hf")

    def _shards(self, tensors: Sequence[TensorInfo]) -> list[tuple[str, list[TensorInfo]]]:
        groups = shard_tensors(tensors, self.options.max_shard_size)
        return list(zip(shard_names(len(groups)), groups))

    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        shards = self._shards(tensors)
        assignment = tuple((t.name, f) for f, group in shards for t in group)
        outputs = [f for f, _ in shards]
        if len(shards) > 1:
            outputs.append(INDEX_NAME)
        return TargetLayout(assignment, (*outputs, COMPLETE_MARKER))

    def existing(self, fingerprint: str) -> Existing:
        d = self._dir()
        if os.path.exists(d) and not os.path.isdir(d):
            return Existing.OTHER
        if os.path.isfile(os.path.join(d, COMPLETE_MARKER)):
            return Existing.COMPLETE
        progress = _load_progress(d)
        if progress is not None:
            same = progress.get("fingerprint") == fingerprint
            return Existing.RESUMABLE if same else Existing.OTHER
        ours = glob.glob(os.path.join(glob.escape(d), "*.safetensors"))
        ours += glob.glob(os.path.join(glob.escape(d), "*.safetensors.index.json"))
        return Existing.OTHER if ours else Existing.ABSENT

    def clear(self) -> None:
        remove_outputs(
            self._dir(),
            names=(COMPLETE_MARKER, PROGRESS_NAME),
            patterns=("*.safetensors", "*.safetensors.index.json", ".*.safetensors.partial"),
        )

    def write(
        self,
        tensors: Sequence[TensorInfo],
        layout: TargetLayout,
        fetch: Fetch,
        on_done: OnDone,
        *,
        fingerprint: str,
        state: SourceState,
        provenance: dict[str, Any],
    ) -> WriteOutcome:
        d = self._dir()
        os.makedirs(d, exist_ok=True)
        progress = _load_progress(d)
        if progress is None or progress.get("fingerprint") != fingerprint:
            progress = {"version": PROGRESS_VERSION, "fingerprint": fingerprint, "shards": {}}
        meta = {"format": "pt"}
        writer = _ShardWriter(d, progress, fetch, on_done, writer_threads(self.options.workers))
        shards = self._shards(tensors)
        for fname, group in shards:
            writer.shard(fname, group, meta)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": {t: f for t, f in layout.assignment},
            }
            atomic_write(os.path.join(d, INDEX_NAME), json.dumps(index, indent=2).encode())
        atomic_write(os.path.join(d, COMPLETE_MARKER), json.dumps(provenance).encode() + b"\n")
        os.unlink(os.path.join(d, PROGRESS_NAME))
        return WriteOutcome(writer.bytes_written, tuple(writer.resumed))


class _ShardWriter:
    """Streams shards window by window and keeps the progress sidecar (module docstring)."""

    def __init__(
        self, d: str, progress: dict[str, Any], fetch: Fetch, on_done: OnDone, writers: int = 2
    ) -> None:
        self.d, self.progress, self.fetch, self.on_done = d, progress, fetch, on_done
        self.writers = writers
        self.bytes_written = 0
        self.resumed: list[str] = []

    def _save(self) -> None:
        atomic_write(os.path.join(self.d, PROGRESS_NAME), json.dumps(self.progress).encode())

    def shard(self, fname: str, group: list[TensorInfo], meta: dict[str, str]) -> None:
        """Write (or finish, or verify) shard ``fname`` holding ``group`` in order."""
        window = WINDOW_BYTES
        final = os.path.join(self.d, fname)
        partial = os.path.join(self.d, f".{fname}.partial")
        sf = _ShardFile.build(group, meta)
        windows = -(-sf.size // window)
        crcs = self._verified(fname, final, partial, sf.size, window)
        if len(crcs) == windows:
            path = final if os.path.isfile(final) else partial
            if os.path.getsize(path) == sf.size:  # the last batch was synced and recorded
                if path == partial:  # interrupted between that and the rename
                    os.replace(partial, final)
                    fsync_dir(self.d)
                self._report(group, sf, 0, sf.size, resumed=True)
                return
            crcs.pop()  # not cut to its size: rewrite the last window
        if os.path.isfile(final):  # a finished shard that no longer verifies: redo its tail
            os.replace(final, partial)
        reported = self._report(group, sf, 0, len(crcs) * window, resumed=True)
        # One window more than writers: each writer has one to write while the calling
        # thread fills the next (3 windows with the default two writers, as before).
        with WindowWriter(
            partial,
            window,
            truncate=not crcs,
            size=sf.size,
            depth=self.writers + 1,
            writers=self.writers,
        ) as w:
            unsynced = 0
            for k in range(len(crcs), windows):
                lo, hi = k * window, min(sf.size, (k + 1) * window)
                # The source reads the next window in the background while this one is
                # filled (kernel readahead on the source files) and the previous written.
                self._prefetch(sf, hi, min(sf.size, hi + window))
                w.put(k, hi - lo, functools.partial(self._fill, sf, lo=lo))
                self.bytes_written += hi - lo
                unsynced += hi - lo
                last = k == windows - 1
                if unsynced < SYNC_BYTES and not last:
                    continue
                written = w.drain()
                crcs += [written[j] for j in range(len(crcs), k + 1)]
                w.sync(sf.size if last else None)
                unsynced = 0
                rec = {"size": sf.size, "window": window, "windows": crcs}
                self.progress["shards"][fname] = rec
                self._save()
                if not last:
                    reported = self._report(group, sf, reported, hi)
        os.replace(partial, final)
        fsync_dir(self.d)
        self._report(group, sf, reported, sf.size)

    def _fill(self, sf: _ShardFile, view: memoryview, lo: int) -> None:
        """Window bytes ``[lo, lo + view.nbytes)`` of the shard: header and tensor pieces."""
        for e, a, b in sf.pieces(lo, lo + view.nbytes):
            if e.name is None:
                view[a - lo : b - lo] = sf.header[a:b]
            else:
                self.fetch.range(e.name, a - e.offset, view[a - lo : b - lo])

    def _prefetch(self, sf: _ShardFile, lo: int, hi: int) -> None:
        for e, a, b in sf.pieces(lo, hi):
            if e.name is not None:
                self.fetch.prefetch(e.name, a - e.offset, b - a)

    def _report(
        self,
        group: list[TensorInfo],
        sf: _ShardFile,
        first: int,
        durable: int,
        resumed: bool = False,
    ) -> int:
        """Report ``group[first:]``'s tensors that end by byte ``durable``; returns the
        index of the first tensor not reported."""
        n = first
        while n < len(group) and sf.tensor_end(n) <= durable:
            if resumed:
                self.resumed.append(group[n].name)
            self.on_done(group[n].name, group[n].nbytes, resumed)
            n += 1
        return n

    def _verified(self, fname: str, final: str, partial: str, size: int, window: int) -> list[int]:
        """The recorded window CRCs of ``fname`` that the bytes on disk still match (a
        prefix); empty if nothing is recorded for this layout."""
        rec = self.progress["shards"].get(fname)
        if not isinstance(rec, dict) or rec.get("size") != size or rec.get("window") != window:
            return []
        want = rec.get("windows")
        path = final if os.path.isfile(final) else partial
        if not isinstance(want, list) or not os.path.isfile(path):
            return []
        ok: list[int] = []
        buf = bytearray(min(window, size))
        with open(path, "rb", buffering=0) as f:
            for k, crc in enumerate(want):
                n = min(window, size - k * window)
                if n <= 0:
                    break
                view = memoryview(buf)[:n]
                got = 0
                while got < n:
                    r = os.preadv(f.fileno(), [view[got:]], k * window + got)
                    if r <= 0:
                        break
                    got += r
                if got != n or _crc.crc32c(view) != crc:
                    break
                ok.append(crc)
        return ok


def _load_progress(d: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(d, PROGRESS_NAME)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) and isinstance(doc.get("shards"), dict) else None
    except (OSError, ValueError):
        return None
