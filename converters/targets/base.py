"""What every conversion target provides: a pure output layout, then a streaming write.

Call order (the executor in :mod:`ckptd.converters.convert`)::

    t = TargetClass(path, options)
    layout = t.layout(tensors)            # pure: which output holds each tensor
    t.existing(fingerprint)               # ABSENT / COMPLETE / RESUMABLE / OTHER
    t.clear()                             # only with --overwrite
    t.write(tensors, layout, fetch, on_done, fingerprint=..., state=..., provenance=...)

``write`` pulls each tensor with ``fetch(name)`` (one at a time: the caller's memory
bound), or streams its raw bytes in pieces with ``fetch.range(name, start, out)``,
calls ``on_done(name, nbytes, resumed)`` once per tensor after it is durable, writes its
commit marker last, and leaves an interrupted output resumable where the format allows.
"""

from __future__ import annotations

import enum
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ckptd.converters.sources.base import PlanError, SourceState, TensorInfo
from ckptd.formats.posix_io import fsync_dir

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch


class Fetch(Protocol):
    """How a target pulls tensor data from the executor (which owns the source)."""

    def __call__(self, name: str) -> torch.Tensor:
        """The whole target tensor ``name`` (hold at most one at a time)."""
        ...

    def range(self, name: str, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + out.nbytes)`` of ``name``'s raw data (its dtype,
        row-major, little-endian) into ``out``; ask for one tensor's ranges in order,
        before the next tensor's (one short sample range may come first: it does not
        reach the tensor's end, where a source that read the tensor whole drops it)."""
        ...

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """Hint that bytes ``[start, start + nbytes)`` of ``name`` are asked for next."""
        ...


OnDone = Callable[[str, int, bool], None]
COMPLETE_MARKER = ".ckpt-convert-complete"
PROGRESS_NAME = ".ckpt-convert-progress.json"


@dataclass(frozen=True)
class TargetOptions:
    """Target tunables (all part of the plan's fingerprint)."""

    step: int = 0  # universal: the step written
    max_shard_size: int = 5_000_000_000  # hf: bytes per shard file
    workers: int = 4  # universal: chunk encode/put threads
    codec: str = "auto"  # universal: codec policy
    dcp_bucket_bytes: int = 256 << 20  # dcp: tensors per .distcp file (memory bound)
    variables: tuple[tuple[str, int], ...] = ()  # spec-driven targets: model variables
    target_layout: tuple[tuple[str, int], ...] = ()  # spec-driven targets: tp, pp, ...
    spec: str | None = None  # spec-driven targets: shipped spec name or path


@dataclass(frozen=True)
class TargetLayout:
    """Where each target tensor goes, and every output in write order (marker last)."""

    assignment: tuple[tuple[str, str], ...]  # (target tensor name, output name)
    outputs: tuple[str, ...]

    def output_of(self) -> dict[str, str]:
        return dict(self.assignment)


@dataclass(frozen=True)
class WriteOutcome:
    """What a write did: bytes put, and tensors skipped because they were verified."""

    bytes_written: int
    resumed: tuple[str, ...]


class Existing(enum.Enum):
    """What the destination holds before a conversion."""

    ABSENT = "absent"  # nothing of ours or any checkpoint
    COMPLETE = "complete"  # a finished checkpoint: needs --overwrite
    RESUMABLE = "resumable"  # our interrupted conversion of the same plan
    OTHER = "other"  # another checkpoint or another interrupted conversion


class Target(ABC):
    """A destination format (see the module docstring)."""

    format: ClassVar[str]

    def __init__(self, path: str, options: TargetOptions) -> None:
        self.path = path
        self.options = options

    def validate_name(self, name: str) -> None:
        """Raise :class:`PlanError` if ``name`` cannot name a tensor in this format."""
        if not name or "\x00" in name:
            raise PlanError(f"target tensor name {name!r} is empty or contains NUL")

    @abstractmethod
    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        """Assign every tensor an output (pure; no I/O)."""

    @abstractmethod
    def existing(self, fingerprint: str) -> Existing:
        """Inspect the destination (read only)."""

    @abstractmethod
    def clear(self) -> None:
        """Remove what a conversion to this destination writes (``--overwrite``)."""

    @abstractmethod
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
        """Write every tensor (resuming a matching interrupted write), then commit."""


def local_path(path: str, what: str) -> str:
    """A local directory path (``file://`` stripped); remote URLs are refused."""
    if "://" in path and not path.startswith("file://"):
        raise PlanError(f"the {what} target writes local directories only, got {path!r}")
    return path.removeprefix("file://")


def remove_outputs(
    directory: str,
    names: Sequence[str] = (),
    patterns: Sequence[str] = (),
    dirs: Sequence[str] = (),
) -> None:
    """Delete what a target wrote in ``directory`` (files by name or glob, whole sub-
    directories), then fsync it; nothing else there is touched (``--overwrite``)."""
    import glob
    import shutil

    if not os.path.isdir(directory):
        return
    doomed = [os.path.join(directory, n) for n in names]
    for pat in patterns:
        doomed += glob.glob(os.path.join(glob.escape(directory), pat))
    for p in doomed:
        if os.path.isfile(p):
            os.unlink(p)
    for sub in dirs:
        full = os.path.join(directory, sub)
        if os.path.isdir(full):
            shutil.rmtree(full)
    fsync_dir(directory)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` via a fsync'd temp file and a rename (readers never see a part)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_progress(d: str, key: str) -> dict[str, Any] | None:
    """The progress record of an interrupted conversion into directory ``d`` (the JSON
    object in ``PROGRESS_NAME`` whose ``key`` maps output names to what was made
    durable), or None if there is none or it is unreadable (then nothing is resumed)."""
    try:
        with open(os.path.join(d, PROGRESS_NAME)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) and isinstance(doc.get(key), dict) else None
    except (OSError, ValueError):
        return None
