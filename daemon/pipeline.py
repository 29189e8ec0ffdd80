"""What a daemon does with a step once it is STAGED: protect it, persist it, commit it.

One background thread per step (started by :class:`~ckptd.daemon.service.SnapshotService`'s
``on_staged`` hook), in order:

1. **protect**: erasure-code with the group (``protect`` callable; m = 0 marks the step
   protected at once: there is nothing to code);
2. **persist**: when the save named a root (or the daemon has one), write each local
   rank's chunks with :func:`~ckptd.daemon.persist.persist_rank`, pulling regions other
   ranks send from their daemons' data channel (``xfer/...`` keys, served here by
   :class:`TransferSource`), rate-limited by the daemon's token bucket;
3. **report** to the coordinator (the daemon of rank 0), again every ``REPORT_RETRY_S``
   until the coordinator's verdict arrives (a coordinator that restarted lost the
   reports it had), at most ``REPORT_ATTEMPTS`` times.

The coordinator (:class:`Coordinator`) collects every rank's report and runs
:func:`~ckptd.daemon.persist.commit_step` (manifest, commit marker, retention in the
background), then tells every daemon of the step. A step that is already committed in
storage (a daemon restarted after the commit and re-adopted its snapshots) is only
marked committed, never written again.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import torch

from ckptd.daemon.auth import bearer_metadata
from ckptd.daemon.datachannel import BlobNotFoundError, PeerLostError
from ckptd.daemon.logs import get_logger
from ckptd.daemon.persist import commit_step, persist_rank, recv_source, send_payload
from ckptd.daemon.ratelimit import ThrottledStorage, TokenBucket, limiter_from_config
from ckptd.daemon.service import StepProgress
from ckptd.daemon.transport import DataClient
from ckptd.dtypes import torch_dtype
from ckptd.errors import CkptError, InvalidKeyError
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.retention import BackgroundGC, RetentionPolicy
from ckptd.formats.storage import Storage, open_storage
from ckptd.planner import Transfer
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc
from ckptd.snapshot import SnapshotDescriptor

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon

log = get_logger("ckptd.daemon.pipeline")

PULL_DEADLINE_S = 120.0  # how long a pull waits for the sending rank's snapshot
REPORT_RETRY_S = 10.0
REPORT_ATTEMPTS = 60
RPC_TIMEOUT_S = 30.0
ProtectFn = Callable[[str, StepProgress], None]


class StepPipeline:
    """Runs steps 1-3 of the module docstring for every staged step of this daemon."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop) -> None:
        self.daemon = daemon
        self.loop = loop
        self.protect: ProtectFn | None = None  # set by the erasure part when m > 0
        self.release_older: Callable[[str, int], None] | None = None
        self.coordinator = Coordinator(self)
        self._storages: dict[str, Storage] = {}
        self._limiter: TokenBucket | None = None
        self._limiter_ready = False
        self._data: dict[str, DataClient] = {}
        self._lock = threading.Lock()
        self.persisting: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ entry point
    def on_staged(self, job: str, prog: StepProgress) -> None:
        """The service's hook: run the step's pipeline in its own thread."""
        threading.Thread(target=self._run, args=(job, prog), daemon=True,
                         name=f"ckptd-step-{prog.step}").start()

    def _run(self, job: str, prog: StepProgress) -> None:
        svc = self.daemon.snapshots
        step = prog.step
        try:
            try:
                self._protect(job, prog)
            except Exception as e:  # persistence goes on: storage still saves the step
                log.error("protection failed", job=job, step=step, error=str(e))
                svc.update(job, step, protection_error=f"{type(e).__name__}: {e}")
            root = self._root_of(job, prog)
            if root is None:
                return  # memory only: the step stays STAGED/PROTECTED here
            storage = self.storage(root)
            if commit_mod.is_committed(storage, step):
                svc.update(job, step, persisted=True, committed_to_storage=True)
            else:
                reports = self._persist(job, prog, storage)
                if all(not r["status"] for r in reports):
                    svc.update(job, step, persisted=True)
                self._report(job, prog, reports)
            done = svc.progress(job, step)
            if done is not None and done.committed_to_storage and self.release_older:
                self.release_older(job, step)  # storage holds it: older data may go
        except Exception as e:
            log.error("step pipeline failed", job=job, step=step, error=str(e))
            svc.update(job, step, error=f"{type(e).__name__}: {e}")

    def _protect(self, job: str, prog: StepProgress) -> None:
        cfg = self.daemon.config
        if cfg.erasure_m == 0 or self.protect is None:
            # Nothing to code (m = 0), or no erasure part: the step counts as protected as
            # far as it can be; status shows m, so nobody mistakes it for coded.
            self.daemon.snapshots.update(job, prog.step, protected=cfg.erasure_m == 0,
                                         group=(cfg.node_name,))
            return
        self.protect(job, prog)

    def _root_of(self, job: str, prog: StepProgress) -> str | None:
        desc = self._descriptor(job, min(prog.ranks))
        return desc.root or self.daemon.config.persistence_root

    # ------------------------------------------------------------------ persistence
    def storage(self, root: str) -> Storage:
        """The (cached) storage of ``root``, with the daemon's storage options and limiter."""
        with self._lock:
            st = self._storages.get(root)
            if st is None:
                cfg = self.daemon.config
                options = dict(cfg.storage_options) if root == cfg.persistence_root else {}
                inner = open_storage(root, **options)
                if not self._limiter_ready:
                    self._limiter = limiter_from_config(
                        cfg.rate_limit_bytes_per_s, cfg.rate_limit_share, storage=inner)
                    self._limiter_ready = True
                st = ThrottledStorage(inner, self._limiter) if self._limiter else inner
                self._storages[root] = st
            return st

    def _persist(self, job: str, prog: StepProgress, storage: Storage) -> list[dict[str, Any]]:
        svc = self.daemon.snapshots
        reports = []
        with self._lock:
            self.persisting.add((job, prog.step))
        try:
            for rank in sorted(prog.ranks):
                desc = self._descriptor(job, rank)
                snap = svc.snapshot(job, rank, prog.committed[rank])
                try:
                    payload = snap.view()
                    reports.append(persist_rank(
                        desc, payload, storage, functools.partial(self._pull, job, desc),
                        _codec_for(desc.root or ""), limiter=None))
                finally:
                    snap.release()
        finally:
            with self._lock:
                self.persisting.discard((job, prog.step))
        log.info("step persisted here", job=job, step=prog.step, ranks=sorted(prog.ranks),
                 failed=[r["rank"] for r in reports if r["status"]])
        return reports

    def _pull(self, job: str, desc: SnapshotDescriptor, i: int, t: Transfer) -> torch.Tensor:
        """``desc.plan.recvs[i]``: from this daemon's own snapshot, or a peer's."""
        src, index = recv_source(desc.plan, i)
        node = desc.nodes[src]
        dtype = torch_dtype(desc.metas[t.name].dtype)
        if node == self.daemon.config.node_name:
            src_desc = self._descriptor(job, src)
            gen = self.daemon.snapshots.progress(job, desc.step)
            snap = self.daemon.snapshots.snapshot(job, src, gen.committed[src] if gen else -1)
            try:
                return send_payload(src_desc, snap.view(), desc.rank, index, expect=t).clone()
            finally:
                snap.release()
        key = f"xfer/{job}/{desc.step}/{src}/{desc.rank}/{index}"
        nbytes = t.box.numel * dtype.itemsize
        out = torch.empty(nbytes, dtype=torch.uint8)
        deadline = time.monotonic() + PULL_DEADLINE_S
        delay = 0.05
        while True:
            try:
                client = self.data_client(node)
                client.get_range(key, 0, nbytes, out=memoryview(out.numpy()))
                return out.view(dtype).view(t.box.lengths)
            except (BlobNotFoundError, PeerLostError, LookupError) as e:
                # The sender's snapshot may not be committed yet (its trainer is a moment
                # behind), or the peer is restarting: bounded retries.
                if time.monotonic() + delay > deadline:
                    raise PeerLostError(f"pull {key} from {node}: {e}") from e
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def data_client(self, node: str) -> DataClient:
        """The pooled data-channel client of peer ``node`` (LookupError if unknown yet)."""
        peer = self.daemon.membership.peer_named(node)
        if peer is None or not peer.data_address:
            raise LookupError(f"peer {node!r} has not announced its data address yet")
        with self._lock:
            client = self._data.get(peer.data_address)
            if client is None:
                cfg = self.daemon.config
                token = (cfg.token.reveal() if cfg.token else "unauthenticated").encode()
                client = self._data[peer.data_address] = DataClient(peer.data_address, token)
            return client

    def _descriptor(self, job: str, rank: int) -> SnapshotDescriptor:
        state = self.daemon.snapshots.jobs.get(job)
        got = state.descriptors.get(rank) if state else None
        if got is None:
            raise InvalidKeyError(f"job {job}: no descriptor of rank {rank} on this daemon")
        return got[1]

    # ------------------------------------------------------------------ reports
    def _report(self, job: str, prog: StepProgress, reports: list[dict[str, Any]]) -> None:
        import json

        desc = self._descriptor(job, min(prog.ranks))
        coordinator = desc.nodes[0]
        request = pb.ReportPersistedRequest(
            job=job, step=prog.step, node=self.daemon.config.node_name,
            rank_reports_json=[json.dumps(r).encode() for r in reports])
        svc = self.daemon.snapshots
        for attempt in range(REPORT_ATTEMPTS):
            try:
                self.call_node(coordinator, "ReportPersisted", request)
            except (grpc.RpcError, LookupError, CkptError) as e:
                log.warning("report to the coordinator failed; retrying", job=job,
                            step=prog.step, coordinator=coordinator, error=str(e),
                            attempt=attempt)
            state, _ = svc.wait_step(job, prog.step, pb.STEP_STATE_COMMITTED, REPORT_RETRY_S)
            if state in (pb.STEP_STATE_COMMITTED, pb.STEP_STATE_FAILED):
                return
        svc.update(job, prog.step, error=f"no verdict from the coordinator {coordinator!r}")

    def call_node(self, node: str, method: str, request: Any) -> Any:
        """A Peer RPC to ``node`` (this daemon itself included), from any thread."""
        if node == self.daemon.config.node_name:
            if method == "ReportPersisted":
                reports = [__import__("json").loads(r) for r in request.rank_reports_json]
                fut = asyncio.run_coroutine_threadsafe(
                    self.coordinator.collect(request.job, request.step, request.node, reports),
                    self.loop)
                return fut.result(RPC_TIMEOUT_S)
            raise ValueError(method)
        peer = self.daemon.membership.peer_named(node)
        if peer is None:
            raise LookupError(f"node {node!r} is not a known peer")
        cfg = self.daemon.config

        async def call() -> Any:
            stub = pb_grpc.PeerStub(self.daemon.membership.channel(peer.address))
            return await getattr(stub, method)(request, timeout=RPC_TIMEOUT_S,
                                               metadata=bearer_metadata(cfg.token))

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(RPC_TIMEOUT_S + 5)


class Coordinator:
    """The daemon of rank 0: collects reports, commits, tells every daemon."""

    def __init__(self, pipeline: StepPipeline) -> None:
        self.pipeline = pipeline
        self._reports: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self._done: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self._gcs: dict[str, BackgroundGC] = {}

    async def collect(self, job: str, step: int, node: str, reports: list[dict[str, Any]]) -> None:
        """One node's reports of a step; commits once every rank reported."""
        pipe = self.pipeline
        key = (job, step)
        if key in self._done:  # a late or repeated report: re-announce the verdict
            await self._announce(job, step, node_only=node)
            return
        desc = pipe._descriptor(job, 0)  # raises if rank 0 is not ours
        if desc.step != step:
            raise InvalidKeyError(f"job {job}: this daemon's rank 0 holds step {desc.step}, "
                                  f"a report came for step {step}")
        got = self._reports.setdefault(key, {})
        for r in reports:
            got[int(r["rank"])] = r
        if len(got) < desc.world:
            return
        del self._reports[key]
        root = desc.root or pipe.daemon.config.persistence_root
        assert root is not None
        storage = pipe.storage(root)
        outcome = await asyncio.to_thread(
            commit_step, storage, step, desc.world, list(got.values()), desc.layouts_digest,
            tensors=set(desc.metas), gc=self._gc(root, storage))
        self._done[key] = outcome.committed
        while len(self._done) > 256:
            self._done.popitem(last=False)
        self._errors = getattr(self, "_errors", {})
        self._errors[key] = outcome.error
        log.info("step verdict", job=job, step=step, committed=outcome.committed,
                 error=outcome.error or None, bytes=outcome.bytes_written)
        await self._announce(job, step)

    async def _announce(self, job: str, step: int, node_only: str | None = None) -> None:
        pipe = self.pipeline
        key = (job, step)
        committed = self._done[key]
        error = getattr(self, "_errors", {}).get(key, "")
        request = pb.StepOutcomeRequest(job=job, step=step, committed=committed, error=error)
        svc = pipe.daemon.snapshots
        if committed:
            svc.update(job, step, persisted=True, committed_to_storage=True)
        else:
            svc.update(job, step, error=error or "persist failed")
        desc = pipe._descriptor(job, 0)
        me = pipe.daemon.config.node_name
        targets = sorted({n for n in desc.nodes if n != me})
        if node_only is not None:
            targets = [n for n in targets if n == node_only]
        cfg = pipe.daemon.config
        for node in targets:
            peer = pipe.daemon.membership.peer_named(node)
            if peer is None:
                log.warning("cannot announce a verdict to an unknown node", node=node)
                continue
            stub = pb_grpc.PeerStub(pipe.daemon.membership.channel(peer.address))
            try:
                await stub.StepOutcome(request, timeout=RPC_TIMEOUT_S,
                                       metadata=bearer_metadata(cfg.token))
            except grpc.aio.AioRpcError as e:  # it asks again with its next report
                log.warning("verdict not delivered", node=node, error=e.code().name)

    def _gc(self, root: str, storage: Storage) -> BackgroundGC | None:
        cfg = self.pipeline.daemon.config
        if cfg.keep_last == 0 and cfg.keep_every is None:
            return None
        gc = self._gcs.get(root)
        if gc is None:
            policy = RetentionPolicy(keep_last=cfg.keep_last, keep_every=cfg.keep_every)
            gc = self._gcs[root] = BackgroundGC(
                storage, policy, in_progress=lambda: {s for _, s in self.pipeline.persisting})
        return gc


class TransferSource:
    """Serves ``xfer/{job}/{step}/{src}/{dst}/{index}``: the ``index``-th region rank
    ``src``'s snapshot of ``step`` sends to rank ``dst`` (a persistence pull).

    The region is computed once per key and kept in a small LRU (the data channel reads
    it frame by frame).
    """

    def __init__(self, daemon: Daemon, cache_entries: int = 8) -> None:
        self.daemon = daemon
        self._cache: OrderedDict[str, memoryview] = OrderedDict()
        self._lock = threading.Lock()
        self._max = cache_entries

    def size(self, key: str) -> int:
        return len(self._bytes(key))

    def read(self, key: str, start: int, end: int) -> memoryview:
        return self._bytes(key)[start:end]

    def _bytes(self, key: str) -> memoryview:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        job, step, src, dst, index = _xfer_key(key)
        svc = self.daemon.snapshots
        prog = svc.progress(job, step)
        if prog is None or src not in prog.committed:
            raise BlobNotFoundError(key)
        state = svc.jobs[job]
        desc = state.descriptors[src][1]
        if desc.step != step:
            raise BlobNotFoundError(key)
        snap = svc.snapshot(job, src, prog.committed[src])
        try:
            t = send_payload(desc, snap.view(), dst, index)
            data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        finally:
            snap.release()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return data


def _xfer_key(key: str) -> tuple[str, int, int, int, int]:
    from ckptd.daemon.shm import check_job_id

    parts = key.split("/")
    if len(parts) != 6 or parts[0] != "xfer" or not all(p.isdigit() for p in parts[2:]):
        raise BlobNotFoundError(key)
    return check_job_id(parts[1]), *(int(p) for p in parts[2:])  # type: ignore[return-value]


def _codec_for(root: str) -> CodecPolicy:
    """The client's default codec choice for a root (local disk: auto; remote: stricter)."""
    local = "://" not in root or root.startswith("file://")
    return CodecPolicy() if local else CodecPolicy(min_ratio=1.05)
