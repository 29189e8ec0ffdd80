"""The Helm chart (helm/ckptd): lint, render, validate with real tools, and check that
what it renders agrees with the daemon (config parser, ports, paths, probes, secrets).

Uses the official ``helm`` binary (``.ci/fetch-helm``), ``kubernetes-validate`` and
``yamllint``; skips only when helm cannot be fetched at all. Renders each value set once.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_render as hr
import pytest
import yaml

from ckptd.daemon.config import load_config
from ckptd.daemon.server import CONTROL_SERVICE

# Oldest supported (native gRPC probes are GA from 1.27) and the newest schemas that
# kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "1.37.0")
TOKEN = "chart-test-token-0123456789"
VALUE_SETS = {
    "defaults": [],
    "s3-secure": [hr.EXAMPLES / "values-s3-secure.yaml"],
    "custom-paths": [hr.EXAMPLES / "values-custom-paths.yaml"],
}
YAMLLINT_CONFIG = hr.REPO / "helm" / ".yamllint.yaml"


@pytest.fixture(scope="module", autouse=True)
def helm_available() -> None:
    """Skip this module, with the reason, only if the helm binary cannot be had."""
    try:
        hr.helm_binary()
    except hr.HelmUnavailable as exc:
        pytest.skip(f"helm unavailable: {exc}")


@functools.cache
def rendered(set_name: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    """(YAML text, parsed documents) of one value set, rendered once per session."""
    text = hr.render_text(files=VALUE_SETS[set_name])
    return text, tuple(d for d in yaml.safe_load_all(text) if d)


def pod_of(docs: Any) -> dict[str, Any]:
    return hr.find(docs, "DaemonSet")["spec"]["template"]["spec"]


def validator() -> list[str]:
    exe = shutil.which("kubernetes-validate")
    return [exe] if exe else [sys.executable, "-m", "kubernetes_validate"]


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return hr.helm("lint", "--strict", str(hr.CHART), *args, check=False)


# ----------------------------------------------------------------- real tools


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_lint_render_and_validate(set_name: str) -> None:
    files = [a for f in VALUE_SETS[set_name] for a in ("-f", str(f))]
    out = lint(*files)
    assert out.returncode == 0, out.stdout + out.stderr
    text, _ = rendered(set_name)
    for version in K8S_VERSIONS:
        res = subprocess.run([*validator(), "--strict", "--quiet", "-k", version, "-"],
                             input=text, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"kubernetes-validate {version}:\n{res.stdout}{res.stderr}"
    res = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c",
                          str(YAMLLINT_CONFIG), "-"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"yamllint on the rendered chart:\n{res.stdout}{res.stderr}"


def test_yamllint_values_and_examples() -> None:
    res = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c",
                          str(YAMLLINT_CONFIG), str(hr.CHART / "values.yaml"),
                          str(hr.CHART / "Chart.yaml"), str(hr.EXAMPLES)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_training_example_validates() -> None:
    for version in K8S_VERSIONS:
        res = subprocess.run([*validator(), "--strict", "--quiet", "-k", version,
                              str(hr.EXAMPLES / "training-job.yaml")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(("values", "message"), [
    (["--set-string", "ports.peer=7477"], "/ports/peer"),  # a string port
    (["--set", "memory.budgetMiB=-1"], "/memory/budgetMiB"),  # a negative memory size
    (["--set", "ports.metrics=9100"], "/ports/metrics"),  # the node exporter's port
    (["--set", "config.persistence.storage_options.secret=x"], "/config"),  # inline creds
    (["--set", "auth.existingSecret="], "/auth/existingSecret"),  # no token Secret
    (["--set", "tls.enabled=true"], "/tls/existingSecret"),  # mTLS without certificates
    (["--set", "config.listen.port=1"], "/config"),  # chart-owned daemon settings
    (["--set-string", "socketGroup=3000"], "/socketGroup"),  # a gid, not a string
    (["--set", "config.socket_group=3000"], "/config"),  # chart-owned: use socketGroup
])
def test_wrong_values_fail_lint(values: list[str], message: str) -> None:
    out = lint(*values)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr, out.stdout + out.stderr


def test_inconsistent_values_fail_render() -> None:
    for args, message in ((["--set", "ports.data=7477"], "must differ"),
                          (["--set", "config.erasure.m=4"], "m must be < n")):
        out = hr.helm("template", "x", str(hr.CHART), *args, check=False)
        assert out.returncode != 0 and message in out.stderr, out.stderr


# ----------------------------------------------------------------- agreement with the daemon


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_config_accepted_by_daemon_parser(set_name: str, tmp_path: Path) -> None:
    """The ConfigMap's config and the container's CKPTD_* env pass daemon/config.py, with
    the container paths mapped to files under tmp_path (Secret and TLS files exist)."""
    _, docs = rendered(set_name)
    pod = pod_of(docs)
    main = hr.container(pod, "ckptd")
    mounts = hr.pod_mounts(pod, main, tmp_path)
    _, config = hr.daemon_config(docs)
    for key in ("cert_file", "key_file", "ca_file"):
        if config.get("tls"):
            local = Path(mounts.path(config["tls"][key]) or "")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("dummy")
    token_file = Path(mounts.path(config["auth"]["token_file"]) or "")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    path = tmp_path / "ckptd.yaml"
    path.write_text(yaml.safe_dump(mounts.rewrite(config)))
    secrets = {"ckptd-s3": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}}
    env = hr.resolve_env(main, "node-a", secrets, mounts)
    cfg = load_config(path, env=env)
    assert cfg.node_name == "node-a"
    assert cfg.token is not None and cfg.token_file == str(token_file)
    assert cfg.peers.dns_name == "ckptd-peers.ml.svc.cluster.local"
    assert cfg.peers.dns_port == cfg.listen_port
    assert cfg.erasure_m < cfg.erasure_n
    budget_mib = cfg.memory_budget_bytes >> 20
    limits = main["resources"]["limits"]["memory"]
    assert limits.endswith("Mi") or limits.endswith("Gi")
    limit_mib = int(limits[:-2]) * (1024 if limits.endswith("Gi") else 1)
    assert limit_mib > budget_mib, "the memory limit must hold the shared-memory budget"
    assert main["resources"]["requests"]["memory"] == limits


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_ports_and_probes_match_config(set_name: str) -> None:
    _, docs = rendered(set_name)
    main = hr.container(pod_of(docs), "ckptd")
    _, config = hr.daemon_config(docs)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"peer": config["listen"]["port"], "data": config["data"]["port"],
                     "health": config["health_port"], "metrics": config["metrics"]["port"]}
    assert not {9100, 9400} & set(ports.values())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = main[probe]["grpc"]
        assert grpc_probe["port"] == config["health_port"], probe
        assert grpc_probe.get("service", "") in ("", CONTROL_SERVICE), probe
    service = hr.find(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == config["peers"]["dns_name"].split(".")[0]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"peer", "data", "metrics"}
    annotations = hr.find(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_host_paths_agree_with_config_and_training_pod(set_name: str) -> None:
    _, docs = rendered(set_name)
    pod = pod_of(docs)
    main = hr.container(pod, "ckptd")
    _, config = hr.daemon_config(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    host = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
            for m in main["volumeMounts"] if "hostPath" in volumes[m["name"]]}
    socket_dir = os.path.dirname(config["socket_path"])
    # hostPaths are mounted at the same path; the daemon owns exactly these two.
    assert host == {socket_dir: socket_dir, config["memory"]["shm_dir"]:
                    config["memory"]["shm_dir"]}
    assert all(volumes[n]["hostPath"]["type"] == "DirectoryOrCreate"
               for n in volumes if "hostPath" in volumes[n])
    assert not any("emptyDir" in volumes[m["name"]] for m in main["volumeMounts"]
                   if m["mountPath"] in host), "snapshots must outlive the pod"
    sc = pod["securityContext"]
    if pod.get("initContainers"):
        init = hr.container(pod, "prepare-host-dirs", init=True)
        assert set(init["command"][-2:]) == set(host)
        assert f"chown {sc['runAsUser']}:{sc['runAsGroup']}" in init["command"][2]
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                           "add": ["CHOWN", "FOWNER"]}
    if set_name == "defaults":  # the example training Job is written for the defaults
        job = yaml.safe_load((hr.EXAMPLES / "training-job.yaml").read_text())
        tpod = job["spec"]["template"]["spec"]
        trainer = tpod["containers"][0]
        tvol = {v["name"]: v for v in tpod["volumes"]}
        thost = {m["mountPath"]: tvol[m["name"]]["hostPath"]["path"]
                 for m in trainer["volumeMounts"] if "hostPath" in tvol[m["name"]]}
        assert thost == host
        env = {e["name"]: e for e in trainer["env"]}
        assert env["CKPTD_SOCKET"]["value"] == config["socket_path"]
        ref = env["CKPTD_JOB_TOKEN"]["valueFrom"]["secretKeyRef"]
        token_vol = volumes["job-token"]["secret"]
        assert (ref["name"], ref["key"]) == (token_vol["secretName"],
                                             token_vol["items"][0]["key"])
        assert tpod["securityContext"]["runAsUser"] == sc["runAsUser"]


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_security_context(set_name: str) -> None:
    _, docs = rendered(set_name)
    pod = pod_of(docs)
    main = hr.container(pod, "ckptd")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    ds = hr.find(docs, "DaemonSet")["spec"]["updateStrategy"]
    assert ds["type"] == "RollingUpdate" and ds["rollingUpdate"]["maxSurge"] == 0


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_secrets_referenced_not_inlined(set_name: str) -> None:
    _, docs = rendered(set_name)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create Secrets"
    main = hr.container(pod_of(docs), "ckptd")
    for var in main["env"]:
        if any(h in var["name"] for h in ("SECRET", "TOKEN", "KEY_ID", "PASSWORD")):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
    _, config = hr.daemon_config(docs)
    assert "token" not in config.get("auth", {})
    options = config.get("persistence", {}).get("storage_options", {})
    assert not {"key", "secret", "token"} & set(options)
    if set_name == "s3-secure":
        refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in main["env"]
                if "secretKeyRef" in v.get("valueFrom", {})}
        assert refs == {"AWS_ACCESS_KEY_ID": "ckptd-s3", "AWS_SECRET_ACCESS_KEY": "ckptd-s3"}


def test_network_policy_and_service_monitor() -> None:
    _, docs = rendered("s3-secure")
    _, config = hr.daemon_config(docs)
    policy = hr.find(docs, "NetworkPolicy")["spec"]
    selector = hr.find(docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"]["matchLabels"] == selector
    peers_rule, metrics_rule = policy["ingress"]
    assert peers_rule["from"] == [{"podSelector": {"matchLabels": selector}}]
    assert {p["port"] for p in peers_rule["ports"]} == {config["listen"]["port"],
                                                       config["data"]["port"]}
    assert [p["port"] for p in metrics_rule["ports"]] == [config["metrics"]["port"]]
    assert "prometheus" in str(metrics_rule["from"])
    monitor = hr.find(docs, "ServiceMonitor")["spec"]
    service = hr.find(docs, "Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    _, default_docs = rendered("defaults")
    assert not [d for d in default_docs if d["kind"] in ("NetworkPolicy", "ServiceMonitor")]


def test_socket_group_wiring(tmp_path: Path) -> None:
    """socketGroup reaches the daemon's config (accepted by its parser), the daemon pod's
    supplementalGroups and the init container (socket dir uid:group 0750, shm dir 0700);
    without it none of them mentions a group."""
    _, docs = rendered("defaults")
    pod = pod_of(docs)
    assert "socket_group" not in hr.daemon_config(docs)[1]
    assert "supplementalGroups" not in pod["securityContext"]
    docs = hr.render({"socketGroup": 3000})
    pod = pod_of(docs)
    sc = pod["securityContext"]
    _, config = hr.daemon_config(docs)
    assert config["socket_group"] == 3000 and sc["supplementalGroups"] == [3000]
    init = hr.container(pod, "prepare-host-dirs", init=True)
    script, socket_dir, shm_dir = init["command"][2], *init["command"][-2:]
    assert (socket_dir, shm_dir) == (os.path.dirname(config["socket_path"]),
                                     config["memory"]["shm_dir"])
    assert f'chown {sc["runAsUser"]}:3000 "$1"; chmod 0750 "$1"' in script
    assert f'chown {sc["runAsUser"]}:{sc["runAsGroup"]} "$2"; chmod 0700 "$2"' in script
    config["auth"] = {"allow_unauthenticated": True}
    path = tmp_path / "ckptd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path, env={"CKPTD_NODE_NAME": "node-a"}).socket_group == 3000
    _, custom = rendered("custom-paths")  # prepare: false, the node provides the directory
    assert hr.daemon_config(custom)[1]["socket_group"] == 3000
    assert pod_of(custom)["securityContext"]["supplementalGroups"] == [3000]
