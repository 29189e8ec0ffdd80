"""Host staging memory: allocated once, pre-faulted, reused across saves.

First-touch page faults cost about ten times a copy into warm memory on these
machines, so a save copies into arenas that earlier saves already touched. A pool of
``max_inflight`` arenas gives backpressure: a save waits for an arena that a previous
save is still persisting from.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ckptd.dtypes import torch_dtype
from ckptd.errors import StagingBudgetError

ALIGN = 64


class Arena:
    """One reusable, pre-faulted host buffer carved into aligned tensor views."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def reserve(self, nbytes: int) -> None:
        """Make the arena at least ``nbytes`` (grows geometrically; pre-faults new pages)."""
        if nbytes <= self.buf.numel():
            return
        size = max(nbytes, int(self.buf.numel() * 1.25))
        self.buf = torch.empty(0, dtype=torch.uint8)  # drop the old one first
        buf = torch.empty(size, dtype=torch.uint8)
        buf.zero_()  # touch every page now, not during the next stall
        self.buf = buf

    def views(self, specs: Sequence[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Contiguous tensors of the given (dtype, shape) laid out back to back."""
        out, off = [], 0
        for dtype, shape in specs:
            dt = torch_dtype(dtype)
            n = 1
            for s in shape:
                n *= s
            nbytes = n * dt.itemsize
            out.append(self.buf[off : off + nbytes].view(dt).view(shape))
            off = _align(off + nbytes)
        return out


def arena_bytes(specs: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes an arena needs for ``specs`` (with alignment)."""
    off = 0
    for dtype, shape in specs:
        n = torch_dtype(dtype).itemsize
        for s in shape:
            n *= s
        off = _align(off + n)
    return off


class ArenaPool:
    """``size`` arenas; :meth:`acquire` blocks while all are in use (backpressure)."""

    def __init__(self, size: int, budget_bytes: int | None) -> None:
        self._free = [Arena() for _ in range(size)]
        self._cond = threading.Condition()
        self._budget = budget_bytes
        self._size = size

    def acquire(self, nbytes: int, timeout: float | None = None) -> Arena:
        """An arena of at least ``nbytes``; raises StagingBudgetError if it cannot fit."""
        if self._budget is not None and nbytes * self._size > self._budget:
            raise StagingBudgetError(
                f"one snapshot of this rank needs {nbytes} bytes of staging x "
                f"{self._size} in flight > budget {self._budget} bytes; raise "
                "staging_budget_bytes or lower max_inflight_saves"
            )
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                raise TimeoutError("timed out waiting for a previous save to free staging memory")
            arena = self._free.pop()
        arena.reserve(nbytes)
        return arena

    def release(self, arena: Arena) -> None:
        with self._cond:
            self._free.append(arena)
            self._cond.notify()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
