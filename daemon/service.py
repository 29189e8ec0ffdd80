"""The daemon's snapshot service: leases, commits, per-step progress, and the bytes it serves.

Call order for one rank's save (trainer on the same node, over the unix socket):
``BeginSnapshot`` → the trainer maps the lease and copies its pieces in → ``CommitSnapshot``
with the descriptor (:mod:`ckptd.snapshot`). The RPC returns as soon as the descriptor is
checked; the commit itself (payload CRC32C, header, record: ~80 ms/GiB) finishes in a
daemon thread, so the trainer's stall does not pay for it. From then on the daemon owns the
snapshot: a trainer crash no longer matters. A later ``BeginSnapshot`` of the same rank
waits for that commit first (a new write would supersede it).

Per step, this daemon tracks the ranks it holds (``desc.nodes[r] == node``); once all are
committed the step is STAGED here, and the step's *pipeline* runs in the background:
protection with the erasure group, persistence of the chunks, report to the coordinator.
:class:`StepProgress` records how far each step got; ``WaitStep`` and ``JobStatus`` read it.

Bytes leave the daemon only through the data channel (:mod:`ckptd.daemon.transport`), whose
``BlobStore`` is :class:`DaemonBlobs`: ``snap/{job}/{rank}/{generation}`` is a committed
snapshot's payload, pinned while a range is read and never served if its generation is
not the committed one (a reader never gets bytes of another snapshot). Other prefixes are
routed to the parts that own them (persistence transfers, erasure blocks).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from ckptd.daemon.datachannel import BlobNotFoundError
from ckptd.daemon.logs import get_logger
from ckptd.daemon.shm import PREFIX, SnapshotBusyError, SnapshotError, check_job_id
from ckptd.daemon.snapshots import CompleteSnapshot, SnapshotStore, WritableSnapshot
from ckptd.errors import CkptError, InvalidKeyError, StagingBudgetError
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.snapshot import SnapshotDescriptor

log = get_logger("ckptd.daemon.service")

STATE_ORDER: dict[int, int] = {
    pb.STEP_STATE_UNSPECIFIED: 0,
    pb.STEP_STATE_STAGED: 1,
    pb.STEP_STATE_PROTECTED: 2,
    pb.STEP_STATE_PERSISTED: 3,
    pb.STEP_STATE_COMMITTED: 4,
}
_SLOT_FILE = re.compile(re.escape(PREFIX) + r"(.+)\.r(\d+)\.slot")
MAX_STEPS_KEPT = 64  # progress records of old steps are forgotten past this many


@dataclass
class StepProgress:
    """How far one step of one job got on this daemon."""

    step: int
    ranks: frozenset[int]  # the ranks of this step this node holds (from a descriptor)
    nodes: tuple[str, ...]
    committed: dict[int, int] = field(default_factory=dict)  # rank -> generation
    bytes: int = 0
    staged_at: float | None = None
    protected: bool = False
    persisted: bool = False
    persisted_at: float | None = None
    committed_to_storage: bool = False
    error: str = ""
    group: tuple[str, ...] = ()
    parity_held: bool = False
    protection_error: str = ""

    @property
    def staged(self) -> bool:
        return self.staged_at is not None

    def state(self) -> int:
        """The furthest state reached (FAILED wins)."""
        if self.error:
            return pb.STEP_STATE_FAILED
        if self.committed_to_storage:
            return pb.STEP_STATE_COMMITTED
        if self.persisted:
            return pb.STEP_STATE_PERSISTED
        if self.protected:
            return pb.STEP_STATE_PROTECTED
        if self.staged:
            return pb.STEP_STATE_STAGED
        return pb.STEP_STATE_UNSPECIFIED

    def to_pb(self, node: str, n: int, m: int) -> pb.StepStatus:
        lag = (self.persisted_at - self.staged_at
               if self.persisted_at is not None and self.staged_at is not None else 0.0)
        return pb.StepStatus(
            step=self.step, node=node, state=pb.StepState.ValueType(self.state()),
            ranks=sorted(self.ranks),
            bytes=self.bytes, group=list(self.group), erasure_n=n, erasure_m=m,
            protected=self.protected, persisted=self.persisted,
            committed=self.committed_to_storage, error=self.error, persist_lag_seconds=lag,
            parity_held=self.parity_held)


class JobState:
    """One job on this daemon: its snapshot store and the progress of its steps."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.steps: dict[int, StepProgress] = {}
        self.descriptors: dict[int, tuple[int, SnapshotDescriptor]] = {}  # rank -> (gen, desc)
        self.pending: dict[int, threading.Event] = {}  # rank -> commit in flight


StepHook = Callable[[str, StepProgress], None]


class SnapshotService:
    """Snapshot state of one daemon (thread-safe; the gRPC handlers call it via threads).

    ``on_staged``: called (in a daemon thread) once a step is STAGED on this node; the
    daemon wires protection and persistence to it.
    """

    def __init__(self, node: str, shm_dir: str, budget_bytes: int,
                 group: int | None = None) -> None:
        self.node = node
        self.group = group  # socket_group: trainers of this gid map the buffers too
        self.shm_dir = shm_dir
        self.budget_bytes = budget_bytes
        self.jobs: dict[str, JobState] = {}
        self.on_staged: list[StepHook] = []
        self.metrics: Any = None  # DaemonMetrics, set by the daemon
        self._begun: dict[tuple[str, int], float] = {}  # (job, rank) -> lease handed out
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------ lifecycle
    def adopt(self) -> dict[str, Any]:
        """Take back every job's snapshots left in ``shm_dir`` by a previous daemon process
        (checked; see SnapshotStore.adopt) and rebuild their progress as STAGED."""
        os.makedirs(self.shm_dir, mode=0o700, exist_ok=True)
        jobs = sorted({m[1] for name in os.listdir(self.shm_dir)
                       if (m := _SLOT_FILE.fullmatch(name))})
        report: dict[str, Any] = {}
        for job in jobs:
            try:
                check_job_id(job)
            except InvalidKeyError:
                continue
            state = self._job(job, create=True)
            assert state is not None
            adopted = state.store.adopt()
            report[job] = adopted
            for rank, info in adopted.kept.items():
                snap = state.store.slot(rank).latest(verify=False)
                if snap is None:
                    continue
                try:
                    desc = SnapshotDescriptor.from_json(snap.descriptor)
                except InvalidKeyError as e:
                    log.warning("adopted snapshot has a bad descriptor; ignored", job=job,
                                rank=rank, error=str(e))
                    continue
                finally:
                    snap.release()
                self._record_commit(job, state, desc, info.generation, info.nbytes, notify=True)
            log.info("adopted snapshots", job=job, ranks=sorted(adopted.kept),
                     discarded=len(adopted.discarded))
        return report

    def close(self) -> None:
        """Unmap every store; the files stay for the next daemon process to adopt."""
        with self._lock:
            jobs, self.jobs = list(self.jobs.values()), {}
        for j in jobs:
            j.store.close(unlink=False)

    def memory_used(self) -> int:
        with self._lock:
            return sum(j.store.used_bytes() for j in self.jobs.values())

    # ------------------------------------------------------------------ trainer calls
    def begin(
        self, job: str, rank: int, step: int, nbytes: int, timeout: float
    ) -> WritableSnapshot:
        """Open rank's free buffer for ``step`` (waits for its previous commit first)."""
        state = self._job(job, create=True)
        assert state is not None
        pending = state.pending.get(rank)
        if pending is not None and not pending.wait(timeout):
            raise SnapshotBusyError(f"job {job} rank {rank}: the previous snapshot's commit "
                                    f"did not finish within {timeout} s")
        budget_room = self.budget_bytes - (self.memory_used() - state.store.used_bytes())
        if nbytes > budget_room:
            raise StagingBudgetError(
                f"job {job} rank {rank}: a snapshot of step {step} needs {nbytes} bytes but "
                f"only {max(0, budget_room)} of the daemon's {self.budget_bytes}-byte budget "
                "are not held by other jobs; the last committed snapshot is intact")
        w = state.store.slot(rank).begin(step, nbytes, timeout=timeout)
        self._begun[(job, rank)] = time.monotonic()
        return w

    def writer(self, job: str, rank: int, generation: int) -> WritableSnapshot:
        """The open write of ``(job, rank)`` with ``generation`` (the lease handed out)."""
        state = self._job(job)
        slot = state.store.slot(rank) if state is not None else None
        w = slot._writer if slot is not None else None
        if w is None or not w.open or w.header.generation != generation:
            raise SnapshotError(f"job {job} rank {rank}: no open write of generation "
                                f"{generation} (superseded, aborted or never begun)")
        return w

    def commit(self, job: str, rank: int, step: int, generation: int,
               descriptor: bytes) -> threading.Event:
        """Hand the open write over to a daemon thread that checks the descriptor and
        commits it; returns the event set when that finished.

        The RPC (the end of the trainer's stall) does not wait for the parse (~ms per
        thousand tensors), the payload CRC or the record: a descriptor that does not match
        its lease fails the commit there, and the step with it (``WaitStep`` says why).
        """
        w = self.writer(job, rank, generation)
        if w.header.step != step:
            raise InvalidKeyError(f"rank {rank}: the lease is of step {w.header.step}, the "
                                  f"commit of step {step}")
        state = self._job(job)
        assert state is not None
        begun = self._begun.pop((job, rank), None)
        if begun is not None and self.metrics is not None:
            # Lease to commit: the trainer's copy into shared memory, i.e. its stall
            # (less the layout exchange it did before asking for the lease).
            self.metrics.observe_stall(time.monotonic() - begun)
        done = threading.Event()
        state.pending[rank] = done

        def finish() -> None:
            try:
                desc = self._checked(descriptor, job, rank, step, w.header.length)
                info = w.commit(descriptor)
                self._record_commit(job, state, desc, info.generation, info.nbytes, notify=True)
                self._reserve_next(state, rank, info.nbytes)
            except BaseException as e:  # nothing committed; the last snapshot stays
                if w.open:
                    w.abort()
                log.error("snapshot commit failed", job=job, rank=rank, step=step, error=str(e))
                self._fail(job, step, f"rank {rank}: commit failed: {e}")
            finally:
                done.set()

        threading.Thread(target=finish, name=f"ckptd-commit-{rank}", daemon=True).start()
        return done

    def _checked(self, descriptor: bytes, job: str, rank: int, step: int,
                 length: int) -> SnapshotDescriptor:
        """The parsed descriptor if it is the one of this lease; ``InvalidKeyError`` else."""
        desc = SnapshotDescriptor.loads(descriptor)
        if (desc.job, desc.rank, desc.step) != (job, rank, step):
            raise InvalidKeyError(f"descriptor is for job {desc.job} rank {desc.rank} step "
                                  f"{desc.step}, the commit for job {job} rank {rank} step {step}")
        if desc.nodes[rank] != self.node:
            raise InvalidKeyError(f"descriptor places rank {rank} on node {desc.nodes[rank]!r}, "
                                  f"this daemon is {self.node!r}")
        if desc.nbytes > length:
            raise InvalidKeyError(f"rank {rank}: descriptor needs {desc.nbytes} bytes, the "
                                  f"lease is {length} bytes")
        return desc

    def _reserve_next(self, state: JobState, rank: int, nbytes: int) -> None:
        """Create (pre-fault) the rank's other buffer now, in this daemon thread, so that
        the next save does not pay for it in its stall (first touch is ~10x a copy)."""
        try:
            state.store.slot(rank).reserve(nbytes)
        except (StagingBudgetError, SnapshotError) as e:  # the next begin will say so
            log.info("second buffer not reserved", rank=rank, reason=str(e))

    # ------------------------------------------------------------------ progress
    def _record_commit(self, job: str, state: JobState, desc: SnapshotDescriptor,
                       generation: int, nbytes: int, notify: bool) -> None:
        staged: StepProgress | None = None
        with self._changed:
            state.descriptors[desc.rank] = (generation, desc)
            prog = state.steps.get(desc.step)
            if prog is None:
                local = frozenset(r for r, n in enumerate(desc.nodes) if n == self.node)
                prog = state.steps[desc.step] = StepProgress(desc.step, local, desc.nodes)
                for old in sorted(state.steps)[:-MAX_STEPS_KEPT]:
                    del state.steps[old]
            prog.committed[desc.rank] = generation
            prog.bytes += nbytes
            if self.metrics is not None:
                self.metrics.add_bytes("staged", nbytes)
            if not prog.staged and prog.ranks <= prog.committed.keys():
                prog.staged_at = time.time()
                staged = prog
            self._changed.notify_all()
        if staged is not None and self.metrics is not None:
            self.metrics.set_last_step("staged", staged.step)
        if staged is not None and notify:
            log.info("step staged", job=job, step=desc.step, ranks=sorted(staged.ranks),
                     bytes=staged.bytes)
            for hook in list(self.on_staged):
                try:
                    hook(job, staged)
                except Exception as e:  # a hook's failure is the step's, not the daemon's
                    log.error("step pipeline failed to start", job=job, step=desc.step,
                              error=str(e))
                    self._fail(job, desc.step, str(e))

    def update(self, job: str, step: int, **changes: Any) -> None:
        """Set fields of a step's progress (protected, persisted, ...) and wake waiters."""
        with self._changed:
            state = self.jobs.get(job)
            prog = state.steps.get(step) if state else None
            if state is None or prog is None:
                return
            for k, v in changes.items():
                setattr(prog, k, v)
            if changes.get("persisted") and prog.persisted_at is None:
                prog.persisted_at = time.time()
            self._publish(state, prog, changes)
            self._changed.notify_all()

    def _publish(self, state: JobState, prog: StepProgress, changes: dict[str, Any]) -> None:
        """Prometheus view of a step's progress (called with the lock held)."""
        m = self.metrics
        if m is None:
            return
        if changes.get("protected"):
            m.add_bytes("protected", prog.bytes)
            m.set_last_step("protected", prog.step)
        if changes.get("persisted"):
            m.add_bytes("persisted", prog.bytes)
            m.set_last_step("persisted", prog.step)
            if prog.staged_at is not None and prog.persisted_at is not None:
                took = max(1e-6, prog.persisted_at - prog.staged_at)
                m.set_persist_throughput(prog.bytes / took)
        if changes.get("committed_to_storage"):
            m.set_last_step("committed", prog.step)
        staged = [p for p in state.steps.values() if p.staged and not p.error]
        behind = [p for p in staged if not p.persisted]
        done = [p.step for p in staged if p.persisted]
        newest = max((p.step for p in staged), default=0)
        lag_s = time.time() - min(p.staged_at or time.time() for p in behind) if behind else 0.0
        m.set_persist_lag(lag_s, newest - max(done) if done and behind else len(behind))

    def _fail(self, job: str, step: int, error: str) -> None:
        with self._changed:
            state = self.jobs.get(job)
            prog = state.steps.get(step) if state else None
            if prog is not None and not prog.error:
                prog.error = error
            self._changed.notify_all()

    def wait_step(self, job: str, step: int, target: int, timeout: float) -> tuple[int, str]:
        """Block until ``step`` reaches ``target`` (or fails); returns (state, error)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                state = self.jobs.get(job)
                prog = state.steps.get(step) if state else None
                if prog is not None:
                    s = prog.state()
                    if s == pb.STEP_STATE_FAILED or STATE_ORDER.get(s, 0) >= STATE_ORDER[target]:
                        return s, prog.error
                    if target == pb.STEP_STATE_PROTECTED and prog.protection_error:
                        return pb.STEP_STATE_FAILED, prog.protection_error
                left = deadline - time.monotonic()
                if left <= 0:
                    return (prog.state() if prog else pb.STEP_STATE_UNSPECIFIED), ""
                self._changed.wait(min(left, 1.0))

    def progress(self, job: str, step: int) -> StepProgress | None:
        with self._lock:
            state = self.jobs.get(job)
            return state.steps.get(step) if state else None

    # ------------------------------------------------------------------ views
    def local_snapshots(self, job: str, data_address: str, generation: int, n: int,
                        m: int) -> pb.LocalSnapshotsResponse:
        """What this daemon holds of ``job`` (only committed, current generations)."""
        with self._lock:
            state = self.jobs.get(job)
            snaps, steps = [], []
            if state is not None:
                for rank, (gen, desc) in sorted(state.descriptors.items()):
                    slot = state.store._slots.get(rank)
                    if slot is None or slot.committed is None or slot.committed[0] != gen:
                        continue  # discarded or superseded since
                    seg = slot.segments[slot.committed[1]]
                    snaps.append(pb.RankSnapshot(
                        rank=rank, step=desc.step, generation=gen, nbytes=desc.nbytes,
                        node=self.node, data_address=data_address,
                        descriptor_json=desc.dumps(), segment_path=seg.path if seg else ""))
                steps = [p.to_pb(self.node, n, m) for _, p in sorted(state.steps.items())]
        return pb.LocalSnapshotsResponse(
            node=self.node, generation=generation, data_address=data_address,
            snapshots=snaps, steps=steps, memory_used_bytes=self.memory_used(),
            memory_budget_bytes=self.budget_bytes)

    def snapshot(self, job: str, rank: int, generation: int) -> CompleteSnapshot:
        """The committed snapshot of ``(job, rank)`` if it still is ``generation``, pinned.

        ``BlobNotFoundError`` otherwise: a superseded, discarded or unknown snapshot is
        never served under another generation's name.
        """
        state = self._job(job)
        slot = state.store._slots.get(rank) if state is not None else None
        snap = slot.latest(verify=False) if slot is not None else None
        if snap is None or snap.info.generation != generation:
            if snap is not None:
                snap.release()
            raise BlobNotFoundError(f"snap/{job}/{rank}/{generation}")
        return snap

    def _job(self, job: str, create: bool = False) -> JobState | None:
        with self._lock:
            state = self.jobs.get(job)
            if state is None and create:
                check_job_id(job)
                store = SnapshotStore(self.shm_dir, job, self.budget_bytes, group=self.group)
                state = self.jobs[job] = JobState(store)
            return state


class DaemonBlobs:
    """The data channel's ``BlobStore``: routes keys by their first component.

    ``snap/{job}/{rank}/{generation}``: a committed snapshot's payload (read-only).
    Other prefixes are registered with :meth:`route` by the parts that own them.
    Writes (``begin_put``) are refused: peers pull, nobody pushes into snapshots.
    """

    PIN_IDLE_S = 2.0  # a snapshot being served stays pinned until idle this long

    def __init__(self, service: SnapshotService) -> None:
        self.service = service
        self._routes: dict[str, Any] = {}
        self._pins: dict[str, tuple[CompleteSnapshot, float]] = {}
        self._pin_lock = threading.Lock()

    def route(self, prefix: str, store: Any) -> None:
        """Serve keys ``{prefix}/...`` from ``store`` (a BlobSource)."""
        self._routes[prefix] = store

    def size(self, key: str) -> int:
        sub = self._sub(key)
        if sub is not None:
            return int(sub.size(key))
        return self._pinned(key).info.nbytes

    def read(self, key: str, start: int, end: int) -> memoryview:
        sub = self._sub(key)
        if sub is not None:
            return sub.read(key, start, end)
        snap = self._pinned(key)
        n = snap.info.nbytes
        if not 0 <= start <= end <= n:
            from ckptd.daemon.datachannel import RangeError

            raise RangeError(f"{key}: range [{start}, {end}) outside {n} bytes")
        # Zero copy: the snapshot stays pinned while it is being served (see _pinned), so
        # no new save can reuse its buffer under the bytes on their way.
        return memoryview(snap.view().numpy())[start:end]

    def _pinned(self, key: str) -> CompleteSnapshot:
        """The snapshot of a ``snap/`` key, pinned until idle for ``PIN_IDLE_S`` (a load
        reads it in thousands of frames: one pin, not one per frame)."""
        now = time.monotonic()
        with self._pin_lock:
            for k, (s, used) in list(self._pins.items()):
                if now - used > self.PIN_IDLE_S and k != key:
                    del self._pins[k]
                    s.release()
            hit = self._pins.get(key)
            if hit is not None:
                self._pins[key] = (hit[0], now)
                return hit[0]
        job, rank, gen = _snap_key(key)
        snap = self.service.snapshot(job, rank, gen)
        with self._pin_lock:
            if key in self._pins:  # another thread pinned it meanwhile
                snap.release()
                return self._pins[key][0]
            self._pins[key] = (snap, now)
        return snap

    def release_idle(self) -> None:
        """Unpin snapshots nobody read for ``PIN_IDLE_S`` (called by the daemon's timer and
        by a begin that waits for a pinned buffer)."""
        now = time.monotonic()
        with self._pin_lock:
            for k, (s, used) in list(self._pins.items()):
                if now - used > self.PIN_IDLE_S:
                    del self._pins[k]
                    s.release()

    def close(self) -> None:
        """Release every pin (daemon shutdown)."""
        with self._pin_lock:
            pins, self._pins = list(self._pins.values()), {}
        for s, _ in pins:
            s.release()

    def begin_put(self, key: str, nbytes: int) -> Any:
        raise PermissionError(f"{key}: the daemon's data channel is read-only")

    def _sub(self, key: str) -> Any | None:
        head = key.split("/", 1)[0]
        if head == "snap":
            return None
        sub = self._routes.get(head)
        if sub is None:
            raise BlobNotFoundError(key)
        return sub


def _snap_key(key: str) -> tuple[str, int, int]:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "snap" or not parts[2].isdigit() or not parts[3].isdigit():
        raise BlobNotFoundError(key)
    return check_job_id(parts[1]), int(parts[2]), int(parts[3])


def grpc_error_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a service error maps to (typed errors keep their meaning)."""
    if isinstance(exc, StagingBudgetError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, SnapshotBusyError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, InvalidKeyError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (SnapshotError, CkptError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
