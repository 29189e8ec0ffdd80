"""Typed errors: one base class, subclasses that also subclass the matching builtin.

Every message says what went wrong, names the tensor/file/key involved, and where
possible what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping


class CkptError(Exception):
    """Base class of every error raised by ckpt / ckptd."""


class NotCommittedError(CkptError, FileNotFoundError):
    """The requested checkpoint does not exist or was never committed."""


class IntegrityError(CkptError, ValueError):
    """Stored bytes do not match their checksum, or metadata is malformed/truncated."""


class ReshardError(CkptError, ValueError):
    """A layout or plan is inconsistent (bounds, overlaps, coverage, shape or dtype mismatch)."""


class LayoutError(ReshardError):
    """A declared layout is invalid (a piece out of bounds, wrong element count, ...)."""


class MissingKeysError(ReshardError, KeyError):
    """``load(strict=True)`` found keys missing from the checkpoint or unexpected in it."""

    def __init__(self, missing: list[str], unexpected: list[str]) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {_preview(self.missing)}")
        if unexpected:
            parts.append(f"in checkpoint but not in the state: {_preview(self.unexpected)}")
        super().__init__("; ".join(parts) + " (pass strict=False to ignore)")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class FormatVersionError(CkptError, ValueError):
    """The checkpoint was written by an incompatible (newer major) format version."""


class InvalidKeyError(CkptError, ValueError):
    """A checkpoint id, tensor name or storage key is unsafe (``..``, absolute, NUL, ...)."""


class StorageError(CkptError, OSError):
    """The storage backend failed (I/O error, permission, unreachable endpoint)."""


class CommitConflictError(StorageError, FileExistsError):
    """A create-only object (commit marker) already exists."""


class StateMergeError(CkptError, ValueError):
    """Per-rank trainer state cannot be mapped to the new layout without a declared merge rule."""


class QuorumError(CkptError, RuntimeError):
    """Too few participants (ranks, erasure shards, peers) are available."""


class SaveInProgressError(CkptError, RuntimeError):
    """A save was requested while the configured number of saves is already in flight."""


class SaveFailedError(CkptError, RuntimeError):
    """A save handed to the daemon failed there (the message is the daemon's reason)."""


class StagingBudgetError(CkptError, MemoryError):
    """The host staging budget is smaller than what one snapshot of this rank needs."""


class DistributedError(CkptError, RuntimeError):
    """A collective operation failed on one or more ranks; ``failures`` maps rank -> message."""

    def __init__(self, what: str, failures: Mapping[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        lines = [f"{what} failed on {len(self.failures)} rank(s):"]
        lines += [f"  rank {r}: {msg}" for r, msg in self.failures.items()]
        super().__init__("\n".join(lines))


def _preview(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
