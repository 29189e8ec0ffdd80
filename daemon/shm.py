"""Shared-memory segments of the snapshot store: one file per buffer, and the trainer's view.

A **segment** is one file under the store's directory (``/dev/shm`` by default, so POSIX
shared memory), created by the daemon and mapped by the daemon and by one trainer::

    [0, HEADER_SIZE)                       header (fields below; the state word last)
    [HEADER_SIZE, HEADER_SIZE + capacity)  payload: the trainer copies its tensors here
    [HEADER_SIZE + capacity, ...)          JSON descriptor of the payload (opaque here)

Header, little-endian: ``magic`` 8s, ``version`` u16, ``buffer`` u16, ``state`` u32 (at
offset 12), then ``epoch`` u64, ``generation`` u64, ``step`` u64, ``length`` u64,
``capacity`` u64, ``rank`` u32, ``payload_crc`` u32 (CRC32C), ``descriptor_len`` u32,
``descriptor_crc`` u32, job id (u16 length + 128 bytes), ``header_crc`` u32 (CRC32C of
every header field except ``state``).

Write ordering (``snapshots.Slot`` does this): ``state = WRITING`` first, so the buffer
stops being COMPLETE before a byte of it changes; then the payload; then the descriptor
and the header fields with their checksums; ``state = COMPLETE`` last.  A process killed
anywhere in between leaves a buffer that is not COMPLETE, or whose checksums fail.  No
``msync`` or fence is needed: every mapping of a tmpfs file shares the same page-cache
pages, so a store is visible to other processes as soon as it is made, and a kill stops
the writer between two stores, never inside one.  On a weakly ordered CPU another process
*reading concurrently* could see the state word before the payload; the reader's
checksum verification turns that into "not complete", never into wrong data.

Creation pre-allocates with ``posix_fallocate`` (a full ``/dev/shm`` is then an error at
creation, not a SIGBUS in the trainer in the middle of its copy) and pre-faults every
page, so that no save pays the first-touch cost (~1-2 GB/s instead of ~11 GB/s).
The trainer maps with ``MAP_POPULATE`` and keeps its mappings across saves
(:class:`TrainerMappings`): its page tables are filled once, not during each copy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any

import crc32c
import torch

from ckptd.errors import CkptError, InvalidKeyError, StagingBudgetError

MAGIC = b"CKPTSHM\x00"
VERSION = 1
HEADER_SIZE = 4096  # one page: the payload starts page-aligned (and 64-byte aligned)
PAGE = mmap.PAGESIZE

EMPTY, WRITING, COMPLETE = 0, 1, 2
STATE_NAMES = {EMPTY: "EMPTY", WRITING: "WRITING", COMPLETE: "COMPLETE"}

_PRE = struct.Struct("<8sHH")  # magic, version, buffer
_STATE = struct.Struct("<I")
_BODY = struct.Struct("<QQQQQIIIIH128s")
_CRC = struct.Struct("<I")
_STATE_OFF = _PRE.size  # 12: an aligned word, written on its own
_BODY_OFF = _STATE_OFF + _STATE.size
_CRC_OFF = _BODY_OFF + _BODY.size

_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PREFIX = "ckptd-"  # every file the store makes starts with it (/dev/shm is shared)


class SnapshotError(CkptError, RuntimeError):
    """A snapshot cannot be written or read as asked (superseded writer, closed store...)."""


class SnapshotBusyError(SnapshotError, TimeoutError):
    """The buffer a new snapshot needs is still being read (persisted, encoded, served)."""


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is safe in a file name (1-128 of ``[A-Za-z0-9._-]``)."""
    if not isinstance(job_id, str) or not _JOB_RE.fullmatch(job_id):
        raise InvalidKeyError(
            f"job id {job_id!r} must be 1-128 characters of [A-Za-z0-9._-], starting with a "
            "letter or digit (it names shared-memory files)"
        )
    return job_id


def segment_name(job_id: str, rank: int, buffer: int, serial: int) -> str:
    """File name of buffer ``buffer`` of ``(job_id, rank)``; ``serial`` changes on growth."""
    return f"{PREFIX}{job_id}.r{rank}.b{buffer}.{serial:x}"


@dataclass(frozen=True)
class Header:
    """The fixed fields of a segment header (everything but the state word)."""

    buffer: int
    epoch: int
    generation: int
    step: int
    length: int
    capacity: int
    rank: int
    payload_crc: int
    descriptor_len: int
    descriptor_crc: int
    job_id: str
    version: int = VERSION

    def pack(self) -> tuple[bytes, bytes]:
        """(bytes before the state word, bytes after it), the header CRC included."""
        job = self.job_id.encode()
        pre = _PRE.pack(MAGIC, self.version, self.buffer)
        body = _BODY.pack(
            self.epoch, self.generation, self.step, self.length, self.capacity, self.rank,
            self.payload_crc, self.descriptor_len, self.descriptor_crc, len(job), job,
        )  # fmt: skip
        return pre, body + _CRC.pack(crc32c.crc32c(body, crc32c.crc32c(pre)))


def read_header(buf: memoryview | bytes) -> tuple[Header, int]:
    """``(header, state)`` from the first bytes of a segment.

    Raises ``ValueError`` saying why when the header is not one this build can trust.
    """
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"segment shorter than its {HEADER_SIZE}-byte header")
    magic, version, buffer = _PRE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ValueError(f"format version {version} (this build reads version {VERSION})")
    (state,) = _STATE.unpack_from(buf, _STATE_OFF)
    (stored,) = _CRC.unpack_from(buf, _CRC_OFF)
    pre, body = bytes(buf[:_STATE_OFF]), bytes(buf[_BODY_OFF:_CRC_OFF])
    if crc32c.crc32c(body, crc32c.crc32c(pre)) != stored:
        raise ValueError("header checksum mismatch (torn or overwritten header)")
    f = _BODY.unpack(body)
    job = bytes(f[10][: f[9]]).decode("utf-8", "replace")
    hdr = Header(buffer, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], job, version)
    if state not in STATE_NAMES:
        raise ValueError(f"unknown state {state}")
    return hdr, state


class Segment:
    """One mapped buffer file (daemon side). Not thread-safe: ``snapshots.Slot`` locks."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._fd = fd
        self._mm = mm
        self._mv = memoryview(mm)

    @classmethod
    def create(cls, path: str, capacity: int, group: int | None = None) -> Segment:
        """A new file of ``HEADER_SIZE + capacity`` bytes, allocated and pre-faulted.

        ``group``: a gid whose members (trainers running as another uid) may map it
        read-write (mode 0660); otherwise only the daemon's uid (0600).
        """
        size = HEADER_SIZE + capacity
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if group is not None:
                os.fchown(fd, -1, group)
                os.fchmod(fd, 0o660)
            os.ftruncate(fd, size)
            _fallocate(fd, size, path)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            # Pages exist after fallocate; one write per page also allocates them where
            # fallocate is missing, and leaves them mapped writable here: no save ever
            # pays for allocating and zeroing a page.
            t = torch.frombuffer(mm, dtype=torch.uint8)
            t[::PAGE].zero_()
            del t
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        seg = cls(path, fd, mm, capacity)
        seg.set_state(EMPTY)
        return seg

    @classmethod
    def open(cls, path: str) -> Segment:
        """Map an existing segment (adoption after a restart). Raises OSError/ValueError."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{size} bytes is smaller than a segment header")
            hdr, _ = read_header(os.pread(fd, HEADER_SIZE, 0))
            if HEADER_SIZE + hdr.capacity > size:
                raise ValueError(f"capacity {hdr.capacity} beyond the file's {size} bytes")
            mapped = HEADER_SIZE + hdr.capacity
            mm = mmap.mmap(fd, mapped, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, hdr.capacity)

    @property
    def size(self) -> int:
        """Bytes of memory the file holds (header, payload capacity, descriptor)."""
        return os.fstat(self._fd).st_size

    def header(self) -> tuple[Header, int]:
        return read_header(self._mv[:HEADER_SIZE])

    def set_state(self, state: int) -> None:
        _STATE.pack_into(self._mm, _STATE_OFF, state)

    def write_header(self, hdr: Header) -> None:
        """Every field but the state word (written with :meth:`set_state`, before/after)."""
        pre, rest = hdr.pack()
        self._mm[:_STATE_OFF] = pre
        self._mm[_BODY_OFF : _BODY_OFF + len(rest)] = rest

    def payload(self, nbytes: int) -> memoryview:
        return self._mv[HEADER_SIZE : HEADER_SIZE + nbytes]

    def tensor(self, nbytes: int) -> torch.Tensor:
        """uint8 tensor over the first ``nbytes`` of the payload (no copy)."""
        if nbytes == 0:  # frombuffer refuses empty buffers
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=HEADER_SIZE)

    def check_identity(self, job_id: str, rank: int, buffer: int, epoch: int) -> Header:
        """The header, if it belongs to this slot and epoch; ``ValueError`` otherwise."""
        hdr, _ = self.header()
        got = (hdr.job_id, hdr.rank, hdr.buffer)
        if got != (job_id, rank, buffer):
            raise ValueError(f"header names job/rank/buffer {got}, not this slot's")
        if hdr.epoch != epoch:
            raise ValueError(
                f"epoch {hdr.epoch:x} is not the slot's epoch {epoch:x} (left over from an "
                "earlier incarnation of this slot)"
            )
        return hdr

    def verify(
        self, job_id: str, rank: int, buffer: int, epoch: int, generation: int, payload: bool
    ) -> tuple[Header, bytes]:
        """Header and raw descriptor JSON if this buffer holds exactly that committed
        generation.

        Checks identity and epoch, state COMPLETE, the generation, lengths, the descriptor
        CRC and (``payload``) the payload CRC; ``ValueError`` naming the first failure.
        The descriptor is not parsed here: every pin (each data-channel frame) verifies,
        and parsing a large plan's descriptor each time cost ~25 ms of GIL per frame.
        """
        hdr = self.check_identity(job_id, rank, buffer, epoch)
        state = self.header()[1]
        if state != COMPLETE:
            raise ValueError(f"state {STATE_NAMES[state]}: the write was interrupted")
        if hdr.generation != generation:
            raise ValueError(
                f"stale generation {hdr.generation}: the slot's last committed generation "
                f"is {generation} (an older copy of the buffer, or a record rolled back)"
            )
        if hdr.length > hdr.capacity or hdr.capacity != self.capacity:
            raise ValueError(f"length {hdr.length} / capacity {hdr.capacity} inconsistent")
        raw = self.read_descriptor(hdr.descriptor_len)
        if crc32c.crc32c(raw) != hdr.descriptor_crc:
            raise ValueError("descriptor checksum mismatch")
        if payload and crc32c.crc32c(self.payload(hdr.length)) != hdr.payload_crc:
            raise ValueError(f"payload checksum mismatch ({hdr.length} bytes of step {hdr.step})")
        return hdr, raw

    def write_descriptor(self, data: bytes) -> None:
        end = HEADER_SIZE + self.capacity
        os.pwrite(self._fd, data, end)
        os.ftruncate(self._fd, end + len(data))  # a shorter descriptor frees the old tail

    def read_descriptor(self, n: int) -> bytes:
        data = os.pread(self._fd, n, HEADER_SIZE + self.capacity)
        if len(data) != n:
            raise ValueError(f"descriptor truncated: {len(data)} of {n} bytes")
        return data

    def close(self, unlink: bool = False) -> None:
        """Unmap and close; the memory is freed once no process maps or names the file."""
        if unlink:
            unlink_quietly(self.path)
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):
            self._mv.release()
        with contextlib.suppress(BufferError):  # a view is still alive: unmapped with it
            self._mm.close()
        os.close(self._fd)
        self._fd = -1


@dataclass(frozen=True)
class WriteLease:
    """What the daemon tells a trainer so that it can copy one snapshot in (JSON-able)."""

    path: str
    job_id: str
    rank: int
    buffer: int
    generation: int
    step: int
    nbytes: int
    capacity: int

    @classmethod
    def of(cls, path: str, h: Header) -> WriteLease:
        return cls(path, h.job_id, h.rank, h.buffer, h.generation, h.step, h.length, h.capacity)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> WriteLease:
        lease = cls(**{k: obj[k] for k in cls.__dataclass_fields__})
        check_job_id(lease.job_id)
        prefix = segment_name(lease.job_id, lease.rank, lease.buffer, 0)[:-1]
        if not os.path.isabs(lease.path) or not os.path.basename(lease.path).startswith(prefix):
            raise InvalidKeyError(f"lease path {lease.path!r} is not a segment of this slot")
        if not 0 <= lease.nbytes <= lease.capacity:
            raise InvalidKeyError(f"lease of {lease.nbytes} bytes > capacity {lease.capacity}")
        return lease


class TrainerMappings:
    """Trainer side: writable maps of one slot's two buffers, kept across saves.

    Call order, in the trainer process: the daemon's ``Slot.begin`` returns a
    :class:`WriteLease` (over the socket); :meth:`writable` maps it (once per buffer
    file, with ``MAP_POPULATE``) and checks that the buffer really is being written for
    that generation; the trainer copies its tensors into the returned uint8 tensor, drops
    it, and asks the daemon to commit.  :meth:`close` when the job ends.  A buffer file
    the daemon replaced (growth) is unmapped here, so that its memory can be freed.
    """

    def __init__(self) -> None:
        self._maps: dict[int, tuple[str, int, mmap.mmap]] = {}

    def writable(self, lease: WriteLease) -> torch.Tensor:
        """A uint8 tensor over the lease's ``nbytes`` of shared memory (zero copies)."""
        cur = self._maps.get(lease.buffer)
        ino = os.stat(lease.path).st_ino
        if cur is None or cur[0] != lease.path or cur[1] != ino:
            self._drop(lease.buffer)
            fd = os.open(lease.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                mm = mmap.mmap(
                    fd, HEADER_SIZE + lease.capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE
                )
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)  # the mapping keeps the file open
            cur = self._maps[lease.buffer] = (lease.path, ino, mm)
        mm = cur[2]
        hdr, state = read_header(memoryview(mm)[:HEADER_SIZE])
        if (hdr.job_id, hdr.rank, hdr.buffer, hdr.generation, state) != (
            lease.job_id, lease.rank, lease.buffer, lease.generation, WRITING,
        ):  # fmt: skip
            raise SnapshotError(
                f"{lease.path} is not open for generation {lease.generation} of job "
                f"{lease.job_id} rank {lease.rank} (it holds generation {hdr.generation}, "
                f"{STATE_NAMES[state]}): the daemon restarted or another save superseded "
                "this one; ask it for a new lease"
            )
        if lease.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mm, dtype=torch.uint8, count=lease.nbytes, offset=HEADER_SIZE)

    def close(self) -> None:
        for b in list(self._maps):
            self._drop(b)

    def _drop(self, buffer: int) -> None:
        cur = self._maps.pop(buffer, None)
        if cur is not None:
            with contextlib.suppress(BufferError):  # a tensor is alive: unmapped with it
                cur[2].close()


def json_descriptor(descriptor: dict[str, Any] | bytes) -> bytes:
    """The stored form of a descriptor: compact JSON (no pickle: it may cross sockets).
    Bytes are taken as already-encoded JSON of an object (checked by the caller)."""
    if isinstance(descriptor, bytes):
        return descriptor
    if not isinstance(descriptor, dict):
        raise TypeError(f"descriptor must be a dict, got {type(descriptor).__name__}")
    return json.dumps(descriptor, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class SnapshotInfo:
    """What a committed snapshot is: which step, which generation of the slot, how big."""

    rank: int
    step: int
    generation: int
    nbytes: int
    payload_crc: int


@dataclass(frozen=True)
class Discarded:
    """A snapshot or file that ``adopt`` (or a failed check) threw away, and why."""

    rank: int | None
    path: str
    reason: str


@dataclass(frozen=True)
class AdoptReport:
    kept: dict[int, SnapshotInfo]  # rank -> the snapshot re-adopted
    discarded: tuple[Discarded, ...]


def read_record(path: str, job_id: str, rank: int) -> dict[str, Any]:
    """A slot record, validated; ``ValueError``/``OSError`` saying why it cannot be used."""
    with open(path, "rb") as f:
        rec = json.loads(f.read(1 << 16))
    ok = (
        isinstance(rec, dict)
        and rec.get("magic") == "ckptd-shm-slot"
        and (rec.get("job"), rec.get("rank")) == (job_id, rank)
        and isinstance(rec.get("epoch"), int)
        and isinstance(rec.get("buffers"), list)
        and len(rec["buffers"]) == 2
        and all(n is None or isinstance(n, str) for n in rec["buffers"])
        and (
            rec.get("committed") is None
            or (
                isinstance(rec["committed"], list)
                and len(rec["committed"]) == 2
                and all(isinstance(x, int) for x in rec["committed"])
                and rec["committed"][1] in (0, 1)
            )
        )
    )
    if not ok:
        raise ValueError("malformed or foreign slot record")
    if rec.get("version") != 1:
        raise ValueError(f"record version {rec.get('version')} (this build reads {1})")
    return rec


def write_record(
    path: str,
    job_id: str,
    rank: int,
    epoch: int,
    committed: tuple[int, int] | None,
    buffers: list[str | None],
) -> None:
    """Replace a slot's record atomically (a reader sees the old or the new one, whole)."""
    record = {
        "magic": "ckptd-shm-slot",
        "version": 1,
        "job": job_id,
        "rank": rank,
        "epoch": epoch,
        "committed": list(committed) if committed else None,
        "buffers": buffers,
    }
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def page_round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _fallocate(fd: int, size: int, path: str) -> None:
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            free = _free_bytes(os.path.dirname(path))
            raise StagingBudgetError(
                f"cannot allocate {size} bytes of shared memory for {path}: the file system "
                f"has {free} bytes free; enlarge it (e.g. the pod's /dev/shm emptyDir "
                "sizeLimit) or lower the daemon's memory budget to what it can hold"
            ) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # otherwise the per-page touch in Segment.create allocates instead


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class SnapshotReader:
    """Trainer side of a same-node load: read-only maps of committed snapshot buffers.

    A loader on the daemon's node reads the payload straight from shared memory instead
    of through a socket. There is no pin across processes, so every read is bracketed by
    header checks: the buffer must be COMPLETE with exactly the expected generation before
    *and after* the copy (a buffer reused by a new save in between fails the second
    check: the copy is discarded, never used). Mappings are kept until :meth:`close`.
    """

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def read_into(self, path: str, generation: int, start: int, out: memoryview) -> None:
        """Payload bytes ``[start, start + len(out))`` of the snapshot ``generation``."""
        mm = self._map(path)
        self._check(mm, path, generation)
        end = HEADER_SIZE + start + len(out)
        if end > len(mm):
            raise SnapshotError(f"{path}: range beyond the segment")
        out[:] = memoryview(mm)[HEADER_SIZE + start : end]
        self._check(mm, path, generation)

    def view(self, path: str, generation: int, start: int, nbytes: int) -> memoryview:
        """Payload bytes ``[start, start + nbytes)`` of the snapshot ``generation`` as a
        read-only view of the mapping, valid until :meth:`close`, with no copy. Checked
        once, here: a caller must detect a later reuse of the buffer itself (e.g. by the
        bytes' checksums, as the rebuild does) or use :meth:`read_into`."""
        mm = self._map(path)
        self._check(mm, path, generation)
        end = HEADER_SIZE + start + nbytes
        if start < 0 or end > len(mm):
            raise SnapshotError(f"{path}: range beyond the segment")
        return memoryview(mm)[HEADER_SIZE + start : end]

    def _map(self, path: str) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[path] = mm
        return mm

    @staticmethod
    def _check(mm: mmap.mmap, path: str, generation: int) -> None:
        try:
            hdr, state = read_header(memoryview(mm)[:HEADER_SIZE])
        except ValueError as e:
            raise SnapshotError(f"{path}: {e}") from None
        if state != COMPLETE or hdr.generation != generation:
            raise SnapshotError(
                f"{path}: holds generation {hdr.generation} ({STATE_NAMES[state]}), not the "
                f"committed generation {generation}: the snapshot changed during the load"
            )

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()
