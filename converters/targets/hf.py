"""Target: Hugging Face safetensors, sharded with ``model.safetensors.index.json``.

Shards are filled greedily in plan order up to ``max_shard_size`` (a larger tensor gets
a shard of its own), as ``transformers`` does; one shard is ``model.safetensors`` with
no index. Each shard is streamed tensor by tensor into ``.<name>.partial`` (the header
is known from the plan, so it is written first), fsync'd, and renamed; the index is
written after every shard, then the marker ``.ckpt-convert-complete``.

Resume: the sidecar ``.ckpt-convert-progress.json`` records, after each tensor is
fsync'd, its CRC32C (and, per finished shard, the file's CRC32C). A rerun verifies the
finished shards and the recorded tensors of the partial shard against those checksums,
truncates after the last verified tensor and continues from there.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import crc32c as _crc
import torch

from ckptd.converters.sources.base import SourceState, TensorInfo
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

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_READ_BLOCK = 64 << 20


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
    return (
        [SINGLE_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a CPU tensor without a copy (if it is contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


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
            progress = {"version": 1, "fingerprint": fingerprint, "shards": {}}
        meta = {"format": "pt"}
        writer = _ShardWriter(d, progress, fetch, on_done)
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
    """Streams shards and keeps the progress sidecar (see the module docstring)."""

    def __init__(self, d: str, progress: dict[str, Any], fetch: Fetch, on_done: OnDone) -> None:
        self.d, self.progress, self.fetch, self.on_done = d, progress, fetch, on_done
        self.bytes_written = 0
        self.resumed: list[str] = []

    def _save(self) -> None:
        atomic_write(os.path.join(self.d, PROGRESS_NAME), json.dumps(self.progress).encode())

    def shard(self, fname: str, group: list[TensorInfo], meta: dict[str, str]) -> None:
        final = os.path.join(self.d, fname)
        partial = os.path.join(self.d, f".{fname}.partial")
        rec = self.progress["shards"].get(fname, {})
        if rec.get("complete") and os.path.isfile(final) and _file_crc(final) == rec["crc32c"]:
            for t in group:
                self.resumed.append(t.name)
                self.on_done(t.name, t.nbytes, True)
            return
        header, offsets = build_header(group, meta)
        done = self._verified_prefix(partial, header, group, offsets, rec.get("tensors", {}))
        crcs: dict[str, int] = {t.name: rec["tensors"][t.name] for t in group[:done]}
        mode = "r+b" if done else "wb"
        with open(partial, mode) as f:
            if not done:
                f.write(header)
            crc = _crc.crc32c(header)
            if done:  # running CRC of the verified prefix, then cut what follows it
                f.seek(len(header))
                crc = _range_crc(f, len(header), offsets[done - 1] + group[done - 1].nbytes, crc)
            f.truncate(offsets[done - 1] + group[done - 1].nbytes if done else len(header))
            for t in group[:done]:
                self.resumed.append(t.name)
                self.on_done(t.name, t.nbytes, True)
            self.bytes_written += 0 if done else len(header)
            for t, off in zip(group[done:], offsets[done:]):
                tensor = self.fetch(t.name)
                data = tensor_bytes(tensor)
                f.seek(off)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                crcs[t.name] = _crc.crc32c(data)
                crc = _crc.crc32c(data, crc)
                self.bytes_written += len(data)
                del tensor, data
                self.progress["shards"][fname] = {"complete": False, "tensors": crcs}
                self._save()
                self.on_done(t.name, t.nbytes, False)
        os.replace(partial, final)
        fsync_dir(self.d)
        self.progress["shards"][fname] = {"complete": True, "crc32c": crc}
        self._save()

    def _verified_prefix(
        self,
        partial: str,
        header: bytes,
        group: list[TensorInfo],
        offsets: list[int],
        crcs: dict[str, int],
    ) -> int:
        """How many leading tensors of the partial shard are stored and match their CRC."""
        if not crcs or not os.path.isfile(partial):
            return 0
        with open(partial, "rb") as f:
            if f.read(len(header)) != header:
                return 0
            n = 0
            for t, off in zip(group, offsets):
                if t.name not in crcs or _range_crc(f, off, off + t.nbytes, 0) != crcs[t.name]:
                    break
                n += 1
        return n


def _range_crc(f: Any, start: int, end: int, crc: int) -> int:
    """CRC32C of bytes [start, end) of an open file, continued from ``crc``; -1 if short."""
    f.seek(start)
    pos = start
    while pos < end:
        block = f.read(min(_READ_BLOCK, end - pos))
        if not block:
            return -1
        crc = _crc.crc32c(block, crc)
        pos += len(block)
    return crc


def _file_crc(path: str) -> int:
    with open(path, "rb") as f:
        return _range_crc(f, 0, os.path.getsize(path), 0)


def _load_progress(d: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(d, PROGRESS_NAME)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) and isinstance(doc.get("shards"), dict) else None
    except (OSError, ValueError):
        return None
