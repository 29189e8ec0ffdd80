"""The save pipeline of one rank: plan (cached per layout), stage, persist, commit.

``Saver.save`` blocks only while tensors are copied into reused staging memory; a
single background thread per process then exchanges boundary regions, writes chunks,
and takes part in the commit, so background collectives stay in order. Rank 0 is the
coordinator: it writes the manifest and the commit marker once every rank reported
its chunks durable, then applies retention in yet another thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.config import Config
from ckpt.daemon_client import DaemonClient, job_id_for
from ckpt.dist import DistContext, describe, raise_if_failed
from ckpt.staging import Arena, ArenaPool, arena_bytes
from ckptd import snapshot
from ckptd.dtypes import torch_dtype
from ckptd.errors import CkptError, CommitConflictError, InvalidKeyError, SaveFailedError
from ckptd.execute import ChunkRecipe, assemble_chunk, chunk_recipes, piece_view, transfer_payload
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy, sample_sizes
from ckptd.formats.manifest import ChunkRecord, TensorRecord
from ckptd.formats.manifest_build import build_manifest, commit_manifest, layouts_digest
from ckptd.formats.retention import BackgroundGC
from ckptd.formats.storage import Storage
from ckptd.formats.writer import CheckpointWriter
from ckptd.fragments import RankLayout, layout_from_json, layout_to_json
from ckptd.layout import Layout, build_rank_layout, local_tensor
from ckptd.planner import RankSavePlan, SavePlan, build_save_plan
from ckptd.rng import capture_rng
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.snapshot import PayloadPiece, build_descriptor, payload_nbytes, payload_pieces
from ckptd.statedict import FlatState, flatten_state

log = logging.getLogger("ckpt.save")


@dataclass(frozen=True)
class SaveResult:
    """Outcome of a finished save."""

    step: int
    root: str
    bytes_written: int
    stall_s: float
    total_s: float
    committed: bool


class SaveHandle:
    """Returned by ``ckpt.save``: ``wait()`` returns the result or raises its error."""

    def __init__(self, step: int, future: Future[SaveResult], stall_s: float) -> None:
        self.step = step
        self.stall_s = stall_s
        self._future = future
        self.error_raised = False  # wait() already raised this save's error to a caller

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the checkpoint is committed (or failed: the error is raised here)."""
        try:
            return self._future.result(timeout)
        except BaseException:
            self.error_raised = self._future.done()  # not on a wait() timeout
            raise

    def done(self) -> bool:
        return self._future.done()


@dataclass(frozen=True)
class PlanEntry:
    """A global plan and everything derived from it for this rank (cached per layout)."""

    plan: SavePlan
    rank_plan: RankSavePlan
    recipes: tuple[ChunkRecipe, ...]
    records: dict[str, TensorRecord]  # without chunks
    meta_owned: tuple[str, ...]  # unpacked arrays whose zarr.json this rank writes
    specs: tuple[tuple[str, tuple[int, ...]], ...]  # staged pieces, then receive buffers
    nbytes: int
    layouts: tuple[RankLayout, ...]
    payload: tuple[PayloadPiece, ...]  # staged pieces laid out in a daemon snapshot


@dataclass
class _Job:
    step: int
    storage: Storage
    root: str
    entry: PlanEntry
    arena: Arena | None
    views: list[torch.Tensor]
    rng: dict[str, Any]
    objects: dict[str, Any]
    coords_key: str
    started: float
    stall_s: float


class Saver:
    """Per-process save machinery: plan cache, staging pool, background worker."""

    def __init__(self, config: Config, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self._pool = ArenaPool(config.max_inflight_saves, config.staging_budget_bytes)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ckpt-persist")
        self._plans: dict[tuple[str, ...], PlanEntry] = {}
        self._layouts: dict[Any, tuple[RankLayout, str]] = {}
        self._pending: list[SaveHandle] = []
        self._inflight_steps: set[int] = set()
        self._lock = threading.Lock()
        self._gcs: dict[str, BackgroundGC] = {}
        self.daemon: DaemonClient | None = (
            DaemonClient(config.daemon_socket, config.daemon_token)
            if config.daemon_socket else None
        )
        self._descriptors: dict[tuple[int, tuple[str, ...], str, str], bytes] = {}

    # ------------------------------------------------------------------ caller's thread
    def save(
        self,
        state: dict[str, Any],
        step: int,
        storage: Storage,
        root: str,
        layout: Layout | None,
        blocking: bool,
    ) -> SaveHandle:
        """Stage ``state`` and hand it to the background worker (see module docstring)."""
        t0 = time.perf_counter()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidKeyError(f"step must be a non-negative int, got {step!r}")
        err: BaseException | None = None
        lay: RankLayout | None = None
        flat: FlatState | None = None
        node = ""
        try:
            flat = flatten_state(state)
            lay, digest = self._rank_layout(flat, layout)
            node = self.daemon.node if self.daemon is not None else ""
        except CkptError as e:
            err, digest = e, ""
        gathered = self.ctx.all_gather((digest, describe(err) if err else None, node))
        raise_if_failed(f"save of step {step} (layout)", [g[1] for g in gathered], err)
        assert lay is not None and flat is not None
        entry = self._plan(tuple(g[0] for g in gathered), lay, flat, self.config.codec_for(root))
        if self.daemon is not None:
            nodes = tuple(g[2] for g in gathered)
            return self._save_to_daemon(flat, entry, lay, nodes, step, root, t0, blocking)

        rng = {k: capture_rng(flat.rng_object(k).include_cuda) for k in flat.rng_keys}
        objects = json.loads(json.dumps(flat.objects))  # a snapshot, not live references
        sources = [
            piece_view(local_tensor(flat.tensors[sp.key]), sp.piece)
            for sp in entry.rank_plan.staged
        ]
        arena: Arena | None = None
        if blocking and all(t.device.type == "cpu" for t in sources):
            # The caller waits until the bytes are durable, so nothing can change under
            # the writer: write straight from the live tensors, no staging copy at all.
            views = sources + [
                torch.empty(shape, dtype=torch_dtype(dt))
                for dt, shape in entry.specs[len(sources) :]
            ]
        else:
            arena = self._pool.acquire(entry.nbytes)
            try:
                views = arena.views(entry.specs)
                for src, dst in zip(sources, views):
                    dst.copy_(src)
            except BaseException:
                self._pool.release(arena)
                raise
        stall = time.perf_counter() - t0
        job = _Job(
            step, storage, root, entry, arena, views, rng, objects, lay.coords_key(), t0, stall
        )
        with self._lock:
            self._inflight_steps.add(step)
        return self._track(self._worker.submit(self._persist, job), step, stall, blocking)

    def _save_to_daemon(
        self,
        flat: FlatState,
        entry: PlanEntry,
        lay: RankLayout,
        nodes: tuple[str, ...],
        step: int,
        root: str,
        t0: float,
        blocking: bool,
    ) -> SaveHandle:
        """Copy the staged pieces into this rank's shared-memory buffer and commit it.

        The one copy of the save goes straight into memory the daemon owns; the daemon
        then protects and persists it, and ``wait()`` asks it how far the step got.
        """
        assert self.daemon is not None
        job = job_id_for(root, self.config.job_id)
        static = self._descriptor_static(entry, nodes, root, job, lay.coords_key())
        rng = {k: capture_rng(flat.rng_object(k).include_cuda) for k in flat.rng_keys}
        objects = json.loads(json.dumps(flat.objects))
        pieces = entry.payload
        nbytes = payload_nbytes(pieces)
        lease, buf = self.daemon.begin(job, self.ctx.rank, step, nbytes)
        try:
            for sp, pp in zip(entry.rank_plan.staged, pieces):
                src = piece_view(local_tensor(flat.tensors[sp.key]), sp.piece)
                dst = buf[pp.offset : pp.offset + pp.nbytes].view(torch_dtype(pp.dtype))
                dst.view(src.shape).copy_(src)
        finally:
            del buf  # the mapping stays (reused); no view of it outlives the copy
        # The plan's part is encoded once per plan (static); only these fields change.
        tail = json.dumps({"step": step, "rng": rng, "objects": objects}, separators=(",", ":"))
        self.daemon.commit(lease, static + b"," + tail[1:].encode())
        stall = time.perf_counter() - t0
        fut = self._worker.submit(self._await_daemon, job, step, root, nbytes, t0, stall)
        return self._track(fut, step, stall, blocking)

    def _track(
        self, fut: Future[SaveResult], step: int, stall: float, blocking: bool
    ) -> SaveHandle:
        """The handle of a save handed to the worker; remembered for ``wait_all``."""
        handle = SaveHandle(step, fut, stall)
        with self._lock:
            self._pending = [h for h in self._pending if not h.done()] + [handle]
        if blocking:
            handle.wait()
        return handle

    def _descriptor_static(
        self, entry: PlanEntry, nodes: tuple[str, ...], root: str, job: str, coords: str
    ) -> bytes:
        """The descriptor fields that only change with the plan, as the JSON text of an
        object without its closing brace (cached: encoding a large plan costs
        milliseconds that would otherwise be in every stall)."""
        key = (id(entry), nodes, root, job)
        hit = self._descriptors.get(key)
        if hit is None:
            desc = build_descriptor(
                entry.plan, self.ctx.rank, entry.layouts, entry.records, job=job, step=0,
                nodes=nodes, root=root, digest=layouts_digest(entry.layouts),
            )
            obj = desc.to_json()
            for k in ("step", "rng", "objects"):  # per save: appended by _save_to_daemon
                obj.pop(k)
            hit = json.dumps(obj, separators=(",", ":")).encode()[:-1]  # open: no "}"
            self._descriptors = {key: hit}  # one plan at a time, like the plan cache
        return hit

    def _await_daemon(
        self, job: str, step: int, root: str, nbytes: int, t0: float, stall: float
    ) -> SaveResult:
        """Wait until the daemon reports the configured state of the step (or its error)."""
        assert self.daemon is not None
        target = _WAIT_STATES[self.config.daemon_wait]
        deadline = time.monotonic() + self.config.daemon_wait_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"save of step {step}: the daemon did not reach "
                    f"{self.config.daemon_wait!r} within {self.config.daemon_wait_timeout_s} s")
            state, error = self.daemon.wait_step(job, step, target, min(left, 60.0))
            if error or state == pb.STEP_STATE_FAILED:
                raise SaveFailedError(f"save of step {step} through ckptd failed: {error}")
            if _STATE_RANK.get(state, 0) >= _STATE_RANK[target]:
                committed = state == pb.STEP_STATE_COMMITTED
                return SaveResult(step, root, nbytes, stall, time.perf_counter() - t0, committed)

    def wait_all(self, timeout: float | None = None) -> list[SaveResult]:
        """Wait for every pending save; raises the first error."""
        with self._lock:
            pending = list(self._pending)
        # A failed save whose error a caller already got (a blocking save, or h.wait())
        # is not raised a second time by ckpt.wait()/shutdown().
        results = [h.wait(timeout) for h in pending if not h.error_raised]
        for gc in list(self._gcs.values()):
            gc.drain(timeout)
        return results

    def close(self) -> None:
        """Finish pending work and stop the worker threads."""
        try:
            self.wait_all()
        finally:
            self._worker.shutdown(wait=True)
            for gc in self._gcs.values():
                gc.close()
            if self.daemon is not None:
                self.daemon.close()

    def _rank_layout(self, flat: FlatState, layout: Layout | None) -> tuple[RankLayout, str]:
        """This rank's layout and its digest, cached by a cheap signature of the state.

        Resolving placements and hashing the layout cost ~0.1 s per 1,000 tensors, a
        third of a save's stall; they only change when keys, shapes, dtypes, DTensor
        placements or the Layout object change (Layouts are treated as immutable).
        """
        sig = (
            id(layout),
            tuple(
                (k, tuple(t.shape), t.dtype, getattr(t, "placements", None))
                for k, t in flat.tensors.items()
            ),
        )
        hit = self._layouts.get(sig)
        if hit is None:
            lay = build_rank_layout(flat, layout, self.ctx.rank)
            hit = (lay, lay.digest())
            # One entry: a new layout replaces the old; keep the Layout object alive so
            # that its id() is not reused by another object while cached.
            self._layouts = {sig: hit}
            self._layout_ref = layout
        return hit

    def _plan(
        self, digests: tuple[str, ...], lay: RankLayout, flat: FlatState, policy: CodecPolicy
    ) -> PlanEntry:
        key = (*digests, policy.codec, str(policy.level))
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        samples = _compressibility(lay, flat, policy) if policy.codec == "auto" else {}
        raw = self.ctx.all_gather((layout_to_json(lay), samples))
        layouts = tuple(layout_from_json(o) for o, _ in raw)
        plan = build_save_plan(layouts, self.config.plan, validated=True)
        totals: dict[str, list[int]] = {}
        for _, smp in raw:
            for name, (c, n) in smp.items():
                acc = totals.setdefault(name, [0, 0])
                acc[0] += c
                acc[1] += n
        codecs = {name: policy.choose(*totals.get(name, (0, 0))) for name in plan.tensors}
        entry = _derive(plan, self.ctx.rank, layouts, self.config, policy, codecs)
        self._plans = {key: entry}  # one layout at a time; a new layout replaces it
        return entry

    # ---------------------------------------------------------------- background thread
    def _persist(self, job: _Job) -> SaveResult:
        status: str | None = None
        records: list[tuple[str, ChunkRecord]] = []
        written = 0
        local_exc: BaseException | None = None
        try:
            records, written = self._write(job)
        except BaseException as e:  # reported to every rank below, raised in wait()
            local_exc, status = e, describe(e)
        finally:
            if job.arena is not None:
                self._pool.release(job.arena)
        payload = {
            "status": status,
            "chunks": [[n, c.to_json()] for n, c in records],
            "rng": job.rng,
            "objects": job.objects,
            "coords": job.coords_key,
            "rank": self.ctx.rank,
            "bytes": written,
        }
        try:
            gathered = self.ctx.gather(payload)
            outcome: dict[str, Any] = {"failures": {}}
            if self.ctx.rank == 0:
                assert gathered is not None
                outcome = self._commit(job, gathered)
            outcome = self.ctx.broadcast(outcome)
        finally:
            with self._lock:
                self._inflight_steps.discard(job.step)
        failures = {int(r): m for r, m in outcome["failures"].items()}
        if failures:
            statuses = [failures.get(r) for r in range(self.ctx.world)]
            raise_if_failed(f"save of step {job.step}", statuses, local_exc)
        return SaveResult(
            job.step,
            job.root,
            int(outcome.get("bytes", written)),
            job.stall_s,
            time.perf_counter() - job.started,
            True,
        )

    def _write(self, job: _Job) -> tuple[list[tuple[str, ChunkRecord]], int]:
        entry, rp = job.entry, job.entry.rank_plan
        staged = job.views[: len(rp.staged)]
        received = job.views[len(rp.staged) :]
        sends = [(t, transfer_payload(t, rp, staged)) for t in rp.sends]
        self.ctx.exchange(sends, list(zip(rp.recvs, received)))
        # Every rank, before its first byte: never overwrite a committed step (its chunks
        # and manifest would no longer match its marker). After the exchange, so that no
        # peer is left waiting; every rank sees the same marker and fails alike.
        if commit_mod.is_committed(job.storage, job.step):
            raise CommitConflictError(
                f"step {job.step} is already committed in {job.storage.url}; a committed "
                "checkpoint is never overwritten: save under a new step, or delete it first"
            )
        policy = self.config.codec_for(job.root)
        writer = CheckpointWriter(job.storage, job.step, self.ctx.rank, policy, self.config.writer)
        try:
            for name in entry.meta_owned:
                writer.write_array_metadata(entry.records[name])
            for rec in entry.recipes:
                trec = entry.records[rec.task.name]
                writer.submit(
                    trec, rec.task.index, assemble_chunk(rec, trec.dtype, staged, received)
                )
            records = writer.finish()
        except BaseException:
            writer.abort()
            raise
        return records, writer.bytes_written

    def _commit(self, job: _Job, gathered: list[dict[str, Any]]) -> dict[str, Any]:
        """Coordinator: write the manifest and the commit marker, or clean up."""
        failures = {r: g["status"] for r, g in enumerate(gathered) if g["status"]}
        total = sum(int(g["bytes"]) for g in gathered)
        if not failures:
            try:
                manifest = build_manifest(
                    job.step, job.entry.records, gathered, layouts_digest(job.entry.layouts)
                )
                total += commit_manifest(job.storage, manifest)
            except BaseException as e:
                failures[0] = describe(e)
        if failures:
            try:  # nothing partial stays behind; never touches a committed step
                if not commit_mod.is_committed(job.storage, job.step):
                    job.storage.delete_prefix(commit_mod.step_dir(job.step))
            except Exception as e:  # leftovers are collected by retention later
                log.warning("could not clean up failed step %d: %s", job.step, e)
        else:
            self._retention(job)
        return {"failures": {str(r): m for r, m in failures.items()}, "bytes": total}

    def _retention(self, job: _Job) -> None:
        policy = self.config.retention
        if policy is None:
            return
        gc = self._gcs.get(job.root)
        if gc is None:
            gc = self._gcs[job.root] = BackgroundGC(
                job.storage, policy, in_progress=lambda: set(self._inflight_steps)
            )
        gc.submit()


def _derive(
    plan: SavePlan,
    rank: int,
    layouts: tuple[RankLayout, ...],
    config: Config,
    policy: CodecPolicy,
    codecs: dict[str, str],
) -> PlanEntry:
    rp = plan.for_rank(rank)
    records = snapshot.array_records(plan, codecs, policy.level, config.writer)
    meta_owned = snapshot.meta_owned(plan, rank, records)
    metas = {n: tp.meta for n, tp in plan.tensors.items()}
    specs = tuple(
        [(metas[s.piece.name].dtype, s.piece.global_box.lengths) for s in rp.staged]
        + [(metas[t.name].dtype, t.box.lengths) for t in rp.recvs]
    )
    payload = tuple(payload_pieces(rp.staged, metas))
    return PlanEntry(
        plan, rp, chunk_recipes(rp), records, meta_owned, specs, arena_bytes(specs), layouts,
        payload,
    )


def _compressibility(
    lay: RankLayout, flat: FlatState, policy: CodecPolicy
) -> dict[str, tuple[int, int]]:
    """Per logical tensor, (compressed, raw) bytes of samples of this rank's data."""
    out: dict[str, tuple[int, int]] = {}
    for e in lay.entries:
        t = local_tensor(flat.tensors[e.key])
        if t.numel() == 0:
            continue
        flat_t = t.detach().reshape(-1)[: (1 << 20) // max(1, t.element_size())]
        data = flat_t.cpu().contiguous().view(torch.uint8).numpy()
        c, n = sample_sizes(memoryview(data).cast("B"), policy.level)
        for name in {p.name for p in e.pieces}:
            prev = out.get(name, (0, 0))
            out[name] = (prev[0] + c, prev[1] + n)
    return out


_WAIT_STATES = {
    "staged": pb.STEP_STATE_STAGED,
    "protected": pb.STEP_STATE_PROTECTED,
    "committed": pb.STEP_STATE_COMMITTED,
}
_STATE_RANK: dict[int, int] = {
    pb.STEP_STATE_STAGED: 1,
    pb.STEP_STATE_PROTECTED: 2,
    pb.STEP_STATE_PERSISTED: 3,
    pb.STEP_STATE_COMMITTED: 4,
}
