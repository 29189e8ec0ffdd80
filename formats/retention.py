"""Retention: which committed steps to keep, and garbage collection off the save path.

Runs after :func:`ckptd.formats.commit.commit` (the last stage of a save). Committed
steps are deleted with :func:`~ckptd.formats.commit.uncommit` (marker first, so a
step disappears atomically for readers). Uncommitted leftovers of interrupted saves
are collected only when they are older than the newest committed step and not in
flight: a caller registers a step as in progress before its first byte is written.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckptd.formats.commit import committed_steps, step_dir, uncommit, uncommitted_steps
from ckptd.formats.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the last ``keep_last`` committed steps plus every step divisible by
    ``keep_every``; the newest committed step is always kept. ``gc_uncommitted``
    collects leftovers of interrupted saves."""

    keep_last: int = 3
    keep_every: int | None = None
    gc_uncommitted: bool = True

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {self.keep_every}")

    def select(self, committed: Iterable[int]) -> tuple[list[int], list[int]]:
        """Split committed steps into ``(keep, delete)``, both ascending, no I/O."""
        steps = sorted(set(committed))
        if not steps:
            return [], []
        keep = set(steps[-self.keep_last :] if self.keep_last else [])
        keep.add(steps[-1])  # never delete the checkpoint a restart would load
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        return sorted(keep), [s for s in steps if s not in keep]


def apply_retention(
    storage: Storage, policy: RetentionPolicy, in_progress: Iterable[int] = frozenset()
) -> list[int]:
    """Delete what ``policy`` does not keep; return the deleted steps, ascending.

    Steps in ``in_progress`` are never touched. Uncommitted leftovers are deleted only
    if ``policy.gc_uncommitted`` and they are older than the newest committed step
    (a newer one may be a save that has not registered yet).
    """
    busy = set(in_progress)
    committed = committed_steps(storage)
    _, drop = policy.select(committed)
    deleted = []
    for step in drop:
        if step not in busy:
            uncommit(storage, step)
            deleted.append(step)
    if policy.gc_uncommitted and committed:
        for step in uncommitted_steps(storage):
            if step < committed[-1] and step not in busy:
                storage.delete_prefix(step_dir(step))
                deleted.append(step)
    if deleted:
        logger.info("retention deleted steps %s from %s", sorted(deleted), storage.url)
    return sorted(deleted)


class BackgroundGC:
    """A single daemon thread that runs :func:`apply_retention` off the save path.

    ``submit`` only enqueues (requests that pile up while one is queued are coalesced),
    so a save never waits for deletions. Errors are logged, never raised into the
    caller. ``in_progress`` is a callable evaluated when a run starts, so steps that
    began saving after ``submit`` are protected too.
    """

    def __init__(
        self,
        storage: Storage,
        policy: RetentionPolicy,
        in_progress: Callable[[], Iterable[int]] = frozenset,
    ) -> None:
        """Start the worker thread for ``storage`` and ``policy``."""
        self.storage = storage
        self.policy = policy
        self.runs = 0
        self.errors = 0
        self._in_progress = in_progress
        # Items: ("run", extra in-progress steps) or ("flush", event), None stops.
        self._queue: queue.SimpleQueue[tuple[str, object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_plain_run = False
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="ckptd-gc", daemon=True)
        self._thread.start()

    def submit(self, in_progress: Iterable[int] = ()) -> None:
        """Request a retention run; ``in_progress`` adds steps to protect. Never blocks."""
        extra = frozenset(in_progress)
        with self._lock:
            if self._closed:
                raise RuntimeError("BackgroundGC is closed")
            if not extra:
                if self._queued_plain_run:
                    return  # an equivalent run is already waiting
                self._queued_plain_run = True
            self._queue.put(("run", extra))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every run submitted so far finished; return False on timeout."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish submitted runs and stop the thread (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundGC:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, arg = item
            if kind == "flush":
                assert isinstance(arg, threading.Event)
                arg.set()
                continue
            assert isinstance(arg, frozenset)
            if not arg:
                with self._lock:
                    self._queued_plain_run = False
            try:
                busy = set(arg) | set(self._in_progress())
                apply_retention(self.storage, self.policy, busy)
                self.runs += 1
            except Exception:
                self.errors += 1
                logger.exception("retention run on %s failed", self.storage.url)
