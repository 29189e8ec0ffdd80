"""The ``ckptd`` command.

    ckptd [--config FILE]                    run the daemon until SIGTERM/SIGINT
    ckptd status [--config FILE | --socket PATH] [--job JOB] [--json] [--timeout S]
    ckptd check-config [--config FILE]       validate and print the effective config

``--config`` defaults to ``$CKPTD_CONFIG``; ``CKPTD_*`` variables override the file (see
:mod:`ckptd.daemon.config`). ``status`` calls ``Control.Status`` over the unix socket with
the job token from the config (``auth.token_file``) or ``$CKPTD_JOB_TOKEN``; ``--json``
prints one JSON object with an ``ok`` field (and ``error`` on failure).

Exit codes: 0 success (the daemon stopped cleanly after SIGTERM); 1 failure (invalid
configuration, unsafe socket path, port in use, daemon unreachable); 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ckptd.daemon.config import (
    DEFAULT_SOCKET_PATH,
    ENV_CONFIG,
    ENV_TOKEN,
    ConfigError,
    DaemonConfig,
    load_config,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptd`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    config_path = args.config or os.environ.get(ENV_CONFIG)
    if args.command == "status":
        return _status(args, config_path)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(config.to_yaml(), end="")
        return 0
    return _run(config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd", description="Per-node checkpoint daemon (see `ckptd status`).")
    parser.add_argument("--config", help=f"YAML config file (default ${ENV_CONFIG})")
    sub = parser.add_subparsers(dest="command")
    status = sub.add_parser("status", help="show a running daemon's status")
    status.add_argument("--config", default=argparse.SUPPRESS, help="the daemon's config")
    status.add_argument("--socket", help="unix socket (default: from the config, "
                        f"$CKPTD_SOCKET or {DEFAULT_SOCKET_PATH})")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.add_argument("--job", help="also show this job's steps on every reachable daemon")
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file")
    return parser


def _run(config: DaemonConfig) -> int:
    from ckptd.daemon.logs import configure_logging
    from ckptd.daemon.server import serve

    configure_logging(config.node_name, config.log_level, config.token)
    return asyncio.run(serve(config))


def _status(args: argparse.Namespace, config_path: str | None) -> int:
    import grpc

    from ckptd.daemon.auth import Secret, bearer_metadata
    from ckptd.rpc.v1 import daemon_pb2, daemon_pb2_grpc

    token: Secret | None = None
    socket_path = args.socket
    try:
        if config_path is not None:
            config = load_config(config_path)
            socket_path = socket_path or config.socket_path
            token = config.token
        elif os.environ.get(ENV_TOKEN):
            token = Secret(os.environ[ENV_TOKEN].strip())
    except ConfigError as exc:
        return _fail(args.json, str(exc))
    socket_path = socket_path or os.environ.get("CKPTD_SOCKET") or DEFAULT_SOCKET_PATH
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            reply = daemon_pb2_grpc.ControlStub(channel).Status(
                daemon_pb2.StatusRequest(), timeout=args.timeout,
                metadata=bearer_metadata(token))
        job = None
        if args.job:
            from ckptd.daemon.jobview import format_job, job_rows

            with grpc.insecure_channel(f"unix:{socket_path}") as channel:
                job = job_rows(daemon_pb2_grpc.ControlStub(channel).JobStatus(
                    daemon_pb2.JobStatusRequest(job=args.job), timeout=args.timeout + 5,
                    metadata=bearer_metadata(token)))
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return _fail(args.json, f"cannot reach ckptd at {socket_path}: "
                                f"{code.name if code else 'error'}: {detail}")
    doc = _status_dict(reply)
    if args.json:
        print(json.dumps({"ok": True, **doc, **({"job": job} if job else {})}, indent=2))
    else:
        print(_format_status(doc))
        if job is not None:
            print(format_job(job))
    return 0


def _status_dict(reply: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(reply, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def _format_status(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        f"node {doc['node']}  {doc['serving']}  generation {doc['generation']}  "
        f"pid {doc['pid']}  up {doc['uptime_seconds']:.1f} s  version {doc['version']}",
        f"memory {_size(int(doc['memory_used_bytes']))} used of "
        f"{_size(int(doc['memory_budget_bytes']))}",
        f"erasure n={cfg['erasure_n']} m={cfg['erasure_m']}; my group "
        f"{doc['my_group']}: {', '.join(doc['groups'][doc['my_group']]['members'])}"
        if doc["groups"] else "erasure: no groups",
        f"persistence {cfg['persistence_root'] or 'disabled'}",
        f"peers ({len(doc['peers'])}):",
    ]
    for p in doc["peers"]:
        age = p["last_seen_age_seconds"]
        seen = f"seen {age:.1f} s ago" if age >= 0 else "never answered"
        lines.append(f"  {p['name'] or '?':<20} {p['address']:<24} "
                     f"{p['state'].removeprefix('PEER_STATE_'):<8} "
                     f"rtt {p['rtt_seconds'] * 1000:.1f} ms  {seen}")
    return "\n".join(lines)


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _fail(as_json: bool, message: str) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"ckptd status: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
