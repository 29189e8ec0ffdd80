"""Target: a PyTorch DCP directory that ``torch.distributed.checkpoint.load`` reads.

One ``dcp.save`` call (no process group) writes one checkpoint, driven by DCP's public
extension points so that memory stays bounded:

- the state dict handed to ``dcp.save`` holds *meta* tensors (shape and dtype only);
- :class:`_StreamingPlanner` (a ``DefaultSavePlanner``) overrides ``resolve_data``, the
  documented hook that produces an item's data when the storage writer asks for it,
  to read the tensor from the source at that moment;
- :class:`_BucketedWriter` (a ``FileSystemWriter``) overrides ``write_data`` to write
  the items in buckets of at most ``dcp_bucket_bytes`` (one ``.distcp`` file each,
  ``__0_<bucket>_0.distcp``), because ``FileSystemWriter`` keeps every tensor of a file
  alive until that file is closed. Peak memory: one bucket or the largest tensor.

DCP writes ``.metadata`` last (temp name + rename), so a DCP reader never sees a
partial checkpoint; ``.ckpt-convert-complete`` follows it.

Resumable per bucket file. DCP's ``.metadata`` is built by ``finish`` from the
``WriteResult`` of every item (where each tensor lies: file, offset, length), so a file
written by an interrupted run can be reused only if its results are known. After each
bucket file is written and fsync'd, the sidecar ``.ckpt-convert-progress.json`` records
the file's size and CRC32C and its items' ``WriteResult`` fields (plain JSON, no
pickle); only then are its tensors reported done. A rerun of the same plan re-reads each
recorded file, and where size and CRC32C still match it hands DCP the recorded results
instead of writing the file (its tensors are never fetched: reported as resumed); any
other file is written again. A different plan over the sidecar starts from scratch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import crc32c as _crc
import torch

from ckptd.converters.sources.base import SourceState, TensorInfo
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
    load_progress,
    local_path,
    remove_outputs,
)
from ckptd.dtypes import torch_dtype

METADATA_NAME = ".metadata"


def buckets(tensors: Sequence[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor is alone)."""
    out: list[list[TensorInfo]] = []
    size = 0
    for t in tensors:
        if not out or (out[-1] and size + t.nbytes > max_bytes):
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out


def bucket_file(i: int) -> str:
    return f"__0_{i}_0.distcp"


class DCPTarget(Target):
    """Writes one DCP checkpoint directory (see the module docstring)."""

    format = "dcp"

    def _dir(self) -> str:
        return local_path(self.path, "dcp")

    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        groups = buckets(tensors, self.options.dcp_bucket_bytes)
        assignment = tuple((t.name, bucket_file(i)) for i, g in enumerate(groups) for t in g)
        files = tuple(bucket_file(i) for i in range(len(groups)))
        return TargetLayout(assignment, (*files, METADATA_NAME, COMPLETE_MARKER))

    def existing(self, fingerprint: str) -> Existing:
        d = self._dir()
        if os.path.exists(d) and not os.path.isdir(d):
            return Existing.OTHER
        if os.path.isfile(os.path.join(d, COMPLETE_MARKER)):
            return Existing.COMPLETE
        try:
            with open(os.path.join(d, PROGRESS_NAME)) as f:
                same = json.load(f).get("fingerprint") == fingerprint
            return Existing.RESUMABLE if same else Existing.OTHER
        except (OSError, ValueError, AttributeError):
            pass
        if os.path.isfile(os.path.join(d, METADATA_NAME)) or glob.glob(
            os.path.join(glob.escape(d), "*.distcp")
        ):
            return Existing.OTHER
        return Existing.ABSENT

    def clear(self) -> None:
        remove_outputs(
            self._dir(),
            names=(COMPLETE_MARKER, METADATA_NAME, PROGRESS_NAME),
            patterns=("*.distcp", ".metadata.tmp"),
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
        import torch.distributed.checkpoint as dcp

        d = self._dir()
        progress = load_progress(d, "files")
        if progress is None or progress.get("fingerprint") != fingerprint:
            self.clear()  # another plan's leftovers: start from scratch
            progress = {"version": 1, "fingerprint": fingerprint, "files": {}}
        os.makedirs(d, exist_ok=True)
        atomic_write(os.path.join(d, PROGRESS_NAME), json.dumps(progress).encode())
        infos = {t.name: t for t in tensors}
        state_dict = {
            t.name: torch.empty(t.shape, dtype=torch_dtype(t.dtype), device="meta") for t in tensors
        }
        planner = _planner_class()(fetch)
        writer = _writer_class()(
            d,
            layout.output_of(),
            _Progress(d, progress, infos, on_done),
            single_file_per_rank=True,
            thread_count=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group", overwrite notes
            try:
                dcp.save(state_dict, storage_writer=writer, planner=planner, no_dist=True)
            except dcp.CheckpointException as e:
                # DCP wraps whatever a step raised (BaseException included: an interrupt,
                # a source's typed error naming its file) per rank; there is one rank.
                # Re-raise the original so that callers see its type and message.
                failures = list(e.failures.values())
                if len(failures) == 1 and isinstance(failures[0], tuple):
                    raise failures[0][0] from None
                raise
        atomic_write(os.path.join(d, COMPLETE_MARKER), json.dumps(provenance).encode() + b"\n")
        os.unlink(os.path.join(d, PROGRESS_NAME))
        return WriteOutcome(writer.progress.bytes_written, tuple(writer.progress.resumed))



def _file_crc(path: str) -> tuple[int, int] | None:
    """(size, CRC32C) of ``path``, or None if it cannot be read."""
    crc, size = 0, 0
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                crc = _crc.crc32c(chunk, crc)
                size += len(chunk)
    except OSError:
        return None
    return size, crc


def _storage_info(rec: dict[str, Any]) -> Any:
    """DCP's ``_StorageInfo`` (where an item lies in a ``.distcp`` file) from a record."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    extra = {} if rec["td"] is None else {"transform_descriptors": list(rec["td"])}
    return _StorageInfo(str(rec["path"]), int(rec["off"]), int(rec["len"]), **extra)


class _Progress:
    """The sidecar of a DCP write: per finished bucket file, its size, CRC32C and the
    ``WriteResult`` fields of its items (see the module docstring)."""

    def __init__(
        self, d: str, doc: dict[str, Any], infos: dict[str, TensorInfo], on_done: OnDone
    ) -> None:
        self.d, self.doc, self.infos, self.on_done = d, doc, infos, on_done
        self.bytes_written = 0
        self.resumed: list[str] = []

    def reuse(self, fname: str, items: list[Any]) -> list[Any] | None:
        """The recorded results of ``fname`` if the file on disk still matches them and
        they cover exactly ``items``; None: the file must be written."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.storage import WriteResult

        rec = self.doc["files"].get(fname)
        if not isinstance(rec, dict) or not isinstance(rec.get("items"), list):
            return None
        if _file_crc(os.path.join(self.d, fname)) != (rec.get("size"), rec.get("crc")):
            return None
        try:
            results = [
                WriteResult(
                    index=MetadataIndex(r["fqn"], r["offset"], r["index"]),
                    size_in_bytes=int(r["size"]),
                    storage_data=_storage_info(r),
                )
                for r in rec["items"]
            ]
        except (KeyError, TypeError, ValueError):
            return None
        if sorted(r.index.fqn for r in results) != sorted(i.index.fqn for i in items):
            return None
        for r in results:
            name = r.index.fqn
            self.resumed.append(name)
            self.on_done(name, self.infos[name].nbytes, True)
        return results

    def record(self, fname: str, results: list[Any]) -> None:
        """``fname`` was written (and fsync'd by DCP's writer): make its entry durable,
        then report its tensors done."""
        fsync_dir(self.d)
        size_crc = _file_crc(os.path.join(self.d, fname))
        if size_crc is None:
            raise OSError(f"{os.path.join(self.d, fname)}: cannot read back what was written")
        items = []
        for r in results:
            sd = r.storage_data
            offset = r.index.offset
            td = getattr(sd, "transform_descriptors", None)  # newer torch only
            items.append(
                {
                    "fqn": r.index.fqn,
                    "offset": None if offset is None else [int(x) for x in offset],
                    "index": r.index.index,
                    "size": int(r.size_in_bytes),
                    "path": sd.relative_path,
                    "off": int(sd.offset),
                    "len": int(sd.length),
                    "td": None if td is None else [str(x) for x in td],
                }
            )
        self.doc["files"][fname] = {"size": size_crc[0], "crc": size_crc[1], "items": items}
        atomic_write(os.path.join(self.d, PROGRESS_NAME), json.dumps(self.doc).encode())
        self.bytes_written += size_crc[0]
        for r in results:
            self.on_done(r.index.fqn, self.infos[r.index.fqn].nbytes, False)


def _planner_class() -> type:
    from torch.distributed.checkpoint import DefaultSavePlanner

    class _StreamingPlanner(DefaultSavePlanner):
        """Produces each tensor from the source when DCP's writer asks for it."""

        def __init__(self, fetch: Fetch) -> None:
            super().__init__()
            self._fetch = fetch

        def resolve_data(self, write_item: Any) -> Any:
            return self._fetch(write_item.index.fqn)

    return _StreamingPlanner


def _writer_class() -> type:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.futures import Future

    class _BucketedWriter(FileSystemWriter):
        """One ``.distcp`` file per planned bucket, written one bucket at a time; a
        bucket file that an interrupted run wrote and recorded is reused."""

        def __init__(
            self, path: str, output_of: dict[str, str], progress: _Progress, **kw: Any
        ) -> None:
            super().__init__(path, **kw)
            self._output_of = output_of
            self.progress = progress

        def write_data(self, plan: Any, planner: Any) -> Any:
            groups: dict[str, list[Any]] = {}
            for item in plan.items:
                groups.setdefault(self._output_of[item.index.fqn], []).append(item)
            results: list[Any] = []
            for fname, items in groups.items():
                kept = self.progress.reuse(fname, items)
                if kept is not None:
                    results += kept
                    continue
                prefix = fname.removesuffix("0.distcp")  # "__0_<i>_" + "0.distcp"
                sub = dataclasses.replace(
                    plan,
                    items=items,
                    storage_data=dataclasses.replace(plan.storage_data, prefix=prefix),
                )
                written = super().write_data(sub, planner).wait()
                self.progress.record(fname, written)
                results += written
            fut: Future[list[Any]] = Future()
            fut.set_result(results)
            return fut

    return _BucketedWriter
