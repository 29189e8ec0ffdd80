"""POSIX file helpers: durable directory entries, O_DIRECT writes and reads, syncfs.

Used by :class:`ckptd.formats.storage.LocalStorage` and its write batch; no storage
semantics here, only how bytes reach a local disk.

Why the O_DIRECT bounce buffer is huge-page memory (measured with
``bench/disk_probe.py``, docs/benchmarks.md "Save / load"): one block request holds at most
``max_segments`` physically contiguous segments (254 on virtio-blk). From ordinary
4 KiB pages a request carries at most about 1 MiB, and a 1 MiB bio is split 254 + 2
pages, so the device sees 0.5-0.8 MiB requests; from 2 MiB transparent huge pages the
requests reach ``max_sectors_kb`` (4 MiB). On this project's VMs the disk then writes
1.1-1.4 GB/s instead of 0.6-0.9 GB/s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIRECT_MIN_BYTES = 1 << 20
DIRECT_ALIGN = 4096  # logical block size and page size: O_DIRECT offsets, lengths, memory
HUGE_PAGE = 2 << 20
_BOUNCE_BYTES = 8 << 20
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels: touch every page instead


# ------------------------------------------------------------------ huge-page memory


class HugeBuffer:
    """``nbytes`` of private anonymous memory, 2 MiB aligned, faulted in, with
    ``MADV_HUGEPAGE``: transparent huge pages where the kernel grants them
    (``/sys/kernel/mm/transparent_hugepage/enabled`` ``always`` or ``madvise``).

    Private, not shared: shared anonymous memory is shmem, which gets no huge pages
    under the default ``shmem_enabled=never``. :attr:`huge` says whether the kernel
    actually backed it with huge pages (else it is ordinary page-aligned memory, which
    still works, in smaller requests). Meant for small, long-lived buffers: faulting
    huge pages in is slow on these VMs (2 GiB: 4.6-7.3 s against 0.9-1.6 s in 4 KiB
    pages, measured; the host backs each fresh 2 MiB page), so staging arenas stay in
    ordinary pages and go through the bounce buffers.
    """

    def __init__(self, nbytes: int) -> None:
        """Allocate and fault in (pre-touch) ``nbytes`` (> 0)."""
        if nbytes <= 0:
            raise ValueError(f"a HugeBuffer needs a positive size, got {nbytes}")
        self._mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP compiled out: ordinary pages
                self._mm.madvise(mmap.MADV_HUGEPAGE)
        self.offset = -base % HUGE_PAGE
        self.address = base + self.offset
        self.nbytes = nbytes
        self.view = memoryview(self._mm)[self.offset : self.offset + nbytes]
        _populate(self.view)
        self.huge = _huge_backed(self.address, nbytes)


def _populate(view: memoryview) -> None:
    """Fault every page in now, not during a write (``MADV_POPULATE_WRITE`` on Linux
    >= 5.14, else a ``memset``)."""
    address = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(view)))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(address, ctypes.c_size_t(view.nbytes), _MADV_POPULATE_WRITE) != 0:
        ctypes.memset(address, 0, view.nbytes)


def _huge_backed(address: int, nbytes: int) -> bool:
    """Whether at least 90 % of ``[address, address + nbytes)`` is in huge pages
    (``AnonHugePages`` of its mapping in ``/proc/self/smaps``; False if unknown)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:
                    lo, _, hi = head.partition("-")
                    inside = int(lo, 16) <= address < int(hi, 16)
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024 >= 0.9 * nbytes
    except (OSError, ValueError):
        pass
    return False


# ----------------------------------------------------------------------------- writes


class _BouncePool:
    """Reused huge-page bounce buffers, one per concurrent writer (thread-safe).

    Not thread-local: writer pools are created per save, and a new buffer costs a
    mapping, faulting 8 MiB in, and a look at ``/proc/self/smaps``.
    """

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes
        self._free: list[HugeBuffer] = []
        self._lock = threading.Lock()

    def acquire(self) -> HugeBuffer:
        with self._lock:
            if self._free:
                return self._free.pop()
        return HugeBuffer(self._nbytes)

    def release(self, buf: HugeBuffer) -> None:
        with self._lock:
            self._free.append(buf)


_bounces = _BouncePool(_BOUNCE_BYTES)


def write_buffered(path: str, view: memoryview) -> None:
    """Write ``view`` to a new (truncated) file through the page cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def write_direct(path: str, view: memoryview) -> bool:
    """Write ``view`` to a new (truncated) file with O_DIRECT through a bounce buffer.

    Bypassing the page cache matters twice for checkpoints: the bytes are not read
    back soon, and page cache must first be allocated. On this project's VMs that
    allocation is the bottleneck (measured: 1 GiB write+fsync 5.6 s buffered after the
    guest returned its free memory to the host, 1.2 s with O_DIRECT). The copy into
    the reused huge-page bounce buffer runs at memory speed (~10x the disk) and makes
    the requests full-size (module docstring). The tail is padded to the block size and
    the file truncated back. Returns False (caller writes buffered) where the
    filesystem refuses O_DIRECT.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o644
        )
    except OSError:
        return False
    try:
        _write_bounced(fd, view)
        if view.nbytes % DIRECT_ALIGN:
            os.ftruncate(fd, view.nbytes)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # e.g. a filesystem without O_DIRECT support
            return False
        raise
    os.close(fd)
    return True


def _write_bounced(fd: int, view: memoryview) -> None:
    """Write ``view`` from file offset 0 through a bounce buffer, padded to blocks."""
    buf = _bounces.acquire()
    try:
        bmv = buf.view
        n = view.nbytes
        off = 0
        while off < n:
            size = min(bmv.nbytes, n - off)
            bmv[:size] = view[off : off + size]
            padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
            if padded != size:
                bmv[size:padded] = bytes(padded - size)
            done = 0
            while done < padded:
                done += os.pwrite(fd, bmv[done:padded], off + done)
            off += size
    finally:
        _bounces.release(buf)


# ------------------------------------------------------------------------------ reads


def read_direct(path: str, start: int, outs: memoryview | Sequence[memoryview]) -> int | None:
    """Read bytes from ``start`` of ``path`` into ``outs`` (one buffer, or several filled
    one after the other) with O_DIRECT through a pooled bounce buffer; return the count
    read (short at the end of the file), or None where the filesystem refuses O_DIRECT
    (the caller then reads buffered).

    Why: a cold buffered read first allocates page cache for every byte and then copies
    it out; on this project's VMs the allocation is the slow part (the same reason
    :func:`write_direct` exists). Measured on 1.5 GiB of chunk files, cold, 4-8 threads:
    1.0-1.3 GB/s buffered, 1.4-1.7 GB/s O_DIRECT into a huge-page bounce buffer plus a
    copy into the destination. Reads go in bounce-sized, block-aligned requests from
    ``start`` rounded down.
    """
    dsts = [o.cast("B") for o in ([outs] if isinstance(outs, memoryview) else outs)]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    buf = _bounces.acquire()
    try:
        want = sum(d.nbytes for d in dsts)
        bmv = buf.view
        pos = start - start % DIRECT_ALIGN  # the file offset of bmv[0] in this request
        skip = start - pos
        done = 0
        part, part_off = 0, 0  # where the next byte goes: dsts[part][part_off]
        while done < want:
            size = min(bmv.nbytes, -(-(skip + want - done) // DIRECT_ALIGN) * DIRECT_ALIGN)
            try:
                n = os.preadv(fd, [bmv[:size]], pos)
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:
                    return None  # O_DIRECT accepted at open, refused at read (e.g. tmpfs)
                raise
            got = min(max(0, n - skip), want - done)
            src = skip
            while got:  # scatter the bytes just read over the destinations in order
                d = dsts[part]
                k = min(got, d.nbytes - part_off)
                d[part_off : part_off + k] = bmv[src : src + k]
                src, got, done, part_off = src + k, got - k, done + k, part_off + k
                if part_off == d.nbytes:
                    part, part_off = part + 1, 0
            if n < size:
                break  # end of file
            pos += n
            skip = 0
        return done
    finally:
        _bounces.release(buf)
        os.close(fd)


def syncfs(path: str) -> bool:
    """``syncfs(2)`` on the filesystem holding ``path``; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fn(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", path)
    finally:
        os.close(fd)
    return True
