"""Structured JSON logs on stderr for the daemon process.

One JSON object per line with at least ``timestamp``, ``level``, ``event``, ``logger``,
``node``, ``step`` and ``rank`` (``null`` when an event concerns no step or rank). Library
code keeps using stdlib ``logging``; :func:`configure_logging` routes those records through
the same JSON renderer. Secrets are redacted twice: keys that name a secret are masked, and
the job token's value is scrubbed from every string, so a careless ``log.info(...)`` cannot
leak it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from ckptd.daemon.auth import Secret

_SECRET_KEYS = frozenset({"token", "authorization", "password", "secret", "job_token"})
_REDACTED = "***"

EventDict = MutableMapping[str, Any]


def configure_logging(node: str, level: str = "info", token: Secret | None = None,
                      stream: TextIO | None = None) -> structlog.stdlib.BoundLogger:
    """Configure process-wide JSON logging and return the daemon's logger.

    Called once by ``ckptd`` at start (logging configuration is per process by nature).
    ``node`` is added to every line; ``token`` is scrubbed from every line.
    """
    secret = token.reveal() if token is not None else None

    def add_fields(_logger: Any, _name: str, event: EventDict) -> EventDict:
        event.setdefault("node", node)
        event.setdefault("step", None)
        event.setdefault("rank", None)
        return event

    def redact(_logger: Any, _name: str, event: EventDict) -> EventDict:
        for key in list(event):
            if key.lower() in _SECRET_KEYS:
                event[key] = _REDACTED
            elif secret and isinstance(event[key], str) and secret in event[key]:
                event[key] = event[key].replace(secret, _REDACTED)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_fields,
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return get_logger("ckptd.daemon")


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A structured logger named ``name`` with ``context`` bound to every event
    (e.g. ``step=12, rank=3`` for the data path)."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger.bind(**context) if context else logger
