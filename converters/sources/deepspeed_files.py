"""Reading DeepSpeed ``.pt`` files safely, and finding tensors' bytes in them.

Safety: every file is read as ``torch.load(weights_only=True)`` reads it (its allowlist
of globals; never a fallback to full unpickling).
Real DeepSpeed files pickle a few DeepSpeed objects besides tensors (the loss scaler,
``ZeroStageEnum``, ``fragment_address`` values of ``param_slice_mappings``); exactly
those globals (:data:`DEEPSPEED_GLOBALS`) are mapped to inert stand-ins
(:class:`DeepSpeedObject`) that only record their constructor arguments and state:
no DeepSpeed code is imported or run. Any other global (``__reduce__`` payloads
included) raises :class:`UnsafePickleError` naming the file and the global; a
truncated or corrupt file raises :class:`SourceFormatError`.

Metadata is read without torch where it can be (:mod:`.torchfile`, the same allowlist
plus the stand-ins; anything else falls back to ``torch.load(weights_only=True,
map_location="meta")``): tensors come back as :class:`~.torchfile.MetaTensor`, which
says where each one's bytes lie in the file (:func:`locate`); :class:`FileReader` then
reads those ranges with ``preadv`` into the caller's buffer (no mapping whose touched
pages would count as resident memory).
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from typing import Any, ClassVar

from ckptd.converters.sources.base import SourceFormatError, advise_willneed
from ckptd.converters.sources.torchfile import (
    MetaTensor,
    NeedsTorchLoad,
    from_torch_meta,
    load_meta,
)


class UnsafePickleError(SourceFormatError):
    """A ``.pt`` file needs more than ``torch.load(weights_only=True)`` allows (never run)."""


#: The DeepSpeed globals that real ZeRO checkpoints pickle; each is unpickled into an
#: inert :class:`DeepSpeedObject` subclass, never into DeepSpeed's class.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DeepSpeedObject:
    """Inert stand-in for a pickled DeepSpeed object: records ``args`` and ``state``.

    ``args`` are what the pickle passed to the class (an enum's value), ``state`` what
    it passed to ``__setstate__`` (an object's ``__dict__``). No behaviour beyond that.
    """

    qualname: ClassVar[str] = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any) -> DeepSpeedObject:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # ZeroStageEnum(2) pickles as the call with its value
        if len(self.args) == 1 and isinstance(self.args[0], int):
            return int(self.args[0])
        raise TypeError(f"{self.qualname} stand-in has no integer value")

    def __repr__(self) -> str:
        return f"<{self.qualname} args={self.args!r} state={self.state!r}>"


STANDINS: dict[str, type[DeepSpeedObject]] = {
    q: type(q.rsplit(".", 1)[1], (DeepSpeedObject,), {"qualname": q, "__module__": __name__})
    for q in DEEPSPEED_GLOBALS
}
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_pt(path: str, *, meta: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with the DeepSpeed stand-ins allowed.

    ``meta``: tensors as :class:`~.torchfile.MetaTensor` (metadata and file offsets;
    read without torch where :func:`~.torchfile.load_meta` can); otherwise memory-mapped
    CPU tensors. Errors are typed and name ``path`` (and the refused global).
    """
    if meta:
        try:
            return load_meta(path, STANDINS)
        except NeedsTorchLoad:
            pass  # torch.load decides: it reads the file, or refuses it below
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                struct.error) as e:
            raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e
    import torch

    where: dict[str, Any] = {"map_location": "meta"} if meta else {"map_location": "cpu"}
    allowed: list[Any] = [(cls, q) for q, cls in STANDINS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, weights_only=True, mmap=not meta, **where)
            return from_torch_meta(obj, path) if meta else obj
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _GLOBAL_RE.search(text)
        what = f"global {m.group(1)}" if m else (text.strip().splitlines() or [type(e).__name__])[0]
        raise UnsafePickleError(
            f"{path}: refused to unpickle {what}: only tensors, containers and the "
            f"DeepSpeed objects {', '.join(DEEPSPEED_GLOBALS)} are allowed (weights_only "
            "load; nothing was executed). Convert only checkpoints written by DeepSpeed."
        ) from e
    except Exception as e:  # truncated zip, bad magic, I/O: no other way to read it
        raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e


@dataclass(frozen=True)
class Span:
    """Bytes ``[lo, hi)`` of a tensor's raw data lie in ``path`` from byte ``offset``."""

    path: str
    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Loc:
    """A tensor's bytes in a ``.pt`` file: ``numel`` elements of ``dtype`` from ``offset``."""

    path: str
    offset: int
    numel: int
    dtype: str  # canonical name (ckptd.dtypes)


def locate(path: str, t: Any, size: int, what: str) -> Loc:
    """Where the meta tensor ``t`` (from ``load_pt(path, meta=True)``) lies in ``path``."""
    if not isinstance(t, MetaTensor):
        raise SourceFormatError(f"{path}: {what} is not a tensor")
    if not t.is_contiguous():
        raise SourceFormatError(f"{path}: {what} is not a contiguous stored tensor")
    off = t.file_offset
    n = t.numel()
    if off + n * t.element_size() > size:
        raise SourceFormatError(f"{path}: {what} runs past the end of the file (truncated?)")
    return Loc(path, off, n, t.dtype)


def check_byteorder(path: str) -> None:
    """Refuse archives written on a big-endian machine (bytes are read as they are)."""
    try:
        with zipfile.ZipFile(path) as z:
            rec = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
            order = z.read(rec).decode().strip() if rec else "little"
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e
    if order != "little":
        raise SourceFormatError(f"{path}: written {order}-endian; only little-endian is read")


class FileReader:
    """Read-only descriptors opened once per path, and positioned reads (thread-safe)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        """A read-only descriptor of ``path``, opened once (closed by :meth:`close`)."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return fd

    def pread(self, path: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``offset``."""
        fd = self.fd(path)
        done = 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise SourceFormatError(f"{path}: ends inside a tensor (truncated?)")
            done += n

    def advise(self, path: str, offset: int, nbytes: int) -> None:
        """Read-ahead hint for ``nbytes`` of ``path`` from ``offset`` (never fails)."""
        if hasattr(os, "posix_fadvise"):
            advise_willneed(self.fd(path), offset, nbytes)

    def close(self) -> None:
        """Close every descriptor."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
