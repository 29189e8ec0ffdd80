"""Real ``ckptd`` daemons for tests: configs on 127.0.0.1 with free ports, process
control, health checks. Every wait is bounded by a deadline."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc

TOKEN = "test-token-0123456789abcdef"
MAX_MESSAGE = 64 * 1024
START_TIMEOUT_S = 60.0  # a busy 2-core machine starts 4 daemons slowly
LOST_AFTER_S = 1.5


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a daemon that will
    bind it a moment later.

    Taken *below* the kernel's ephemeral range: a port the kernel hands out itself (for
    ``port: 0`` listeners, outgoing connections, gloo) can then never be the one chosen
    here while the daemon is still starting (that race failed a CI run: "Address already
    in use"). Random, checked by binding, and never handed out twice by this process.
    """
    lo = _ephemeral_range()[0]
    rng = random.Random()
    if lo > 12000:
        for _ in range(200):  # bounded: a free port is found at once on any sane host
            port = rng.randrange(10000, lo)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: ask the kernel
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` every 50 ms until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def ckptd_cmd(*args: str) -> list[str]:
    """The ``ckptd`` console script (falls back to ``python -m`` when not on PATH)."""
    exe = shutil.which("ckptd")
    return [exe, *args] if exe else [sys.executable, "-m", "ckptd.daemon.main", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``CKPTD_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Node:
    """One daemon under test: its config, files and process."""

    name: str
    root: Path
    port: int
    metrics_port: int
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = field(default=None, repr=False)

    @property
    def socket_path(self) -> str:
        return str(self.root / "sock" / "ckptd.sock")

    @property
    def config_path(self) -> Path:
        return self.root / "ckptd.yaml"

    def start(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_file = open(self.root / "stderr.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(ckptd_cmd("--config", str(self.config_path)),
                                     stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env=clean_env())

    def stderr(self) -> str:
        return (self.root / "stderr.log").read_text()

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n"
                                     f"{self.stderr()}")
            return health_check(f"unix:{self.socket_path}", "") == "SERVING"
        wait_until(ready, START_TIMEOUT_S, f"{self.name} to serve")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log_file is not None:
            self.log_file.close()
        return self.proc.returncode

    def status(self, token: str | None = TOKEN) -> pb.StatusResponse:
        with grpc.insecure_channel(f"unix:{self.socket_path}") as ch:
            reply: pb.StatusResponse = pb_grpc.ControlStub(ch).Status(
                pb.StatusRequest(), timeout=5, metadata=auth_md(token))
            return reply

    def metrics(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return {fam.name: fam for fam in text_string_to_metric_families(text)}


def auth_md(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def health_check(target: str, service: str) -> str:
    """The health status name of ``service`` at ``target`` ("UNAVAILABLE" if unreachable)."""
    try:
        with grpc.insecure_channel(target) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[attr-defined, no-any-return]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def make_nodes(base: Path, count: int, **overrides: Any) -> list[Node]:
    """``count`` node configs on 127.0.0.1 that list each other as static peers."""
    (base / "token").write_text(TOKEN + "\n")
    os.chmod(base / "token", 0o600)
    nodes = []
    for i in range(count):
        root = base / f"n{i}"
        root.mkdir()
        nodes.append(Node(f"node-{i}", root, free_port(), free_port(), {}))
    for node in nodes:
        node.config = {
            "node_name": node.name, "socket_path": node.socket_path,
            "listen": {"host": "127.0.0.1", "port": node.port},
            "data": {"port": 0},
            "metrics": {"host": "127.0.0.1", "port": node.metrics_port},
            "peers": {"static": [f"{n.name}=127.0.0.1:{n.port}" for n in nodes],
                      "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 0.3,
                      "heartbeat_retries": 1, "lost_after_s": LOST_AFTER_S},
            "erasure": {"n": 3, "m": 1},
            "memory": {"shm_dir": str(node.root / "shm"), "budget_bytes": "256MiB"},
            "persistence": {"root_url": str(base / "persist"), "rate_limit": "50%"},
            "auth": {"token_file": str(base / "token")},
            "max_message_bytes": MAX_MESSAGE,
            **overrides,
        }
    return nodes


@contextlib.contextmanager
def daemon_cluster(count: int, start: int | None = None, prefix: str = "ckn-",
                   **overrides: Any) -> Iterator[list[Node]]:
    """``count`` daemons that list each other (the first ``start`` of them running and
    ready; default all), persisting wherever the trainers say; stopped and removed after.

    ``overrides`` replace top-level config keys (e.g. ``erasure={"n": 4, "m": 2}``).
    """
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: socket paths
    cluster = make_nodes(base, count, **overrides)
    for n in cluster:
        n.config["persistence"] = {"root_url": None}
        n.config["data"] = {"port": 0}
    try:
        running = cluster[: count if start is None else start]
        for n in running:
            n.start()
        for n in running:
            n.wait_ready()
        yield cluster
    finally:
        for n in cluster:
            n.stop()
        shutil.rmtree(base, ignore_errors=True)
