"""The ``ckptd`` process shell: config, protocol, health, auth, membership, metrics, logs.

Real ``ckptd`` subprocesses on 127.0.0.1 with free ports and private socket directories;
every wait is bounded by a deadline. The data path is not here yet.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from daemon_harness import (
    LOST_AFTER_S,
    MAX_MESSAGE,
    TOKEN,
    Node,
    auth_md,
    ckptd_cmd,
    clean_env,
    health_check,
    make_nodes,
    wait_until,
)

from ckptd.daemon.auth import Secret
from ckptd.daemon.config import ConfigError, load_config, parse_size
from ckptd.daemon.server import form_groups
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ckd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    """Three running daemons that know each other, all peers ALIVE."""
    base = Path(tempfile.mkdtemp(prefix="ckc-", dir="/tmp"))
    nodes = make_nodes(base, 3)
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()

        def sees_all_peers(node: Node) -> bool:
            peers = node.status().peers
            return len(peers) == 2 and all(p.state == pb.PEER_STATE_ALIVE for p in peers)

        for node in nodes:
            wait_until(functools.partial(sees_all_peers, node), 10,
                       f"{node.name} to see its peers")
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- pure functions


def test_form_groups_is_deterministic_and_covers_every_node() -> None:
    names = [f"node-{i:02d}" for i in range(9)]
    groups = form_groups(reversed(names), 4)
    assert groups == [names[:5], names[5:]]
    assert form_groups(names, 4) == groups
    assert form_groups(names[:8], 4) == [names[:4], names[4:8]]
    assert form_groups(names[:3], 4) == [names[:3]]  # fewer than n: one small group
    assert form_groups([], 4) == []
    for count in range(1, 30):
        for n in range(1, 7):
            gs = form_groups([f"h{i}" for i in range(count)], n)
            assert sorted(x for g in gs for x in g) == sorted(f"h{i}" for i in range(count))
            assert count < n or all(len(g) >= n for g in gs)
            assert max(map(len, gs)) - min(map(len, gs)) <= 1
    with pytest.raises(ValueError, match="duplicate"):
        form_groups(["a", "a"], 2)
    with pytest.raises(ValueError, match=">= 1"):
        form_groups(["a"], 0)


def test_config_env_overrides_and_secrets(short_tmp: Path) -> None:
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN)
    path = short_tmp / "c.yaml"
    path.write_text(yaml.safe_dump({"node_name": "a", "auth": {"token_file": str(token_file)},
                                    "persistence": {"storage_options": {"secret": "s3cr3t",
                                                                        "endpoint_url": "x"}}}))
    env = {"CKPTD_LISTEN__PORT": "7000", "CKPTD_SOCKET": "/run/x/ckptd.sock",
           "CKPTD_PEERS__STATIC": "b=10.0.0.2:7477, 10.0.0.3:7477",
           "CKPTD_MEMORY__BUDGET_BYTES": "2GiB", "CKPTD_ERASURE__M": "2"}
    cfg = load_config(path, env)
    assert (cfg.listen_port, cfg.socket_path, cfg.memory_budget_bytes, cfg.erasure_m) == (
        7000, "/run/x/ckptd.sock", 2 << 30, 2)
    assert [(p.name, p.address) for p in cfg.peers.static] == [
        ("b", "10.0.0.2:7477"), ("", "10.0.0.3:7477")]
    assert cfg.token is not None and cfg.token.matches(TOKEN)
    dumped = cfg.to_yaml()
    assert TOKEN not in dumped and TOKEN not in repr(cfg) and "s3cr3t" not in dumped
    again = load_config(None, {"CKPTD_JOB_TOKEN": TOKEN, **{
        f"CKPTD_{k.upper()}": str(v) for k, v in yaml.safe_load(dumped).items()
        if k in ("node_name", "socket_path")}})
    assert again.node_name == "a" and again.token == Secret(TOKEN)
    assert parse_size("1.5KiB") == 1536 and parse_size("1G") == 10**9


@pytest.mark.parametrize(("doc", "env", "field"), [
    ({"listen": {"port": "abc"}}, {}, "listen.port"),
    ({"listen": {"port": 70000}}, {}, "listen.port"),
    ({}, {"CKPTD_LISTEN__PORT": "abc"}, "listen.port (from CKPTD_LISTEN__PORT)"),
    ({"memory": {"budget_bytes": -1}}, {}, "memory.budget_bytes"),
    ({"erasure": {"n": 3, "m": 3}}, {}, "erasure.m"),
    ({"metrics": {"port": 9100}}, {}, "metrics.port"),
    ({"peers": {"static": ["a=nohost"]}}, {}, "peers.static[0]"),
    ({"persistence": {"rate_limit": "150%"}}, {}, "persistence.rate_limit"),
    ({"auth": {"token": "inline-token-0123456789"}}, {}, "auth.token"),
    ({"bogus": 1}, {}, "bogus: unknown setting"),
    ({}, {"CKPTD_NOPE": "1"}, "CKPTD_NOPE"),
    ({"socket_path": "relative.sock"}, {}, "socket_path"),
])
def test_config_errors_name_the_field(short_tmp: Path, doc: dict[str, Any],
                                      env: dict[str, str], field: str) -> None:
    path = short_tmp / "c.yaml"
    path.write_text(yaml.safe_dump({"node_name": "a", **doc}))
    with pytest.raises(ConfigError) as info:
        load_config(path, {"CKPTD_JOB_TOKEN": TOKEN, **env})
    assert field in str(info.value)


def test_config_requires_a_token(short_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="job token is required"):
        load_config(None, {"CKPTD_NODE_NAME": "a"})
    with pytest.raises(ConfigError, match="at least 16"):
        load_config(None, {"CKPTD_NODE_NAME": "a", "CKPTD_JOB_TOKEN": "short"})
    assert load_config(None, {"CKPTD_AUTH__ALLOW_UNAUTHENTICATED": "true"}).token is None


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) is not installed")
    from ckptd.rpc import PROTO_FILES, generated_files, package_root, regenerate

    try:
        regenerate(tmp_path)
    except ImportError as exc:
        pytest.skip(f"cannot regenerate: {exc}")
    for proto in PROTO_FILES:
        for rel in generated_files(proto):
            fresh, checked_in = tmp_path / rel, package_root() / rel
            assert fresh.read_bytes() == checked_in.read_bytes(), (
                f"{rel} is stale: run `python -m ckptd.rpc` and commit the result")


# --------------------------------------------------------------------------- processes


def test_cli_refuses_invalid_config_with_exit_1(short_tmp: Path) -> None:
    path = short_tmp / "bad.yaml"
    path.write_text(yaml.safe_dump({"node_name": "a", "listen": {"port": "abc"},
                                    "memory": {"budget_bytes": -5},
                                    "erasure": {"n": 2, "m": 2}}))
    proc = subprocess.run(ckptd_cmd("--config", str(path)), capture_output=True, text=True,
                          env=clean_env(CKPTD_JOB_TOKEN=TOKEN), timeout=30)
    assert proc.returncode == 1, proc.stderr
    for field_name in ("listen.port", "memory.budget_bytes", "erasure.m"):
        assert field_name in proc.stderr
    usage = subprocess.run(ckptd_cmd("--bogus"), capture_output=True, text=True,
                           env=clean_env(), timeout=30)
    assert usage.returncode == 2


@pytest.mark.parametrize("case", ["world-writable", "mode", "symlink", "owner", "live"])
def test_refuses_unsafe_socket_path(short_tmp: Path, case: str) -> None:
    if case == "owner" and os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another uid")
    (node,) = make_nodes(short_tmp, 1)
    sock_dir = Path(node.socket_path).parent
    if case == "symlink":
        real = short_tmp / "real"
        real.mkdir(mode=0o700)
        sock_dir.symlink_to(real)
    else:
        sock_dir.mkdir()
        os.chmod(sock_dir, {"world-writable": 0o777, "mode": 0o755}.get(case, 0o700))
    if case == "owner":
        os.chown(sock_dir, 65534, 65534)
    listener = None
    if case == "live":  # something already answers on the socket
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(node.socket_path)
        listener.listen(1)
    expected = {"world-writable": "world-writable", "mode": "mode 0755", "symlink": "symlink",
                "owner": "owned by uid 65534", "live": "already running"}[case]
    try:
        node.start()
        assert node.proc is not None
        assert node.proc.wait(30) == 1
        assert expected in node.stderr()
    finally:
        node.stop()
        if listener is not None:
            listener.close()


def test_health_over_unix_and_tcp(cluster: list[Node]) -> None:
    node = cluster[0]
    unix, tcp = f"unix:{node.socket_path}", f"127.0.0.1:{node.port}"
    assert health_check(unix, "") == "SERVING"
    assert health_check(unix, "ckptd.rpc.v1.Control") == "SERVING"
    assert health_check(tcp, "") == "SERVING"
    assert health_check(tcp, "ckptd.rpc.v1.Peer") == "SERVING"
    assert health_check(tcp, "no.such.Service") == "NOT_FOUND"


def test_socket_permissions(cluster: list[Node]) -> None:
    sock = Path(cluster[0].socket_path)
    dir_st, sock_st = os.stat(sock.parent), os.lstat(sock)
    assert stat.S_IMODE(dir_st.st_mode) == 0o700 and dir_st.st_uid == os.geteuid()
    assert stat.S_ISSOCK(sock_st.st_mode) and stat.S_IMODE(sock_st.st_mode) == 0o600


def test_status_and_groups(cluster: list[Node]) -> None:
    names = sorted(n.name for n in cluster)
    for node in cluster:
        st = node.status()
        assert st.node == node.name and st.serving == "SERVING"
        assert st.peer_port == node.port and st.metrics_port == node.metrics_port
        assert st.memory_budget_bytes == 256 << 20 and st.memory_used_bytes == 0
        assert st.config.erasure_n == 3 and st.config.erasure_m == 1 and st.config.auth
        assert sorted(p.name for p in st.peers) == sorted(set(names) - {node.name})
        assert [list(g.members) for g in st.groups] == [names] and st.my_group == 0
    proc = subprocess.run(ckptd_cmd("status", "--config", str(cluster[1].config_path), "--json"),
                          capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["node"] == "node-1"
    assert {p["state"] for p in doc["peers"]} == {"PEER_STATE_ALIVE"}
    human = subprocess.run(ckptd_cmd("status", "--socket", cluster[1].socket_path),
                           capture_output=True, text=True, timeout=30,
                           env=clean_env(CKPTD_JOB_TOKEN=TOKEN))
    assert human.returncode == 0 and "node-1" in human.stdout and "ALIVE" in human.stdout
    denied = subprocess.run(ckptd_cmd("status", "--socket", cluster[1].socket_path, "--json"),
                            capture_output=True, text=True, env=clean_env(), timeout=30)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in json.loads(denied.stdout)["error"]


def _raw_call(target: str, method: str, payload: bytes, token: str | None) -> bytes:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(payload, timeout=5, metadata=auth_md(token))  # type: ignore[no-any-return]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", "Basic", TOKEN])
def test_token_auth(cluster: list[Node], transport: str, token: str | None) -> None:
    node = cluster[0]
    if transport == "unix":
        target, method = f"unix:{node.socket_path}", "/ckptd.rpc.v1.Control/Ping"
        request = pb.PingRequest(payload=b"hi").SerializeToString()
    else:
        target, method = f"127.0.0.1:{node.port}", "/ckptd.rpc.v1.Peer/Heartbeat"
        request = pb.HeartbeatRequest(node="tester", generation=1).SerializeToString()
    md = (("authorization", f"Basic {TOKEN}"),) if token == "Basic" else auth_md(token)
    try:
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            reply = call(request, timeout=5, metadata=md)
    except grpc.RpcError as exc:
        assert token != TOKEN, exc
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert TOKEN not in node.stderr()
        return
    assert token == TOKEN
    if transport == "unix":
        assert pb.PingResponse.FromString(reply).payload == b"hi"
    else:
        assert pb.HeartbeatResponse.FromString(reply).node == node.name


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_oversized_message_is_rejected(cluster: list[Node], transport: str) -> None:
    node = cluster[0]
    target = f"unix:{node.socket_path}" if transport == "unix" else f"127.0.0.1:{node.port}"
    method = "/ckptd.rpc.v1.Control/Ping" if transport == "unix" else "/ckptd.rpc.v1.Peer/Heartbeat"
    big = pb.PingRequest(payload=b"x" * (MAX_MESSAGE + 1024)).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(target, method, big, TOKEN)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    if transport == "unix":  # just under the limit still works
        ok = pb.PingRequest(payload=b"y" * (MAX_MESSAGE - 1024)).SerializeToString()
        assert len(pb.PingResponse.FromString(_raw_call(target, method, ok, TOKEN)).payload) \
            == MAX_MESSAGE - 1024


def test_metrics_endpoint(cluster: list[Node]) -> None:
    fams = cluster[0].metrics()
    assert all(name.startswith("ckptd_") for name in fams)

    def value(name: str, **labels: str) -> float:
        for sample in (s for fam in fams.values() for s in fam.samples):
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"no sample {name} {labels}")

    assert value("ckptd_up") == 1 and value("ckptd_uptime_seconds") > 0
    assert value("ckptd_peers", state="alive") == 2 and value("ckptd_peers", state="lost") == 0
    assert value("ckptd_memory_budget_bytes") == 256 << 20
    assert value("ckptd_memory_used_bytes") == 0
    assert value("ckptd_build_info", node="node-0") == 1
    assert fams["ckptd_heartbeat_latency_seconds"].type == "histogram"
    assert value("ckptd_heartbeat_latency_seconds_count") > 0
    for stage in ("staged", "protected", "persisted"):
        assert value("ckptd_bytes_total", stage=stage) == 0
    assert fams["ckptd_bytes"].type == "counter"
    for name in ("ckptd_save_stall_seconds", "ckptd_persist_lag_seconds",
                 "ckptd_persist_throughput_bytes_per_second",
                 "ckptd_protection_tolerated_losses", "ckptd_last_step"):
        assert name in fams
    assert value("ckptd_auth_rejections_total", transport="unix", reason="missing") >= 0


def test_sigstop_marks_peer_lost_then_alive(cluster: list[Node]) -> None:
    victim, watchers = cluster[2], cluster[:2]
    assert victim.proc is not None

    def states() -> set[int]:
        return {p.state for w in watchers for p in w.status().peers if p.name == victim.name}

    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        wait_until(lambda: states() == {pb.PEER_STATE_LOST}, LOST_AFTER_S + 6,
                   "the stopped daemon to be marked lost")
        assert time.monotonic() - began >= LOST_AFTER_S - 0.5
        st = watchers[0].status()
        assert {p.name: p.state for p in st.peers}["node-1"] == pb.PEER_STATE_ALIVE
        fams = watchers[0].metrics()
        lost = [s.value for s in fams["ckptd_peers"].samples if s.labels["state"] == "lost"]
        assert lost == [1]
        # a lost node stays in its group: its data is what the group would rebuild
        assert [list(g.members) for g in st.groups] == [[n.name for n in cluster]]
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    wait_until(lambda: states() == {pb.PEER_STATE_ALIVE}, 10, "the resumed daemon to be alive")
    assert "peer state changed" in watchers[0].stderr()


def test_sigterm_exits_cleanly_with_json_logs(short_tmp: Path) -> None:
    (node,) = make_nodes(short_tmp, 1)
    node.start()
    try:
        node.wait_ready()
        with grpc.insecure_channel(f"unix:{node.socket_path}") as ch:
            for _ in range(3):
                pb_grpc.ControlStub(ch).Ping(pb.PingRequest(payload=b"z"), timeout=5,
                                             metadata=auth_md(TOKEN))
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(15) == 0
    finally:
        node.stop()
    assert not os.path.exists(node.socket_path)
    lines = [json.loads(line) for line in node.stderr().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "ckptd started" in events and "draining" in events and "ckptd stopped" in events
    for line in lines:
        assert {"timestamp", "level", "node", "step", "rank"} <= set(line)
        assert line["node"] == "node-0"
    assert TOKEN not in node.stderr()
    with contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", node.metrics_port), timeout=1).close()
        pytest.fail("metrics port still open after exit")


def test_port_in_use_exits_1_and_cleans_up(short_tmp: Path) -> None:
    (node,) = make_nodes(short_tmp, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.port))
        taken.listen(1)
        node.start()
        try:
            assert node.proc is not None
            assert node.proc.wait(30) == 1
        finally:
            node.stop()
    assert "cannot start" in node.stderr() and str(node.port) in node.stderr()
    assert not os.path.exists(node.socket_path)
