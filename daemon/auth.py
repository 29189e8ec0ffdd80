"""Per-job token authentication for every daemon call except health checks.

Clients send gRPC metadata ``authorization: Bearer <token>``; :class:`TokenAuthInterceptor`
compares it in constant time (``hmac.compare_digest``) with the job token and answers
``UNAUTHENTICATED`` otherwise. Health checks (``/grpc.health.v1.Health/*``) are exempt so
that Kubernetes' native gRPC probes, which cannot send metadata, work. The token lives in a
:class:`Secret`, which never prints itself; neither the token nor the received header is
ever logged.

:func:`prepare_socket_path` guards the other door, the unix socket: its directory must be
ours and private (0700), the socket 0600 (:func:`secure_socket`). With a ``socket_group``
(training pods that run as another uid), the directory is 0750 and the sockets 0660, both
of that group: its members may connect, nobody else may enter; nobody but the daemon's
user may ever write the directory.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from ckptd.errors import CkptError

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "
EXEMPT_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)


class Secret:
    """A string that never shows itself in ``repr``/``str``; :meth:`reveal` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value (for outgoing metadata and log redaction only)."""
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison with ``candidate``."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(Secret)


def bearer_metadata(token: Secret | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when auth is disabled)."""
    if token is None:
        return ()
    return ((AUTH_METADATA_KEY, BEARER_PREFIX + token.reveal()),)


def check_metadata(token: Secret, metadata: Any) -> str | None:
    """``None`` if ``metadata`` carries ``token``, else the reason: missing, malformed or
    invalid. Never returns or logs the received value."""
    header = None
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            header = value if isinstance(value, str) else None
            break
    if header is None:
        return "missing"
    if not header.startswith(BEARER_PREFIX):
        return "malformed"
    return None if token.matches(header[len(BEARER_PREFIX):]) else "invalid"


RejectHook = Callable[[str, str, str], None]
"""``(transport, reason, method)``: called once per rejected call (metrics, logs)."""


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the job token with ``UNAUTHENTICATED``.

    ``token=None`` disables the check (``auth.allow_unauthenticated``). ``transport``
    (``unix``/``tcp``) only labels rejections passed to ``on_reject``.
    """

    def __init__(self, token: Secret | None, transport: str,
                 on_reject: RejectHook | None = None) -> None:
        self._token = token
        self._transport = transport
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        if self._token is None or method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        reason = check_metadata(self._token, handler_call_details.invocation_metadata)
        if reason is None:
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(self._transport, reason, method)
        handler = await continuation(handler_call_details)
        return _rejecting(handler, f"{reason} job token: send metadata "
                                   f"'{AUTH_METADATA_KEY}: Bearer <token>'")


def _rejecting(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts without reading
    the request (no deserializer: untrusted bytes are never parsed)."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class UnsafePathError(CkptError, PermissionError):
    """The unix socket path is unsafe (symlink, wrong owner, group/world access)."""


def socket_modes(group: int | None) -> tuple[int, int]:
    """(directory mode, socket mode): 0750/0660 with a socket group, else 0700/0600."""
    return (0o700, 0o600) if group is None else (0o750, 0o660)


def secure_socket(path: str, group: int | None = None) -> None:
    """Give the socket just bound at ``path`` its mode (0600, or 0660 of ``group``)."""
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, socket_modes(group)[1])


def prepare_socket_path(path: str, group: int | None = None) -> None:
    """Make ``path``'s directory safe for the socket, or raise :class:`UnsafePathError`.

    Without ``group``: the directory is created with mode 0700 if missing (its parent must
    exist); an existing one must be a real directory (not a symlink) owned by our effective
    uid with no group or world permissions. With ``group`` (a gid): the same, but mode 0750
    and group ``group`` (we create it so; an existing one must be exactly that: no group
    write, nothing for others, and the group must be able to enter). A leftover socket that
    nobody answers on is removed; anything else at ``path`` (a live daemon, a file, a
    symlink) is refused.
    """
    sock, directory = Path(path), Path(path).parent
    want = socket_modes(group)[0]
    if group is None:
        hint = ("point socket_path into a directory that only the ckptd user can access "
                "(ckptd creates it with mode 0700 when it does not exist)")
    else:
        hint = (f"point socket_path into a directory owned by the ckptd user, group {group}, "
                f"mode 0750 (ckptd creates it so when it does not exist)")
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        try:
            os.mkdir(directory, 0o700)
            if group is not None:
                os.chown(directory, -1, group)
            os.chmod(directory, want)  # mkdir's mode is subject to the umask
        except OSError as exc:
            extra = ("" if group is None or exc.errno != errno.EPERM else
                     f"; the daemon's user must be a member of group {group} "
                     "(runAsGroup or supplementalGroups)")
            raise UnsafePathError(f"cannot create socket directory {directory}: "
                                  f"{exc.strerror}{extra}") from exc
        st = os.lstat(directory)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"socket directory {directory} is a symlink; {hint}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"socket directory {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"socket directory {directory} is owned by uid {st.st_uid}, "
                              f"not by this process (uid {os.geteuid()}); {hint}")
    if mode & 0o002:
        raise UnsafePathError(f"socket directory {directory} is world-writable "
                              f"(mode {mode:04o}); {hint}")
    if group is None and mode & 0o077:
        raise UnsafePathError(f"socket directory {directory} has mode {mode:04o}, it must "
                              f"be 0700 (chmod 0700 {directory}); {hint}")
    if group is not None and (mode != want or st.st_gid != group):
        raise UnsafePathError(
            f"socket directory {directory} has mode {mode:04o} and group {st.st_gid}, it "
            f"must be 0750 and group {group} (chgrp {group} {directory}; chmod 0750 "
            f"{directory}); {hint}")
    if not os.path.lexists(sock):
        return
    if not stat.S_ISSOCK(os.lstat(sock).st_mode):
        raise UnsafePathError(f"{sock} exists and is not a socket; remove it or choose "
                              "another socket_path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(sock))
    except ConnectionRefusedError:
        os.unlink(sock)  # stale socket from a daemon that died
        logging.getLogger(__name__).info("removed stale socket %s", sock)
        return
    except OSError as exc:  # e.g. a live but hung daemon: never remove its socket
        raise UnsafePathError(f"cannot tell whether {sock} is in use ({exc}); is a ckptd "
                              "already running on this node?") from exc
    finally:
        probe.close()
    raise UnsafePathError(f"another process is listening on {sock}; is a ckptd already "
                          "running on this node?")
