"""O_DIRECT writing through reused huge-page bounce buffers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckptd.formats import posix_io
from ckptd.formats.posix_io import DIRECT_ALIGN, HUGE_PAGE, HugeBuffer, write_direct


def test_huge_buffer_is_aligned_and_faulted_in() -> None:
    buf = HugeBuffer(3 << 20)
    assert buf.address % HUGE_PAGE == 0
    assert buf.view.nbytes == 3 << 20
    assert bytes(buf.view[:16]) == bytes(16)  # populated (zero) memory, writable
    buf.view[:4] = b"abcd"
    assert bytes(buf.view[:4]) == b"abcd"
    with pytest.raises(ValueError):
        HugeBuffer(0)


def test_bounce_buffers_are_huge_pages_where_the_kernel_allows() -> None:
    """The point of the bounce buffer: full-size (4 MiB) O_DIRECT requests."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are disabled here")
    assert HugeBuffer(8 << 20).huge


@pytest.mark.parametrize(
    "size", [DIRECT_ALIGN, (8 << 20), (8 << 20) + 4096, (21 << 20) + 123, (1 << 20) + 7]
)
def test_write_direct_round_trips(tmp_path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size + 3, dtype=np.uint8)
    view = memoryview(data)[3:]  # an unaligned source address
    path = str(tmp_path / "x")
    if not write_direct(path, view):
        pytest.skip("this filesystem refuses O_DIRECT")
    with open(path, "rb") as f:
        assert f.read() == view.tobytes()
    assert os.path.getsize(path) == size


def test_write_direct_replaces_a_longer_file(tmp_path) -> None:
    path = tmp_path / "y"
    path.write_bytes(b"z" * (3 << 20))
    src = memoryview(os.urandom((1 << 20) + 5))
    if not write_direct(str(path), src):
        pytest.skip("this filesystem refuses O_DIRECT")
    assert path.read_bytes() == bytes(src)


def test_bounce_buffers_are_reused_across_threads_and_calls(tmp_path, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(posix_io, "_bounces", posix_io._BouncePool(1 << 20))  # a fresh pool
    src = memoryview(bytearray(os.urandom((2 << 20) + 5)))[1:]  # 2 MiB: two bounce fills
    if not write_direct(str(tmp_path / "probe"), src):
        pytest.skip("this filesystem refuses O_DIRECT")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_direct(str(tmp_path / f"a{i}"), src), range(16)))
    pooled = len(posix_io._bounces._free)
    assert 1 <= pooled <= 5  # one per concurrent writer (+ the probe's), not one per call
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_direct(str(tmp_path / f"b{i}"), src), range(16)))
    assert len(posix_io._bounces._free) <= 5
    for i in range(16):
        assert (tmp_path / f"b{i}").read_bytes() == bytes(src)


@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, 1 << 20),  # aligned
        (4096 * 3, (8 << 20) + 4096),  # spans two bounce-sized requests
        (123, (2 << 20) + 5),  # unaligned start and end
        ((21 << 20) - 100, 1 << 20),  # runs past the end of the file: short read
        ((8 << 20) - 1, (8 << 20) + 2),  # straddles bounce boundaries on both sides
    ],
)
def test_read_direct_matches_the_file(tmp_path, start: int, length: int) -> None:
    size = 21 << 20
    data = np.random.default_rng(start).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = str(tmp_path / "obj")
    with open(path, "wb") as f:
        f.write(data)
    out = bytearray(length)
    got = posix_io.read_direct(path, start, memoryview(out))
    if got is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    want = data[start : start + length]
    assert got == len(want)
    assert bytes(out[:got]) == want


def test_local_storage_get_into_reads_direct_and_buffered_alike(tmp_path, monkeypatch) -> None:
    """Large reads go through O_DIRECT, small ones buffered; a filesystem that refuses
    O_DIRECT falls back to buffered reads with the same bytes."""
    from ckptd.formats.storage import LocalStorage

    st = LocalStorage(tmp_path)
    data = np.random.default_rng(1).integers(0, 256, (3 << 20) + 11, dtype=np.uint8).tobytes()
    st.put("a/obj", data)
    calls = []
    real = posix_io.read_direct
    monkeypatch.setattr(
        "ckptd.formats.storage.read_direct",
        lambda *a: calls.append(a[1]) or real(*a),
    )
    big, small = bytearray(2 << 20), bytearray(100)
    assert st.get_into("a/obj", 5, memoryview(big)) == len(big)
    assert st.get_into("a/obj", 7, memoryview(small)) == len(small)
    assert bytes(big) == data[5 : 5 + len(big)] and bytes(small) == data[7:107]
    assert calls == [5]  # only the large read bypassed the page cache
    monkeypatch.setattr("ckptd.formats.storage.read_direct", lambda *a: None)
    big2 = bytearray(2 << 20)
    assert st.get_into("a/obj", 5, memoryview(big2)) == len(big2) and big2 == big
