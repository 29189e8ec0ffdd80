"""Tensor dtype names: torch dtype <-> canonical name <-> zarr v3 ``data_type``.

Canonical names are torch's (``float32``, ``bfloat16``). dtypes without a numpy/zarr
equivalent (bfloat16, float8 variants) are stored bit-for-bit as unsigned integers of
the same width; the manifest and the array attributes keep the real dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ckptd.errors import CkptError

_TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
for _n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _n):
        _TORCH[_n] = getattr(torch, _n)
for _n in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _n):
        _TORCH[_n] = getattr(torch, _n)

_NAME = {v: k for k, v in _TORCH.items()}

# Stored as raw bits in an unsigned integer array of the same width.
_BITS_AS = {"bfloat16": "uint16"} | {n: "uint8" for n in _TORCH if n.startswith("float8")}


class UnsupportedDtypeError(CkptError, TypeError):
    """A tensor dtype that the universal format cannot store."""


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _NAME[dtype]
    except KeyError:
        raise UnsupportedDtypeError(f"dtype {dtype} is not supported by the format") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a canonical name."""
    try:
        return _TORCH[name]
    except KeyError:
        raise UnsupportedDtypeError(f"unknown dtype name {name!r}") from None


def itemsize_of(name: str) -> int:
    """Bytes per element of a canonical dtype name."""
    return torch_dtype(name).itemsize


def storage_dtype(name: str) -> str:
    """The zarr ``data_type`` used to store ``name`` (its bits, for dtypes numpy lacks)."""
    return _BITS_AS.get(name, name)


def numpy_storage_dtype(name: str) -> np.dtype:
    """Little-endian numpy dtype of the stored bits of ``name``."""
    return np.dtype(storage_dtype(name)).newbyteorder("<")
