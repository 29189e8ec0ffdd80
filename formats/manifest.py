"""The manifest: typed dataclasses with one JSON serialization (the contract).

It lives in the checkpoint group's ``zarr.json`` under ``attributes.ckpt``; see
docs/format.md. Parsing is strict and safe (``json`` only): malformed or truncated
metadata raises :class:`IntegrityError`, a newer major version raises
:class:`FormatVersionError`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ckptd.dtypes import UnsupportedDtypeError, itemsize_of
from ckptd.errors import FormatVersionError, IntegrityError
from ckptd.fragments import Shape, TensorMeta

FORMAT_NAME = "ckptd-universal"
FORMAT_VERSION = (1, 0)
GROUP_META_KEY = "zarr.json"


@dataclass(frozen=True)
class ChunkRecord:
    """Where one encoded chunk is stored: a whole object, or a byte range of a pack."""

    index: tuple[int, ...]
    object: str  # key relative to the checkpoint directory
    offset: int  # byte offset inside ``object`` (0 for a whole object)
    length: int  # stored (encoded) bytes
    crc32c: int
    packed: bool = False

    def to_json(self) -> list[Any]:
        return [list(self.index), self.object, self.offset, self.length, self.crc32c, self.packed]

    @staticmethod
    def from_json(obj: list[Any]) -> ChunkRecord:
        idx, objkey, off, length, crc, packed = obj
        return ChunkRecord(
            tuple(int(i) for i in idx), str(objkey), int(off), int(length), int(crc), bool(packed)
        )


@dataclass(frozen=True)
class TensorRecord:
    """One logical tensor: metadata, storage layout and its chunks."""

    name: str
    dtype: str
    shape: Shape
    chunk_shape: Shape
    codec: str
    level: int
    packed: bool  # array metadata is only in the manifest (small tensor, chunks in packs)
    chunks: tuple[ChunkRecord, ...]

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.name, self.dtype, self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunk_shape": list(self.chunk_shape),
            "codec": self.codec,
            "level": self.level,
            "packed": self.packed,
            "chunks": [c.to_json() for c in self.chunks],
        }

    @staticmethod
    def from_json(name: str, obj: dict[str, Any]) -> TensorRecord:
        rec = TensorRecord(
            name=name,
            dtype=str(obj["dtype"]),
            shape=tuple(int(s) for s in obj["shape"]),
            chunk_shape=tuple(int(s) for s in obj["chunk_shape"]),
            codec=str(obj["codec"]),
            level=int(obj.get("level", 1)),
            packed=bool(obj.get("packed", False)),
            chunks=tuple(ChunkRecord.from_json(c) for c in obj["chunks"]),
        )
        itemsize_of(rec.dtype)  # unknown dtype -> UnsupportedDtypeError
        if len(rec.chunk_shape) != len(rec.shape):
            raise IntegrityError(f"tensor {name!r}: chunk_shape rank differs from shape rank")
        return rec


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs besides the chunk bytes."""

    step: int
    tensors: dict[str, TensorRecord]
    layout: dict[str, Any] = field(default_factory=dict)  # provenance: world, coords, digest
    rng: dict[str, Any] = field(default_factory=dict)  # coords key -> {state key -> rng state}
    state: dict[str, Any] = field(default_factory=dict)  # JSON leaves equal on every rank
    per_rank_state: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> coords -> v
    created: float = field(default_factory=time.time)
    version: tuple[int, int] = FORMAT_VERSION
    writer: str = "ckptd"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": f"{self.version[0]}.{self.version[1]}",
            "writer": self.writer,
            "step": self.step,
            "created": self.created,
            "tensors": {n: t.to_json() for n, t in sorted(self.tensors.items())},
            "layout": self.layout,
            "rng": self.rng,
            "state": self.state,
            "per_rank_state": self.per_rank_state,
        }

    @staticmethod
    def from_json(obj: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise IntegrityError(f"{where}: not a {FORMAT_NAME} manifest")
        version = parse_version(obj.get("version"), where)
        try:
            tensors = {n: TensorRecord.from_json(n, t) for n, t in obj["tensors"].items()}
            return Manifest(
                step=int(obj["step"]),
                tensors=tensors,
                layout=dict(obj.get("layout", {})),
                rng=dict(obj.get("rng", {})),
                state=dict(obj.get("state", {})),
                per_rank_state=dict(obj.get("per_rank_state", {})),
                created=float(obj.get("created", 0.0)),
                version=version,
                writer=str(obj.get("writer", "")),
            )
        except UnsupportedDtypeError as e:
            raise IntegrityError(f"{where}: {e}") from e
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def parse_version(v: Any, where: str) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"``; refuse an unknown major version."""
    try:
        major, minor = (int(x) for x in str(v).split("."))
    except ValueError:
        raise IntegrityError(f"{where}: bad format version {v!r}") from None
    if major != FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"{where}: format version {major}.{minor} is not supported by this reader "
            f"(reads {FORMAT_VERSION[0]}.x); upgrade ckptd to read it"
        )
    return major, minor


def group_metadata_bytes(manifest: Manifest) -> bytes:
    """The checkpoint group's ``zarr.json``: a zarr v3 group with the manifest attribute."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"ckpt": manifest.to_json()}}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_group_metadata(data: bytes, where: str) -> Manifest:
    """Parse a checkpoint group's ``zarr.json`` into a :class:`Manifest`."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{where}: manifest is not valid JSON (truncated?): {e}") from e
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or "attributes" not in doc:
        raise IntegrityError(f"{where}: not a zarr v3 group with a ckpt manifest")
    return Manifest.from_json(doc["attributes"].get("ckpt"), where)
