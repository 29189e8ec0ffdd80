"""Peer data path: bulk bytes between daemons over a dedicated framed socket channel.

Roles and call order (gRPC remains the control plane; it tells peers *what* to move):

* The daemon that holds bytes runs one ``DataServer(bind, token, store)`` and calls
  ``start()`` once (it returns the bound address to advertise over gRPC), ``close()``
  at shutdown.  ``store`` is the daemon's ``BlobStore``: in tests ``MemoryBlobStore``,
  in the daemon the shared-memory snapshots.  The server calls the store from one thread
  per connection, so a store must be thread-safe for different keys.
* A daemon that needs bytes keeps one ``DataClient(address, token)`` per peer (it pools
  connections) and calls ``put``/``get_range``/``get``/``stat`` from any thread.

Guarantees: each object moves in bounded frames (``frame_size``, default 4 MiB) with a
CRC32C per frame, so memory per connection stays bounded whatever the object size;
``get_range`` receives straight into the caller's buffer; every call has a deadline and
a peer that does not answer within it raises ``PeerLostError`` (never a hang); refused
connections are retried with exponential backoff, bounded by ``retries`` and the
deadline.  ``put`` and ``get`` are idempotent, which is what makes retrying them safe.
Wire format, handshake and errors: ``ckptd.daemon.datachannel``.  No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import crc32c

from ckptd.daemon.datachannel import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    NONCE_BYTES,
    AuthError,
    BlobNotFoundError,
    Buffer,
    DataServer,
    Flag,
    FrameSocket,
    FrameTooLargeError,
    Header,
    Op,
    PeerLostError,
    ProtocolError,
    RangeError,
    auth_digest,
    encode_key,
    parse_address,
    tune_socket,
)
from ckptd.errors import CkptError, IntegrityError, StorageError

__all__ = [
    "AuthError",
    "BlobNotFoundError",
    "BlobSink",
    "BlobSource",
    "BlobStore",
    "DataClient",
    "DataServer",
    "FrameTooLargeError",
    "MemoryBlobStore",
    "PatternBlobStore",
    "PeerLostError",
    "ProtocolError",
    "PutHandle",
    "RangeError",
    "TransportFaults",
]

T = TypeVar("T")


@dataclass(frozen=True)
class TransportFaults:
    """Test-only fault injection for a ``DataServer`` (style principle 9).

    ``corrupt_get``: flip one byte of every DATA payload after computing its CRC, so the
    client must detect it.  ``corrupt_put``: flip one byte of every received PUT payload
    before verifying it, so the server must refuse the put.
    """

    corrupt_get: bool = False
    corrupt_put: bool = False


# ------------------------------------------------------------------ store interfaces


class BlobSource(Protocol):
    """What a ``DataServer`` reads from.  Called from several threads at once."""

    def size(self, key: str) -> int:
        """Size of the committed object ``key``; ``KeyError`` if there is none."""
        ...

    def read(self, key: str, start: int, end: int) -> memoryview:
        """A zero-copy view of bytes ``[start, end)`` (at most one frame) of ``key``."""
        ...


class PutHandle(Protocol):
    """One object being received: buffers are filled in order, then commit or abort."""

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        """A writable view for bytes ``[offset, offset + nbytes)``; the server receives into it."""
        ...

    def commit(self) -> None:
        """Every byte arrived and was verified: make the object visible (replacing any old one)."""
        ...

    def abort(self) -> None:
        """The put failed: drop what was received; the previous object, if any, stays."""
        ...


class BlobSink(Protocol):
    """What a ``DataServer`` writes to.  Unverified bytes never become visible."""

    def begin_put(self, key: str, nbytes: int) -> PutHandle:
        """Reserve room for ``nbytes``; raise ``StorageError``/``MemoryError`` if over budget."""
        ...


class BlobStore(BlobSource, BlobSink, Protocol):
    """Both roles: what a daemon hands its ``DataServer``."""


class MemoryBlobStore:
    """Objects in ``bytearray``s (tests; the daemon passes its shared-memory snapshots)."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytearray] = {}
        self._lock = threading.Lock()

    def __setitem__(self, key: str, data: Buffer) -> None:
        with self._lock:
            self._blobs[key] = bytearray(data)

    def __getitem__(self, key: str) -> bytearray:
        with self._lock:
            return self._blobs[key]

    def size(self, key: str) -> int:
        with self._lock:
            if key not in self._blobs:
                raise KeyError(f"no object {key!r} on this peer")
            return len(self._blobs[key])

    def read(self, key: str, start: int, end: int) -> memoryview:
        with self._lock:
            return memoryview(self._blobs[key])[start:end]

    def begin_put(self, key: str, nbytes: int) -> PutHandle:
        return _MemoryPut(self, key, bytearray(nbytes))


@dataclass
class _MemoryPut:
    store: MemoryBlobStore
    key: str
    data: bytearray

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.data)[offset : offset + nbytes]

    def commit(self) -> None:
        with self.store._lock:
            self.store._blobs[self.key] = self.data

    def abort(self) -> None:
        self.data = bytearray()


class PatternBlobStore:
    """Synthetic objects for benchmarks and memory tests: nothing is stored.

    ``size("pattern:N")`` is N; byte ``i`` of every object is ``pattern_byte(i)``; reads
    are views of one fixed buffer, puts land in one reused scratch buffer per put.  So
    the process's memory is the transport's own, whatever the volume moved.
    """

    PERIOD = DEFAULT_MAX_FRAME_BYTES

    def __init__(self) -> None:
        one = bytes(range(251)) * (self.PERIOD // 251 + 1)  # 251: prime, so frames differ
        self._pattern = memoryview(one[: self.PERIOD] * 2)

    @classmethod
    def expected(cls, start: int, end: int) -> bytes:
        """What ``get_range("pattern:N", start, end)`` returns (for checking)."""
        import numpy as np

        idx = np.arange(start, end, dtype=np.int64)
        return ((idx % cls.PERIOD) % 251).astype(np.uint8).tobytes()

    def size(self, key: str) -> int:
        prefix, _, n = key.partition(":")
        if prefix != "pattern" or not n.isdigit():
            raise KeyError(f"no object {key!r} (PatternBlobStore serves 'pattern:<bytes>')")
        return int(n)

    def read(self, key: str, start: int, end: int) -> memoryview:
        if end - start > self.PERIOD:
            raise RangeError(f"read of {end - start} bytes exceeds one frame")
        s = start % self.PERIOD
        return self._pattern[s : s + end - start]

    def begin_put(self, key: str, nbytes: int) -> PutHandle:
        return _ScratchPut(self)


class _ScratchPut:
    def __init__(self, store: PatternBlobStore) -> None:
        self.store, self.scratch = store, bytearray()

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        if len(self.scratch) < nbytes:
            self.scratch = bytearray(nbytes)
        return memoryview(self.scratch)[:nbytes]

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


# ----------------------------------------------------------------------------- client

# Failures worth another attempt on a fresh connection: the peer refused or reset us
# (restarting, or a pooled connection that the server closed while idle).  A timeout is
# not retried: the deadline is the whole call's, so a silent peer is lost, not retried.
_TRANSIENT = (ConnectionError, EOFError, OSError)


class DataClient:
    """Pooled, authenticated connections to one peer's ``DataServer``.  Thread-safe.

    Every call takes ``timeout`` (seconds; default the client's) for the whole call,
    connection and retries included.  Errors: ``PeerLostError`` (silent past the deadline,
    or unreachable after ``retries``), ``AuthError`` (token refused), ``IntegrityError``
    (a CRC mismatch on either side), ``BlobNotFoundError``, ``RangeError``,
    ``ProtocolError`` (incl. ``FrameTooLargeError``), ``StorageError`` (the peer's store
    refused the put, e.g. over its memory budget).
    """

    def __init__(
        self,
        address: str,
        token: bytes,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        pool_size: int = 4,
        frame_size: int = DEFAULT_FRAME_BYTES,
        max_frame: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        if not 0 < frame_size <= max_frame:
            raise ValueError(f"need 0 < frame_size <= max_frame, got {frame_size}, {max_frame}")
        self.address, self.token = address, bytes(token)
        self.family, self.sockaddr = parse_address(address)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.pool_size, self.frame_size, self.max_frame = pool_size, frame_size, max_frame
        self._idle: list[FrameSocket] = []
        self._lock = threading.Lock()

    # -- public calls

    def put(self, key: str, data: Buffer, *, timeout: float | None = None) -> None:
        """Store ``data`` (any contiguous buffer) under ``key`` on the peer, replacing it."""
        raw_key = encode_key(key)
        view = memoryview(data).cast("B")
        self._call(f"put {key!r}", lambda c, d: self._put(c, d, raw_key, view), timeout)

    def get_range(
        self,
        key: str,
        start: int,
        end: int,
        out: Buffer | None = None,
        *,
        timeout: float | None = None,
    ) -> memoryview:
        """Bytes ``[start, end)`` of ``key``, received straight into ``out`` if given.

        Returns a view of ``out`` (or of a new ``bytearray``) of ``end - start`` bytes.
        If the call raises, the contents of ``out`` are unspecified.
        """
        encode_key(key)
        if not 0 <= start <= end:
            raise RangeError(f"bad range [{start}, {end})")
        dest = memoryview(out if out is not None else bytearray(end - start)).cast("B")
        if dest.readonly or len(dest) < end - start:
            raise RangeError(f"out must be a writable buffer of >= {end - start} bytes")
        dest = dest[: end - start]
        raw_key = key.encode("utf-8")
        self._call(f"get {key!r}", lambda c, d: self._get(c, d, raw_key, start, end, dest), timeout)
        return dest

    def get(self, key: str, *, timeout: float | None = None) -> bytearray:
        """The whole object (a ``stat`` then a ``get_range`` under one deadline)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = bytearray(self.stat(key, timeout=timeout))
        self.get_range(key, 0, len(out), out, timeout=max(0.0, deadline - time.monotonic()))
        return out

    def stat(self, key: str, *, timeout: float | None = None) -> int:
        """Size of ``key`` on the peer (``BlobNotFoundError`` if it has none)."""
        raw_key = encode_key(key)

        def op(conn: FrameSocket, deadline: float) -> int:
            _arm(conn, deadline)
            conn.send(Header(Op.STAT, key_len=len(raw_key)), raw_key)
            return self._reply(conn).total

        return self._call(f"stat {key!r}", op, timeout)

    def close(self) -> None:
        """Close pooled connections (calls in flight finish on their own connection)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol

    def _put(self, conn: FrameSocket, deadline: float, key: bytes, view: memoryview) -> None:
        total, pos = len(view), 0
        try:
            while True:
                n = min(self.frame_size, total - pos)
                chunk = view[pos : pos + n]
                last = pos + n == total
                header = Header(
                    Op.PUT, Flag.LAST if last else Flag.NONE, key_len=len(key) if pos == 0 else 0,
                    offset=pos, length=n, total=total, crc=crc32c.crc32c(chunk),
                )
                _arm(conn, deadline)
                conn.send(header, key if pos == 0 else b"", chunk)
                pos += n
                if last:
                    break
        except TimeoutError:
            raise
        except OSError:
            # The server may have refused mid-stream (e.g. frame too large) and closed:
            # its ERROR frame is still readable and says why; else this was transient.
            with contextlib.suppress(OSError):
                conn.sock.settimeout(0.5)
                self._reply(conn)
            raise
        _arm(conn, deadline)
        self._reply(conn)

    def _get(
        self, conn: FrameSocket, deadline: float, key: bytes, start: int, end: int, dest: memoryview
    ) -> None:
        _arm(conn, deadline)
        conn.send(Header(Op.GET, key_len=len(key), offset=start, total=end), key)
        pos = start
        while True:
            _arm(conn, deadline)
            header = conn.recv_header()
            if header.op == Op.ERROR:
                conn.raise_error(header)
            if header.op != Op.DATA or header.offset != pos or pos + header.length > end:
                raise ProtocolError(f"peer {self.address}: unexpected reply frame {header}")
            view = dest[pos - start : pos - start + header.length]
            conn.recv_into(view)
            if crc32c.crc32c(view) != header.crc:
                raise IntegrityError(
                    f"peer {self.address}: CRC32C mismatch in bytes [{pos}, "
                    f"{pos + header.length}) of {key.decode()!r}; the data was corrupted in "
                    "transit or in the peer's memory"
                )
            pos += header.length
            if header.last:
                break
        if pos != end:
            raise ProtocolError(f"peer {self.address}: stream ended at {pos}, wanted {end}")

    def _reply(self, conn: FrameSocket) -> Header:
        header = conn.recv_header()
        if header.op == Op.ERROR:
            conn.raise_error(header)
        if header.op != Op.OK:
            raise ProtocolError(f"peer {self.address}: expected OK, got {header.op.name}")
        return header

    # -- connections, deadlines, retries

    def _call(self, what: str, op: Callable[[FrameSocket, float], T], timeout: float | None) -> T:
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            conn: FrameSocket | None = None
            try:
                conn = self._acquire(deadline)
                result = op(conn, deadline)
            except (CkptError, ValueError) as exc:  # typed answers (and our own checks)
                if conn is not None:
                    # After these ERROR replies the stream is in sync; after anything else
                    # (a CRC mismatch mid-stream, a protocol violation) it is not.
                    in_sync = isinstance(exc, BlobNotFoundError | RangeError | StorageError)
                    self._release(conn, reuse=in_sync)
                raise
            except TimeoutError as exc:
                if conn is not None:
                    conn.close()
                raise PeerLostError(
                    f"peer {self.address} did not answer {what} within {budget:.3g} s; "
                    "mark it lost"
                ) from exc
            except _TRANSIENT as exc:
                if conn is not None:
                    conn.close()
                attempt += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + random.random()  # jitter: peers retrying together spread out
                if attempt > self.retries or time.monotonic() + delay >= deadline:
                    raise PeerLostError(
                        f"peer {self.address} unreachable for {what} after {attempt} "
                        f"attempt(s): {exc}; mark it lost"
                    ) from exc
                time.sleep(delay)
            else:
                self._release(conn, reuse=True)
                return result

    def _acquire(self, deadline: float) -> FrameSocket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect(deadline)

    def _release(self, conn: FrameSocket, *, reuse: bool) -> None:
        with self._lock:
            if reuse and len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, deadline: float) -> FrameSocket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            tune_socket(sock)  # before connect, so TCP window scaling can use the buffers
            sock.settimeout(min(self.connect_timeout, _remaining(deadline)))
            sock.connect(self.sockaddr)
            conn = FrameSocket(sock, self.max_frame, peer=self.address)
            _arm(conn, deadline)
            hello = conn.recv_header()
            if hello.op != Op.HELLO or hello.length != NONCE_BYTES:
                raise ProtocolError(f"peer {self.address}: expected HELLO, got {hello.op.name}")
            nonce = conn.recv_small(NONCE_BYTES)
            conn.send(Header(Op.AUTH, length=32), b"", auth_digest(self.token, nonce))
            self._reply(conn)
            return conn
        except BaseException:
            sock.close()
            raise


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline exceeded")
    return left


def _arm(conn: FrameSocket, deadline: float) -> None:
    """Bound the next socket operation by what is left of the call's deadline."""
    conn.sock.settimeout(_remaining(deadline))
