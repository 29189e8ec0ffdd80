"""Source: Hugging Face safetensors, one file or sharded with ``*.safetensors.index.json``.

Every file's header is validated by :func:`read_header` before anything is read. Data
is read lazily with ``safetensors.safe_open``: a handle maps its file, and pages touched
through it stay resident while the mapping lives, so large tensors get a handle of
their own (closed as soon as the tensor is dropped) and the shared handle that small
tensors are read through is reopened after every ``REOPEN_BYTES``. Small tensors are
copied out of the mapping so that they do not pin it.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import torch

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    PlanError,
    Source,
    SourceFormatError,
    SourceNotFoundError,
    TensorInfo,
    advise_willneed,
    check_read,
)
from ckptd.converters.sources.safetensors_header import HeaderEntry, read_header
from ckptd.dtypes import dtype_name

INDEX_SUFFIX = markers.HF_INDEX_SUFFIX
LARGE_BYTES = 16 << 20  # tensors at least this large get their own handle
REOPEN_BYTES = 128 << 20


class HFSource(Source):
    """Reads ``model.safetensors``, a directory of shards with an index, or the index."""

    format = "hf"

    def __init__(self, path: str, step: int | None = None, workers: int = 4) -> None:
        super().__init__(path, step, workers)
        self.files, index = _resolve_files(path)
        headers = {f: read_header(f) for f in self.files}
        self._entries: dict[str, tuple[str, HeaderEntry]] = {}
        wanted = None if index is None else index
        for f in self.files:
            for e in headers[f].entries:
                if wanted is not None and wanted.get(e.info.name) != os.path.basename(f):
                    continue
                if e.info.name in self._entries:
                    other = self._entries[e.info.name][0]
                    raise SourceFormatError(f"{f}: tensor {e.info.name!r} also appears in {other}")
                self._entries[e.info.name] = (f, e)
        for name, fname in (wanted or {}).items():
            if name not in self._entries:
                raise SourceFormatError(
                    f"{fname}: tensor {name!r} is listed in the index but not in the file"
                )
        self.metadata = headers[self.files[0]].metadata if self.files else {}
        self._shared: Any = None  # an open safetensors handle (safe_open is untyped)
        self._shared_file = ""
        self._shared_bytes = 0
        self._fds: dict[str, int] = {}  # for read_range / prefetch

    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_hf(path)

    def tensors(self) -> list[TensorInfo]:
        order = sorted(
            self._entries.values(), key=lambda fe: (self.files.index(fe[0]), fe[1].begin)
        )
        return [e.info for _, e in order]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, entry = self._entries[name]
        where = path
        try:
            if entry.info.nbytes >= LARGE_BYTES:
                with safe_open(path, framework="pt") as f:
                    t = f.get_tensor(name)
            else:
                if (
                    self._shared is None
                    or self._shared_file != path
                    or (self._shared_bytes >= REOPEN_BYTES)
                ):
                    self._close_shared()
                    self._shared = safe_open(path, framework="pt").__enter__()
                    self._shared_file, self._shared_bytes = path, 0
                t = self._shared.get_tensor(name).clone()
                self._shared_bytes += entry.info.nbytes
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, SourceFormatError):
                raise
            raise SourceFormatError(f"{where}: tensor {name!r}: cannot read: {e}") from e
        return check_read(entry.info, t, where)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` straight into the contiguous ``out`` (a slice of a fused
        tensor being assembled): the bytes go from the file into ``out``, no copy."""
        path, entry = self._entries[name]
        if dtype_name(out.dtype) != entry.info.dtype or tuple(out.shape) != entry.info.shape:
            raise SourceFormatError(
                f"{path}: tensor {name!r} is {entry.info.dtype}{list(entry.info.shape)}, "
                f"asked to read it into {dtype_name(out.dtype)}{list(out.shape)}"
            )
        if not out.is_contiguous() or sys.byteorder != "little":
            out.copy_(self.read(name))
            return
        size = entry.end - entry.begin
        if size == 0:
            return
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(entry.begin)
                got = 0
                while got < size:
                    n = f.readinto(buf[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise SourceFormatError(f"{path}: tensor {name!r}: cannot read: {e}") from e
        if got != size:
            raise SourceFormatError(
                f"{path}: tensor {name!r}: file ends after {got} of its {size} bytes"
            )

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """``preadv`` of just the asked bytes: safetensors stores a tensor's raw data as is."""
        path, entry = self._entries[name]
        end = start + out.nbytes
        if not 0 <= start <= end <= entry.end - entry.begin:
            raise PlanError(f"byte range [{start}, {end}) outside tensor {name!r}")
        got = 0
        try:
            fd = self._fd(path)
            while got < out.nbytes:
                n = os.preadv(fd, [out[got:]], entry.begin + start + got)
                if n <= 0:
                    break
                got += n
        except OSError as e:
            raise SourceFormatError(f"{path}: tensor {name!r}: cannot read: {e}") from e
        if got != out.nbytes:
            raise SourceFormatError(
                f"{path}: tensor {name!r}: file ends inside bytes [{start}, {end}) of the tensor"
            )

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """``posix_fadvise(WILLNEED)`` on the file range under the bytes asked for next."""
        path, entry = self._entries[name]
        n = min(nbytes, entry.end - entry.begin - start)
        if n > 0 and start >= 0:
            try:
                fd = self._fd(path)
            except OSError:
                return  # only a hint; the read reports the error
            advise_willneed(fd, entry.begin + start, n)

    def _fd(self, path: str) -> int:
        """A read-only descriptor of ``path``, opened once (many small tensors share a
        file; closed by :meth:`close`)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def fingerprint(self) -> str:
        parts = [f"{f}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in self.files]
        return "hf:" + "|".join(parts)

    def _close_shared(self) -> None:
        if self._shared is not None:
            self._shared.__exit__(None, None, None)
            self._shared = None

    def close(self) -> None:
        self._close_shared()
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _resolve_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The shard files to read and, if sharded, the index's weight map."""
    if not os.path.exists(path):
        raise SourceNotFoundError(f"no such file or directory: {path}")
    index_path = None
    if os.path.isfile(path):
        if path.endswith(INDEX_SUFFIX):
            index_path = path
        else:
            return [path], None
    else:
        indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*" + INDEX_SUFFIX)))
        if len(indexes) > 1:
            raise SourceFormatError(
                f"{path}: several safetensors indexes {[os.path.basename(i) for i in indexes]}; "
                "pass the one to convert as SRC"
            )
        if indexes:
            index_path = indexes[0]
        else:
            files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
            if not files:
                raise SourceNotFoundError(f"{path}: no *.safetensors file")
            return files, None
    try:
        with open(index_path) as f:
            doc = json.load(f)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
            for v in weight_map.values()
        ):
            raise ValueError("weight_map must map names to file names in the same directory")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceFormatError(f"{index_path}: malformed safetensors index: {e}") from e
    base = os.path.dirname(index_path)
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        full = os.path.join(base, fname)
        if not os.path.isfile(full):
            raise SourceFormatError(f"{index_path}: shard {fname} named by the index is missing")
        files.append(full)
    return files, {str(k): v for k, v in weight_map.items()}
