"""Daemon configuration: one YAML file plus ``CKPTD_*`` environment overrides.

Schema (every key optional unless noted; defaults in brackets)::

    node_name: node-a            # [host name] unique per node, [A-Za-z0-9._-]
    socket_path: /run/ckptd/ckptd.sock   # local clients; dir 0700 owned by us, socket 0600
    socket_group: null           # group name or gid whose members may use the socket (trainers
                                 # of another uid): dir 0750 + sockets 0660 of that group
    listen: {host: 0.0.0.0, port: 7477}  # peer gRPC (TCP)
    data: {port: 7478}           # bulk data channel between daemons (TCP, same host)
    health_port: null            # extra plaintext health-only port (probes when tls is on)
    peers:
      static: [node-b=10.0.0.2:7477, 10.0.0.3:7477, {name: node-d, address: h:7477}]
      dns_name: null             # Kubernetes headless Service, resolved periodically
      dns_port: null             # [listen.port]
      dns_refresh_s: 30
      heartbeat_interval_s: 1.0
      heartbeat_timeout_s: 1.0   # deadline of one heartbeat call
      heartbeat_retries: 2       # extra attempts within one round
      lost_after_s: 5.0          # no answer for this long -> peer LOST
    erasure: {n: 4, m: 1}        # groups of n daemons tolerate m losses (0 <= m < n)
    memory: {shm_dir: /dev/shm/ckptd, budget_bytes: 8GiB}
    persistence:
      root_url: null             # path or fsspec URL (s3://bucket/prefix); null = memory only
      storage_options: {}        # passed to fsspec; secrets belong in env, not here
      rate_limit: null           # bytes/s (int or "200MiB/s") or a share ("50%")
    retention: {keep_last: 3, keep_every: null}
    auth: {token_file: null, allow_unauthenticated: false}
    tls: null                    # {cert_file, key_file, ca_file, server_name}: mTLS between peers
    metrics: {host: 0.0.0.0, port: 9477}  # Prometheus; never 9100/9400 (node/DCGM exporters)
    max_message_bytes: 64MiB
    log_level: info

Environment: ``CKPTD_<KEY>`` sets a top-level key and ``CKPTD_<SECTION>__<KEY>`` a nested
one (``CKPTD_LISTEN__PORT=7000``, ``CKPTD_PEERS__STATIC=a=h1:7477,b=h2:7477``); they win
over the file. ``CKPTD_SOCKET`` is an alias of ``socket_path`` (the name clients use),
``CKPTD_JOB_TOKEN`` carries the job token itself, ``CKPTD_CONFIG`` names the file. Any
other ``CKPTD_*`` variable is an error (a typo must not be silently ignored).
Every problem is reported at once in a :class:`ConfigError` naming the field (and the env
variable). The token is a :class:`Secret`: never printed, logged or written by ``to_yaml``.
"""

from __future__ import annotations

import grp
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ckptd.daemon.auth import Secret
from ckptd.errors import CkptError

DEFAULT_PEER_PORT = 7477
DEFAULT_DATA_PORT = 7478  # bulk data channel (daemon/datachannel.py), next to the gRPC port
DEFAULT_METRICS_PORT = 9477  # not 9100/9400/9464 (node, DCGM, OpenTelemetry exporters)
DEFAULT_SOCKET_PATH = "/run/ckptd/ckptd.sock"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
RESERVED_PORTS = {9100: "the Prometheus node exporter", 9400: "the NVIDIA DCGM exporter"}
ENV_PREFIX = "CKPTD_"
ENV_TOKEN = "CKPTD_JOB_TOKEN"
ENV_CONFIG = "CKPTD_CONFIG"
ENV_ALIASES = {"CKPTD_SOCKET": ("socket_path",)}
MIN_TOKEN_CHARS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_UNIX_PATH_MAX = 107
_SECRET_HINTS = ("secret", "password", "token", "key", "credential")


class ConfigError(CkptError, ValueError):
    """The daemon configuration is invalid; ``problems`` lists ``field: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid ckptd configuration:\n  " + "\n  ".join(self.problems))


class EnvValue(str):
    """A value that came from an environment variable (``source`` names it); only these
    are coerced from strings to ints/floats/bools/lists. A YAML ``port: "7477"`` is an error."""

    source: str

    def __new__(cls, value: str, source: str) -> EnvValue:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


@dataclass(frozen=True)
class PeerEntry:
    """One static peer: ``address`` is ``host:port``; ``name`` is learned if empty."""

    address: str
    name: str = ""


@dataclass(frozen=True)
class PeersConfig:
    """Membership: static peers and/or a DNS name, and the heartbeat policy."""

    static: tuple[PeerEntry, ...] = ()
    dns_name: str | None = None
    dns_port: int = DEFAULT_PEER_PORT
    dns_refresh_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 1.0
    heartbeat_retries: int = 2
    lost_after_s: float = 5.0


@dataclass(frozen=True)
class TlsConfig:
    """mTLS between daemons: our certificate and key, and the CA that signs every peer."""

    cert_file: str
    key_file: str
    ca_file: str
    server_name: str | None = None


@dataclass(frozen=True)
class DaemonConfig:
    """The validated daemon configuration (see the module docstring for the schema)."""

    node_name: str
    socket_path: str = DEFAULT_SOCKET_PATH
    socket_group: int | None = None  # gid (resolved from a name at load)
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PEER_PORT
    data_port: int = DEFAULT_DATA_PORT
    health_port: int | None = None
    peers: PeersConfig = field(default_factory=PeersConfig)
    erasure_n: int = 4
    erasure_m: int = 1
    shm_dir: str = "/dev/shm/ckptd"
    memory_budget_bytes: int = 8 << 30
    persistence_root: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    rate_limit_bytes_per_s: int | None = None
    rate_limit_share: float | None = None
    keep_last: int = 3
    keep_every: int | None = None
    token: Secret | None = None
    token_file: str | None = None
    allow_unauthenticated: bool = False
    tls: TlsConfig | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = DEFAULT_METRICS_PORT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_level: str = "info"

    def to_yaml(self) -> str:
        """The effective configuration in the file schema. The token is never written
        (only ``auth.token_file``); storage options that look secret are masked."""
        doc: dict[str, Any] = {}
        for name, path in _FILE_KEYS.items():
            section, _, key = path.rpartition(".")
            (doc.setdefault(section, {}) if section else doc)[key] = getattr(self, name)
        doc["peers"] = {**asdict(self.peers), "static": [
            f"{p.name}={p.address}" if p.name else p.address for p in self.peers.static]}
        doc["persistence"]["storage_options"] = _masked(self.storage_options)
        doc["persistence"]["rate_limit"] = (
            f"{self.rate_limit_share * 100:g}%" if self.rate_limit_share is not None
            else self.rate_limit_bytes_per_s)
        doc["tls"] = None if self.tls is None else asdict(self.tls)
        return yaml.safe_dump(doc, sort_keys=False)


_FILE_KEYS = {  # DaemonConfig field -> key in the file (peers, tls, rate limit: to_yaml)
    "node_name": "node_name", "socket_path": "socket_path", "socket_group": "socket_group",
    "listen_host": "listen.host",
    "listen_port": "listen.port", "data_port": "data.port", "health_port": "health_port",
    "erasure_n": "erasure.n", "erasure_m": "erasure.m", "shm_dir": "memory.shm_dir",
    "memory_budget_bytes": "memory.budget_bytes", "persistence_root": "persistence.root_url",
    "keep_last": "retention.keep_last", "keep_every": "retention.keep_every",
    "token_file": "auth.token_file", "allow_unauthenticated": "auth.allow_unauthenticated",
    "metrics_host": "metrics.host", "metrics_port": "metrics.port",
    "max_message_bytes": "max_message_bytes", "log_level": "log_level",
}


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
                ) -> DaemonConfig:
    """Read ``path`` (YAML; ``None`` = defaults only), apply ``CKPTD_*`` overrides from
    ``env`` (default ``os.environ``), validate, and return the config.

    Raises :class:`ConfigError` listing every problem found.
    """
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError([f"config file {path}: {exc.strerror or exc}"]) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file {path}: not valid YAML: {exc}"]) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"config file {path}: must be a mapping, got "
                               f"{type(loaded).__name__}"])
        raw = loaded or {}
    problems: list[str] = []
    _apply_env(raw, env, problems)
    reader = _Reader(raw, problems)
    cfg = _build(reader, env)
    reader.check_unknown()
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def parse_size(value: int | str) -> int:
    """``8GiB``/``512Mi`` (binary), ``1G``/``100KB`` (decimal) or an int -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"expected a size like 8GiB, 512MiB or 1000000, got {value!r}")
    number, prefix, binary = match.groups()
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    return int(float(number) * ((1024 if binary else 1000) ** power))


def parse_peer(value: Any) -> PeerEntry:
    """``"name=host:port"``, ``"host:port"`` or ``{name: ..., address: ...}``."""
    if isinstance(value, dict):
        name, address = str(value.get("name") or ""), value.get("address")
        if set(value) - {"name", "address"}:
            raise ValueError(f"unknown keys {sorted(set(value) - {'name', 'address'})}")
    elif isinstance(value, str):
        name, _, address = value.rpartition("=")
    else:
        raise ValueError(f"expected 'name=host:port' or a mapping, got {value!r}")
    if not isinstance(address, str):
        raise ValueError(f"missing address in {value!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port with a port in 1..65535, got {address!r}")
    if name and not _NAME_RE.match(name):
        raise ValueError(f"invalid node name {name!r}")
    return PeerEntry(address=address, name=name)


# ----------------------------------------------------------------------------- internals


def _masked(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: "***" if any(h in k.lower() for h in _SECRET_HINTS) else v
            for k, v in options.items()}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in (ENV_TOKEN, ENV_CONFIG):
            continue
        keys = ENV_ALIASES.get(var) or tuple(
            part.lower() for part in var[len(ENV_PREFIX):].split("__"))
        if len(keys) > 2 or not all(keys):
            problems.append(f"{var}: not a ckptd setting (use CKPTD_KEY or CKPTD_SECTION__KEY)")
            continue
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                problems.append(f"{var}: {key} is not a section")
                break
            node = child
        else:
            node[keys[-1]] = EnvValue(env[var], var)


class _Reader:
    """Typed access to the raw mapping; records problems as ``field: message``."""

    def __init__(self, raw: dict[str, Any], problems: list[str]) -> None:
        self.raw, self.problems = raw, problems
        self.seen: set[str] = set()

    def section(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name)
        if not isinstance(value, dict | None) and name not in self.seen:
            self.problems.append(f"{name}: must be a mapping, got {type(value).__name__}")
        self.seen.add(name)
        return value if isinstance(value, dict) else {}

    def get(self, path: str, kind: str, default: Any, check: Callable[[Any], str | None]
            | None = None) -> Any:
        """Value at ``path`` (``a`` or ``a.b``) converted to ``kind``, or ``default``."""
        section, _, key = path.rpartition(".")
        node = self.section(section) if section else self.raw
        self.seen.add(path)
        value = node.get(key)
        if value is None:
            return default
        label = _label(path, value)
        try:
            result = _convert(value, kind)
        except ValueError as exc:
            self.problems.append(f"{label}: {exc}")
            return default
        message = check(result) if check else None
        if message:
            self.problems.append(f"{label}: {message} (got {value!r})")
            return default
        return result

    def check_unknown(self) -> None:
        for key, value in self.raw.items():
            if isinstance(value, dict) and key in self.seen:
                self.problems.extend(f"{_label(f'{key}.{sub}', v)}: unknown setting"
                                     for sub, v in value.items() if f"{key}.{sub}" not in self.seen)
            elif key not in self.seen:
                self.problems.append(f"{_label(key, value)}: unknown setting")


def _label(path: str, value: Any) -> str:
    return f"{path} (from {value.source})" if isinstance(value, EnvValue) else path


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "size": ((int,), "a size"), "port": ((int,), "an integer port"),
    "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
    "list": ((list,), "a list"), "map": ((dict,), "a mapping"), "str": ((str,), "a string")}


def _convert(value: Any, kind: str) -> Any:
    if isinstance(value, EnvValue):
        text = str(value)
        if kind == "list":
            return [item.strip() for item in text.split(",") if item.strip()]
        value = text if kind in ("str", "any", "size") else yaml.safe_load(text)  # "1" -> 1
    if kind == "any":
        return value
    if kind == "size" and isinstance(value, str | int) and not isinstance(value, bool):
        return parse_size(value)
    types, noun = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
        raise ValueError(f"must be {noun}, got {type(value).__name__} {value!r}")
    result: Any = value
    return float(result) if kind == "float" else result


def _port(allow_zero: bool = True) -> Callable[[int], str | None]:
    def check(port: int) -> str | None:
        if not (0 if allow_zero else 1) <= port <= 65535:
            return "must be a port number in 0..65535"
        if port in RESERVED_PORTS:
            return f"port {port} belongs to {RESERVED_PORTS[port]}; choose another"
        return None
    return check


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _absolute(value: str) -> str | None:
    return None if os.path.isabs(value) else "must be an absolute path"


def _build(r: _Reader, env: Mapping[str, str]) -> DaemonConfig | None:
    problems = r.problems
    node_name = r.get("node_name", "str", socket.gethostname(),
                      lambda v: None if _NAME_RE.match(v) else "must match [A-Za-z0-9._-]+")
    socket_path = r.get("socket_path", "str", DEFAULT_SOCKET_PATH, lambda v: _absolute(v) or (
        None if len(os.fsencode(v)) <= _UNIX_PATH_MAX
        else f"is longer than the {_UNIX_PATH_MAX}-byte unix socket limit"))
    socket_group = _read_group(r)
    listen_port = r.get("listen.port", "port", DEFAULT_PEER_PORT, _port())
    peers_raw = r.get("peers.static", "list", [])
    static: list[PeerEntry] = []
    for i, item in enumerate(peers_raw):
        try:
            static.append(parse_peer(item))
        except ValueError as exc:
            problems.append(f"peers.static[{i}]: {exc}")
    names = [p.name for p in static if p.name]
    if len(set(names)) != len(names):
        problems.append(f"peers.static: duplicate node names {sorted(names)}")
    interval = r.get("peers.heartbeat_interval_s", "float", 1.0, _positive)
    lost_after = r.get("peers.lost_after_s", "float", 5.0, _positive)
    if lost_after <= interval:
        problems.append(f"peers.lost_after_s: must be > peers.heartbeat_interval_s "
                        f"({lost_after} <= {interval})")
    peers = PeersConfig(
        static=tuple(static),
        dns_name=r.get("peers.dns_name", "str", None) or None,
        dns_port=r.get("peers.dns_port", "port", listen_port, _port(allow_zero=False)),
        dns_refresh_s=r.get("peers.dns_refresh_s", "float", 30.0, _positive),
        heartbeat_interval_s=interval,
        heartbeat_timeout_s=r.get("peers.heartbeat_timeout_s", "float", 1.0, _positive),
        heartbeat_retries=r.get("peers.heartbeat_retries", "int", 2,
                                lambda v: None if 0 <= v <= 10 else "must be in 0..10"),
        lost_after_s=lost_after,
    )
    n = r.get("erasure.n", "int", 4, lambda v: None if v >= 1 else "must be >= 1")
    m = r.get("erasure.m", "int", 1, _non_negative)
    if m >= n:
        problems.append(f"erasure.m: must be < erasure.n (got m={m}, n={n}): a group of n "
                        "daemons holds n - m data shards, so at least one")
    rate = r.get("persistence.rate_limit", "any", None)
    rate_bytes, rate_share = _parse_rate(rate, problems)
    token, token_file = _read_token(r, env)
    allow_unauth = r.get("auth.allow_unauthenticated", "bool", False)
    if token is None and not allow_unauth:
        problems.append(f"auth.token_file: a job token is required (auth.token_file or "
                        f"{ENV_TOKEN}); set auth.allow_unauthenticated: true only for tests")
    metrics_port = r.get("metrics.port", "port", DEFAULT_METRICS_PORT, _port())
    health_port = r.get("health_port", "port", None, _port())
    data_port = r.get("data.port", "port", DEFAULT_DATA_PORT, _port())
    used = [p for p in (listen_port, data_port, metrics_port, health_port) if p]
    if len(set(used)) != len(used):
        problems.append(
            f"listen.port/data.port/metrics.port/health_port: must differ (got {used})")
    keep_every = r.get("retention.keep_every", "int", None,
                       lambda v: None if v >= 1 else "must be >= 1 or null")
    cfg = DaemonConfig(
        node_name=node_name, socket_path=socket_path, socket_group=socket_group,
        listen_host=r.get("listen.host", "str", "0.0.0.0"), listen_port=listen_port,
        data_port=data_port, health_port=health_port, peers=peers, erasure_n=n, erasure_m=m,
        shm_dir=r.get("memory.shm_dir", "str", "/dev/shm/ckptd", _absolute),
        memory_budget_bytes=r.get("memory.budget_bytes", "size", 8 << 30, _positive),
        persistence_root=r.get("persistence.root_url", "str", None) or None,
        storage_options=r.get("persistence.storage_options", "map", {}),
        rate_limit_bytes_per_s=rate_bytes, rate_limit_share=rate_share,
        keep_last=r.get("retention.keep_last", "int", 3, _non_negative),
        keep_every=keep_every, token=token, token_file=token_file,
        allow_unauthenticated=allow_unauth, tls=_read_tls(r),
        metrics_host=r.get("metrics.host", "str", "0.0.0.0"), metrics_port=metrics_port,
        max_message_bytes=r.get("max_message_bytes", "size", DEFAULT_MAX_MESSAGE_BYTES,
                                lambda v: None if 4096 <= v < 2**31 else
                                "must be between 4KiB and 2GiB"),
        log_level=r.get("log_level", "str", "info", lambda v: None if v.lower() in
                        ("debug", "info", "warning", "error") else
                        "must be debug, info, warning or error").lower(),
    )
    return None if problems else cfg


def _read_group(r: _Reader) -> int | None:
    """``socket_group``: a gid (int, or digits from the env) or a group name -> gid."""
    value = r.get("socket_group", "any", None)
    label = _label("socket_group", r.raw.get("socket_group"))
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < 2**32 - 1:
            return value
        r.problems.append(f"{label}: a gid must be in 0..4294967294 (got {value})")
        return None
    if not isinstance(value, str):
        r.problems.append(f"{label}: must be a group name or a gid, got "
                          f"{type(value).__name__} {value!r}")
        return None
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        r.problems.append(f"{label}: no group named {value!r} on this host (give the "
                          "numeric gid instead)")
        return None


def _parse_rate(rate: Any, problems: list[str]) -> tuple[int | None, float | None]:
    if rate is None:
        return None, None
    text = str(rate).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError("a share must be in (0%, 100%]")
            return None, share
        value = parse_size(rate if isinstance(rate, int) else text.removesuffix("/s"))
        if value <= 0:
            raise ValueError("must be > 0")
        return value, None
    except ValueError as exc:
        problems.append(f"persistence.rate_limit: {exc} (bytes/s like 200MiB/s, or 50%)")
        return None, None


def _read_token(r: _Reader, env: Mapping[str, str]) -> tuple[Secret | None, str | None]:
    if r.section("auth").get("token") is not None:
        r.seen.add("auth.token")
        r.problems.append(f"auth.token: never put the token in the config file; use "
                          f"auth.token_file or {ENV_TOKEN}")
    token_file = r.get("auth.token_file", "str", None, _absolute)
    value: str | None = env.get(ENV_TOKEN) or None
    source = ENV_TOKEN
    if value is None and token_file is not None:
        source = f"auth.token_file ({token_file})"
        try:
            value = Path(token_file).read_text().strip()
        except OSError as exc:
            r.problems.append(f"auth.token_file: cannot read {token_file}: "
                              f"{exc.strerror or exc}")
            return None, token_file
    if value is None:
        return None, token_file
    value = value.strip()
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value):
        r.problems.append(f"{source}: the job token must be at least {MIN_TOKEN_CHARS} "
                          f"characters without whitespace (got {len(value)} characters)")
        return None, token_file
    return Secret(value), token_file


def _read_tls(r: _Reader) -> TlsConfig | None:
    if not r.section("tls"):
        return None
    files = {}
    for key in ("cert_file", "key_file", "ca_file"):
        files[key] = r.get(f"tls.{key}", "str", "", lambda v: None if os.path.isfile(v)
                           else "file not found")
        if not files[key] and f"tls.{key}" not in " ".join(r.problems):
            r.problems.append(f"tls.{key}: required when tls is set")
    return TlsConfig(server_name=r.get("tls.server_name", "str", None), **files)
