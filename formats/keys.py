"""Storage keys: relative POSIX-style paths, validated before any backend sees them.

Every :class:`~ckptd.formats.storage.Storage` method validates its key with
:func:`validate_key`, so a hostile tensor name or checkpoint id can never escape the
storage root (``..``), address an absolute path, or smuggle a NUL byte into a syscall.
"""

from __future__ import annotations

import re

from ckptd.errors import InvalidKeyError

MAX_SEGMENT_BYTES = 255  # NAME_MAX on every POSIX filesystem we target
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative storage key, else raise.

    A key is a ``/``-separated relative path. Rejected (with :class:`InvalidKeyError`
    naming the key): non-strings, the empty key, absolute paths, ``.`` or ``..``
    segments, empty segments (``a//b``, a trailing ``/``), backslashes, NUL and other
    control characters, and segments longer than 255 UTF-8 bytes.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"storage key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        raise InvalidKeyError("storage key must not be empty")
    if key.startswith("/"):
        raise InvalidKeyError(f"storage key {key!r} is absolute; keys are relative to the root")
    if "\\" in key:
        raise InvalidKeyError(f"storage key {key!r} contains a backslash; use '/' separators")
    if _CONTROL_CHARS.search(key):
        raise InvalidKeyError(f"storage key {key!r} contains a NUL or control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(
                f"storage key {key!r} has an empty, '.' or '..' segment; "
                "keys must be normalized relative paths"
            )
        try:
            encoded = segment.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates cannot name a file or object
            raise InvalidKeyError(f"storage key {key!r} is not valid UTF-8") from exc
        if len(encoded) > MAX_SEGMENT_BYTES:
            raise InvalidKeyError(
                f"storage key {key!r} has a segment of {len(encoded)} bytes "
                f"(limit {MAX_SEGMENT_BYTES})"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: ``""`` (the root) or a key; one trailing ``/`` is allowed.

    Returns the prefix without its trailing ``/``.
    """
    if prefix == "":
        return ""
    if isinstance(prefix, str) and prefix.endswith("/") and len(prefix) > 1:
        prefix = prefix[:-1]
    return validate_key(prefix)


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` and validate the result.

    Empty parts are skipped, so ``join_key(prefix, name)`` works with ``prefix == ""``.
    Each part may itself contain ``/``; the joined key must pass :func:`validate_key`.
    """
    return validate_key("/".join(p for p in parts if p))


def validate_name(name: str, what: str = "name") -> str:
    """Validate a single path segment used as an identifier (checkpoint id, tag).

    Stricter than a key segment: 1-128 characters from ``[A-Za-z0-9._-]``, starting
    with a letter or digit, so it is safe in URLs, shell commands and every filesystem.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidKeyError(
            f"{what} {name!r} is invalid: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name
