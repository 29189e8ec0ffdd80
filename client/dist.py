"""torch.distributed plumbing for the client: groups, gathers, transfers, error fan-in.

ckpt creates two gloo groups of its own on first use (every rank must call save/load
collectively): one used by the caller's thread for planning, one used by the
background thread for transfers and commit, so that background collectives never
interleave with the trainer's or with each other.
"""

from __future__ import annotations

import datetime
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ckptd.errors import CkptError, DistributedError
from ckptd.planner import Transfer


@dataclass
class DistContext:
    """Rank, world size and ckpt's own process groups (None when not distributed)."""

    rank: int
    world: int
    plan_group: Any = None
    bg_group: Any = None
    default_group: Any = None  # the torch.distributed world these groups belong to

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_gather(self, obj: Any, background: bool = False) -> list[Any]:
        """Gather a picklable *control* object (layouts, statuses) from every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.bg_group if background else self.plan_group)
        return out

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Gather a control object to ``dst`` on the background group (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.bg_group)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks (planning group), in place."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.plan_group)
        return t

    def broadcast(self, obj: Any, src: int = 0, background: bool = True) -> Any:
        """Broadcast a control object from ``src``."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(
            box, src=src, group=self.bg_group if background else self.plan_group
        )
        return box[0]

    def exchange(
        self,
        sends: Sequence[tuple[Transfer, torch.Tensor]],
        recvs: Sequence[tuple[Transfer, torch.Tensor]],
    ) -> None:
        """Point-to-point transfers of boundary regions on the background group."""
        if not (sends or recvs):
            return
        reqs = []
        for t, buf in recvs:
            reqs.append(
                dist.irecv(buf.reshape(-1).view(torch.uint8), src=t.src, group=self.bg_group)
            )
        for t, buf in sends:
            reqs.append(
                dist.isend(buf.reshape(-1).view(torch.uint8), dst=t.dst, group=self.bg_group)
            )
        for r in reqs:
            if r is not None:  # None only for a rank outside the group (not ours)
                r.wait()


_lock = threading.Lock()
_cached: DistContext | None = None
_LOCAL = DistContext(0, 1)  # the context of every non-distributed call


def context(timeout_s: float) -> DistContext:
    """The process's DistContext; creates ckpt's gloo groups collectively on first use."""
    global _cached
    with _lock:
        if not (dist.is_available() and dist.is_initialized()):
            # One shared object: api._get_saver compares contexts by identity, and a fresh
            # DistContext per call made it close and rebuild the Saver on every save
            # (serializing async saves and re-raising an old save's error forever).
            return _LOCAL
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return _LOCAL
        world_group = dist.distributed_c10d._get_default_group()
        # Groups of a destroyed and re-created world are dead: reuse only the same world.
        if _cached is not None and _cached.default_group is world_group:
            return _cached
        td = datetime.timedelta(seconds=timeout_s)
        plan_group = dist.new_group(backend="gloo", timeout=td)
        bg_group = dist.new_group(backend="gloo", timeout=td)
        _cached = DistContext(rank, world, plan_group, bg_group, world_group)
        return _cached


def reset_context() -> None:
    """Forget the cached groups (after ``destroy_process_group``)."""
    global _cached
    with _lock:
        _cached = None


def describe(exc: BaseException) -> str:
    """One-line description of an error for cross-rank reporting."""
    if isinstance(exc, CkptError):
        return f"{type(exc).__name__}: {exc}"
    tb = traceback.format_exception_only(type(exc), exc)
    return "".join(tb).strip()


def raise_if_failed(what: str, statuses: Sequence[str | None], local: BaseException | None) -> None:
    """Raise one DistributedError naming every failing rank (or the local error alone)."""
    failures = {r: s for r, s in enumerate(statuses) if s}
    if not failures:
        return
    if len(statuses) == 1 and local is not None:
        raise local
    err = DistributedError(what, failures)
    raise err from local
