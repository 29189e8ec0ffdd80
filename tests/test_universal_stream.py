"""``UniversalWriter.add_ranges`` writes the same objects as ``add``, from byte ranges."""

from __future__ import annotations

import torch

from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.storage import MemoryStorage
from ckptd.formats.universal_io import UniversalWriter, chunk_ranges
from ckptd.formats.universal_reader import UniversalReader
from ckptd.formats.writer import StagingPool, WriterOptions
from ckptd.planner import PlanOptions

# Small chunks so that the tensors below have several, clipped edge chunks (zero padded).
PLAN = PlanOptions(target_chunk_bytes=4096, min_aligned_chunk_bytes=1 << 20)
OPTS = WriterOptions(workers=2, small_tensor_bytes=256, max_inflight_bytes=8192)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(10, 300, generator=g),  # chunks (3, 300): last one clipped
        "b": torch.randn(7, 5, 64, generator=g).to(torch.bfloat16),
        "c": torch.zeros(4000),  # compressible: codec auto picks zstd
        "d": torch.randn(8, generator=g),  # packed
        "e": torch.tensor(3.0),  # 0-d, packed
    }


def _write(stream: bool) -> MemoryStorage:
    st = MemoryStorage()
    w = UniversalWriter(st, 1, CodecPolicy(), OPTS, PLAN, sync_bytes=10_000)
    for name, t in _tensors().items():
        if stream:
            raw = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
            reads: list[tuple[int, int]] = []

            def read(
                start: int,
                out: memoryview,
                raw: memoryview = raw,
                reads: list[tuple[int, int]] = reads,
            ) -> None:
                reads.append((start, out.nbytes))
                out[:] = raw[start : start + out.nbytes]

            dtype = str(t.dtype).removeprefix("torch.")
            w.add_ranges(name, dtype, tuple(t.shape), read)
            assert max(n for _, n in reads) <= max(4096, t.numel() * t.element_size())
        else:
            w.add(name, t)
    w.commit()
    return st


def test_add_ranges_writes_what_add_writes() -> None:
    whole, streamed = _write(False), _write(True)
    keys = sorted(k for k in whole.list() if not k.endswith("COMMITTED"))
    assert keys == sorted(k for k in streamed.list() if not k.endswith("COMMITTED"))
    for k in keys:
        if k.endswith("step-000000001/zarr.json"):
            continue  # the manifest carries its creation time
        assert whole.get(k) == streamed.get(k), k
    r = UniversalReader.open(streamed, 1)
    for name, t in _tensors().items():
        assert torch.equal(r.read(name), t)
    assert r.manifest.tensors["c"].codec == "zstd"


def test_chunk_ranges_only_for_contiguous_chunks() -> None:
    where = chunk_ranges((10, 300), (3, 300), 4)
    assert where is not None and where((3, 0)) == (9 * 1200, 1200)
    assert chunk_ranges((4, 6), (2, 3), 4) is None  # a chunk is two separate rows


def test_staging_pool_stays_within_its_limit() -> None:
    pool = StagingPool(limit_bytes=8 << 20, round_to=1 << 20)
    small = [pool.acquire(1 << 20) for _ in range(6)]
    for b in small:
        pool.release(b)
    big = pool.acquire(4 << 20)  # drops free small buffers to stay within 8 MiB
    assert pool._owned <= 8 << 20
    pool.release(big)
    again = pool.acquire(4 << 20)
    assert again is big  # reused, not allocated again
