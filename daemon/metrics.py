"""Prometheus metrics of one daemon: ``ckptd_`` prefix, base units, low-cardinality labels.

Every metric lives in the daemon's own :class:`~prometheus_client.CollectorRegistry` (no
process-global state) and is served by :meth:`DaemonMetrics.serve` on the metrics port
(default 9477, never 9100/9400). Labels are bounded enums only (peer state, gRPC code,
pipeline stage); per-peer or per-step labels are never used.

The data-path metrics are defined now and read 0 until the data path lands; it reports
through the ``observe_*``/``add_*``/``set_*`` hooks below, never by touching the metric
objects, so that names and units stay in one place.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

PEER_STATES = ("unknown", "alive", "suspect", "lost")
STAGES = ("staged", "protected", "persisted", "committed")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
_STALL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DaemonMetrics:
    """The daemon's metrics and the hooks that update them (all thread-safe)."""

    def __init__(self, node: str, version: str, generation: int,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._started = time.monotonic()
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

        Info("ckptd_build", "Daemon build and identity (value is always 1).", registry=r).info(
            {"version": version, "python": platform.python_version(), "node": node,
             "generation": str(generation)})
        self.up = Gauge("ckptd_up", "1 while the daemon serves, 0 while it drains.",
                        registry=r)
        Gauge("ckptd_start_time_seconds", "Start time, seconds since the Unix epoch.",
              registry=r).set(time.time())
        Gauge("ckptd_uptime_seconds", "Seconds since the daemon started.",
              registry=r).set_function(lambda: time.monotonic() - self._started)
        self.peers = Gauge("ckptd_peers", "Known peers by membership state.", ["state"],
                           registry=r)
        for state in PEER_STATES:
            self.peers.labels(state).set(0)
        self.heartbeat_latency = Histogram(
            "ckptd_heartbeat_latency_seconds", "Round-trip time of successful heartbeats.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.heartbeat_failures = Counter(
            "ckptd_heartbeat_failures_total", "Failed heartbeat attempts by gRPC status code.",
            ["code"], registry=r)
        self.auth_rejections = Counter(
            "ckptd_auth_rejections_total", "Calls rejected for a missing or wrong job token.",
            ["transport", "reason"], registry=r)
        self.memory_budget = Gauge("ckptd_memory_budget_bytes",
                                   "Shared-memory budget for snapshots.", registry=r)
        self.memory_used = Gauge("ckptd_memory_used_bytes",
                                 "Shared memory held by snapshots and parity.", registry=r)
        # ---- data path (0 until it lands)
        self.save_stall = Histogram(
            "ckptd_save_stall_seconds", "Time a trainer's save blocked (copy into shared "
            "memory).", buckets=_STALL_BUCKETS, registry=r)
        self.bytes_total = Counter(
            "ckptd_bytes_total", "Snapshot bytes that reached a pipeline stage.", ["stage"],
            registry=r)
        for stage in STAGES[:3]:
            self.bytes_total.labels(stage).inc(0)
        self.persist_throughput = Gauge(
            "ckptd_persist_throughput_bytes_per_second",
            "Throughput of the last completed persistence.", registry=r)
        self.last_step = Gauge("ckptd_last_step", "Newest step that reached each stage "
                               "(-1: none yet).", ["stage"], registry=r)
        for stage in STAGES:
            self.last_step.labels(stage).set(-1)
        self.protection_tolerated = Gauge(
            "ckptd_protection_tolerated_losses", "Node losses the newest protected snapshot "
            "survives right now (m when fully protected, less when peers are lost).",
            registry=r)
        self.protection_configured = Gauge(
            "ckptd_protection_configured_losses", "Configured erasure parameter m.",
            registry=r)
        self.persist_lag = Gauge(
            "ckptd_persist_lag_seconds", "Age of the newest staged snapshot that is not "
            "persisted yet (0 when persistence is caught up).", registry=r)
        self.persist_lag_steps = Gauge(
            "ckptd_persist_lag_steps", "Steps between the newest staged and the newest "
            "persisted snapshot.", registry=r)

    # ------------------------------------------------------------------ membership hooks
    def set_serving(self, serving: bool) -> None:
        """``ckptd_up``: 1 while serving, 0 while draining."""
        self.up.set(1 if serving else 0)

    def set_peer_counts(self, counts: Mapping[str, int]) -> None:
        """Number of peers per state (states missing from ``counts`` read 0)."""
        for state in PEER_STATES:
            self.peers.labels(state).set(counts.get(state, 0))

    def observe_heartbeat(self, seconds: float) -> None:
        """One successful heartbeat's round-trip time."""
        self.heartbeat_latency.observe(seconds)

    def count_heartbeat_failure(self, code: str) -> None:
        """One failed heartbeat attempt; ``code`` is a gRPC status name (bounded)."""
        self.heartbeat_failures.labels(code).inc()

    def count_auth_rejection(self, transport: str, reason: str, _method: str = "") -> None:
        """One call rejected by the token check (usable as the interceptor's hook)."""
        self.auth_rejections.labels(transport, reason).inc()

    # ------------------------------------------------------------------ data-path hooks
    def set_memory(self, budget_bytes: int | None = None, used_bytes: int | None = None) -> None:
        """Shared-memory budget and current use."""
        if budget_bytes is not None:
            self.memory_budget.set(budget_bytes)
        if used_bytes is not None:
            self.memory_used.set(used_bytes)

    def observe_stall(self, seconds: float) -> None:
        """How long one ``save`` blocked the trainer."""
        self.save_stall.observe(seconds)

    def add_bytes(self, stage: str, nbytes: int) -> None:
        """``nbytes`` reached ``stage``: staged, protected or persisted."""
        if stage not in STAGES[:3]:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES[:3]}")
        self.bytes_total.labels(stage).inc(nbytes)

    def set_last_step(self, stage: str, step: int) -> None:
        """Newest step at ``stage`` (staged, protected, persisted, committed)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.last_step.labels(stage).set(step)

    def set_persist_throughput(self, bytes_per_second: float) -> None:
        """Throughput of the persistence that just completed."""
        self.persist_throughput.set(bytes_per_second)

    def set_protection(self, tolerated_losses: int, configured_m: int) -> None:
        """How many node losses the newest snapshot survives, against the configured m."""
        self.protection_tolerated.set(tolerated_losses)
        self.protection_configured.set(configured_m)

    def set_persist_lag(self, seconds: float, steps: int) -> None:
        """Persistence lag behind the newest staged snapshot."""
        self.persist_lag.set(seconds)
        self.persist_lag_steps.set(steps)

    # ------------------------------------------------------------------ HTTP endpoint
    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
