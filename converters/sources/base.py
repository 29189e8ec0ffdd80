"""What every checkpoint source gives the converter: an inventory, then tensors on demand.

A source is opened from a path, lists its logical tensors up front (names, dtypes,
global shapes: the *source layout* the planner needs) without reading any tensor data,
and then reads one whole tensor at a time, in any order, when the executor asks for it.
The executor holds at most one tensor from a source at a time (bounded memory), so a
source must not keep references to tensors it returned.

A streaming target (Hugging Face safetensors) asks instead for byte ranges of a tensor's
raw data (:meth:`Source.read_range`), window by window, so that no whole tensor is held:
sources whose files store a tensor's bytes as they are (safetensors, DeepSpeed flat
partitions) read just that range; chunked or sharded ones (universal, Megatron) read the
boxes the range covers; the default reads the whole tensor once and keeps it until its
last byte was asked for.

The errors of the converter live here too, since sources and targets both raise them.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ckptd.dtypes import itemsize_of, torch_dtype
from ckptd.errors import CkptError
from ckptd.fragments import Box, flat_range_to_boxes

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

Shape = tuple[int, ...]


class ConvertError(CkptError):
    """Base class of the errors of ``ckpt-convert``."""


class SourceNotFoundError(ConvertError, FileNotFoundError):
    """The source path does not exist or holds no checkpoint."""


class SourceFormatError(ConvertError, ValueError):
    """A source file is malformed (its message names the file and, if any, the tensor)."""


class FormatDetectionError(ConvertError, ValueError):
    """The source format could not be told from its markers; pass ``--from``."""


class TargetExistsError(ConvertError, FileExistsError):
    """The destination already holds a checkpoint; pass ``--overwrite`` to replace it."""


class PlanError(ConvertError, ValueError):
    """The conversion cannot be planned (name clash after renaming, invalid target name)."""


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor of a source or target: name, dtype name, global shape."""

    name: str
    dtype: str  # canonical torch dtype name (ckptd.dtypes)
    shape: Shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize_of(self.dtype)


@dataclass(frozen=True)
class SourceState:
    """Non-tensor content a source can carry over to a universal target."""

    state: dict[str, Any] = field(default_factory=dict)
    per_rank_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """An opened checkpoint to convert from (see the module docstring).

    Call order: ``tensors()`` (any number of times, cheap), then ``read(name)`` for
    each tensor to convert, then ``close()``. ``read`` returns a CPU tensor of exactly
    the listed dtype and shape that the caller owns.
    """

    format: ClassVar[str]

    def __init__(self, path: str, step: int | None, workers: int) -> None:
        self.path = path
        self.requested_step = step
        self.workers = workers
        self._range_cache: tuple[str, memoryview] | None = None  # see read_range

    @classmethod
    @abstractmethod
    def detect(cls, path: str) -> bool:
        """Whether ``path`` carries this format's markers (no tensor data is read)."""

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every logical tensor, in the order it is best read (file order)."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + out.nbytes)`` of tensor ``name``'s raw data into ``out``.

        The raw data is what safetensors stores: the tensor in its listed dtype, row-major,
        little-endian. Callers ask for consecutive ranges of one tensor before the next
        (a window writer). This default reads the whole tensor once and keeps it until
        its last byte was asked for (memory: one tensor, as for :meth:`read`); sources
        that can read a part override it.
        """
        cached = self._range_cache
        if cached is None or cached[0] != name:
            self._range_cache = None  # drop the previous tensor before reading the next
            self._range_cache = cached = (name, raw_bytes(self.read(name)))
        raw = cached[1]
        end = start + out.nbytes
        if not 0 <= start <= end <= raw.nbytes:
            raise PlanError(f"byte range [{start}, {end}) outside tensor {name!r}")
        out[:] = raw[start:end]
        if end == raw.nbytes:
            self._range_cache = None

    def prefetch(self, name: str, start: int, nbytes: int) -> None:  # noqa: B027
        """Hint: bytes ``[start, start + nbytes)`` of ``name`` will be asked for next.

        Sources that read file ranges start reading them in the background (kernel
        readahead), so that the read of the next window overlaps the current one. The
        default does nothing; a hint never fails a conversion.
        """

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes when the source's content may have changed."""

    @property
    def step(self) -> int | None:
        """The training step the source holds, if it records one."""
        return None

    def skipped(self) -> list[str]:
        """Entries that are not converted (non-tensor objects), for the plan."""
        return []

    def source_state(self) -> SourceState:
        """Trainer state, per-rank state and RNG states (universal sources only)."""
        return SourceState()

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release handles."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_read(info: TensorInfo, t: torch.Tensor, where: str) -> torch.Tensor:
    """Fail if a tensor read back does not have the dtype and shape its header promised."""
    from ckptd.dtypes import dtype_name

    if dtype_name(t.dtype) != info.dtype or tuple(t.shape) != info.shape:
        raise SourceFormatError(
            f"{where}: tensor {info.name!r} read as {dtype_name(t.dtype)}{list(t.shape)}, "
            f"its metadata says {info.dtype}{list(info.shape)}"
        )
    return t


def raw_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a CPU tensor, without a copy if it is contiguous."""
    if sys.byteorder != "little":
        raise SourceFormatError("ckpt-convert reads and writes raw tensor bytes little-endian")
    import torch

    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def advise_willneed(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to read ``nbytes`` of ``fd`` from ``offset`` in the background.

    Measured on a cold page cache here: reading 640 MiB of DeepSpeed partitions in
    16 MiB ``preadv`` calls took 0.97-1.06 s, 0.72-0.81 s with the next window advised
    while the current one is read. Only a hint: errors are ignored.
    """
    # AttributeError: no posix_fadvise (macOS); OSError: a file that refuses advice.
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)


def read_range_by_boxes(
    info: TensorInfo, read_box: Callable[[Box], torch.Tensor], start: int, out: memoryview
) -> None:
    """:meth:`Source.read_range` for a source that reads regions (boxes) of a tensor.

    The byte range is widened to whole elements, split into at most ``2 * ndim - 1``
    boxes of the row-major flattening (partial row, whole rows, partial row), each box
    read with ``read_box`` and its bytes copied into ``out``: memory is about twice the
    range, never the whole tensor.
    """
    size = itemsize_of(info.dtype)
    end = start + out.nbytes
    if not 0 <= start <= end <= info.nbytes:
        raise PlanError(f"byte range [{start}, {end}) outside tensor {info.name!r}")
    if end == start:
        return
    import torch

    first, last = start // size, -(-end // size)
    part = torch.empty(last - first, dtype=torch_dtype(info.dtype))
    for off, box in flat_range_to_boxes(info.shape, first, last):
        part[off : off + box.numel].copy_(read_box(box).reshape(-1))
    skip = start - first * size
    out[:] = raw_bytes(part)[skip : skip + out.nbytes]


class InventorySource(Source):
    """A source that lists its tensors once when opened.

    Subclasses fill ``_infos`` (name -> :class:`TensorInfo`, in read order) and
    ``_skipped`` (entries that are not converted) in their constructor.
    """

    def __init__(self, path: str, step: int | None, workers: int) -> None:
        super().__init__(path, step, workers)
        self._infos: dict[str, TensorInfo] = {}
        self._skipped: list[str] = []

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def skipped(self) -> list[str]:
        return list(self._skipped)
