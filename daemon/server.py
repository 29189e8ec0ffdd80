"""The daemon process: gRPC listeners, health, auth, membership and graceful shutdown.

Listeners (all ``grpc.aio``, one event loop, one process):

* unix socket ``socket_path`` (dir 0700 owned by us, socket 0600; 0750/0660 of
  ``socket_group`` when set): ``Control`` + health;
* TCP ``listen.host:listen.port`` (mTLS when ``tls`` is set): ``Peer`` + health;
* optional plaintext ``health_port``: health only (Kubernetes probes cannot speak mTLS).

Every call except health checks needs the job token (:mod:`ckptd.daemon.auth`). Health
reports ``SERVING`` per service (``""``, ``ckptd.rpc.v1.Control``, ``ckptd.rpc.v1.Peer``)
once started and ``NOT_SERVING`` while draining. Lifecycle, in order: :meth:`Daemon.start`
(socket checks, listeners, metrics, membership), :meth:`Daemon.stop` (NOT_SERVING, stop
heartbeats, drain in-flight calls for ``DRAIN_GRACE_S``, close); :func:`serve` wires SIGTERM
and SIGINT to ``stop`` and returns the exit code.

The data path plugs in as more services on the same servers (:meth:`Daemon.add_services`
before :meth:`Daemon.start`) and reads membership from :attr:`Daemon.membership`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ckptd.daemon.auth import (
    TokenAuthInterceptor,
    UnsafePathError,
    bearer_metadata,
    prepare_socket_path,
    secure_socket,
)
from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.group import GroupProtector
from ckptd.daemon.handlers import ControlSnapshots, PeerSnapshots, query_peers
from ckptd.daemon.logs import get_logger
from ckptd.daemon.metrics import DaemonMetrics
from ckptd.daemon.pipeline import StepPipeline, TransferSource
from ckptd.daemon.service import DaemonBlobs, SnapshotService
from ckptd.daemon.transport import DataServer
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc

__all__ = ["Daemon", "UnsafePathError", "form_groups", "prepare_socket_path", "serve"]

CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["Control"].full_name
PEER_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name
DRAIN_GRACE_S = 5.0
log = get_logger("ckptd.daemon.server")


def daemon_version() -> str:
    """The installed ``ckptd`` version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptd")
    except PackageNotFoundError:
        return "0+unknown"


def form_groups(node_names: Iterable[str], n: int) -> list[list[str]]:
    """Erasure groups over ``node_names``: deterministic and independent of input order.

    Names are sorted and cut into ``g = max(1, len // n)`` contiguous groups whose sizes
    differ by at most one, so every group has at least ``n`` members when there are at
    least ``n`` nodes (a larger group keeps tolerating ``m`` losses with less overhead),
    and a single smaller group otherwise (the caller reports it as under-protected).
    """
    names = sorted(node_names)
    if n < 1:
        raise ValueError(f"group size n must be >= 1, got {n}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate node names: {names}")
    if not names:
        return []
    count = max(1, len(names) // n)
    base, extra = divmod(len(names), count)
    groups, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        groups.append(names[start:start + size])
        start += size
    return groups


_STATE_PB = {"unknown": pb.PEER_STATE_UNKNOWN, "alive": pb.PEER_STATE_ALIVE,
             "suspect": pb.PEER_STATE_SUSPECT, "lost": pb.PEER_STATE_LOST}
_NO_RETRY = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
             grpc.StatusCode.UNIMPLEMENTED)


@dataclass
class PeerInfo:
    """What this daemon knows about one peer address (mutated by :class:`Membership`)."""

    address: str
    source: str
    name: str = ""
    state: str = "unknown"
    generation: int = 0
    last_seen: float | None = None
    rtt: float = 0.0
    failures: int = 0
    is_self: bool = False
    data_address: str = ""  # the peer's data channel, from its heartbeat answers


class Membership:
    """Peer discovery (static list, DNS) and heartbeats; owns the peer table.

    One task sends a heartbeat to every peer each ``heartbeat_interval_s`` (all peers
    concurrently, each call with a ``heartbeat_timeout_s`` deadline and at most
    ``heartbeat_retries`` retries); a peer is ALIVE after an answer, SUSPECT after a missed
    round and LOST once it has not answered for ``lost_after_s``. Another task re-resolves
    ``peers.dns_name`` every ``dns_refresh_s``. An address that answers with our own name
    and generation (the headless Service lists us too) is dropped. Channels are created
    lazily inside the running loop (never before a fork).
    """

    def __init__(self, config: DaemonConfig, generation: int, metrics: DaemonMetrics) -> None:
        self._cfg, self._generation, self._metrics = config, generation, metrics
        self.peers: dict[str, PeerInfo] = {
            e.address: PeerInfo(e.address, "static", e.name)
            for e in config.peers.static if e.name != config.node_name}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()

    async def start(self) -> None:
        """Start the heartbeat (and DNS) tasks."""
        self._started = time.monotonic()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeats"))
        if self._cfg.peers.dns_name:
            self._tasks.append(asyncio.create_task(self._dns_loop(), name="peer-dns"))

    async def stop(self) -> None:
        """Cancel the tasks and close every channel (idempotent)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)

    def peer_statuses(self) -> list[pb.PeerStatus]:
        """The peer table as protobuf messages, sorted by name then address."""
        now = time.monotonic()
        return [pb.PeerStatus(
            name=p.name, address=p.address, state=_STATE_PB[p.state], generation=p.generation,
            last_seen_age_seconds=-1.0 if p.last_seen is None else now - p.last_seen,
            rtt_seconds=p.rtt, consecutive_failures=p.failures, source=p.source)
            for p in sorted(self.peers.values(), key=lambda p: (p.name, p.address))
            if not p.is_self]

    def peer_named(self, node: str) -> PeerInfo | None:
        """The peer that answered with name ``node`` (None if none did)."""
        return next((p for p in self.peers.values() if p.name == node and not p.is_self), None)

    def groups(self) -> tuple[list[list[str]], int]:
        """Erasure groups over every known node name (lost ones included: their data is
        what the group rebuilds) and the index of ours."""
        names = {p.name for p in self.peers.values() if p.name and not p.is_self}
        names.add(self._cfg.node_name)
        groups = form_groups(names, self._cfg.erasure_n)
        mine = next(i for i, g in enumerate(groups) if self._cfg.node_name in g)
        return groups, mine

    async def _heartbeat_loop(self) -> None:
        interval = self._cfg.peers.heartbeat_interval_s
        while True:
            began = time.monotonic()
            await asyncio.gather(*(self._probe(p) for p in list(self.peers.values())
                                   if not p.is_self))
            counts: dict[str, int] = {}
            for p in self.peers.values():
                if not p.is_self:
                    counts[p.state] = counts.get(p.state, 0) + 1
            self._metrics.set_peer_counts(counts)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _probe(self, peer: PeerInfo) -> None:
        cfg = self._cfg
        stub = pb_grpc.PeerStub(self.channel(peer.address))
        request = pb.HeartbeatRequest(node=cfg.node_name, generation=self._generation,
                                      sent_unix_nanos=time.time_ns())
        code = grpc.StatusCode.UNKNOWN
        for attempt in range(cfg.peers.heartbeat_retries + 1):
            began = time.monotonic()
            try:
                reply = await stub.Heartbeat(request, timeout=cfg.peers.heartbeat_timeout_s,
                                             metadata=bearer_metadata(cfg.token))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self._metrics.count_heartbeat_failure(code.name)
                if code in _NO_RETRY:
                    break
                if attempt < cfg.peers.heartbeat_retries:
                    await asyncio.sleep(min(0.05 * 2**attempt, cfg.peers.heartbeat_interval_s / 4))
                continue
            rtt = time.monotonic() - began
            self._metrics.observe_heartbeat(rtt)
            self._answered(peer, reply, rtt)
            return
        self._missed(peer, code)

    def _answered(self, peer: PeerInfo, reply: pb.HeartbeatResponse, rtt: float) -> None:
        if reply.node == self._cfg.node_name and reply.generation == self._generation:
            peer.is_self = True
            log.debug("peer address is this daemon; dropped", address=peer.address)
            return
        if peer.name and reply.node != peer.name:
            log.warning("peer answers with another name", address=peer.address,
                        expected=peer.name, got=reply.node)
        if peer.generation and reply.generation != peer.generation:
            log.info("peer restarted", peer=reply.node, generation=reply.generation)
        peer.name, peer.generation, peer.rtt = reply.node, reply.generation, rtt
        peer.data_address = reply.data_address
        peer.last_seen, peer.failures = time.monotonic(), 0
        self._transition(peer, "alive")

    def _missed(self, peer: PeerInfo, code: grpc.StatusCode) -> None:
        peer.failures += 1
        reference = peer.last_seen if peer.last_seen is not None else self._started
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.error("peer rejected our job token; check auth on both nodes",
                      peer=peer.name or peer.address, code=code.name)
        if time.monotonic() - reference >= self._cfg.peers.lost_after_s:
            self._transition(peer, "lost", code=code.name)
        elif peer.last_seen is not None:
            self._transition(peer, "suspect", code=code.name)

    def _transition(self, peer: PeerInfo, state: str, **fields: Any) -> None:
        if peer.state != state:
            level = log.warning if state in ("lost", "suspect") else log.info
            level("peer state changed", peer=peer.name or peer.address, address=peer.address,
                  old=peer.state, new=state, **fields)
            peer.state = state

    def channel(self, address: str) -> grpc.aio.Channel:
        """The (lazily created, cached) channel to a peer address, with this daemon's TLS,
        message-size and reconnect settings; the data path reuses it. Loop-bound."""
        channel = self._channels.get(address)
        if channel is None:
            cfg = self._cfg
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", int(cfg.peers.heartbeat_interval_s * 1000)),
            ]
            if cfg.tls is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                if cfg.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", cfg.tls.server_name))
                creds = grpc.ssl_channel_credentials(
                    Path(cfg.tls.ca_file).read_bytes(), Path(cfg.tls.key_file).read_bytes(),
                    Path(cfg.tls.cert_file).read_bytes())
                channel = grpc.aio.secure_channel(address, creds, options=options)
            self._channels[address] = channel
        return channel

    async def _dns_loop(self) -> None:
        cfg = self._cfg.peers
        assert cfg.dns_name is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await asyncio.wait_for(loop.getaddrinfo(
                    cfg.dns_name, cfg.dns_port, type=socket.SOCK_STREAM), timeout=10.0)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("peer DNS lookup failed", name=cfg.dns_name, error=str(exc))
            else:
                for *_, sockaddr in infos:
                    address = _join(str(sockaddr[0]), cfg.dns_port)
                    if address not in self.peers:
                        self.peers[address] = PeerInfo(address, "dns")
                        log.info("peer discovered", address=address, name=cfg.dns_name)
            await asyncio.sleep(cfg.dns_refresh_s)


class ControlServicer(ControlSnapshots, pb_grpc.ControlServicer):
    """Local control plane (unix socket)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext
                   ) -> pb.PingResponse:
        """Echo the payload."""
        d = self._daemon
        return pb.PingResponse(payload=request.payload, node=d.config.node_name,
                               generation=d.generation)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
                     ) -> pb.StatusResponse:
        """This daemon, its configuration summary and its peers."""
        return self._daemon.status()


class PeerServicer(PeerSnapshots, pb_grpc.PeerServicer):
    """Daemon-to-daemon membership (TCP)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        """Answer with our name and generation."""
        d = self._daemon
        return pb.HeartbeatResponse(node=d.config.node_name, generation=d.generation,
                                    received_unix_nanos=time.time_ns(),
                                    data_address=d.data_address)


ServiceAdder = Callable[[grpc.aio.Server], None]


class Daemon:
    """One ``ckptd`` process's servers and state; see the module docstring for the order."""

    def __init__(self, config: DaemonConfig, generation: int | None = None) -> None:
        self.config = config
        self.generation = generation if generation is not None else time.time_ns()
        self.started_at = time.monotonic()
        self.metrics = DaemonMetrics(config.node_name, daemon_version(), self.generation)
        self.metrics.set_memory(budget_bytes=config.memory_budget_bytes, used_bytes=0)
        self.metrics.set_protection(0, config.erasure_m)
        self.membership = Membership(config, self.generation, self.metrics)
        self.memory_used = 0
        self.peer_port = 0
        self.metrics_port = 0
        self.snapshots = SnapshotService(config.node_name, config.shm_dir,
                                         config.memory_budget_bytes, group=config.socket_group)
        self.snapshots.metrics = self.metrics
        self.blobs = DaemonBlobs(self.snapshots)
        self.data_servers: list[DataServer] = []
        self.data_address = ""  # TCP data channel, advertised to peers
        self.local_data_address = ""  # unix data channel, for trainers on this node
        self._servers: list[tuple[grpc.aio.Server, health.aio.HealthServicer, list[str]]] = []
        self._extra: dict[str, list[ServiceAdder]] = {"unix": [], "tcp": []}
        self._extra_names: dict[str, list[str]] = {"unix": [], "tcp": []}
        self._stopping = asyncio.Event()
        self._serving = False

    def add_services(self, listener: str, adder: ServiceAdder, service_name: str) -> None:
        """Register another service (the data path) on ``"unix"`` or ``"tcp"`` before
        :meth:`start`; ``service_name`` gets its own health status."""
        self._extra[listener].append(adder)
        self._extra_names[listener].append(service_name)

    async def start(self) -> None:
        """Check the socket path, bind every listener, start metrics and heartbeats.

        Raises :class:`UnsafePathError` or ``OSError`` (port in use) without leaving
        anything running.
        """
        cfg = self.config
        prepare_socket_path(cfg.socket_path, cfg.socket_group)
        self.pipeline = StepPipeline(self, asyncio.get_running_loop())
        self.snapshots.on_staged.append(self.pipeline.on_staged)
        self.blobs.route("xfer", TransferSource(self))
        self._persist_reports = self.pipeline.coordinator.collect
        self.protector = GroupProtector(self)
        self.pipeline.protect = self.protector.protect
        self.pipeline.release_older = self.protector.release_older
        self.snapshots.adopt()  # before any listener: no lease can race the adoption
        self.refresh_memory()
        try:
            unix = self._new_server("unix", [CONTROL_SERVICE],
                                    pb_grpc.add_ControlServicer_to_server, ControlServicer(self))
            unix[0].add_insecure_port(f"unix:{cfg.socket_path}")
            tcp = self._new_server("tcp", [PEER_SERVICE], pb_grpc.add_PeerServicer_to_server,
                                   PeerServicer(self))
            address = _join(cfg.listen_host, cfg.listen_port)
            if cfg.tls is not None:
                self.peer_port = tcp[0].add_secure_port(address, _server_credentials(cfg))
            else:
                self.peer_port = tcp[0].add_insecure_port(address)
            if cfg.health_port is not None:
                probe = self._new_server("health", [CONTROL_SERVICE, PEER_SERVICE])
                probe[0].add_insecure_port(_join(cfg.listen_host, cfg.health_port))
            for server, _, _ in self._servers:
                await server.start()
            secure_socket(cfg.socket_path, cfg.socket_group)
            self._start_data_servers()
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        except BaseException:
            await self._close_servers(grace=None)
            self._close_data_servers()
            self.snapshots.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.socket_path)  # ours: prepare_socket_path removed any other
            raise
        await self.membership.start()
        self._sweeper = asyncio.create_task(self._sweep_pins(), name="pin-sweeper")
        await self._set_serving(True)
        log.info("ckptd started", socket=cfg.socket_path, peer_port=self.peer_port,
                 metrics_port=self.metrics_port, generation=self.generation,
                 peers=len(cfg.peers.static), dns=cfg.peers.dns_name, tls=cfg.tls is not None)

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (signal-handler safe)."""
        self._stopping.set()

    async def wait(self) -> None:
        """Block until :meth:`request_stop`."""
        await self._stopping.wait()

    async def stop(self, grace: float = DRAIN_GRACE_S) -> None:
        """Drain and close: NOT_SERVING, stop heartbeats, finish in-flight calls within
        ``grace`` seconds, close listeners, metrics and the socket. Idempotent."""
        if self._serving:
            await self._set_serving(False)
            log.info("draining", grace_s=grace)
        await self.membership.stop()
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
        await self._close_servers(grace)
        self._close_data_servers()
        self.blobs.close()
        protector = getattr(self, "protector", None)
        if protector is not None:
            protector.close()
        self.snapshots.close()
        self.metrics.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)
        log.info("ckptd stopped")

    def status(self) -> pb.StatusResponse:
        """The ``Control.Status`` answer."""
        cfg = self.config
        self.refresh_memory()
        groups, mine = self.membership.groups()
        summary = pb.ConfigSummary(
            erasure_n=cfg.erasure_n, erasure_m=cfg.erasure_m, shm_dir=cfg.shm_dir,
            persistence_root=cfg.persistence_root or "", peer_dns_name=cfg.peers.dns_name or "",
            static_peers=len(cfg.peers.static), max_message_bytes=cfg.max_message_bytes,
            tls=cfg.tls is not None, auth=cfg.token is not None,
            retention_keep_last=cfg.keep_last, retention_keep_every=cfg.keep_every or 0,
            heartbeat_interval_seconds=cfg.peers.heartbeat_interval_s,
            lost_after_seconds=cfg.peers.lost_after_s)
        return pb.StatusResponse(
            node=cfg.node_name, generation=self.generation, version=daemon_version(),
            pid=os.getpid(), uptime_seconds=time.monotonic() - self.started_at,
            socket_path=cfg.socket_path, peer_port=self.peer_port,
            metrics_port=self.metrics_port, memory_budget_bytes=cfg.memory_budget_bytes,
            memory_used_bytes=self.memory_used, config=summary,
            peers=self.membership.peer_statuses(),
            groups=[pb.ErasureGroup(members=g) for g in groups], my_group=mine,
            serving="SERVING" if self._serving else "NOT_SERVING")

    def refresh_memory(self) -> None:
        """Publish shared-memory use (status and metrics)."""
        self.memory_used = self.snapshots.memory_used()
        self.metrics.set_memory(budget_bytes=self.config.memory_budget_bytes,
                                used_bytes=self.memory_used)

    def local_snapshots(self, job: str, include_lost: bool = True) -> pb.LocalSnapshotsResponse:
        """What this daemon holds of ``job`` (the ``Peer.LocalSnapshots`` answer): its own
        ranks' snapshots and, with ``include_lost``, the ranks of unreachable group members
        it can serve rebuilt."""
        cfg = self.config
        reply = self.snapshots.local_snapshots(job, self.data_address, self.generation,
                                               cfg.erasure_n, cfg.erasure_m)
        protector = getattr(self, "protector", None)
        if include_lost and protector is not None:
            reply.snapshots.extend(protector.lost_snapshots(job))
        return reply

    async def job_status(self, job: str) -> pb.JobStatusResponse:
        """This daemon's view of ``job`` and every reachable peer's."""
        views = [pb.NodeView(node=self.config.node_name, reachable=True,
                             local=self.local_snapshots(job))]
        views += await query_peers(self, job)
        return pb.JobStatusResponse(job=job, nodes=views)

    async def persistence_report(self, job: str, step: int, node: str,
                                 reports: list[dict[str, Any]]) -> None:
        """A node's persistence report for a step (the coordinator collects them)."""
        handler = getattr(self, "_persist_reports", None)
        if handler is None:
            raise RuntimeError("this daemon does not coordinate persistence")
        await handler(job, step, node, reports)

    # ------------------------------------------------------------------ internals
    async def _sweep_pins(self) -> None:
        """Unpin snapshots the data channel stopped serving (so saves can reuse them)."""
        while True:
            await asyncio.sleep(1.0)
            self.blobs.release_idle()

    def _start_data_servers(self) -> None:
        cfg = self.config
        token = (cfg.token.reveal() if cfg.token is not None else "unauthenticated").encode()
        tcp = DataServer(_join(cfg.listen_host, cfg.data_port), token, self.blobs)
        self.data_servers.append(tcp)
        bound = tcp.start()
        host = cfg.listen_host if cfg.listen_host not in ("0.0.0.0", "::", "") else None
        port = bound.rsplit(":", 1)[1]
        # Peers reach us at the host of our gRPC address; advertise that host with our port.
        self.data_address = _join(host or _advertised_host(cfg), int(port))
        unix = DataServer(f"unix:{cfg.socket_path}.data", token, self.blobs,
                          socket_group=cfg.socket_group)
        self.data_servers.append(unix)
        self.local_data_address = unix.start()

    def _close_data_servers(self) -> None:
        for server in self.data_servers:
            server.close()
        self.data_servers.clear()

    def _new_server(self, listener: str, services: list[str], add: Any = None,
                    servicer: Any = None) -> tuple[grpc.aio.Server, Any, list[str]]:
        cfg = self.config
        transport = "unix" if listener == "unix" else "tcp"
        server = grpc.aio.server(
            interceptors=[TokenAuthInterceptor(cfg.token, transport,
                                               self.metrics.count_auth_rejection)],
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        if add is not None:
            add(servicer, server)
        for adder in self._extra.get(listener, []):
            adder(server)
        names = ["", *services, *self._extra_names.get(listener, [])]
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        entry = (server, health_servicer, names)
        self._servers.append(entry)
        return entry

    async def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for _, health_servicer, names in self._servers:
            for name in names:
                await health_servicer.set(name, status)
        self.metrics.set_serving(serving)

    async def _close_servers(self, grace: float | None) -> None:
        await asyncio.gather(*(server.stop(grace) for server, _, _ in self._servers))
        self._servers.clear()


def _advertised_host(cfg: DaemonConfig) -> str:
    """The address peers use for us when we listen on every interface."""
    env = os.environ.get("POD_IP")  # Kubernetes downward API, when the chart sets it
    if env:
        return env
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_credentials(cfg: DaemonConfig) -> grpc.ServerCredentials:
    assert cfg.tls is not None
    tls = cfg.tls
    return grpc.ssl_server_credentials(
        [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
        root_certificates=Path(tls.ca_file).read_bytes(), require_client_auth=True)


async def serve(config: DaemonConfig) -> int:
    """Run a daemon until SIGTERM/SIGINT; returns the process exit code (0 clean, 1 failed
    to start)."""
    daemon = Daemon(config)
    try:
        await daemon.start()
    except (UnsafePathError, OSError, RuntimeError) as exc:
        log.error("ckptd cannot start", error=str(exc))
        await daemon.membership.stop()
        daemon.metrics.close()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.wait()
        log.info("termination requested")
    finally:
        await daemon.stop()
    return 0
