"""Peer bulk transfer on loopback: gRPC streaming vs dedicated socket channels, one run.

    python bench/peer_transfer.py --out /tmp/peer.json    # or: --sizes 256M --cases channel

Every case starts a server process and a client process (so neither sees the other's
memory or GIL) and moves bytes from a pre-touched source buffer to a pre-touched
destination buffer (the daemon's shared-memory snapshots are pre-faulted too), so what
is measured is the transport, not page faults.  Reported per case and size: median GB/s
over ``--repeats`` runs (after one warm-up run on the same connection), the client's and
server's CPU seconds per GB moved, and RSS growth (peak during the transfers minus the
baseline after the buffers were allocated).  Cases (``get`` = server -> client):

* ``grpc-sync`` / ``grpc-aio``: server-streaming RPC of raw ``bytes`` messages of 1/4/16
  MiB; ``default`` keeps gRPC's 4 MiB receive limit, ``raised`` lifts it to 64 MiB;
  ``nocomp`` sets ``compression=NoCompression`` explicitly (the default is no
  compression too).  ``grpc-sync-put``: client streaming, the other direction.
* ``raw-*``: plain blocking sockets, ``sendall`` of a memoryview / ``recv_into`` the
  destination, no framing or checksum (the ceiling); ``sendfile`` sends from a
  ``/dev/shm`` file; ``defbuf`` keeps the kernel's default socket buffers.
* ``asyncio-tcp``: asyncio streams (``readexactly`` returns new bytes: one more copy).
* ``channel-*``: ``ckptd.daemon.transport`` (frames, CRC32C both sides, auth, deadlines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

MiB = 1 << 20
TOKEN = b"bench-token"
REQ = struct.Struct("!QQ")  # raw channels: (start, end) request

# name -> (mechanism, message/frame MiB, options)
CASES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "grpc-sync:1MiB:default": ("grpc-sync", 1, {"raised": False}),
    "grpc-sync:4MiB:default": ("grpc-sync", 4, {"raised": False}),
    "grpc-sync:16MiB:default": ("grpc-sync", 16, {"raised": False}),
    "grpc-sync:1MiB:raised": ("grpc-sync", 1, {"raised": True}),
    "grpc-sync:4MiB:raised": ("grpc-sync", 4, {"raised": True}),
    "grpc-sync:16MiB:raised": ("grpc-sync", 16, {"raised": True}),
    "grpc-sync:4MiB:raised:nocomp": ("grpc-sync", 4, {"raised": True, "nocomp": True}),
    "grpc-aio:1MiB:default": ("grpc-aio", 1, {"raised": False}),
    "grpc-aio:1MiB:raised": ("grpc-aio", 1, {"raised": True}),
    "grpc-aio:4MiB:raised": ("grpc-aio", 4, {"raised": True}),
    "grpc-aio:16MiB:raised": ("grpc-aio", 16, {"raised": True}),
    "grpc-sync-put:4MiB:raised": ("grpc-sync-put", 4, {"raised": True}),
    "raw-tcp:4MiB:defbuf": ("raw-tcp", 4, {"sockbuf": 0}),
    "raw-tcp:4MiB": ("raw-tcp", 4, {}),
    "raw-tcp-sendfile:4MiB": ("raw-tcp-sendfile", 4, {}),
    "raw-unix:4MiB": ("raw-unix", 4, {}),
    "asyncio-tcp:4MiB": ("asyncio-tcp", 4, {}),
    "channel-tcp:1MiB": ("channel-tcp", 1, {}),
    "channel-tcp:4MiB": ("channel-tcp", 4, {}),
    "channel-tcp:16MiB": ("channel-tcp", 16, {}),
    "channel-tcp-put:4MiB": ("channel-tcp-put", 4, {}),
    "channel-unix:4MiB": ("channel-unix", 4, {}),
    "channel-unix-put:4MiB": ("channel-unix-put", 4, {}),
}


def touched(nbytes: int) -> bytearray:
    """A buffer with every page faulted in and non-trivial content."""
    buf, block = bytearray(nbytes), os.urandom(min(nbytes, 16 * MiB))
    for pos in range(0, nbytes, len(block)):
        buf[pos : pos + len(block)] = block[: nbytes - pos]
    return buf


def grpc_options(raised: bool) -> list[tuple[str, int]]:
    if not raised:
        return []
    return [("grpc.max_receive_message_length", 64 * MiB),
            ("grpc.max_send_message_length", 64 * MiB)]


# ----------------------------------------------------------------------------- servers


def serve(mech: str, size: int, msg: int, opts: dict[str, Any], sock_dir: str) -> None:
    """Serve ``size`` source bytes over ``mech``; print ``LISTENING addr``; run until killed."""
    src = touched(size)
    view = memoryview(src)
    sink = touched(size) if mech.endswith("-put") else bytearray()
    if mech.startswith("grpc"):
        _serve_grpc(mech, view, memoryview(sink), msg, opts)
    elif mech.startswith("channel"):
        from ckptd.daemon.transport import DataServer, MemoryBlobStore

        class Prefaulted(MemoryBlobStore):
            """Puts land in one pre-faulted buffer, like a shared-memory snapshot slot."""

            def begin_put(self, key: str, nbytes: int) -> Any:
                return _SlotPut(memoryview(sink)[:nbytes])

        store = Prefaulted()
        store._blobs["blob"] = src  # no copy of the 1 GiB source
        bind = f"unix:{sock_dir}/ch.sock" if "unix" in mech else "127.0.0.1:0"
        server = DataServer(bind, TOKEN, store, frame_size=msg * MiB, max_frame=max(16, msg) * MiB)
        print(f"LISTENING {server.start()}", flush=True)
        threading.Event().wait()
    elif mech == "asyncio-tcp":
        asyncio.run(_serve_asyncio(view, msg))
    else:
        _serve_raw(mech, view, msg, opts, sock_dir)


class _SlotPut:
    def __init__(self, slot: memoryview) -> None:
        self.slot = slot

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        return self.slot[offset : offset + nbytes]

    def commit(self) -> None: ...
    def abort(self) -> None: ...


def _serve_grpc(mech: str, view: memoryview, sink: memoryview, msg: int, opts: dict) -> None:
    import grpc

    def get(request: bytes, context: Any) -> Any:
        start, end = REQ.unpack(request)
        for pos in range(start, end, msg * MiB):
            yield bytes(view[pos : min(end, pos + msg * MiB)])  # gRPC Python needs bytes

    def put(requests: Any, context: Any) -> bytes:
        pos = 0
        for m in requests:
            sink[pos : pos + len(m)] = m
            pos += len(m)
        return REQ.pack(0, pos)

    handlers = {
        "Get": grpc.unary_stream_rpc_method_handler(get),
        "Put": grpc.stream_unary_rpc_method_handler(put),
    }
    generic = grpc.method_handlers_generic_handler("bench.Peer", handlers)
    options = grpc_options(opts.get("raised", False))
    if mech == "grpc-aio":

        async def aget(request: bytes, context: Any) -> Any:
            start, end = REQ.unpack(request)
            for pos in range(start, end, msg * MiB):
                yield bytes(view[pos : min(end, pos + msg * MiB)])

        async def main() -> None:
            server = grpc.aio.server(options=options)
            h = {"Get": grpc.unary_stream_rpc_method_handler(aget)}
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("bench.Peer", h),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(f"LISTENING 127.0.0.1:{port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
        return
    server = grpc.server(ThreadPoolExecutor(4), options=options)
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def _tune(sock: socket.socket, opts: dict) -> None:
    bufsize = opts.get("sockbuf", 8 * MiB)
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _serve_raw(mech: str, view: memoryview, msg: int, opts: dict, sock_dir: str) -> None:
    shm_file = None
    if mech == "raw-tcp-sendfile":
        path = f"/dev/shm/ckptd-bench-{os.getpid()}"
        with open(path, "wb") as f:
            f.write(view)
        shm_file = open(path, "rb")  # noqa: SIM115 - lives as long as the server
        os.unlink(path)
    if mech == "raw-unix":
        lsock = socket.socket(socket.AF_UNIX)
        addr: Any = f"{sock_dir}/raw.sock"
    else:
        lsock = socket.socket(socket.AF_INET)
        addr = ("127.0.0.1", 0)
    _tune(lsock, opts)
    lsock.bind(addr)
    lsock.listen(8)
    name = lsock.getsockname()
    print(f"LISTENING {name if isinstance(name, str) else f'{name[0]}:{name[1]}'}", flush=True)

    def conn_loop(conn: socket.socket) -> None:
        req = bytearray(REQ.size)
        while True:
            got = conn.recv_into(req, REQ.size, socket.MSG_WAITALL)
            if got < REQ.size:
                return
            start, end = REQ.unpack(req)
            for pos in range(start, end, msg * MiB):
                n = min(msg * MiB, end - pos)
                if shm_file is not None:
                    conn.sendfile(shm_file, pos, n)
                else:
                    conn.sendall(view[pos : pos + n])

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=conn_loop, args=(conn,), daemon=True).start()


async def _serve_asyncio(view: memoryview, msg: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune(writer.get_extra_info("socket"), {})
        while True:
            try:
                start, end = REQ.unpack(await reader.readexactly(REQ.size))
            except asyncio.IncompleteReadError:
                return
            for pos in range(start, end, msg * MiB):
                writer.write(view[pos : min(end, pos + msg * MiB)])
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=64 * MiB)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


# ----------------------------------------------------------------------------- clients


def make_transfer(mech: str, addr: str, msg: int, opts: dict, out: memoryview) -> Callable:
    """A function ``xfer(n)`` that moves ``n`` bytes once over one kept-open connection."""
    if mech.startswith("grpc"):
        import grpc

        options = grpc_options(opts.get("raised", False))
        kw = {"compression": grpc.Compression.NoCompression} if opts.get("nocomp") else {}
        if mech == "grpc-aio":
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)

            async def connect() -> Any:  # an aio channel binds to the loop it is made in
                return grpc.aio.insecure_channel(addr, options=options, **kw).unary_stream(
                    "/bench.Peer/Get")

            acall = loop.run_until_complete(connect())

            async def aget(n: int) -> int:
                pos = 0
                async for m in acall(REQ.pack(0, n)):
                    out[pos : pos + len(m)] = m
                    pos += len(m)
                return pos

            return lambda n: loop.run_until_complete(aget(n))
        channel = grpc.insecure_channel(addr, options=options, **kw)
        if mech == "grpc-sync-put":
            put = channel.stream_unary("/bench.Peer/Put")
            step = msg * MiB
            return lambda n: REQ.unpack(
                put(bytes(out[p : min(n, p + step)]) for p in range(0, n, step)))[1]
        call = channel.unary_stream("/bench.Peer/Get")

        def get(n: int) -> int:
            pos = 0
            for m in call(REQ.pack(0, n)):
                out[pos : pos + len(m)] = m
                pos += len(m)
            return pos

        return get
    if mech.startswith("channel"):
        from ckptd.daemon.transport import DataClient

        client = DataClient(addr, TOKEN, frame_size=msg * MiB, max_frame=max(16, msg) * MiB)
        if mech.endswith("-put"):
            return lambda n: (client.put("x", out[:n]), n)[1]
        return lambda n: len(client.get_range("blob", 0, n, out))
    if mech == "asyncio-tcp":
        loop = asyncio.new_event_loop()
        reader, writer = loop.run_until_complete(
            asyncio.open_connection("127.0.0.1", int(addr.rsplit(":", 1)[1]), limit=64 * MiB))
        _tune(writer.get_extra_info("socket"), {})

        async def aread(n: int) -> int:
            writer.write(REQ.pack(0, n))
            pos = 0
            while pos < n:
                data = await reader.readexactly(min(msg * MiB, n - pos))
                out[pos : pos + len(data)] = data
                pos += len(data)
            return pos

        return lambda n: loop.run_until_complete(aread(n))
    if mech == "raw-unix":
        sock = socket.socket(socket.AF_UNIX)
        _tune(sock, opts)
        sock.connect(addr)
    else:
        sock = socket.socket(socket.AF_INET)
        _tune(sock, opts)
        host, port = addr.rsplit(":", 1)
        sock.connect((host, int(port)))

    def raw(n: int) -> int:
        sock.sendall(REQ.pack(0, n))
        pos = 0
        while pos < n:
            got = sock.recv_into(out[pos:n], n - pos)
            if not got:
                raise ConnectionError("server closed")
            pos += got
        return pos

    return raw


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def client(mech: str, addr: str, sizes: list[int], msg: int, opts: dict, repeats: int) -> dict:
    """Run every size (warm-up + repeats); report seconds, CPU and peak-RSS growth."""
    out = memoryview(touched(max(sizes)))
    base_rss = maxrss()
    me = psutil.Process()
    results: dict[str, Any] = {}
    xfer = make_transfer(mech, addr, msg, opts, out)
    for n in sizes:
        try:
            assert xfer(n) == n, "short transfer"
            cpu0, times = me.cpu_times(), []
            for _ in range(repeats):
                t0 = time.perf_counter()
                got = xfer(n)
                times.append(time.perf_counter() - t0)
                assert got == n, f"short transfer: {got} of {n}"
            cpu1 = me.cpu_times()
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            results[str(n)] = {
                "seconds": times,
                "gbps": n / statistics.median(times) / 1e9,
                "client_cpu_s_per_gb": cpu / (n * repeats / 1e9),
                "client_rss_growth_mib": (maxrss() - base_rss) / MiB,
            }
        except Exception as exc:  # e.g. gRPC's default 4 MiB message limit: report, go on
            code = getattr(exc, "code", None)  # grpc.RpcError: say which status, not the repr
            text = f"{code().name}: {exc.details()}" if callable(code) else str(exc)  # type: ignore[attr-defined]
            results[str(n)] = {"error": f"{type(exc).__name__}: {text.splitlines()[0][:160]}"}
    return results


# ----------------------------------------------------------------------- orchestration


def vm_hwm(pid: int) -> int:
    """Peak RSS of a process (``VmHWM``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(name: str, sizes: list[int], repeats: int, sock_dir: str) -> dict:
    mech, msg, opts = CASES[name]
    spec = json.dumps({"mech": mech, "msg": msg, "opts": opts})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    srv = subprocess.Popen(
        [sys.executable, __file__, "_serve", spec, str(max(sizes)), sock_dir],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = srv.stdout.readline() if srv.stdout else ""
        if not line.startswith("LISTENING "):
            return {"case": name, "error": f"server did not start: {line!r}"}
        addr = line.split(" ", 1)[1].strip()
        sproc = psutil.Process(srv.pid)
        hwm0, cpu0 = vm_hwm(srv.pid), sproc.cpu_times()
        res = subprocess.run(
            [sys.executable, __file__, "_client", spec, addr, ",".join(map(str, sizes)),
             str(repeats)], capture_output=True, text=True, env=env, timeout=600,
        )
        cpu1 = sproc.cpu_times()
        if res.returncode != 0:
            return {"case": name, "error": res.stderr.strip().splitlines()[-1][:300]}
        per_size = json.loads(res.stdout.strip().splitlines()[-1])
        moved = sum(int(n) * (repeats + 1) for n, r in per_size.items() if "error" not in r)
        server_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "case": name, "mechanism": mech, "message_mib": msg, "options": opts,
            "sizes": per_size,
            "server_cpu_s_per_gb": server_cpu / (moved / 1e9) if moved else None,
            "server_rss_growth_mib": (vm_hwm(srv.pid) - hwm0) / MiB,
        }
    finally:
        srv.kill()
        srv.wait()


def table(results: list[dict], sizes: list[int]) -> str:
    heads = [f"{n / 2**30:g} GiB GB/s" if n >= 2**30 else f"{n // MiB} MiB GB/s" for n in sizes]
    lines = ["| case | " + " | ".join(heads)
             + " | client CPU s/GB | server CPU s/GB | client RSS +MiB | server RSS +MiB |",
             "|---" * (len(sizes) + 5) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} |")
            continue
        cells, last = [], {}
        for n in sizes:
            s = r["sizes"].get(str(n), {})
            cells.append(f"{s['gbps']:.2f}" if "gbps" in s else "rejected: " + s.get("error", "?"))
            last = s if "gbps" in s else last
        def fmt(v: Any, spec: str = ".2f") -> str:
            return format(v, spec) if isinstance(v, float | int) else "-"
        lines.append(
            f"| {r['case']} | " + " | ".join(cells)
            + f" | {fmt(last.get('client_cpu_s_per_gb'))} | {fmt(r['server_cpu_s_per_gb'])}"
            + f" | {fmt(last.get('client_rss_growth_mib'), '.0f')}"
            + f" | {fmt(r['server_rss_growth_mib'], '.0f')} |"
        )
    return "\n".join(lines)


def parse_size(s: str) -> int:
    unit = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1].upper())
    return int(float(s[:-1]) * unit) if unit else int(s)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_serve", "_client"):  # the child processes
        spec = json.loads(sys.argv[2])
        if sys.argv[1] == "_serve":
            serve(spec["mech"], int(sys.argv[3]), spec["msg"], spec["opts"], sys.argv[4])
        else:
            sizes = [int(x) for x in sys.argv[4].split(",")]
            res = client(spec["mech"], sys.argv[3], sizes, spec["msg"], spec["opts"],
                         int(sys.argv[5]))
            print(json.dumps(res))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256M,1G")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="", help="comma list of case names or prefixes")
    p.add_argument("--out", default="")
    args = p.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    wanted = [w for w in args.cases.split(",") if w]
    names = [c for c in CASES if not wanted or any(c.startswith(w) for w in wanted)]
    import grpc

    meta = {
        "nproc": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "grpcio": grpc.__version__, "kernel": platform.release(), "repeats": args.repeats,
        "note": "loopback, server and client in separate processes on a shared, busy 2-core "
                "VM: absolute numbers are noisy; compare within this run",
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-") as sock_dir:
        for name in names:
            t0 = time.perf_counter()
            r = run_case(name, sizes, args.repeats, sock_dir)
            results.append(r)
            print(f"{name}: {time.perf_counter() - t0:.1f}s "
                  + json.dumps({k: v.get("gbps", v.get("error")) for k, v in
                                r.get("sizes", {}).items()} or r.get("error")), flush=True)
    meta["loadavg_after"] = os.getloadavg()
    md = table(results, sizes)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "table": md}, f, indent=1)


if __name__ == "__main__":
    main()
