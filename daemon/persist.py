"""Persistence of in-memory snapshots to the universal format, without the trainers.

A daemon holding rank r's snapshot (payload + :class:`~ckptd.snapshot.SnapshotDescriptor`)
writes exactly what the in-process pipeline (``ckpt.saver``) would have written for r:
the chunks of ``desc.plan.chunks`` (built by the same ``chunk_recipes``/``assemble_chunk``)
and the array metadata of ``desc.meta_owned``. Chunks that span several ranks need
regions that other ranks' snapshots hold (``desc.plan.recvs``); they are *pulled* from
the daemons holding those snapshots, which answer with :func:`send_payload`.

Protocol of one step (who calls what, in order):

1. every daemon, for each of its ranks' snapshots, in the background:
   :func:`persist_rank` -> a rank report (never raises; ``status`` says what failed).
   Meanwhile it answers other daemons' pulls with :func:`send_payload` (any thread);
   a pull names ``(src rank, dst rank, index)`` as given by :func:`recv_source`.
2. every daemon sends its reports to the coordinator (the daemon of rank 0);
3. the coordinator, once it has every rank's report: :func:`commit_step` -> manifest and
   commit marker, or removal of the partial step; retention then runs in the background
   (a :class:`~ckptd.formats.retention.BackgroundGC` it passes in);
4. the coordinator tells every daemon the :class:`Outcome`.

Pure of networking: the caller passes the pull as a callable and carries the reports.
The payload must stay valid (the snapshot pinned) until :func:`persist_rank` returns and
while :func:`send_payload` answers for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptd.daemon.ratelimit import ThrottledStorage, TokenBucket
from ckptd.dtypes import torch_dtype
from ckptd.errors import CommitConflictError, IntegrityError, InvalidKeyError
from ckptd.execute import assemble_chunk, chunk_recipes, transfer_payload
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.manifest import ChunkRecord
from ckptd.formats.manifest_build import (
    build_manifest,
    commit_manifest,
    describe,
    merge_records,
    record_json,
)
from ckptd.formats.retention import BackgroundGC
from ckptd.formats.storage import Storage
from ckptd.formats.writer import CheckpointWriter, WriterOptions
from ckptd.planner import RankSavePlan, Transfer
from ckptd.snapshot import SnapshotDescriptor

log = logging.getLogger("ckptd.persist")

FetchRecv = Callable[[int, Transfer], torch.Tensor]


# ------------------------------------------------------------------- payload views


def staged_views(desc: SnapshotDescriptor, payload: torch.Tensor) -> list[torch.Tensor]:
    """Typed views of ``desc.pieces`` over the uint8 ``payload`` (zero copy), each shaped
    as its global box: ``staged_views(...)[i]`` is ``plan.staged[i]``'s data."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
        raise InvalidKeyError(
            f"snapshot payload must be a contiguous 1-D uint8 tensor, got {payload.dtype} "
            f"{tuple(payload.shape)}"
        )
    end = max((p.offset + p.nbytes for p in desc.pieces), default=0)
    if payload.numel() < end:
        raise InvalidKeyError(
            f"snapshot payload of job {desc.job!r} step {desc.step} rank {desc.rank} has "
            f"{payload.numel()} bytes, its descriptor needs {end}"
        )
    views = []
    for p in desc.pieces:
        raw = payload[p.offset : p.offset + p.nbytes]
        # Offsets are 64-byte aligned (SnapshotDescriptor.check), so every dtype view works.
        views.append(raw.view(torch_dtype(p.dtype)).view(p.global_box.lengths))
    return views


def sends_to(plan: RankSavePlan, dst: int) -> list[Transfer]:
    """The transfers ``plan.rank`` sends to ``dst``, in plan order (the pull index order)."""
    return [t for t in plan.sends if t.dst == dst]


def recv_source(plan: RankSavePlan, i: int) -> tuple[int, int]:
    """``(src rank, index)`` of ``plan.recvs[i]`` on the sender's side.

    The planner lists a transfer once and files it under the sender's ``sends`` and the
    receiver's ``recvs`` in the same order, so the k-th receive from ``src`` is the k-th
    send of ``src`` to this rank (what the in-process point-to-point exchange relies on).
    """
    t = plan.recvs[i]
    return t.src, sum(1 for u in plan.recvs[:i] if u.src == t.src)


def send_payload(
    desc: SnapshotDescriptor,
    payload: torch.Tensor,
    dst_rank: int,
    index: int,
    expect: Transfer | None = None,
) -> torch.Tensor:
    """What this rank's snapshot sends as its ``index``-th transfer to ``dst_rank``: the
    region's elements, contiguous, shaped as the transfer's box (the sender of a pull).

    ``expect``, if the puller sent its view of the transfer, must match ours: a mismatch
    means the two snapshots are not of one plan, and wrong bytes must not be written.
    """
    mine = sends_to(desc.plan, dst_rank)
    if not 0 <= index < len(mine):
        raise InvalidKeyError(
            f"rank {desc.rank} of step {desc.step} sends {len(mine)} region(s) to rank "
            f"{dst_rank}, not #{index}"
        )
    t = mine[index]
    if expect is not None and expect != t:
        raise IntegrityError(
            f"pull #{index} from rank {desc.rank} to {dst_rank} of step {desc.step} expects "
            f"{expect}, the snapshot sends {t}: the snapshots are not of one save plan"
        )
    return transfer_payload(t, desc.plan, staged_views(desc, payload))


# ----------------------------------------------------------------------- one rank


def persist_rank(
    desc: SnapshotDescriptor,
    payload: torch.Tensor,
    storage: Storage,
    fetch_recv: FetchRecv,
    policy: CodecPolicy,
    writer_options: WriterOptions | None = None,
    limiter: TokenBucket | None = None,
) -> dict[str, Any]:
    """Write rank ``desc.rank``'s chunks and owned array metadata of ``desc.step``; return
    its report (see :mod:`ckptd.formats.manifest_build`).

    ``fetch_recv(i, transfer)`` returns ``desc.plan.recvs[i]``'s elements as a tensor of
    the transfer's box shape and dtype (pulled from the daemon of ``transfer.src``, which
    answers with :func:`send_payload`; see :func:`recv_source`). Every receive is fetched
    before the first byte is written, so a missing peer fails the rank early. Chunk and
    pack writes are paced by ``limiter``. A step that is already committed is refused
    (``CommitConflictError``): its chunks would no longer match its marker.

    Never raises (except ``BaseException``s such as ``KeyboardInterrupt``): a failure is
    the report's ``status`` so that the coordinator can clean the step up.
    """
    t0 = time.perf_counter()
    status: str | None = None
    chunks: list[tuple[str, ChunkRecord]] = []
    written = 0
    try:
        opts = writer_options if writer_options is not None else WriterOptions()
        chunks, written = _write(desc, payload, storage, fetch_recv, policy, opts, limiter)
    except Exception as e:
        status = describe(e)
        log.warning(
            "persisting step %d rank %d of job %r failed: %s",
            desc.step, desc.rank, desc.job, status,
        )
    return {
        "rank": desc.rank,
        "status": status,
        "chunks": [[n, c.to_json()] for n, c in chunks],
        "rng": desc.rng,
        "objects": desc.objects,
        "coords": desc.coords,
        "bytes": written,
        # The coordinator knows only its own descriptor: every rank vouches for the array
        # records of what it wrote (rank 0 also for chunkless tensors).
        "records": {n: record_json(r) for n, r in desc.records.items()},
        "seconds": time.perf_counter() - t0,
    }


def _write(
    desc: SnapshotDescriptor,
    payload: torch.Tensor,
    storage: Storage,
    fetch_recv: FetchRecv,
    policy: CodecPolicy,
    writer_options: WriterOptions,
    limiter: TokenBucket | None,
) -> tuple[list[tuple[str, ChunkRecord]], int]:
    plan = desc.plan
    if commit_mod.is_committed(storage, desc.step):
        raise CommitConflictError(
            f"step {desc.step} is already committed in {storage.url}; a committed "
            "checkpoint is never overwritten: save under a new step, or delete it first"
        )
    staged = staged_views(desc, payload)
    received = [_checked_recv(desc, i, t, fetch_recv(i, t)) for i, t in enumerate(plan.recvs)]
    target: Storage = ThrottledStorage(storage, limiter) if limiter is not None else storage
    writer = CheckpointWriter(target, desc.step, desc.rank, policy, writer_options)
    try:
        for name in desc.meta_owned:
            writer.write_array_metadata(desc.records[name])
        for rec in chunk_recipes(plan):
            trec = desc.records[rec.task.name]
            writer.submit(trec, rec.task.index, assemble_chunk(rec, trec.dtype, staged, received))
        records = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return records, writer.bytes_written


def _checked_recv(
    desc: SnapshotDescriptor, i: int, t: Transfer, got: torch.Tensor
) -> torch.Tensor:
    """A pulled region, checked: wrong bytes must fail the rank, not land in a chunk."""
    want = torch_dtype(desc.metas[t.name].dtype)
    if got.dtype != want or tuple(got.shape) != tuple(t.box.lengths):
        raise IntegrityError(
            f"receive #{i} of rank {desc.rank} ({t.name!r} {t.box} from rank {t.src}) came "
            f"back as {got.dtype} {tuple(got.shape)}, expected {want} {t.box.lengths}"
        )
    return got if got.is_contiguous() else got.contiguous()


# ------------------------------------------------------------------- coordinator


@dataclass(frozen=True)
class Outcome:
    """What the coordinator decided for a step (sent back to every daemon)."""

    step: int
    committed: bool
    failures: dict[int, str] = field(default_factory=dict)  # rank -> error, one line
    bytes_written: int = 0  # every rank's stored bytes plus the manifest

    @property
    def error(self) -> str:
        """Every failure, one line ("" when committed)."""
        return "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "committed": self.committed,
            "failures": {str(r): m for r, m in self.failures.items()},
            "bytes": self.bytes_written,
        }


def commit_step(
    storage: Storage,
    step: int,
    world: int,
    reports: Sequence[Mapping[str, Any]],
    layouts_digest: str,
    *,
    tensors: Collection[str] | None = None,
    gc: BackgroundGC | None = None,
) -> Outcome:
    """Coordinator: commit ``step`` from every rank's report, or clean the step up.

    Call once every rank ``0..world-1`` reported (any order). If every status is None,
    writes the manifest (built by :func:`~ckptd.formats.manifest_build.build_manifest`
    from the reports' records and chunks) and then the commit marker; otherwise -- or if
    that fails -- deletes the step's directory unless the step is committed (a committed
    step is never touched, also not by the manifest write). On success, ``gc`` (if any)
    is asked for a retention run, which happens in its thread: the save never waits.
    ``tensors`` (every logical tensor of the save, e.g. the coordinator's
    ``desc.metas``) turns a tensor missing from every report into a failure.
    """
    failures: dict[int, str] = {}
    ordered: list[Mapping[str, Any]] = []
    by_rank: dict[int, Mapping[str, Any]] = {}
    total = 0
    for rep in reports:
        try:
            r = int(rep["rank"])
            total += int(rep.get("bytes", 0))
        except (KeyError, TypeError, ValueError) as e:
            failures[0] = f"IntegrityError: malformed report ({type(e).__name__}: {e})"
            continue
        if not 0 <= r < world or r in by_rank:
            failures[0] = f"IntegrityError: report of rank {r} is out of range or duplicated"
        by_rank[r] = rep
    for r in range(world):
        got = by_rank.get(r)
        if got is None:
            failures[r] = f"no report from rank {r}"
        elif got.get("status"):
            failures[r] = str(got["status"])
        else:
            ordered.append(got)
    if not failures:
        try:
            if commit_mod.is_committed(storage, step):
                raise CommitConflictError(
                    f"step {step} is already committed in {storage.url}; not overwriting it"
                )
            manifest = build_manifest(
                step, merge_records(ordered), ordered, layouts_digest, tensors
            )
            total += commit_manifest(storage, manifest)
        except Exception as e:
            failures[0] = describe(e)
    if failures:
        _cleanup(storage, step)
        return Outcome(step, False, failures, total)
    if gc is not None:
        try:
            gc.submit()
        except Exception as e:  # a closed GC must not turn a committed save into a failure
            log.warning("retention after step %d not scheduled: %s", step, e)
    return Outcome(step, True, {}, total)


def _cleanup(storage: Storage, step: int) -> None:
    """Remove a failed step's leftovers; never a committed step."""
    try:
        if not commit_mod.is_committed(storage, step):
            storage.delete_prefix(commit_mod.step_dir(step))
    except Exception as e:  # leftovers are collected by retention later
        log.warning("could not clean up failed step %d: %s", step, e)
