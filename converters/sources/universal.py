"""Source: the ckptd universal format (a root with committed steps, or one step dir)."""

from __future__ import annotations

import os

import torch

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    Source,
    SourceNotFoundError,
    SourceState,
    TensorInfo,
    read_range_by_boxes,
)
from ckptd.errors import NotCommittedError
from ckptd.formats import commit as commit_mod
from ckptd.formats.storage import Storage, open_storage
from ckptd.formats.universal_reader import UniversalReader


def split_step_dir(path: str) -> tuple[str, int | None]:
    """``ROOT/step-000000042`` -> (``ROOT``, 42); any other path -> (path, None)."""
    trimmed = path.rstrip("/")
    head, tail = os.path.split(trimmed) if "://" not in trimmed else trimmed.rsplit("/", 1)
    step = commit_mod.parse_step_dir(tail)
    return (head or ".", step) if step is not None else (path, None)


class UniversalSource(Source):
    """Reads a committed step; ``--step`` (or a step directory as SRC) picks which."""

    format = "universal"

    def __init__(self, path: str, step: int | None = None, workers: int = 4) -> None:
        super().__init__(path, step, workers)
        root, dir_step = split_step_dir(path)
        if dir_step is not None and step is not None and step != dir_step:
            raise SourceNotFoundError(f"{path} is step {dir_step}, but --step {step} was asked")
        self._storage: Storage = open_storage(root)
        try:
            self._reader = UniversalReader.open(
                self._storage, dir_step if step is None else step, workers
            )
        except NotCommittedError as e:
            self._storage.close()
            raise SourceNotFoundError(str(e)) from e

    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_universal(path)

    @property
    def step(self) -> int:
        return self._reader.step

    @property
    def reader(self) -> UniversalReader:
        return self._reader

    def tensors(self) -> list[TensorInfo]:
        m = self._reader.manifest
        return [TensorInfo(n, m.tensors[n].dtype, m.tensors[n].shape) for n in self._reader.names()]

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(name)

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Only the chunks under the range are read (the boxes of its flat range)."""
        m = self._reader.meta(name)
        info = TensorInfo(name, m.dtype, tuple(m.shape))
        read_range_by_boxes(info, lambda box: self._reader.read_box(name, box), start, out)

    def fingerprint(self) -> str:
        marker = commit_mod.read_marker(self._storage, self.step)
        return f"universal:{self._storage.url}:{self.step}:{marker.get('manifest_crc32c')}"

    def source_state(self) -> SourceState:
        m = self._reader.manifest
        return SourceState(dict(m.state), dict(m.per_rank_state), dict(m.rng))

    def close(self) -> None:
        self._storage.close()
