"""Fault injection for storage (style principle 9): a wrapper that fails chosen calls."""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.formats.storage import Buffer, Storage


@dataclass(frozen=True)
class FaultPlan:
    """Which calls of a :class:`FaultyStorage` fail, and how.

    ``op`` and ``key_glob`` are :func:`fnmatch.fnmatchcase` patterns over the method
    name and the key (``*`` also matches ``/``). The first ``after`` matching calls
    succeed; the next ``times`` matching calls (all of them if ``None``) raise ``error``
    before touching the inner storage, or SIGKILL the process if ``kill`` is set (for
    subprocess crash tests only).
    """

    op: str = "put"
    key_glob: str = "*"
    after: int = 0
    error: BaseException = OSError("injected fault")  # noqa: RUF009 - never mutated
    kill: bool = False
    times: int | None = None

    def matches(self, op: str, key: str) -> bool:
        """Return whether a call of ``op`` on ``key`` is covered by this plan."""
        return fnmatch.fnmatchcase(op, self.op) and fnmatch.fnmatchcase(key, self.key_glob)


class FaultyStorage(Storage):
    """Wraps a storage and injects the failures described by one or more FaultPlans.

    ``injected`` records every ``(op, key)`` that failed, for assertions.
    """

    def __init__(self, inner: Storage, plan: FaultPlan | Sequence[FaultPlan]) -> None:
        """Wrap ``inner``; ``plan`` is one FaultPlan or several (each counted separately)."""
        self.inner = inner
        self.plans = [plan] if isinstance(plan, FaultPlan) else list(plan)
        self.url = inner.url
        self.supports_atomic_rename = inner.supports_atomic_rename
        self.supports_conditional_put = inner.supports_conditional_put
        self.injected: list[tuple[str, str]] = []
        self._seen = [0] * len(self.plans)
        self._lock = threading.Lock()

    def _check(self, op: str, key: str) -> None:
        with self._lock:
            for i, plan in enumerate(self.plans):
                if not plan.matches(op, key):
                    continue
                self._seen[i] += 1
                nth = self._seen[i] - plan.after  # 1-based index among failing calls
                if nth >= 1 and (plan.times is None or nth <= plan.times):
                    self.injected.append((op, key))
                    if plan.kill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise plan.error

    def _get(self, key: str) -> bytes:
        self._check("get", key)
        return self.inner.get(key)

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        self._check("get_range", key)
        return self.inner.get_range(key, start, end)

    def _put(self, key: str, data: Buffer) -> None:
        self._check("put", key)
        self.inner.put(key, data)

    def _put_if_absent(self, key: str, data: Buffer) -> None:
        self._check("put_if_absent", key)
        self.inner.put_if_absent(key, data)

    def _exists(self, key: str) -> bool:
        self._check("exists", key)
        return self.inner.exists(key)

    def _size(self, key: str) -> int:
        self._check("size", key)
        return self.inner.size(key)

    def _delete(self, key: str, missing_ok: bool) -> None:
        self._check("delete", key)
        self.inner.delete(key, missing_ok)

    def _delete_prefix(self, prefix: str) -> None:
        self._check("delete_prefix", prefix)
        self.inner.delete_prefix(prefix)

    def _list(self, prefix: str) -> list[str]:
        self._check("list", prefix)
        return self.inner.list(prefix)

    def _list_dirs(self, prefix: str) -> list[str]:
        self._check("list_dirs", prefix)
        return self.inner.list_dirs(prefix)

    def close(self) -> None:
        """Close the wrapped storage."""
        self.inner.close()
