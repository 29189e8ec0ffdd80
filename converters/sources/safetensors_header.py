"""The safetensors container: header parsing with strict validation, and header building.

Layout of a ``.safetensors`` file: 8 bytes little-endian ``u64`` header length N, N
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, padded with spaces), then the data buffer; offsets are relative to the
buffer start and the tensors tile the buffer exactly (no holes, no overlaps).

:func:`read_header` checks every one of these rules itself before any tensor is read,
so that a file whose header lies (a size that does not match dtype x shape, a range
past the end of the file, overlapping tensors) fails with a
:class:`~ckptd.converters.sources.base.SourceFormatError` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from ckptd.converters.sources.base import SourceFormatError, TensorInfo
from ckptd.dtypes import itemsize_of

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA_KEY = "__metadata__"

# safetensors dtype code <-> canonical torch dtype name (ckptd.dtypes)
ST_TO_DTYPE = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}
DTYPE_TO_ST = {v: k for k, v in ST_TO_DTYPE.items()}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its info and absolute byte range in the file."""

    info: TensorInfo
    begin: int  # absolute file offset
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: entries in data order, and the string metadata."""

    path: str
    data_start: int
    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str]

    def by_name(self) -> dict[str, HeaderEntry]:
        return {e.info.name: e for e in self.entries}


def read_header(path: str) -> SafetensorsHeader:
    """Read and validate the header of ``path`` (see the module docstring)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SourceFormatError(
                    f"{path}: header length {n} is impossible for a file of {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise SourceFormatError(f"{path}: cannot read: {e}") from e
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceFormatError(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SourceFormatError(f"{path}: header is not a JSON object")
    meta = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SourceFormatError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries = [_entry(path, name, obj, data_start, data_len) for name, obj in doc.items()]
    entries.sort(key=lambda x: (x.begin, x.end))
    pos = data_start
    for ent in entries:
        if ent.begin != pos:
            what = "overlaps the previous tensor" if ent.begin < pos else "leaves a gap before it"
            raise SourceFormatError(
                f"{path}: tensor {ent.info.name!r}: data_offsets start at "
                f"{ent.begin - data_start}, which {what} (expected {pos - data_start}); "
                "the header lies about sizes"
            )
        pos = ent.end
    if pos != size:
        raise SourceFormatError(
            f"{path}: tensors cover {pos - data_start} of the {data_len} data bytes "
            "(trailing bytes: the header lies about sizes)"
        )
    return SafetensorsHeader(path, data_start, tuple(entries), dict(meta))


def _entry(path: str, name: str, obj: Any, data_start: int, data_len: int) -> HeaderEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(obj, dict):
        raise SourceFormatError(f"{where}: header entry is not an object")
    code, shape, offs = obj.get("dtype"), obj.get("shape"), obj.get("data_offsets")
    if code not in ST_TO_DTYPE:
        raise SourceFormatError(f"{where}: unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SourceFormatError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offs)
        or offs[0] > offs[1]
    ):
        raise SourceFormatError(f"{where}: data_offsets {offs!r} are not [begin, end]")
    dtype = ST_TO_DTYPE[code]
    want = math.prod(shape) * itemsize_of(dtype)
    if offs[1] - offs[0] != want:
        raise SourceFormatError(
            f"{where}: header says {code}{shape} ({want} bytes) but data_offsets {offs} span "
            f"{offs[1] - offs[0]} bytes; the header lies about sizes"
        )
    if offs[1] > data_len:
        raise SourceFormatError(
            f"{where}: data_offsets {offs} run past the end of the data ({data_len} bytes; "
            "truncated file?)"
        )
    return HeaderEntry(
        TensorInfo(name, dtype, tuple(shape)), data_start + offs[0], data_start + offs[1]
    )


def build_header(tensors: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, padded to 8) for ``tensors`` stored in order.

    Returns the bytes and each tensor's absolute file offset.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = dict(metadata)
    pos = 0
    rel = []
    for t in tensors:
        if t.dtype not in DTYPE_TO_ST:
            raise SourceFormatError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors code")
        doc[t.name] = {
            "dtype": DTYPE_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        rel.append(pos)
        pos += t.nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, [start + r for r in rel]
