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
partial checkpoint; ``.ckpt-convert-complete`` follows it. Not resumable per tensor:
DCP's metadata is only produced by a complete ``dcp.save``, so an interrupted DCP
conversion is restarted from scratch (its files are replaced).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

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
        self.clear()  # an interrupted DCP conversion restarts from scratch
        os.makedirs(d, exist_ok=True)
        atomic_write(
            os.path.join(d, PROGRESS_NAME), json.dumps({"fingerprint": fingerprint}).encode()
        )
        infos = {t.name: t for t in tensors}
        state_dict = {
            t.name: torch.empty(t.shape, dtype=torch_dtype(t.dtype), device="meta") for t in tensors
        }
        planner = _planner_class()(fetch, on_done, infos)
        writer = _writer_class()(d, layout.output_of(), single_file_per_rank=True, thread_count=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group", overwrite notes
            dcp.save(state_dict, storage_writer=writer, planner=planner, no_dist=True)
        atomic_write(os.path.join(d, COMPLETE_MARKER), json.dumps(provenance).encode() + b"\n")
        os.unlink(os.path.join(d, PROGRESS_NAME))
        written = sum(os.path.getsize(os.path.join(d, f)) for f in layout.outputs[:-1])
        return WriteOutcome(written, ())


def _planner_class() -> type:
    from torch.distributed.checkpoint import DefaultSavePlanner

    class _StreamingPlanner(DefaultSavePlanner):  # type: ignore[misc,valid-type]
        """Produces each tensor from the source when DCP's writer asks for it."""

        def __init__(self, fetch: Fetch, on_done: OnDone, infos: dict[str, TensorInfo]) -> None:
            super().__init__()
            self._fetch, self._on_done, self._infos = fetch, on_done, infos

        def resolve_data(self, write_item: Any) -> Any:
            name = write_item.index.fqn
            tensor = self._fetch(name)
            self._on_done(name, self._infos[name].nbytes, False)
            return tensor

    return _StreamingPlanner


def _writer_class() -> type:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.futures import Future

    class _BucketedWriter(FileSystemWriter):  # type: ignore[misc,valid-type]
        """One ``.distcp`` file per planned bucket, written one bucket at a time."""

        def __init__(self, path: str, output_of: dict[str, str], **kw: Any) -> None:
            super().__init__(path, **kw)
            self._output_of = output_of

        def write_data(self, plan: Any, planner: Any) -> Any:
            groups: dict[str, list[Any]] = {}
            for item in plan.items:
                groups.setdefault(self._output_of[item.index.fqn], []).append(item)
            results: list[Any] = []
            for fname, items in groups.items():
                prefix = fname.removesuffix("0.distcp")  # "__0_<i>_" + "0.distcp"
                sub = dataclasses.replace(
                    plan,
                    items=items,
                    storage_data=dataclasses.replace(plan.storage_data, prefix=prefix),
                )
                results += super().write_data(sub, planner).wait()
            fut: Future[list[Any]] = Future()
            fut.set_result(results)
            return fut

    return _BucketedWriter
