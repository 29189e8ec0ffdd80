"""Per-job token authentication for every daemon call except health checks.

Clients send gRPC metadata ``authorization: Bearer <token>``; :class:`TokenAuthInterceptor`
compares it in constant time (``hmac.compare_digest``) with the job token and answers
``UNAUTHENTICATED`` otherwise. Health checks (``/grpc.health.v1.Health/*``) are exempt so
that Kubernetes' native gRPC probes, which cannot send metadata, work. The token lives in a
:class:`Secret`, which never prints itself; neither the token nor the received header is
ever logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

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
