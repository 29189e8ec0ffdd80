"""Chunk codecs: the bytes of one stored chunk, and their checksum.

Codec chains, recorded per tensor in the manifest and the zarr array metadata:

- ``raw``: zarr ``bytes`` codec only (little-endian, C order). Fastest on local disks,
  where zstd on fp32 weights (ratio ~1.08) is slower than the disk itself.
- ``zstd``: ``bytes`` + ``zstd``; every chunk compressed.
- ``zstd-adaptive``: ``bytes`` + ``zstd`` as well, but each chunk is
  compressed only if a sample of it compresses at least ``min_ratio``; otherwise it is
  stored as a zstd frame of *raw blocks* (a memcpy, no compression work). Any zstd
  decoder, zarr-python's included, reads both kinds. The decision is made per chunk
  from the data, so writers never have to agree on it.

The default policy, ``auto``, picks ``raw`` or ``zstd`` per tensor when a layout is
first planned, from a sample of every rank's data (:func:`sample_sizes`): tensors that
compress at least ``min_ratio`` (mostly-zero state, often bf16 on remote storage) are
compressed, the rest (fp32 weights, ratio ~1.08) are written raw and read with no
decoding at all.

Checksums are CRC32C of the stored bytes (hardware-accelerated ``crc32c`` package).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import crc32c as _crc32c
import zstandard

from ckptd.errors import IntegrityError

CODECS = ("raw", "zstd", "zstd-adaptive")
POLICIES = ("auto", *CODECS)
_ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
_RAW_BLOCK_MAX = 128 * 1024
_SAMPLE_BYTES = 256 * 1024


@dataclass(frozen=True)
class CodecPolicy:
    """Which codec chain to use and when a chunk is worth compressing."""

    codec: str = "auto"
    level: int = 1
    min_ratio: float = 1.5  # local disks; remote storage uses ~1.05 (see client config)

    def __post_init__(self) -> None:
        if self.codec not in POLICIES:
            raise ValueError(f"codec must be one of {POLICIES}, got {self.codec!r}")

    def choose(self, compressed: int, raw: int) -> str:
        """The codec of one tensor given sample sizes (``auto``) or the fixed codec."""
        if self.codec != "auto":
            return self.codec
        return "zstd" if raw and compressed * self.min_ratio <= raw else "raw"


SAMPLE_SIZES_BYTES = 64 * 1024


def sample_window(total: int, nbytes: int = SAMPLE_SIZES_BYTES) -> tuple[int, int]:
    """``(start, length)`` of the bytes :func:`sample_sizes` samples from ``total`` bytes
    (the middle), so that a streaming writer can read just those bytes first."""
    n = min(nbytes, total)
    return (total - n) // 2, n


def sample_sizes(
    data: memoryview, level: int = 1, nbytes: int = SAMPLE_SIZES_BYTES
) -> tuple[int, int]:
    """(compressed, raw) sizes of a sample from the middle of ``data``."""
    mid, n = sample_window(data.nbytes, nbytes)
    if n == 0:
        return 0, 0
    return len(_compressor(level).compress(data[mid : mid + n])), n


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # One compressor per thread: sharing one across threads crashed the process here.
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        setattr(_local, key, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def crc32c(data: bytes | memoryview | bytearray, value: int = 0) -> int:
    """CRC32C of a buffer (no copy); ``value`` continues the CRC of preceding bytes."""
    return _crc32c.crc32c(data, value)


def raw_block_frame(data: memoryview) -> bytes:
    """A valid zstd frame holding ``data`` in raw (uncompressed) blocks: one memcpy."""
    n = data.nbytes
    # Single-segment frame with an 8-byte content size: descriptor 0b11100000.
    parts: list[bytes | memoryview] = [_ZSTD_MAGIC, b"\xe0", struct.pack("<Q", n)]
    if n == 0:
        parts.append((1).to_bytes(3, "little"))  # last block, raw, size 0
    for off in range(0, n, _RAW_BLOCK_MAX):
        size = min(_RAW_BLOCK_MAX, n - off)
        last = 1 if off + size == n else 0
        parts.append((last | (size << 3)).to_bytes(3, "little"))
        parts.append(data[off : off + size])
    return b"".join(parts)


def encode(data: memoryview, codec: str, policy: CodecPolicy) -> bytes | memoryview:
    """Encode a chunk's little-endian C-order bytes with ``codec``."""
    if codec == "raw":
        return data
    comp = _compressor(policy.level)
    if codec == "zstd":
        return comp.compress(data)
    sample = data[: min(_SAMPLE_BYTES, data.nbytes)]
    if sample.nbytes and len(comp.compress(sample)) * policy.min_ratio <= sample.nbytes:
        out = comp.compress(data)
        if len(out) * policy.min_ratio <= data.nbytes:
            return out
    return raw_block_frame(data)


def decode(data: bytes | memoryview, codec: str, nbytes: int, where: str) -> bytes | memoryview:
    """Decode a stored chunk to exactly ``nbytes`` raw bytes; ``where`` names it in errors."""
    if codec == "raw":
        out = data
    else:
        try:
            out = _decompressor().decompress(data, max_output_size=nbytes)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{where}: zstd frame is corrupt: {e}") from e
    if len(out) != nbytes:
        raise IntegrityError(f"{where}: decoded {len(out)} bytes, expected {nbytes}")
    return out
