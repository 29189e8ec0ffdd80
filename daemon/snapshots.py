"""Shared-memory snapshots: one double-buffered slot per (job, rank), under a memory budget.

Roles and call order:

* The **daemon** owns a :class:`SnapshotStore` (``root``: ``/dev/shm`` by default).  After a
  restart it calls :meth:`SnapshotStore.adopt` first, to take back the snapshots the
  previous daemon process left (checked; the rest is discarded, with the reason).
  ``store.slot(rank)``: the rank's :class:`Slot` (a rank not adopted starts over).
* A save of one rank: the daemon calls ``slot.begin(step, nbytes)`` and sends
  ``writable.lease`` to the trainer, which maps it (``shm.TrainerMappings.writable``) and
  copies its tensors in: the save's only copy; then the daemon calls
  ``writable.commit(descriptor)``.  A new ``begin`` supersedes an unfinished write (a
  trainer that died mid-copy).  ``writable.view()``: the daemon fills it itself (rebuild).
* Daemon readers (persistence, erasure coding, restore) call ``slot.latest()``: the last
  committed snapshot once magic, version, epoch, generation and CRC32Cs check out, else
  None; *pinned* until ``release()``: a ``begin`` that needs its buffer waits (backpressure),
  then raises ``SnapshotBusyError``.  ``slot.previous()``: the snapshot committed before
  the latest, for as long as its buffer has not been reused (the next ``begin`` reuses
  it); ``slot.at_step(step)``: whichever of the two is of that step.  Erasure protection
  keeps step s's snapshots pinned until step s+1 is protected, so a save of step s+2
  waits for that rather than destroying the last protected step.
  ``store.release(rank)`` frees a slot's memory; ``store.close()`` unmaps but keeps the
  files, for the next daemon's ``adopt``.

Double buffering: a snapshot is written into the buffer that does *not* hold the last
committed one, so a crash mid-write never damages it.  A slot's record file (JSON,
replaced atomically by rename) names the slot's epoch (random, new for each fresh slot),
its two buffer files, and the last committed (generation, buffer); updating it is the
commit point, after the buffer's state became COMPLETE.  A buffer is only ever returned if
its header carries the slot's epoch and exactly the committed generation: a leftover of an
earlier slot, an older copy restored in place, or an uncommitted write is never read.

Memory: each buffer is one pre-faulted file of 4 KiB + capacity, reused across saves; one
too small is replaced by one ``growth`` times larger (exactly the size needed if the
budget cannot take more).  The buffer replaced holds only a superseded snapshot, so it is
freed first; the last committed one stays in the other buffer until the new one commits.
``used_bytes`` counts header + capacity of every buffer (not the small descriptors).

Thread-safety: every method may be called from any daemon thread.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import replace
from typing import Any

import crc32c
import torch

from ckptd.daemon import shm
from ckptd.daemon.shm import (
    COMPLETE,
    EMPTY,
    HEADER_SIZE,
    PREFIX,
    WRITING,
    AdoptReport,
    Discarded,
    Header,
    Segment,
    SnapshotBusyError,
    SnapshotError,
    SnapshotInfo,
)
from ckptd.errors import StagingBudgetError

log = logging.getLogger("ckptd.daemon.snapshots")


class CompleteSnapshot:
    """A verified, pinned, committed snapshot; ``release()`` (or ``with``) unpins it."""

    def __init__(
        self, slot: Slot, buffer: int, seg: Segment, info: SnapshotInfo, desc: bytes
    ) -> None:
        self.info = info
        self._raw_descriptor = desc  # CRC-checked JSON, parsed only when asked for
        self._slot, self._buffer, self._seg = slot, buffer, seg
        self._pinned = True

    @property
    def path(self) -> str:
        """The shared-memory segment holding it (a same-node reader maps it read-only)."""
        return self._seg.path

    @functools.cached_property
    def descriptor(self) -> dict[str, Any]:
        """The snapshot's descriptor (parsed on first use)."""
        return dict(json.loads(self._raw_descriptor))

    def view(self) -> torch.Tensor:
        """uint8 tensor over the payload, in the daemon's mapping. Read it, never write it;
        do not use it after ``release()``: a later save may then overwrite the buffer."""
        if not self._pinned:
            raise SnapshotError("snapshot was released; call slot.latest() again")
        return self._seg.tensor(self.info.nbytes)

    def release(self) -> None:
        if self._pinned:
            self._pinned = False
            self._slot._unpin(self._buffer)

    def __enter__(self) -> CompleteSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WritableSnapshot:
    """A snapshot being written (state WRITING); ``commit`` or ``abort`` ends it."""

    def __init__(self, slot: Slot, seg: Segment, header: Header) -> None:
        self.header = header
        self.lease = shm.WriteLease.of(seg.path, header)  # for the trainer
        self._slot, self._seg = slot, seg
        self.open = True

    def view(self) -> torch.Tensor:
        """uint8 tensor of ``lease.nbytes`` over the buffer (the daemon's own mapping)."""
        return self._seg.tensor(self.header.length)

    def commit(
        self, descriptor: dict[str, Any] | bytes, payload_crc: int | None = None
    ) -> SnapshotInfo:
        """Make this the slot's last committed snapshot (see the module docstring's order).

        ``payload_crc``: the writer's CRC32C of the payload if it computed one while
        copying; otherwise it is computed here, after the copy (~13 GB/s, GIL released).
        """
        return self._slot._commit(self, shm.json_descriptor(descriptor), payload_crc)

    def abort(self) -> None:
        """Give up this snapshot; the last committed one stays."""
        self._slot._abort(self)

    def __enter__(self) -> WritableSnapshot:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.open:
            self.abort()


class Slot:
    """The two buffers of one rank (see the module docstring)."""

    def __init__(self, store: SnapshotStore, rank: int, epoch: int) -> None:
        self.store, self.rank, self.epoch = store, rank, epoch
        self.segments: list[Segment | None] = [None, None]
        self.committed: tuple[int, int] | None = None  # (generation, buffer)
        # The snapshot committed before ``committed``, while its buffer is untouched:
        # what readers of the last *protected* step use once a newer step is committed.
        # Not kept across a daemon restart (the record names one committed snapshot).
        self.prior: tuple[int, int] | None = None
        self._next_gen = 1
        self._pins = [0, 0]
        self._writer: WritableSnapshot | None = None
        self._cond = threading.Condition()
        self._closed = False

    def begin(self, step: int, nbytes: int, timeout: float | None = 30.0) -> WritableSnapshot:
        """Open the free buffer for a snapshot of ``nbytes`` (growing it if needed).

        Raises ``StagingBudgetError`` if the budget cannot hold it and
        ``SnapshotBusyError`` if a reader keeps the buffer for ``timeout`` seconds; in
        both cases the last committed snapshot is untouched.
        """
        if nbytes < 0 or step < 0:
            raise ValueError(f"need step >= 0 and nbytes >= 0, got {step}, {nbytes}")
        with self._cond:
            self._check_open()
            self._supersede()  # an unfinished write: its commit() will now fail
            target = 0 if self.committed is None else 1 - self.committed[1]
            if not self._cond.wait_for(lambda: self._pins[target] == 0, timeout):
                raise SnapshotBusyError(
                    f"rank {self.rank}: the previous snapshot is still being read after "
                    f"{timeout} s; the new snapshot of step {step} "
                    "needs its buffer (persistence or peers are behind: save less often)"
                )
            self._check_open()
            if self.prior is not None and self.prior[1] == target:
                self.prior = None  # its buffer is about to be overwritten
            gen = self._next_gen
            self._next_gen += 1
            seg = self.segments[target]
            if seg is None or seg.capacity < nbytes:
                seg = self._grow(target, nbytes, step, serial=gen)
            job, cap = self.store.job_id, seg.capacity
            hdr = Header(target, self.epoch, gen, step, nbytes, cap, self.rank, 0, 0, 0, job)
            seg.set_state(WRITING)  # first: from here on this buffer is not COMPLETE
            seg.write_header(hdr)
            self._writer = WritableSnapshot(self, seg, hdr)
            return self._writer

    def reserve(self, nbytes: int) -> None:
        """Pre-allocate free buffers of ``nbytes`` now, off the trainer's stall (skips the
        committed, written or pinned buffer: call it again after the next commit)."""
        with self._cond:
            self._check_open()
            busy = {
                self.committed[1] if self.committed else -1,
                self._writer.header.buffer if self._writer else -1,
            }
            for b, seg in enumerate(self.segments):
                if b not in busy and not self._pins[b] and (seg is None or seg.capacity < nbytes):
                    self._next_gen += 1
                    self._grow(b, nbytes, None, serial=self._next_gen - 1)

    def _grow(self, b: int, nbytes: int, step: int | None, serial: int) -> Segment:
        old = self.segments[b]
        if self.prior is not None and self.prior[1] == b:
            self.prior = None  # the buffer is replaced: its snapshot goes with it
        old_size = HEADER_SIZE + old.capacity if old else 0
        exact = shm.page_round(nbytes)
        want = max(exact, shm.page_round(int(old.capacity * self.store.growth))) if old else exact
        cap = self.store._reserve(old_size, want, exact)  # atomic against other slots
        if cap is None:
            kept = f"generation {self.committed[0]}" if self.committed else "none"
            what = f"step {step}" if step is not None else "this rank"
            raise StagingBudgetError(
                f"job {self.store.job_id} rank {self.rank}: a snapshot of {what} needs "
                f"{nbytes} bytes (+{HEADER_SIZE} header), but "
                f"{self.store.used_bytes() - old_size} of the {self.store.budget_bytes}-byte "
                "memory budget are held by other buffers; raise the daemon's memory budget "
                f"or save fewer bytes per rank. The last committed snapshot ({kept}) is intact."
            )
        # The buffer replaced holds no snapshot that is still needed (the last committed
        # one is in the other buffer): free it first, so peak memory is old + new only.
        if old is not None:
            old.set_state(EMPTY)
            old.close(unlink=True)
            self.segments[b] = None
            self._write_record()
        name = shm.segment_name(self.store.job_id, self.rank, b, serial)
        try:
            seg = Segment.create(os.path.join(self.store.root, name), cap, self.store.group)
        except BaseException:
            self.store._account(-(HEADER_SIZE + cap))
            raise
        self.segments[b] = seg
        self._write_record()
        return seg

    def _commit(self, w: WritableSnapshot, desc: bytes, crc: int | None) -> SnapshotInfo:
        hdr = w.header
        if crc is None:  # outside the lock: ~80 ms per GiB; the writer is re-checked below
            crc = crc32c.crc32c(w._seg.payload(hdr.length))
        hdr = replace(hdr, payload_crc=crc, descriptor_len=len(desc))
        hdr = replace(hdr, descriptor_crc=crc32c.crc32c(desc))
        with self._cond:
            if not w.open or self._writer is not w:
                raise SnapshotError(
                    f"rank {self.rank}: the write of step {hdr.step} (generation "
                    f"{hdr.generation}) was superseded or aborted; nothing was committed"
                )
            w._seg.write_descriptor(desc)
            w._seg.write_header(hdr)
            w._seg.set_state(COMPLETE)  # last write into the buffer
            if self.committed is not None and self.committed[1] != hdr.buffer:
                self.prior = self.committed
            self.committed = (hdr.generation, hdr.buffer)
            self._write_record()  # the commit point
            self._supersede()
            return SnapshotInfo(self.rank, hdr.step, hdr.generation, hdr.length, crc)

    def _abort(self, w: WritableSnapshot) -> None:
        with self._cond:
            if self._writer is w and w.open:
                w._seg.set_state(EMPTY)
                self._writer = None
            w.open = False

    def latest(self, verify: bool = True) -> CompleteSnapshot | None:
        """The last committed snapshot, verified and pinned; None if there is none.

        A snapshot that fails a check is discarded (logged with the reason, kept in
        ``store.discarded``) and None is returned: never stale or damaged bytes.
        ``verify=False`` skips only the payload CRC (the header checks always run).
        """
        return self._pinned(self.committed, verify)

    def previous(self, verify: bool = True) -> CompleteSnapshot | None:
        """The snapshot committed before the latest, verified and pinned; None if there is
        none or its buffer was reused (by a ``begin`` since the latest commit, a growth,
        or a daemon restart).  While pinned, a ``begin`` that needs its buffer waits."""
        return self._pinned(self.prior, verify)

    def at_step(self, step: int, verify: bool = True) -> CompleteSnapshot | None:
        """The latest or else the previous snapshot if it is of ``step``; None otherwise."""
        for get in (self.latest, self.previous):
            snap = get(verify)
            if snap is not None:
                if snap.info.step == step:
                    return snap
                snap.release()
        return None

    def _pinned(self, which: tuple[int, int] | None, verify: bool) -> CompleteSnapshot | None:
        with self._cond:
            self._check_open()
            # Re-read under the lock: ``which`` was read without it.
            if which is None or which not in (self.committed, self.prior):
                return None
            gen, b = which
            self._pins[b] += 1
        try:
            seg, info, desc = self._check(b, gen, verify)
        except BaseException as e:
            self._unpin(b)
            if not isinstance(e, ValueError):
                raise
            self._discard_committed(gen, b, str(e))
            return None
        return CompleteSnapshot(self, b, seg, info, desc)

    def _check(self, b: int, gen: int, verify: bool) -> tuple[Segment, SnapshotInfo, bytes]:
        """The committed snapshot in buffer ``b``, or ``ValueError`` saying what is wrong."""
        seg = self.segments[b]
        if seg is None:
            raise ValueError(f"buffer {b} is missing")
        hdr, desc = seg.verify(self.store.job_id, self.rank, b, self.epoch, gen, verify)
        info = SnapshotInfo(self.rank, hdr.step, hdr.generation, hdr.length, hdr.payload_crc)
        return seg, info, desc

    def _discard_committed(self, gen: int, b: int, reason: str) -> None:
        with self._cond:
            seg = self.segments[b]
            path = seg.path if seg else f"buffer {b}"
            if self._closed:  # released under the reader: nothing was wrong with the bytes
                return
            if self.prior == (gen, b):
                self.prior = None
            if self.committed == (gen, b):
                self.committed = None
                self._write_record()
                if seg is not None and self._pins[b] == 0:
                    seg.set_state(EMPTY)
        log.warning(
            "rank %d: discarded snapshot generation %d in %s: %s", self.rank, gen, path, reason
        )
        self.store._account(discarded=Discarded(self.rank, path, reason))

    def _unpin(self, b: int) -> None:
        with self._cond:
            self._pins[b] -= 1
            self._cond.notify_all()

    def _write_record(self) -> None:
        names = [os.path.basename(s.path) if s else None for s in self.segments]
        path = self.store._record_path(self.rank)
        shm.write_record(path, self.store.job_id, self.rank, self.epoch, self.committed, names)

    def _supersede(self) -> None:
        if self._writer is not None:
            self._writer.open = False
            self._writer = None

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError(f"slot of rank {self.rank} is released or its store closed")

    def _close(self, unlink: bool) -> int:
        """Unmap (and with ``unlink`` delete) the slot's files; returns the bytes freed."""
        with self._cond:
            self._closed = True
            self._supersede()
            freed = 0
            for i, seg in enumerate(self.segments):
                if seg is not None:
                    freed += HEADER_SIZE + seg.capacity
                    seg.close(unlink=unlink)
                    self.segments[i] = None
            if unlink:
                shm.unlink_quietly(self.store._record_path(self.rank))
            self._cond.notify_all()
            return freed


class SnapshotStore:
    """Every slot of one job on this node, under one memory budget (see the module doc)."""

    def __init__(
        self, root: str | os.PathLike[str], job_id: str, budget_bytes: int, growth: float = 1.5,
        group: int | None = None,
    ) -> None:
        if budget_bytes <= 0 or growth < 1.0:
            raise ValueError(f"need budget_bytes > 0 and growth >= 1, got {budget_bytes}, {growth}")
        self.root = os.fspath(root)
        self.job_id = shm.check_job_id(job_id)
        self.budget_bytes = budget_bytes
        self.growth = growth
        self.discarded: list[Discarded] = []  # everything thrown away, with the reason
        self.group = group  # trainers of this gid may map the buffers (0660, dir 0750)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if group is not None:
            os.chown(self.root, -1, group)
            os.chmod(self.root, 0o750)
        self._names = re.compile(
            re.escape(f"{PREFIX}{job_id}.r") + r"(\d+)\.(slot(?:\.tmp)?|b[01]\.[0-9a-f]+)"
        )
        self._slots: dict[int, Slot] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._closed = False

    def slot(self, rank: int) -> Slot:
        """The slot of ``rank``; a rank neither adopted nor used yet starts over."""
        with self._lock:
            if self._closed:
                raise SnapshotError("snapshot store is closed")
            slot = self._slots.get(rank)
            if slot is None:
                for name in self._files().get(rank, []):  # not adopted: never reused
                    shm.unlink_quietly(os.path.join(self.root, name))
                slot = self._slots[rank] = Slot(self, rank, secrets.randbits(63) | 1)
                slot._write_record()
            return slot

    def ranks(self) -> list[int]:
        """Ranks with a slot in this store (adopted or used), ascending."""
        with self._lock:
            return sorted(self._slots)

    def used_bytes(self) -> int:
        """Shared memory held by every buffer of this store (compare with budget_bytes)."""
        with self._lock:
            return self._used

    def release(self, rank: int) -> None:
        """Delete the slot of ``rank`` and free its memory (a job that ended)."""
        with self._lock:
            slot = self._slots.pop(rank, None)
        if slot is not None:
            self._account(-slot._close(unlink=True))

    def close(self, unlink: bool = False) -> None:
        """Unmap every slot; the files stay (for the next daemon's adopt) unless ``unlink``."""
        with self._lock:
            slots, self._slots, self._closed = list(self._slots.values()), {}, True
        for slot in slots:
            self._account(-slot._close(unlink=unlink))

    def adopt(self) -> AdoptReport:
        """Take back the slots a previous daemon process left in ``root`` (call it first).

        Keeps each rank's last committed snapshot whose checks pass (the same checks as
        ``latest``, payload CRC included) and the pre-faulted buffers for reuse; discards
        everything else (interrupted writes, stale or foreign segments, unreadable
        records) and says why in the report.  The slot keeps its epoch; generations go on.
        """
        with self._lock:
            if self._slots:
                raise SnapshotError("adopt() must be called before any slot() of this store")
        kept: dict[int, SnapshotInfo] = {}
        gone: list[Discarded] = []
        for rank, names in sorted(self._files().items()):
            info = self._adopt_slot(rank, names, gone)
            if info is not None:
                kept[rank] = info
        self.discarded.extend(gone)
        for d in gone:
            log.info("adopt: discarded %s (rank %s): %s", d.path, d.rank, d.reason)
        return AdoptReport(kept, tuple(gone))

    def _adopt_slot(
        self, rank: int, names: list[str], gone: list[Discarded]
    ) -> SnapshotInfo | None:
        segs = {n for n in names if ".slot" not in n}
        try:
            rec = shm.read_record(self._record_path(rank), self.job_id, rank)
        except (OSError, ValueError) as e:
            for n in names:
                shm.unlink_quietly(os.path.join(self.root, n))
                if n in segs:
                    gone.append(Discarded(rank, os.path.join(self.root, n), f"slot record: {e}"))
            return None
        slot = Slot(self, rank, rec["epoch"])
        for b, name in enumerate(rec["buffers"]):
            if name is None or name not in segs:
                continue
            segs.discard(name)
            p = os.path.join(self.root, name)
            try:
                seg = Segment.open(p)
            except (OSError, ValueError) as e:
                gone.append(Discarded(rank, p, f"unusable segment: {e}"))
                shm.unlink_quietly(p)
                continue
            try:
                hdr = seg.check_identity(self.job_id, rank, b, slot.epoch)
            except ValueError as e:
                gone.append(Discarded(rank, p, str(e)))
                seg.close(unlink=True)
                continue
            slot.segments[b] = seg
            slot._next_gen = max(slot._next_gen, hdr.generation + 1)
            self._account(HEADER_SIZE + seg.capacity)
        for n in segs:  # e.g. a growth interrupted before the record named the new file
            gone.append(Discarded(rank, os.path.join(self.root, n), "orphan segment"))
        for n in segs | {n for n in names if n.endswith(".tmp")}:
            shm.unlink_quietly(os.path.join(self.root, n))
        info, cb = None, None
        if rec["committed"] is not None:
            gen, cb = rec["committed"]
            slot._next_gen = max(slot._next_gen, gen + 1)
            try:
                info = slot._check(cb, gen, verify=True)[1]
                slot.committed = (gen, cb)
            except ValueError as e:
                bad = slot.segments[cb]
                gone.append(Discarded(rank, bad.path if bad else f"buffer {cb}", str(e)))
                if bad is not None:
                    bad.set_state(EMPTY)
        for b, held in enumerate(slot.segments):
            if held is not None and b != cb and (hs := held.header())[1] != EMPTY:
                why = "interrupted write" if hs[1] == WRITING else "not the last committed one"
                gone.append(Discarded(rank, held.path, f"{why}: generation {hs[0].generation}"))
                held.set_state(EMPTY)  # never mistaken for a snapshot again; memory reused
        slot._write_record()
        with self._lock:
            self._slots[rank] = slot
        return info

    def _record_path(self, rank: int) -> str:
        return os.path.join(self.root, f"{PREFIX}{self.job_id}.r{rank}.slot")

    def _files(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name in os.listdir(self.root):
            m = self._names.fullmatch(name)
            if m:
                out.setdefault(int(m[1]), []).append(name)
        return out

    def _reserve(self, old_size: int, cap: int, exact: int) -> int | None:
        """Swap ``old_size`` bytes of budget for ``cap`` (or ``exact``) bytes; None: no room."""
        with self._lock:
            room = self.budget_bytes - (self._used - old_size) - HEADER_SIZE
            if cap > room:
                cap = exact
            if cap > room:
                return None
            self._used += HEADER_SIZE + cap - old_size
            return cap

    def _account(self, delta: int = 0, discarded: Discarded | None = None) -> None:
        with self._lock:
            self._used += delta
            if discarded is not None:
                self.discarded.append(discarded)
