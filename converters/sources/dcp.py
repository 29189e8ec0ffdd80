"""Source: a PyTorch Distributed Checkpoint directory (``.metadata`` + ``__R_N.distcp``).

Tensors are enumerated from ``FileSystemReader.read_metadata()`` and read one at a time
with ``torch.distributed.checkpoint.load`` into a pre-allocated tensor (no process group:
``no_dist=True``); DCP assembles tensors saved as shards by several ranks. Peak memory
per tensor is about 2x its size (DCP's ``torch.load`` of the stored item, then the copy).
Non-tensor entries (pickled objects DCP stores as bytes) are not converted; they are
listed as skipped. Note that DCP's own ``.metadata`` is a pickle that DCP unpickles:
convert only DCP checkpoints you trust.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any

import torch

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    InventorySource,
    SourceNotFoundError,
    TensorInfo,
    check_read,
)
from ckptd.dtypes import dtype_name, torch_dtype

METADATA_NAME = markers.DCP_METADATA


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class CachedReader(FileSystemReader):
        """Reads (unpickles) ``.metadata`` once, not once per tensor loaded."""

        _cached: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if self._cached is None:
                self._cached = super().read_metadata(*args, **kwargs)
            return self._cached

    return CachedReader


class DCPSource(InventorySource):
    """Reads a DCP checkpoint directory written by any number of ranks."""

    format = "dcp"

    def __init__(self, path: str, step: int | None = None, workers: int = 4) -> None:
        super().__init__(path, step, workers)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not os.path.isfile(os.path.join(path, METADATA_NAME)):
            raise SourceNotFoundError(f"{path}: no DCP checkpoint ({METADATA_NAME} is missing)")
        self._reader = _reader_class()(path)
        md = self._reader.read_metadata()
        for fqn, item in md.state_dict_metadata.items():
            if isinstance(item, TensorStorageMetadata):
                shape = tuple(int(s) for s in item.size)
                self._infos[fqn] = TensorInfo(fqn, dtype_name(item.properties.dtype), shape)
            else:
                self._skipped.append(fqn)

    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_dcp(path)

    def read(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        info = self._infos[name]
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group" and deprecation notes
            dcp.load({name: out}, storage_reader=self._reader, no_dist=True)
        return check_read(info, out, self.path)

    def fingerprint(self) -> str:
        files = [os.path.join(self.path, METADATA_NAME)]
        files += sorted(glob.glob(os.path.join(glob.escape(self.path), "*.distcp")))
        return "dcp:" + "|".join(
            f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in files
        )
