"""Wire format of the peer data channel: framed, checksummed, authenticated bulk bytes.

gRPC stays the control plane; bulk bytes (shards, ranges for resharding) take this
channel because gRPC's Python streaming stays below 1 GB/s on loopback while sockets that
``recv_into`` the destination do not (measured side by side: ``bench/peer_transfer.py``).

Every frame is a fixed 40-byte header, then ``key_len`` bytes of UTF-8 key, then
``length`` bytes of payload::

    magic  "CKDT"   4s   refuses anything that is not this protocol
    version         B    PROTOCOL_VERSION; a peer refuses other versions
    op              B    Op
    flags           B    Flag bits (LAST marks the final frame of a stream)
    (pad)           x
    key_len         H    <= MAX_KEY_BYTES
    offset          Q    byte offset of this payload in the object (ERROR: error code)
    length          Q    payload bytes that follow the key (<= the receiver's max frame)
    total           Q    object size (PUT, DATA, STAT reply) or range end (GET)
    crc             I    CRC32C of the payload

All integers are big-endian.  Connection set-up (challenge-response, so the token never
crosses the socket)::

    server -> HELLO   payload = 32-byte nonce
    client -> AUTH    payload = HMAC-SHA256(token, nonce)
    server -> OK      (or ERROR AUTH, then close)

Then any number of requests, one at a time per connection:

* PUT: client sends PUT frames covering ``[0, total)`` in order (LAST on the final one;
  one empty LAST frame for an empty object); server replies OK once, after committing.
* GET ``[offset, total)``: client sends one GET frame; server replies DATA frames in
  order, LAST on the final one (``total`` of DATA = object size), or ERROR.
* STAT: server replies OK with ``total`` = object size, or ERROR.

On a malformed header the receiver replies ERROR (best effort) and closes: the byte
stream cannot be trusted after a framing error.  No pickle: every byte is described here.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import crc32c

from ckptd.daemon.auth import secure_socket
from ckptd.errors import CkptError, IntegrityError, StorageError

if TYPE_CHECKING:
    from ckptd.daemon.transport import BlobStore, PutHandle, TransportFaults

MAGIC = b"CKDT"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sBBBxHQQQI")
HEADER_SIZE = HEADER.size  # 40
MAX_KEY_BYTES = 1024
NONCE_BYTES = 32
DEFAULT_FRAME_BYTES = 4 << 20  # what a sender puts in one frame
DEFAULT_MAX_FRAME_BYTES = 16 << 20  # what a receiver accepts; bounds memory per frame
MAX_ERROR_BYTES = 4096

Buffer = Any  # anything exposing the buffer protocol


# Frame kinds, then the error code an ERROR frame carries in ``offset`` (numbered from 1).
Op = enum.IntEnum("Op", "HELLO AUTH OK ERROR PUT GET DATA STAT")
ErrorCode = enum.IntEnum(
    "ErrorCode", "PROTOCOL VERSION TOO_LARGE AUTH NOT_FOUND INTEGRITY RANGE STORAGE"
)


class Flag(enum.IntFlag):
    NONE = 0
    LAST = 1  # the final frame of a stream


class TransportError(CkptError):
    """Base class of data-channel failures."""


class PeerLostError(TransportError, ConnectionError):
    """The peer did not answer within the deadline, or stayed unreachable through retries."""


class ProtocolError(TransportError, ValueError):
    """A frame violated the wire format (bad magic, unknown version, oversized frame)."""


class FrameTooLargeError(ProtocolError):
    """A frame's payload exceeds the receiver's limit (``max_frame``)."""


class VersionError(ProtocolError):
    """The peer speaks another data-channel protocol version."""


class AuthError(TransportError, PermissionError):
    """The peer refused our token (or we refused its handshake). Check the job's token."""


class BlobNotFoundError(TransportError, KeyError):
    """The peer holds no object under this key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "blob not found"


class RangeError(TransportError, IndexError):
    """A requested byte range lies outside the object, or does not fit the caller's buffer."""


_CODE_TO_ERROR: dict[int, type[Exception]] = {  # IntEnum keys: a wire int finds them
    ErrorCode.PROTOCOL: ProtocolError,
    ErrorCode.VERSION: VersionError,
    ErrorCode.TOO_LARGE: FrameTooLargeError,
    ErrorCode.AUTH: AuthError,
    ErrorCode.NOT_FOUND: BlobNotFoundError,
    ErrorCode.INTEGRITY: IntegrityError,
    ErrorCode.RANGE: RangeError,
    ErrorCode.STORAGE: StorageError,
}


def error_for(code: int, message: str, peer: str) -> Exception:
    """The typed exception for an ERROR frame received from ``peer``."""
    return _CODE_TO_ERROR.get(code, ProtocolError)(f"peer {peer}: {message}")


def describe(exc: BaseException) -> str:
    """An exception's message (``str(KeyError)`` would add quotes)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def code_for(exc: BaseException) -> ErrorCode:
    """The ERROR code that reports ``exc`` to the peer (inverse of ``error_for``)."""
    for code in (ErrorCode.TOO_LARGE, ErrorCode.VERSION, ErrorCode.AUTH, ErrorCode.INTEGRITY):
        if isinstance(exc, _CODE_TO_ERROR[code]):
            return code
    for cls, code in ((KeyError, ErrorCode.NOT_FOUND), (IndexError, ErrorCode.RANGE),
                      (OSError | MemoryError | StorageError, ErrorCode.STORAGE)):
        if isinstance(exc, cls):
            return code
    return ErrorCode.PROTOCOL


@dataclass(frozen=True)
class Header:
    """One decoded frame header (see the module docstring for the fields)."""

    op: Op
    flags: Flag = Flag.NONE
    key_len: int = 0
    offset: int = 0
    length: int = 0
    total: int = 0
    crc: int = 0
    version: int = PROTOCOL_VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.op, self.flags, self.key_len,
                           self.offset, self.length, self.total, self.crc)

    @property
    def last(self) -> bool:
        return bool(self.flags & Flag.LAST)


def unpack_header(raw: Buffer, max_frame: int) -> Header:
    """Decode and validate a header; ``ProtocolError`` names what is wrong."""
    magic, version, op, flags, key_len, offset, length, total, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (not a ckptd data channel?)")
    if version != PROTOCOL_VERSION:
        raise VersionError(f"unsupported data-channel protocol version {version} (this peer "
                           f"speaks {PROTOCOL_VERSION}); run the same ckptd version everywhere")
    if not 1 <= op <= len(Op):
        raise ProtocolError(f"unknown frame op {op}")
    if key_len > MAX_KEY_BYTES:
        raise ProtocolError(f"key of {key_len} bytes exceeds the {MAX_KEY_BYTES}-byte limit")
    if length > max_frame:
        raise FrameTooLargeError(f"frame payload of {length} bytes exceeds the limit {max_frame}")
    return Header(Op(op), Flag(flags), key_len, offset, length, total, crc, version)


def encode_key(key: str) -> bytes:
    """UTF-8 bytes of a valid key; ``ValueError`` for empty, NUL-bearing or long keys."""
    raw = key.encode("utf-8")
    if not raw or len(raw) > MAX_KEY_BYTES or b"\0" in raw:
        raise ValueError(f"invalid blob key {key!r}: need 1..{MAX_KEY_BYTES} UTF-8 bytes, no NUL")
    return raw


def auth_digest(token: bytes, nonce: bytes) -> bytes:
    """The client's proof of the token for one connection's nonce."""
    return hmac.new(token, b"ckptd-data-v1\0" + nonce, hashlib.sha256).digest()


class FrameSocket:
    """A connected stream socket with frame helpers; one user at a time.

    Timeouts are the caller's (``sock.settimeout``); ``TimeoutError`` and other ``OSError``
    propagate unchanged so the caller can tell a silent peer from a refused one.
    """

    def __init__(self, sock: socket.socket, max_frame: int, peer: str) -> None:
        self.sock, self.max_frame, self.peer = sock, max_frame, peer
        self._hdr = bytearray(HEADER_SIZE)

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, straight from the socket (no intermediate buffer)."""
        pos, n = 0, len(view)
        while pos < n:
            got = self.sock.recv_into(view[pos:], n - pos)
            if got == 0:
                raise ConnectionResetError(f"peer {self.peer} closed the connection")
            pos += got

    def recv_header(self) -> Header:
        self.recv_into(memoryview(self._hdr))
        return unpack_header(self._hdr, self.max_frame)

    def recv_small(self, n: int) -> bytes:
        buf = memoryview(bytearray(n))
        self.recv_into(buf)
        return buf.tobytes()

    def send(self, header: Header, key: bytes = b"", payload: Buffer = b"") -> None:
        """One frame; header and key go in one write, the payload from the caller's buffer."""
        self.sock.sendall(header.pack() + key if key else header.pack())
        if header.length:
            self.sock.sendall(payload)

    def send_error(self, code: ErrorCode, message: str) -> None:
        msg = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
        self.send(Header(Op.ERROR, Flag.LAST, offset=int(code), length=len(msg)), b"", msg)

    def raise_error(self, header: Header) -> None:
        """Read an ERROR frame's message and raise the matching typed exception."""
        msg = self.recv_small(min(header.length, MAX_ERROR_BYTES)).decode("utf-8", "replace")
        raise error_for(header.offset, msg, self.peer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tune_socket(sock: socket.socket, buffer_bytes: int = 8 << 20) -> None:
    """Large kernel buffers (fewer wake-ups per GB) and no Nagle delay on small frames."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        # Capped by net.core.{w,r}mem_max; the kernel default still works if refused.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(address: str) -> tuple[int, Any]:
    """``"tcp://host:port"`` / ``"host:port"`` / ``"unix:/path"`` -> (family, sockaddr)."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:"):]
    rest = address.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad data-channel address {address!r}: want host:port or unix:/path")
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


class DataServer:
    """Serves a ``BlobStore`` on a TCP or unix socket: one thread per connection.

    ``start()`` binds and returns the address to advertise (port 0 picks a free port);
    ``close()`` stops accepting and closes every connection.  ``io_timeout`` bounds each
    read/write in a request, ``idle_timeout`` an idle pooled connection: a stalled client
    never pins a thread.  At most ``max_connections`` at once (each costs a thread and a
    header buffer: payloads move between the socket and the store's own buffers).
    """

    def __init__(
        self, bind: str, token: bytes, store: BlobStore, *,
        frame_size: int = DEFAULT_FRAME_BYTES, max_frame: int = DEFAULT_MAX_FRAME_BYTES,
        io_timeout: float = 30.0, idle_timeout: float = 300.0, max_connections: int = 64,
        faults: TransportFaults | None = None, socket_group: int | None = None,
    ) -> None:
        if not token:
            raise ValueError("DataServer needs a non-empty token")
        if not 0 < frame_size <= max_frame:
            raise ValueError(f"need 0 < frame_size <= max_frame, got {frame_size}, {max_frame}")
        self.bind, self.token, self.store = bind, bytes(token), store
        self.frame_size, self.max_frame = frame_size, max_frame
        self.io_timeout, self.idle_timeout = io_timeout, idle_timeout
        self.faults = faults  # test-only fault injection; None in production
        self.socket_group = socket_group  # unix socket: 0660 of this gid, else 0600
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock, self._closed, self.address = threading.Lock(), threading.Event(), ""

    def start(self) -> str:
        family, addr = parse_address(self.bind)
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX and os.path.exists(addr):
            os.unlink(addr)  # a stale socket from a previous run
        elif family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(sock)  # before listen: accepted sockets inherit the buffer sizes
        sock.bind(addr)
        if family == socket.AF_UNIX:
            secure_socket(addr, self.socket_group)  # the control socket's mode and group
            self.address = f"unix:{addr}"
        else:
            host, port = sock.getsockname()[:2]
            self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        sock.listen(128)
        self._listener = sock
        threading.Thread(target=self._accept_loop, name="ckptd-data-accept", daemon=True).start()
        return self.address

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> DataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            self._slots.acquire()  # backpressure: stop accepting when every slot is busy
            try:
                conn, _ = self._listener.accept()
            except OSError:
                self._slots.release()
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = FrameSocket(sock, self.max_frame, peer="client")
        try:
            sock.settimeout(self.io_timeout)
            if self._handshake(conn):
                while not self._closed.is_set():
                    sock.settimeout(self.idle_timeout)
                    header = conn.recv_header()
                    sock.settimeout(self.io_timeout)
                    self._request(conn, header)
        except ProtocolError as exc:  # the stream cannot be trusted any more: say why, close
            self._refuse(conn, code_for(exc), str(exc))
        except (OSError, EOFError):
            pass  # the client went away or stalled past io_timeout: nothing to answer
        finally:
            with self._lock:
                self._conns.discard(sock)
            conn.close()
            self._slots.release()

    def _handshake(self, conn: FrameSocket) -> bool:
        nonce = os.urandom(NONCE_BYTES)
        conn.send(Header(Op.HELLO, length=NONCE_BYTES), b"", nonce)
        header = conn.recv_header()
        if header.op != Op.AUTH or header.length != 32 or header.key_len:
            raise ProtocolError("expected an AUTH frame after HELLO")
        if not hmac.compare_digest(conn.recv_small(32), auth_digest(self.token, nonce)):
            self._refuse(conn, ErrorCode.AUTH, "wrong data-channel token")
            return False
        conn.send(Header(Op.OK))
        return True

    def _refuse(self, conn: FrameSocket, code: ErrorCode, message: str) -> None:
        """Send ERROR, then drain briefly so the close does not reset the reply away."""
        with contextlib.suppress(OSError):
            conn.send_error(code, message)
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.settimeout(1.0)
            scratch = bytearray(1 << 20)
            for _ in range(64):
                if not conn.sock.recv_into(scratch):
                    break

    def _request(self, conn: FrameSocket, header: Header) -> None:
        raw_key = conn.recv_small(header.key_len)
        try:
            key = raw_key.decode("utf-8")
            encode_key(key)
        except ValueError as exc:
            raise ProtocolError(f"invalid key: {exc}") from None
        if header.op == Op.PUT:
            self._put(conn, key, header)
        elif header.op == Op.GET:
            self._get(conn, key, header.offset, header.total)
        elif header.op == Op.STAT:
            try:
                size = self.store.size(key)
            except Exception as exc:  # report store failures to the peer, keep serving
                conn.send_error(code_for(exc), f"stat {key!r}: {describe(exc)}")
                return
            conn.send(Header(Op.OK, Flag.LAST, total=size))
        else:
            raise ProtocolError(f"unexpected {header.op.name} frame where a request belongs")

    def _put(self, conn: FrameSocket, key: str, first: Header) -> None:
        handle: PutHandle | None = None
        try:
            handle = self.store.begin_put(key, first.total)
        except Exception as exc:  # e.g. over the memory budget: drain the frames, then refuse
            error: tuple[ErrorCode, str] | None = (code_for(exc), f"put {key!r}: {describe(exc)}")
        else:
            error = None
        try:
            self._receive_put(conn, key, first, handle, error)
        except BaseException:
            if handle is not None:
                handle.abort()  # never leave a half-received object behind
            raise

    def _receive_put(self, conn: FrameSocket, key: str, first: Header,
                     handle: PutHandle | None, error: tuple[ErrorCode, str] | None) -> None:
        total, pos, header = first.total, 0, first
        scratch: memoryview | None = None
        while True:
            if header.op != Op.PUT or header.offset != pos or pos + header.length > total:
                raise ProtocolError(
                    f"put {key!r}: frame at offset {header.offset} (+{header.length}) "
                    f"does not continue at {pos} of {total}"
                )
            if handle is not None and error is None:
                view = handle.buffer(pos, header.length)
            else:
                scratch = scratch or memoryview(bytearray(self.max_frame))
                view = scratch[: header.length]
            conn.recv_into(view)
            if self.faults and self.faults.corrupt_put and header.length:
                view[0] ^= 0xFF
            if error is None and crc32c.crc32c(view) != header.crc:
                error = (ErrorCode.INTEGRITY, f"put {key!r}: CRC32C mismatch at offset {pos}")
            pos += header.length
            if header.last:
                break
            header = conn.recv_header()
            if header.key_len:
                raise ProtocolError(f"put {key!r}: continuation frame carries a key")
        if error is None and pos != total:
            error = (ErrorCode.RANGE, f"put {key!r}: got {pos} of {total} bytes")
        if error is None and handle is not None:
            try:
                handle.commit()
            except Exception as exc:
                error = (code_for(exc), f"put {key!r}: commit failed: {describe(exc)}")
        if error is not None:
            if handle is not None:
                handle.abort()
            conn.send_error(*error)
        else:
            conn.send(Header(Op.OK, Flag.LAST, total=total))

    def _get(self, conn: FrameSocket, key: str, start: int, end: int) -> None:
        try:
            size = self.store.size(key)
            if not 0 <= start <= end <= size:
                raise RangeError(f"range [{start}, {end}) outside object {key!r} of {size} bytes")
        except Exception as exc:
            conn.send_error(code_for(exc), f"get {key!r}: {describe(exc)}")
            return
        pos = start
        while True:
            n = min(self.frame_size, end - pos)
            try:
                view = self.store.read(key, pos, pos + n)
            except Exception as exc:
                # Mid-stream: the client checks every frame's op, so it raises the store's
                # typed error (e.g. a rebuild that lost its quorum) instead of a lost peer.
                conn.send_error(code_for(exc), f"get {key!r}: {describe(exc)}")
                return
            crc = crc32c.crc32c(view)
            if self.faults and self.faults.corrupt_get and n:
                corrupted = bytearray(view)
                corrupted[n // 2] ^= 0x01
                view = memoryview(corrupted)
            last = pos + n == end
            flags = Flag.LAST if last else Flag.NONE
            conn.send(Header(Op.DATA, flags, offset=pos, length=n, total=size, crc=crc), b"", view)
            pos += n
            if last:
                return
