"""The structure of a ``torch.save`` file, read without importing torch.

A DeepSpeed (or other legacy) ``.pt`` file is a zip archive: ``<archive>/data.pkl`` is a
pickle of the saved object in which each tensor is a call of
``torch._utils._rebuild_tensor_v2`` on a *persistent id* naming a storage record
``<archive>/data/<key>`` (stored uncompressed, its bytes the tensor's raw data). Reading
the metadata of a conversion needs only that pickle and the records' file offsets:
:func:`load_meta` returns the object with each tensor replaced by a :class:`MetaTensor`
(dtype, shape, stride, and where its bytes lie in the file), the analogue of
``torch.load(map_location="meta")``.

Why: ``import torch`` costs ~2 s and ~180 MiB here, most of a conversion of a few GiB
(a DeepSpeed -> Hugging Face export moves its bytes by ``preadv`` and never needs a
torch tensor). A conversion that does need torch imports it where it uses it.

Safety is that of ``torch.load(weights_only=True)``: ``find_class`` resolves only an
allowlist (the tensor rebuild functions, containers, dtypes, storage types, and the
caller's inert stand-ins); anything else raises :class:`NeedsTorchLoad`, on which the
caller falls back to ``torch.load(weights_only=True)``, which either reads the file or
refuses it with its own error. Nothing from the file is ever executed.
"""

from __future__ import annotations

import codecs
import math
import pickle
import struct
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ckptd.dtypes import itemsize_of

#: ``torch.<X>Storage`` (the legacy typed storages ``torch.save`` names) -> dtype name
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
#: dtype globals a pickle may name (``torch.float32`` pickles as ``GLOBAL torch float32``)
DTYPE_NAMES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
     "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "float8_e4m3fn",
     "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}
)  # fmt: skip
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


class NeedsTorchLoad(Exception):
    """The file uses something this reader does not model: read it with ``torch.load``."""


@dataclass(frozen=True)
class StorageRecord:
    """A storage of the archive: ``numel`` elements of ``dtype`` from byte ``offset``."""

    key: str
    dtype: str
    numel: int
    offset: int


class MetaTensor:
    """A tensor's metadata from a ``.pt`` file, and where its bytes lie in the file.

    Quacks like a meta-device ``torch.Tensor`` where conversions look at one (``dtype``
    is the canonical dtype name, not a ``torch.dtype``)."""

    __slots__ = ("_offset", "_stride", "dtype", "shape", "storage")

    def __init__(self, storage: StorageRecord, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.storage, self._offset = storage, offset
        self.shape, self._stride, self.dtype = shape, stride, storage.dtype

    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def element_size(self) -> int:
        """Bytes per element."""
        return itemsize_of(self.dtype)

    def storage_offset(self) -> int:
        """First element's index in the storage."""
        return self._offset

    def stride(self) -> tuple[int, ...]:
        """Elements between neighbours along each dim."""
        return self._stride

    def is_contiguous(self) -> bool:
        """Row-major with no gaps (dims of size 1 may have any stride, as in torch)."""
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self._stride)):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    @property
    def file_offset(self) -> int:
        """Byte offset of the first element in the file."""
        return self.storage.offset + self._offset * self.element_size()

    def __repr__(self) -> str:
        return f"MetaTensor({self.dtype}{list(self.shape)} @ {self.file_offset})"


def is_tensor(value: Any) -> bool:
    """A :class:`MetaTensor`, or a ``torch.Tensor`` (checked only if torch is loaded)."""
    if isinstance(value, MetaTensor):
        return True
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def load_meta(path: str, standins: Mapping[str, type] | None = None) -> Any:
    """The object saved in ``path`` with tensors as :class:`MetaTensor` (no data read).

    ``standins``: ``"module.qualname" -> class`` for extra globals to allow (inert
    stand-ins). Raises :class:`NeedsTorchLoad` for anything it does not model (a global
    outside the allowlist, a compressed record, an unknown storage type, a file that is
    not a zip archive: torch's legacy format, or a truncated file, which torch then
    reports), ``OSError`` / ``pickle.UnpicklingError`` for an unreadable one.
    """
    with open(path, "rb") as f:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile as e:
            raise NeedsTorchLoad(f"{path}: {e}") from None
        with z:
            return _load_archive(path, f, z, standins)


def _load_archive(path: str, f: Any, z: zipfile.ZipFile,
                  standins: Mapping[str, type] | None) -> Any:
    """:func:`load_meta` of an open archive ``z`` (of file ``f``)."""
    infos = {i.filename: i for i in z.infolist()}
    pkl = next((n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        raise NeedsTorchLoad(f"{path}: no <archive>/data.pkl (an old torch.save format)")
    prefix = pkl[: -len("data.pkl")]

    def record(key: str) -> int:
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NeedsTorchLoad(f"{path}: record data/{key} is compressed")
        f.seek(info.header_offset)
        sig, n_name, n_extra = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise pickle.UnpicklingError(f"record data/{key}: bad local header")
        return info.header_offset + _LOCAL_HEADER.size + n_name + n_extra

    return _MetaUnpickler(z.read(pkl), record, dict(standins or {})).load()


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _TensorClass:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named as a type (never instantiated)."""


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> MetaTensor:
    if not isinstance(storage, StorageRecord):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 without a storage")
    shape, strides = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    t = MetaTensor(storage, int(storage_offset), shape, strides)
    if t.numel() and storage_offset + sum((n - 1) * s for n, s in zip(shape, strides)) >= (
        storage.numel
    ):
        raise pickle.UnpicklingError(f"a tensor {list(shape)} runs past its storage")
    return t


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    return data  # a Parameter's metadata is its data's


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: Any,
                          state: Any) -> Any:
    if new_type is not _TensorClass or func not in (_rebuild_tensor_v2, _rebuild_parameter):
        raise NeedsTorchLoad("a tensor subclass")
    return func(*args)


def _scalar_type(name: str) -> str:
    return name


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
    ("torch", "Tensor"): _TensorClass,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): _scalar_type,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    **{("torch", n): _StorageType(d) for n, d in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", n): n for n in DTYPE_NAMES},
}


class _MetaUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, record: Callable[[str], int],
                 standins: dict[str, type]) -> None:
        import io

        super().__init__(io.BytesIO(raw), encoding="utf-8")
        self._record, self._standins = record, standins
        self._storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        found = _ALLOWED.get((module, name))
        if found is None:
            found = self._standins.get(f"{module}.{name}")
        if found is None:
            raise NeedsTorchLoad(f"global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise NeedsTorchLoad(f"storage type {stype!r}")
        key = str(key)
        rec = self._storages.get(key)
        if rec is None:
            rec = StorageRecord(key, stype.dtype, int(numel), self._record(key))
            self._storages[key] = rec
        elif rec.dtype != stype.dtype:  # one storage viewed as two dtypes: torch handles it
            raise NeedsTorchLoad(f"storage {key} read as {rec.dtype} and {stype.dtype}")
        return rec


def from_torch_meta(obj: Any, path: str) -> Any:
    """``obj`` loaded by ``torch.load(map_location="meta")`` with its tensors turned into
    :class:`MetaTensor` (each storage carries ``_checkpoint_offset``, torch's record
    offset), so that both loaders give one kind of object."""
    import torch

    from ckptd.dtypes import dtype_name

    records: dict[int, StorageRecord] = {}

    def conv(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            base = getattr(st, "_checkpoint_offset", None)
            if base is None:
                raise pickle.UnpicklingError(f"{path}: a tensor without a stored record")
            dt = dtype_name(x.dtype)
            rec = records.setdefault(
                id(st), StorageRecord(str(id(st)), dt, st.nbytes() // x.element_size(), base)
            )
            return MetaTensor(rec, int(x.storage_offset()), tuple(x.shape), tuple(x.stride()))
        if isinstance(x, OrderedDict):
            return OrderedDict((k, conv(v)) for k, v in x.items())
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, tuple) and not isinstance(x, torch.Size):
            return type(x)(conv(v) for v in x) if type(x) is tuple else x
        if hasattr(x, "state") and hasattr(x, "args"):  # a DeepSpeed stand-in
            x.state = conv(x.state)
        return x

    return conv(obj)
