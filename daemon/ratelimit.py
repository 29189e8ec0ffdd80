"""Rate limiting of background persistence: a byte token bucket and a throttled storage.

The daemon persists snapshots while the trainers keep training on the same node, so it
must not take more than its share of the disk or network (design.md §5). Every object
that persistence writes (a chunk or a pack of small chunks) first takes its size in
tokens from one :class:`TokenBucket` per daemon; :class:`ThrottledStorage` does that for
every ``put`` of a wrapped storage, so the chunk writer needs no knowledge of it.

Configuration (``persistence.rate_limit`` in daemon/config.py):

* ``rate_limit_bytes_per_s``: an absolute limit in bytes/s;
* ``rate_limit_share`` (0 < s <= 1): a share of the **sustained write bandwidth of the
  persistence target as this daemon sees it** -- the local disk for ``file://`` roots,
  the network path plus object store for ``s3://``. The bandwidth is given explicitly
  (``bandwidth_bytes_per_s``) or measured once, when the daemon opens the root, by
  :func:`measure_write_bandwidth`: one probe object of incompressible bytes written
  through the same batched path as chunks (put, then flush = durable), timed and
  deleted. The share limits what persistence *offers* to the target; if the trainer
  itself uses the same disk, its writes come out of the remaining share.

Why our own bucket and not a library: ``pyrate-limiter``/``limits`` count requests per
window and refuse (or raise on) a single request larger than the window's capacity;
``token-bucket`` only answers yes/no. Persistence needs "admit this 64 MiB pack, then
hold back everybody until the rate is repaid", which a reservation (debt) bucket does in
twenty lines.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable

from ckptd.formats.storage import Buffer, Storage, WriteBatch, as_bytes_view

PROBE_PREFIX = ".ckptd-bandwidth-probe"
DEFAULT_PROBE_BYTES = 64 << 20
DEFAULT_BURST_S = 0.1


class TokenBucket:
    """A thread-safe token bucket in bytes/s with reservations.

    :meth:`acquire` takes ``n`` tokens at once, even more than the bucket holds: the
    balance goes negative and the caller sleeps until it is repaid at ``rate``. Later
    callers see the debt and wait behind it, so over any interval of length T the bytes
    admitted are at most ``burst + rate * T`` whatever the number of threads. ``burst``
    (default: ``rate`` x 0.1 s) is what may go at full speed after an idle period.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else self.rate * DEFAULT_BURST_S)
        if self.burst < 0:
            raise ValueError(f"burst must be >= 0 bytes, got {burst_bytes}")
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()
        self.bytes_admitted = 0  # totals, for metrics and tests
        self.seconds_waited = 0.0

    def acquire(self, nbytes: int) -> float:
        """Take ``nbytes`` tokens, sleeping as long as needed; return the seconds slept."""
        if nbytes <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes  # reserve now: later callers queue behind this debt
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.bytes_admitted += nbytes
            self.seconds_waited += wait
        if wait > 0:
            self._sleep(wait)  # outside the lock: other threads reserve meanwhile
        return wait


def limiter_from_config(
    bytes_per_s: int | None,
    share: float | None,
    *,
    bandwidth_bytes_per_s: float | None = None,
    storage: Storage | None = None,
    probe_bytes: int = DEFAULT_PROBE_BYTES,
) -> TokenBucket | None:
    """The persistence limiter of a daemon's config (None: unlimited).

    ``bytes_per_s`` wins if set. A ``share`` applies to ``bandwidth_bytes_per_s`` or,
    when that is None, to the bandwidth of ``storage`` measured by
    :func:`measure_write_bandwidth` (see the module docstring).
    """
    if bytes_per_s is not None:
        return TokenBucket(bytes_per_s)
    if share is None:
        return None
    if not 0 < share <= 1:
        raise ValueError(f"rate limit share must be in (0, 1], got {share}")
    bw = bandwidth_bytes_per_s
    if bw is None:
        if storage is None:
            raise ValueError("a rate limit share needs a bandwidth or a storage to measure")
        bw = measure_write_bandwidth(storage, probe_bytes)
    return TokenBucket(share * bw)


def measure_write_bandwidth(storage: Storage, nbytes: int = DEFAULT_PROBE_BYTES) -> float:
    """Bytes/s of one durable batched write of ``nbytes`` random bytes to ``storage``.

    Random bytes, because a compressing or deduplicating target would flatter zeros. The
    probe object lives under ``.ckptd-bandwidth-probe/`` (never a step directory, so no
    reader or retention run sees it) and is deleted afterwards, also on error.
    """
    data = os.urandom(max(1, nbytes))
    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    try:
        batch = storage.batch()
        batch.put(key, data)
        batch.flush()
        elapsed = time.perf_counter() - t0
    finally:
        # Only our own object: daemons of other nodes may probe the same root right now.
        storage.delete(key)
    return len(data) / max(elapsed, 1e-6)


class ThrottledStorage(Storage):
    """``inner`` with every ``put`` (plain or batched) paced by ``limiter``.

    Only writes are throttled; reads, listings and deletes pass through. Thread-safe as
    the inner storage is. Used for the chunk writes of persistence, not for the
    coordinator's small manifest and marker (they must not wait behind chunk debt).
    """

    def __init__(self, inner: Storage, limiter: TokenBucket) -> None:
        self.inner = inner
        self.limiter = limiter
        self.url = inner.url
        self.supports_atomic_rename = inner.supports_atomic_rename
        self.supports_conditional_put = inner.supports_conditional_put

    def batch(self) -> WriteBatch:
        return _ThrottledBatch(self, self.inner.batch(), self.limiter)

    def _get(self, key: str) -> bytes:
        return self.inner.get(key)

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.get_range(key, start, end)

    def _put(self, key: str, data: Buffer) -> None:
        self.limiter.acquire(as_bytes_view(data).nbytes)
        self.inner.put(key, data)

    def _put_if_absent(self, key: str, data: Buffer) -> None:
        self.limiter.acquire(as_bytes_view(data).nbytes)
        self.inner.put_if_absent(key, data)

    def _exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def _size(self, key: str) -> int:
        return self.inner.size(key)

    def _delete(self, key: str, missing_ok: bool) -> None:
        self.inner.delete(key, missing_ok)

    def _delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def _list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def _list_dirs(self, prefix: str) -> list[str]:
        return self.inner.list_dirs(prefix)


class _ThrottledBatch(WriteBatch):
    """The inner storage's batch (keeping its fast durable-at-flush path), paced."""

    def __init__(self, outer: ThrottledStorage, inner: WriteBatch, limiter: TokenBucket) -> None:
        super().__init__(outer)
        self._inner = inner
        self._limiter = limiter

    def put(self, key: str, data: Buffer) -> None:
        self._limiter.acquire(as_bytes_view(data).nbytes)
        self._inner.put(key, data)

    def flush(self) -> None:
        self._inner.flush()
