"""Conformance and fault tests of the peer data channel (``ckptd.daemon.transport``).

``TransportTests`` is the suite every transport implementation subclasses (style
principle 8): here the TCP channel and the unix-socket channel.  Servers run in real
subprocesses on 127.0.0.1 (free ports) or a private unix socket; faults are injected with
``TransportFaults`` (a server flag), SIGSTOP (hung peer) and SIGKILL (lost peer).
"""

from __future__ import annotations

import hmac
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from ckptd.daemon.datachannel import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameSocket,
    Header,
    Op,
    VersionError,
    auth_digest,
    parse_address,
    unpack_header,
)
from ckptd.daemon.transport import (
    AuthError,
    BlobNotFoundError,
    DataClient,
    FrameTooLargeError,
    PatternBlobStore,
    PeerLostError,
    ProtocolError,
    RangeError,
)
from ckptd.errors import CkptError, IntegrityError

pytestmark = pytest.mark.slow

TOKEN = b"test-job-token"
MiB = 1 << 20

# The server subprocess: the token comes through the environment, never argv.
SERVER = """
import os, sys, threading
from ckptd.daemon.transport import (DataServer, MemoryBlobStore, PatternBlobStore,
                                    TransportFaults)
bind, store, faults = sys.argv[1], sys.argv[2], sys.argv[3]
flags = {f.replace("-", "_"): True for f in faults.split(",") if f}
server = DataServer(bind, os.environb[b"CKPTD_DATA_TOKEN"],
                    PatternBlobStore() if store == "pattern" else MemoryBlobStore(),
                    faults=TransportFaults(**flags))
print("LISTENING", server.start(), flush=True)
threading.Event().wait()
"""


class ServerProc:
    """A ``DataServer`` in its own process; ``address`` is what clients connect to."""

    def __init__(self, bind: str, store: str = "memory", faults: str = "") -> None:
        env = {**os.environ, "CKPTD_DATA_TOKEN": TOKEN.decode()}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, bind, store, faults],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING "), f"server failed to start: {line!r}"
        self.address = line.split(" ", 1)[1].strip()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:  # delivery is asynchronous: wait until it has stopped
            deadline = time.monotonic() + 5
            while self._state() not in ("T", "t") and time.monotonic() < deadline:
                time.sleep(0.005)

    def _state(self) -> str:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def peak_rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class TransportTests:
    """Conformance suite: subclasses say how to bind (``bind_address``)."""

    @classmethod
    def bind_address(cls, tmpdir: str) -> str:
        pytest.fail("a TransportTests subclass must provide bind_address()")

    @pytest.fixture(scope="class")
    @classmethod
    def sockdir(cls) -> Iterator[str]:
        # Short path: unix socket paths are limited to 108 bytes.
        with tempfile.TemporaryDirectory(prefix="ckd-", dir="/tmp") as d:
            yield d

    @pytest.fixture
    def spawn(self, sockdir: str) -> Iterator:
        procs: list[ServerProc] = []

        def make(store: str = "memory", faults: str = "") -> ServerProc:
            sub = tempfile.mkdtemp(dir=sockdir)
            procs.append(ServerProc(self.bind_address(sub), store, faults))
            return procs[-1]

        yield make
        for p in procs:
            p.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, sockdir: str) -> Iterator[ServerProc]:  # one per class (classmethod)
        proc = ServerProc(cls.bind_address(tempfile.mkdtemp(dir=sockdir)))
        yield proc
        proc.stop()

    @pytest.fixture
    def client(self, server: ServerProc) -> Iterator[DataClient]:
        with DataClient(server.address, TOKEN, timeout=20.0) as c:
            yield c

    # -- data

    @pytest.mark.parametrize("size", [0, 1, 4 * MiB + 7, 64 * MiB])
    def test_round_trip_bit_exact(self, client: DataClient, size: int) -> None:
        data = payload(size, seed=size)
        client.put(f"rt/{size}", data)
        assert client.stat(f"rt/{size}") == size
        assert client.get(f"rt/{size}") == data

    def test_put_replaces(self, client: DataClient) -> None:
        client.put("replace", b"old bytes")
        client.put("replace", b"new")
        assert client.get("replace") == b"new"

    def test_ranges(self, client: DataClient) -> None:
        data = payload(9 * MiB + 3, seed=1)
        client.put("ranges", data)
        cases = [(0, 0), (0, 1), (5, 5), (4 * MiB - 1, 4 * MiB + 1), (1, 9 * MiB + 3),
                 (8 * MiB, 9 * MiB + 3), (len(data), len(data))]
        for start, end in cases:
            assert bytes(client.get_range("ranges", start, end)) == data[start:end], (start, end)
        with pytest.raises(RangeError):
            client.get_range("ranges", 0, len(data) + 1)
        with pytest.raises(RangeError):
            client.get_range("ranges", 10, 5)
        assert bytes(client.get_range("ranges", 0, 4)) == data[:4]  # connection still usable

    def test_receive_into_caller_buffer(self, client: DataClient) -> None:
        data = payload(6 * MiB + 5, seed=2)
        client.put("into", data)
        out = bytearray(len(data) + 100)
        view = client.get_range("into", 3, len(data), memoryview(out)[50:])
        assert view.obj is out  # a view of the caller's buffer, not a copy
        assert out[50 : 50 + len(data) - 3] == data[3:]
        assert out[:50] == bytes(50) and out[50 + len(data) - 3 :] == bytes(53)
        arr = np.zeros(len(data), dtype=np.uint8)  # any writable buffer, e.g. numpy or shm
        client.get_range("into", 0, len(data), arr)
        assert arr.tobytes() == data
        with pytest.raises(RangeError):
            client.get_range("into", 0, 100, bytearray(10))
        with pytest.raises(RangeError):
            client.get_range("into", 0, 10, bytes(10))  # read-only

    def test_missing_key(self, client: DataClient) -> None:
        with pytest.raises(BlobNotFoundError, match="no-such-key"):
            client.get("no-such-key")
        with pytest.raises(KeyError):  # also a KeyError, like a dict
            client.stat("no-such-key")
        with pytest.raises(ValueError):
            client.put("bad\0key", b"x")

    def test_concurrent_clients(self, server: ServerProc, client: DataClient) -> None:
        errors: list[BaseException] = []

        def work(i: int, c: DataClient) -> None:
            try:
                for j in range(3):
                    data = payload(3 * MiB + i * 1000 + j, seed=100 * i + j)
                    c.put(f"conc/{i}/{j}", data)
                    assert c.get(f"conc/{i}/{j}") == data
            except BaseException as exc:
                errors.append(exc)

        own = [DataClient(server.address, TOKEN) for _ in range(4)]
        threads = [threading.Thread(target=work, args=(i, client)) for i in range(4)]
        threads += [threading.Thread(target=work, args=(4 + i, c)) for i, c in enumerate(own)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for c in own:
            c.close()
        assert not errors, errors

    # -- security and protocol violations

    def test_wrong_token_rejected(self, server: ServerProc) -> None:
        t0 = time.monotonic()
        with DataClient(server.address, b"wrong-token", timeout=5) as c, pytest.raises(AuthError):
            c.stat("anything")
        assert time.monotonic() - t0 < 2  # a refusal is an answer: not retried until timeout
        with DataClient(server.address, b"", timeout=5) as c, pytest.raises(AuthError):
            c.stat("anything")

    def _raw_session(self, address: str) -> FrameSocket:
        family, sockaddr = parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(sockaddr)
        conn = FrameSocket(sock, 16 * MiB, peer=address)
        hello = conn.recv_header()
        digest = auth_digest(TOKEN, conn.recv_small(hello.length))
        conn.send(Header(Op.AUTH, length=len(digest)), b"", digest)
        assert conn.recv_header().op == Op.OK
        return conn

    def test_oversized_frame_rejected(self, server: ServerProc) -> None:
        conn = self._raw_session(server.address)
        conn.send(Header(Op.PUT, key_len=1, length=1 << 40, total=1 << 40), b"k")
        reply = conn.recv_header()
        assert reply.op == Op.ERROR and reply.offset == ErrorCode.TOO_LARGE
        with pytest.raises(FrameTooLargeError, match="exceeds"):
            conn.raise_error(reply)
        assert conn.sock.recv(1) == b""  # and the server closed the connection
        conn.close()
        # The client API meets the same refusal when it sends frames above the peer's limit.
        with DataClient(server.address, TOKEN, frame_size=32 * MiB, max_frame=64 * MiB) as c:
            with pytest.raises(FrameTooLargeError):
                c.put("big-frames", bytes(40 * MiB))
            with pytest.raises(BlobNotFoundError):
                c.stat("big-frames")  # nothing half-written became visible

    def test_unknown_version_and_garbage_rejected(self, server: ServerProc) -> None:
        conn = self._raw_session(server.address)
        conn.sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, Op.STAT, 0, 1, 0, 0, 0, 0))
        with pytest.raises(VersionError, match="version"):
            conn.raise_error(conn.recv_header())
        conn.close()
        conn = self._raw_session(server.address)
        conn.sock.sendall(b"GET / HTTP/1.1\r\n" * 3)
        with pytest.raises(ProtocolError, match="magic"):
            conn.raise_error(conn.recv_header())
        conn.close()

    # -- faults

    def test_corrupted_get_payload_detected(self, spawn) -> None:
        srv = spawn(faults="corrupt-get")
        with DataClient(srv.address, TOKEN, timeout=10) as c:
            c.put("x", payload(5 * MiB, seed=3))
            with pytest.raises(IntegrityError, match="CRC32C"):
                c.get("x")
            with pytest.raises(IntegrityError):
                c.get_range("x", 10, 20)

    def test_corrupted_put_payload_refused(self, spawn) -> None:
        srv = spawn(faults="corrupt-put")
        with DataClient(srv.address, TOKEN, timeout=10) as c:
            with pytest.raises(IntegrityError, match="CRC32C"):
                c.put("y", payload(5 * MiB, seed=4))
            with pytest.raises(BlobNotFoundError):  # the corrupted object was not committed
                c.stat("y")
            c.put("empty", b"")  # no payload to corrupt: accepted; connection still usable
            assert c.stat("empty") == 0

    def test_sigstop_peer_lost_within_deadline_then_back(self, spawn) -> None:
        srv = spawn()
        data = payload(2 * MiB, seed=5)
        with DataClient(srv.address, TOKEN, timeout=1.0) as c:
            c.put("s", data)
            srv.signal(signal.SIGSTOP)
            try:
                calls = {"get": lambda: c.get("s"), "put": lambda: c.put("s2", data),
                         "connect": lambda: DataClient(srv.address, TOKEN, timeout=1.0).stat("s")}
                for what, call in calls.items():
                    t0 = time.monotonic()
                    with pytest.raises(PeerLostError, match="did not answer"):
                        call()
                        pytest.fail(f"{what} did not fail against a stopped peer")
                    assert 0.9 < time.monotonic() - t0 < 2.0, what  # the deadline, not a hang
            finally:
                srv.signal(signal.SIGCONT)
            assert c.get("s") == data  # a resumed peer serves again
            assert isinstance(PeerLostError("x"), CkptError | ConnectionError)

    def test_sigkill_peer_lost(self, spawn) -> None:
        srv = spawn()
        with DataClient(srv.address, TOKEN, timeout=5.0, retries=3, backoff=0.05) as c:
            c.put("k", b"abc")
            srv.signal(signal.SIGKILL)
            srv.proc.wait()
            t0 = time.monotonic()
            with pytest.raises(PeerLostError, match=r"unreachable|did not answer"):
                c.get("k")
            assert time.monotonic() - t0 < 5.0  # bounded retries, well inside the deadline

    def test_server_memory_bounded(self, spawn) -> None:
        """512 MiB each way through a store that keeps nothing: the server's RSS stays flat."""
        srv = spawn(store="pattern")
        n = 512 * MiB
        buf = bytearray(n)
        with DataClient(srv.address, TOKEN, timeout=30) as c:
            c.get_range(f"pattern:{n}", 0, 16 * MiB, buf)  # warm up the connection
            base = srv.peak_rss()
            c.get_range(f"pattern:{n}", 0, n, buf)
            c.put("sink", buf)
            grown = srv.peak_rss() - base
        assert grown < 48 * MiB, f"server peak RSS grew by {grown / MiB:.0f} MiB"
        window = slice(n // 2 - 1000, n // 2 + 1000)
        assert bytes(buf[window]) == PatternBlobStore.expected(window.start, window.stop)


class TestTcpTransport(TransportTests):
    @classmethod
    def bind_address(cls, tmpdir: str) -> str:
        return "127.0.0.1:0"


class TestUnixTransport(TransportTests):
    @classmethod
    def bind_address(cls, tmpdir: str) -> str:
        return f"unix:{tmpdir}/data.sock"


# ------------------------------------------------------------------ wire-format units


def test_header_round_trip_and_limits() -> None:
    h = Header(Op.DATA, offset=5, length=10, total=99, crc=0xDEADBEEF)
    assert unpack_header(h.pack(), 16) == h
    with pytest.raises(FrameTooLargeError):
        unpack_header(Header(Op.DATA, length=17).pack(), 16)
    with pytest.raises(ProtocolError, match="op"):
        unpack_header(HEADER.pack(MAGIC, PROTOCOL_VERSION, 99, 0, 0, 0, 0, 0, 0), 16)
    assert parse_address("unix:/x/y") == (socket.AF_UNIX, "/x/y")
    assert parse_address("tcp://127.0.0.1:80") == (socket.AF_INET, ("127.0.0.1", 80))
    with pytest.raises(ValueError):
        parse_address("nohost")


def test_auth_digest_depends_on_token_and_nonce() -> None:
    a = auth_digest(b"t", b"n" * 32)
    assert hmac.compare_digest(a, auth_digest(b"t", b"n" * 32))
    assert a != auth_digest(b"u", b"n" * 32) and a != auth_digest(b"t", b"m" * 32)


def test_no_pickle_in_the_data_path() -> None:
    import ckptd.daemon.datachannel as dc
    import ckptd.daemon.transport as tr

    for mod in (dc, tr):
        with open(mod.__file__ or "") as f:
            src = f.read()
        for banned in ("import pickle", "pickle.", "marshal", "shelve", "eval("):
            assert banned not in src, (mod.__name__, banned)
