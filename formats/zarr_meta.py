"""zarr v3 array metadata (``zarr.json``) for stored tensors.

The metadata is derived from a :class:`TensorRecord`; it is written as a real object
for unpacked arrays and synthesized by :class:`CheckpointStore` for packed ones.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ckptd.dtypes import numpy_storage_dtype, storage_dtype
from ckptd.formats.manifest import TensorRecord


def array_metadata(rec: TensorRecord) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` document of a tensor's array."""
    np_dtype = numpy_storage_dtype(rec.dtype)
    codecs: list[dict[str, Any]] = [
        {"name": "bytes", "configuration": {"endian": "little"}}
        if np_dtype.itemsize > 1
        else {"name": "bytes"}
    ]
    if rec.codec != "raw":
        codecs.append({"name": "zstd", "configuration": {"level": rec.level, "checksum": False}})
    attrs: dict[str, Any] = {"ckpt_dtype": rec.dtype}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(rec.shape),
        "data_type": storage_dtype(rec.dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(rec.chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_value(np_dtype),
        "codecs": codecs,
        "attributes": attrs,
    }


def array_metadata_bytes(rec: TensorRecord) -> bytes:
    """``array_metadata`` serialized."""
    return json.dumps(array_metadata(rec), separators=(",", ":")).encode()


def _fill_value(dt: np.dtype) -> Any:
    if dt.kind == "b":
        return False
    if dt.kind == "c":
        return [0.0, 0.0]
    if dt.kind == "f":
        return 0.0
    return 0
