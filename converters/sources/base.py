"""What every checkpoint source gives the converter: an inventory, then tensors on demand.

A source is opened from a path, lists its logical tensors up front (names, dtypes,
global shapes: the *source layout* the planner needs) without reading any tensor data,
and then reads one whole tensor at a time, in any order, when the executor asks for it.
The executor holds at most one tensor from a source at a time (bounded memory), so a
source must not keep references to tensors it returned.

The errors of the converter live here too, since sources and targets both raise them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ckptd.dtypes import itemsize_of
from ckptd.errors import CkptError

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
