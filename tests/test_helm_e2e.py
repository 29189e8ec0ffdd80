"""End to end without a cluster: the chart's DaemonSet, rendered by ``helm template``, run
as two real ``ckptd`` processes ("nodes" node-a and node-b on 127.0.0.1) with exactly the
container's command, args, env and the ConfigMap's config (paths and ports remapped, see
tests/helm_render.py). No API server can run here, so scheduling, kubelet and the CNI are
not exercised.

The save/load tests run trainer processes with exactly the environment and socket path of
the example training Job (helm/examples/training-job.yaml) on each node: two trainers
(gloo, one per node) save with ``daemon_wait="committed"``; a fresh process loads from the
daemons' memory, bit-exact; ``ckptd status --job`` shows the job. Once with the default
values (the trainers' root is a local directory), once with the S3 value set, its
persistence root in a bucket of a loopback S3 server (moto) and its credentials from the
Secret the chart names, with the chart's mTLS between the daemons (a CA and certificate
made here).

Run as a script, this module is the fresh loading process (``load ROOT STAGE``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_render as hr
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TOKEN = "e2e-chart-token-0123456789abcdef"
NODES = ("node-a", "node-b")
SECRETS = {"ckptd-job-token": {"token": TOKEN}}
TESTS = Path(__file__).resolve().parent
TRAINER = TESTS / "daemon_trainer.py"
STEP, STAGE = 11, 1  # ZeRO-1 state of tests/test_multiproc_layouts.py


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
        with hr.run_chart_daemons(docs, base, NODES, SECRETS) as nodes:
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


# ------------------------------------------------------------------ save and load


def training_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, trainer container) of the example Job; not root: our uid, like the
    daemons (:func:`helm_render.local_user_values`)."""
    job = yaml.safe_load((hr.EXAMPLES / "training-job.yaml").read_text())
    tpod = job["spec"]["template"]["spec"]
    if hr.local_user_values():
        tpod = {**tpod, "securityContext": {**tpod["securityContext"],
                                           **hr.local_user_values()["podSecurityContext"]}}
    return tpod, tpod["containers"][0]


def pod_env(node: hr.ChartNode, secrets: Mapping[str, Mapping[str, str]] = SECRETS
            ) -> tuple[dict[str, str], dict[str, Any]]:
    """(environment, Popen user kwargs) of the example training container on ``node``:
    its env resolved through its own mounts (so CKPTD_SOCKET is the node's socket)."""
    tpod, trainer = training_pod()
    env = hr.resolve_env(trainer, node.name, secrets, hr.pod_mounts(tpod, trainer, node.root))
    assert env["CKPTD_SOCKET"] == node.socket_path
    return hr.base_env() | env, hr.run_as(tpod, trainer)


def _logs(nodes: list[hr.ChartNode]) -> str:
    return "\n".join(f"--- {n.name}:\n{n.stderr()[-3000:]}" for n in nodes)


def save_with_trainers(nodes: list[hr.ChartNode], root: str,
                       extra_env: Mapping[str, str] | None = None) -> None:
    """One trainer per node (gloo world of len(nodes)) saves step STEP to ``root`` with
    ``daemon_wait="committed"`` and prints SAVED; then it is SIGKILLed, as a crash would."""
    port, procs = hr.free_port(), []
    try:
        for rank, node in enumerate(nodes):
            env, user = pod_env(node)
            procs.append(subprocess.Popen(
                [sys.executable, str(TRAINER), str(rank), str(len(nodes)), str(port), root,
                 str(STEP), str(STAGE)],
                env=env | {"CKPT_DAEMON_WAIT": "committed", **(extra_env or {})},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/", **user))
        for p in procs:
            assert p.stdout is not None
            seen: list[bytes] = []
            for _ in range(200):  # bounded: a trainer prints a handful of lines
                line = p.stdout.readline()  # the test's timeout bounds a silent hang
                seen.append(line)
                if not line or line.startswith(b"SAVED"):
                    break
            assert seen[-1].startswith(b"SAVED"), (
                f"trainer did not save:\n{b''.join(seen).decode(errors='replace')[-3000:]}\n"
                + _logs(nodes))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            if p.stdout is not None:
                p.stdout.close()


def load_in_fresh_process(node: hr.ChartNode, root: str, nodes: list[hr.ChartNode],
                          extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run this module as a script on ``node`` (the training pod's env): it loads every
    tensor, checks each bit, and prints the LoadResult as JSON."""
    env, user = pod_env(node)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "load", root,
                          str(STAGE)], env=env | dict(extra_env or {}), capture_output=True,
                         text=True, timeout=120, check=False, cwd="/", **user)
    assert out.returncode == 0, f"load failed:\n{out.stdout}{out.stderr[-4000:]}\n" + _logs(nodes)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def job_status(node: hr.ChartNode, root: str) -> dict[str, Any]:
    """``ckptd status --job <job of root> --json`` as the training pod runs it."""
    from ckpt.daemon_client import job_id_for

    env, user = pod_env(node)
    out = subprocess.run(
        [*hr.container_argv({"command": ["ckptd"]}), "status", "--json", "--timeout", "5",
         "--job", job_id_for(root)], env=env, capture_output=True, text=True, timeout=60,
        check=False, cwd="/", **user)
    assert out.returncode == 0, f"ckptd status failed: {out.stdout}{out.stderr}"
    return dict(json.loads(out.stdout))


def check_save_load(nodes: list[hr.ChartNode], root: str,
                    extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Save through every node, load in a fresh process, check status; returns the job."""
    save_with_trainers(nodes, root, extra_env)
    result = load_in_fresh_process(nodes[0], root, nodes, extra_env)
    assert result == {"source": "memory", "step": STEP}, result
    doc = job_status(nodes[0], root)
    job = doc["job"]
    assert {n["node"] for n in job["nodes"] if n["reachable"]} == set(NODES), job
    steps = {(r["node"], r["step"]): r for r in job["steps"]}
    assert set(steps) == {(n, STEP) for n in NODES}, job
    assert all(r["staged"] and r["persisted"] and r["committed"] and r["bytes"] > 0
               for r in steps.values()), job
    return job


def test_save_committed_then_load_from_memory(
        chart_nodes: tuple[list[hr.ChartNode], list[dict]]) -> None:
    from ckptd.formats import commit as commit_mod
    from ckptd.formats.storage import open_storage

    nodes, _ = chart_nodes
    root = str(nodes[0].root.parent / "ckpt")  # the trainers' persistence root
    check_save_load(nodes, root)
    assert commit_mod.committed_steps(open_storage(root)) == [STEP]


def _tls_secret(tmp: Path) -> dict[str, str]:
    """A CA and one certificate (for the chart's tls.serverName ``ckptd-peer``) in
    cert-manager's Secret layout, made with openssl."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True,
                       timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.crt", "-days", "2", "-subj", "/CN=ckptd-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
        "-subj", "/CN=ckptd-peer")
    (tmp / "ext.cnf").write_text("subjectAltName=DNS:ckptd-peer\n"
                                 "extendedKeyUsage=serverAuth,clientAuth\n")
    ssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf")
    return {k: (tmp / k).read_text() for k in ("tls.crt", "tls.key", "ca.crt")}


@pytest.mark.s3
def test_s3_value_set_save_committed_then_load_from_memory(
        s3_server: str, s3_bucket: Any) -> None:
    """The S3 value set (mTLS, NetworkPolicy, ServiceMonitor): its rendered persistence
    root, pointed at a fresh bucket on the loopback S3 server, with the keys from the
    Secret the chart references."""
    import s3fs

    bucket = s3_bucket()
    root = f"s3://{bucket}/run-7"
    values = hr.local_user_values() | {"persistence": {
        "rootUrl": root, "s3": {"endpointUrl": s3_server}}}
    try:
        docs = hr.render(values, files=[hr.EXAMPLES / "values-s3-secure.yaml"])
    except hr.HelmUnavailable as exc:
        pytest.skip(f"helm unavailable: {exc}")
    _, config = hr.daemon_config(docs)
    assert config["persistence"]["root_url"] == root and config.get("tls")
    main = hr.container(hr.find(docs, "DaemonSet")["spec"]["template"]["spec"], "ckptd")
    s3_env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in main["env"]
              if "secretKeyRef" in v.get("valueFrom", {})
              and v["name"].startswith("AWS_")}
    assert set(s3_env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    base = Path(tempfile.mkdtemp(prefix="ckh3-", dir="/tmp"))
    tls_dir = base / "tls-material"
    tls_dir.mkdir()
    secrets: dict[str, dict[str, str]] = {
        **SECRETS, s3_env["AWS_ACCESS_KEY_ID"]["name"]: {
            s3_env["AWS_ACCESS_KEY_ID"]["key"]: "testing",
            s3_env["AWS_SECRET_ACCESS_KEY"]["key"]: "testing"},
        "ckptd-peer-tls": _tls_secret(tls_dir)}
    # The trainers reach the same bucket (they name the root; the daemons write it):
    # the loading process may open it, as a training image configured for S3 would.
    trainer_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server,
                   "AWS_ENDPOINT_URL_S3": s3_server}
    try:
        with hr.run_chart_daemons(docs, base, NODES, secrets) as nodes:
            for node in nodes:  # the daemons got the keys only through the Secret refs
                assert node.env["AWS_ACCESS_KEY_ID"] == "testing"
            check_save_load(nodes, root, trainer_env)
            assert "step verdict" in "".join(n.stderr() for n in nodes)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_server})
    assert fs.ls(f"{bucket}/run-7"), "nothing persisted in the bucket"


# ------------------------------------------------------------------ the loading process


def _load_main(root: str, stage: int) -> None:
    """Fresh process: CKPTD_SOCKET/CKPTD_JOB_TOKEN from the environment (the training
    pod's), load the canonical tensors, check every bit, print the LoadResult."""
    sys.path.insert(0, str(TESTS))
    import torch
    from test_multiproc_layouts import SENTINEL, _z_globals, assert_bits

    import ckpt

    assert ckpt.get_config().daemon_socket == os.environ["CKPTD_SOCKET"]
    g = _z_globals()
    state: dict[str, Any] = {"model": {}, "master": {}, "optim": {"step": torch.tensor(0.0)}}
    for key, t in g.items():
        top, sub = key.split(".", 1)
        dtype = torch.bfloat16 if top == "model" and stage != 3 else t.dtype
        state[top][sub] = torch.full_like(t, SENTINEL, dtype=dtype)
    res = ckpt.load(state, root, strict=True)
    for key, t in g.items():
        top, sub = key.split(".", 1)
        want = t.to(torch.bfloat16) if top == "model" and stage != 3 else t
        assert_bits(state[top][sub], want, f"fresh process: {key}")
    assert float(state["optim"]["step"]) == 11.0
    ckpt.shutdown()
    print(json.dumps({"source": res.source, "step": res.step}), flush=True)


if __name__ == "__main__":
    assert sys.argv[1] == "load", sys.argv
    _load_main(sys.argv[2], int(sys.argv[3]))
