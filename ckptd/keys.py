"""Validation of state keys (the dotted names of flattened state entries).

Its own module, without torch: the converters' writers check names too, and a
DeepSpeed -> universal conversion runs without importing torch.
"""

from __future__ import annotations

import functools

from ckptd.errors import InvalidKeyError


@functools.lru_cache(maxsize=1 << 16)
def validate_state_key(key: str) -> str:
    """Reject keys that cannot name a tensor safely (empty parts, ``/``, NUL, ``..``).

    Cached: a trainer saves the same keys every time, and this runs in the stall.
    """
    if not key or any(c in key for c in ("/", "\\", "\x00")) or any(ord(c) < 32 for c in key):
        raise InvalidKeyError(f"state key {key!r} contains '/', '\\\\', NUL or a control char")
    if key.startswith(".") or key.endswith(".") or ".." in key or key.startswith("__"):
        raise InvalidKeyError(f"state key {key!r} has an empty part or starts with '__'")
    return key
