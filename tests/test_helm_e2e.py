"""End to end without a cluster: the chart's DaemonSet, rendered by ``helm template``, run
as two real ``ckptd`` processes ("nodes" node-a and node-b on 127.0.0.1) with exactly the
container's command, args, env and the ConfigMap's config (paths and ports remapped, see
tests/helm_render.py). No API server can run here, so scheduling, kubelet and the CNI are
not exercised. A save/load through these daemons comes once the client path exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import helm_render as hr
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TOKEN = "e2e-chart-token-0123456789abcdef"
NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
def chart_nodes() -> Iterator[tuple[list[hr.ChartNode], list[dict]]]:
    """Both daemons of the default chart, started; stopped after the module."""
    try:
        docs = hr.render(hr.local_user_values())
    except hr.HelmUnavailable as exc:
        pytest.skip(f"helm unavailable: {exc}")
    # Short base path: unix socket paths are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="ckh-", dir="/tmp"))
    try:
        with hr.run_chart_daemons(docs, base, NODES, {"ckptd-job-token": {"token": TOKEN}}
                                  ) as nodes:
            yield nodes, docs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_probes_answer_serving(chart_nodes: tuple[list[hr.ChartNode], list[dict]]) -> None:
    nodes, docs = chart_nodes
    main = hr.container(hr.find(docs, "DaemonSet")["spec"]["template"]["spec"], "ckptd")
    for node in nodes:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc_probe = main[probe]["grpc"]
            status = hr.health_status(node.local_port(grpc_probe["port"]),
                                      grpc_probe.get("service", ""))
            assert status == "SERVING", (node.name, probe, status, node.stderr())


def test_status_through_training_pod_socket_shows_peer(
        chart_nodes: tuple[list[hr.ChartNode], list[dict]]) -> None:
    """`ckptd status`, as the example training Job would run it on node-a: its socket
    path (CKPTD_SOCKET) through its own hostPath mounts, its token, its uid."""
    nodes, _ = chart_nodes
    job = yaml.safe_load((hr.EXAMPLES / "training-job.yaml").read_text())
    tpod = job["spec"]["template"]["spec"]
    trainer = tpod["containers"][0]
    if hr.local_user_values():  # not root: the trainer runs as we do, like the daemons
        tpod = {**tpod, "securityContext": {**tpod["securityContext"],
                                           **hr.local_user_values()["podSecurityContext"]}}
    node_a = nodes[0]
    mounts = hr.pod_mounts(tpod, trainer, node_a.root)
    env = hr.resolve_env(trainer, node_a.name, {"ckptd-job-token": {"token": TOKEN}}, mounts)
    assert env["CKPTD_SOCKET"] == node_a.socket_path  # same host file as the daemon's socket

    def peer_alive() -> dict | None:
        node_a.check_alive()
        out = subprocess.run(
            [*hr.container_argv({"command": ["ckptd"]}), "status", "--json", "--timeout", "3"],
            env=hr.base_env() | env, capture_output=True, text=True, timeout=30,
            check=False, cwd="/", **hr.run_as(tpod, trainer))
        if out.returncode != 0:
            raise AssertionError(f"ckptd status failed: {out.stdout}{out.stderr}")
        doc = json.loads(out.stdout)
        peers = {p["name"]: p["state"] for p in doc["peers"]}
        return doc if peers.get("node-b") == "PEER_STATE_ALIVE" else None

    doc = hr.wait_until(peer_alive, 15.0, "node-b ALIVE in node-a's status")
    assert doc["node"] == "node-a" and doc["serving"] == "SERVING"


def test_metrics_port_answers(chart_nodes: tuple[list[hr.ChartNode], list[dict]]) -> None:
    nodes, docs = chart_nodes
    annotations = hr.find(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    port, path = int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]
    for node in nodes:
        url = f"http://127.0.0.1:{node.local_port(port)}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            families = {f.name for f in text_string_to_metric_families(resp.read().decode())}
        assert any(name.startswith("ckptd_") for name in families), sorted(families)


def test_data_port_speaks_data_channel(
        chart_nodes: tuple[list[hr.ChartNode], list[dict]]) -> None:
    """The port the NetworkPolicy opens as ``data`` is the daemon's data channel: it
    greets with a HELLO frame (daemon/datachannel.py)."""
    import socket

    from ckptd.daemon.datachannel import HEADER_SIZE, MAGIC

    nodes, docs = chart_nodes
    main = hr.container(hr.find(docs, "DaemonSet")["spec"]["template"]["spec"], "ckptd")
    data_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "data")
    for node in nodes:
        with socket.create_connection(("127.0.0.1", node.local_port(data_port)),
                                      timeout=5) as conn:
            header = b""
            while len(header) < HEADER_SIZE:
                chunk = conn.recv(HEADER_SIZE - len(header))
                assert chunk, "data channel closed before its HELLO"
                header += chunk
        assert header[:4] == MAGIC
