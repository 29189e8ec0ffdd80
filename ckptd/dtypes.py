"""Tensor dtype names: torch dtype <-> canonical name <-> zarr v3 ``data_type``.

Canonical names are torch's (``float32``, ``bfloat16``). dtypes without a numpy/zarr
equivalent (bfloat16, float8 variants) are stored bit-for-bit as unsigned integers of
the same width; the manifest and the array attributes keep the real dtype.

torch is imported lazily, so that tools which only read manifests (``ckpt ls``) start
without it.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from ckptd.errors import CkptError

if TYPE_CHECKING:
    import torch

_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}

# Stored as raw bits in an unsigned integer array of the same width.
_BITS_AS = {"bfloat16": "uint16"} | {n: "uint8" for n in _ITEMSIZE if n.startswith("float8")}


class UnsupportedDtypeError(CkptError, TypeError):
    """A tensor dtype that the universal format cannot store."""


@cache
def _torch_table() -> dict[str, torch.dtype]:
    import torch

    return {n: getattr(torch, n) for n in _ITEMSIZE if hasattr(torch, n)}


@cache
def _name_table() -> dict[torch.dtype, str]:
    return {v: k for k, v in _torch_table().items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``); a name is
    returned as it is (metadata read without torch carries names)."""
    if isinstance(dtype, str):
        if dtype in _ITEMSIZE:
            return dtype
        raise UnsupportedDtypeError(f"dtype {dtype} is not supported by the format")
    try:
        return _name_table()[dtype]
    except KeyError:
        raise UnsupportedDtypeError(f"dtype {dtype} is not supported by the format") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a canonical name."""
    try:
        return _torch_table()[name]
    except KeyError:
        raise UnsupportedDtypeError(f"unknown dtype name {name!r}") from None


def itemsize_of(name: str) -> int:
    """Bytes per element of a canonical dtype name."""
    try:
        return _ITEMSIZE[name]
    except KeyError:
        raise UnsupportedDtypeError(f"unknown dtype name {name!r}") from None


def storage_dtype(name: str) -> str:
    """The zarr ``data_type`` used to store ``name`` (its bits, for dtypes numpy lacks)."""
    itemsize_of(name)
    return _BITS_AS.get(name, name)


def numpy_storage_dtype(name: str) -> np.dtype:
    """Little-endian numpy dtype of the stored bits of ``name``."""
    return np.dtype(storage_dtype(name)).newbyteorder("<")
