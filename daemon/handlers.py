"""gRPC handlers of the snapshot path (mixed into the servicers of :mod:`.server`).

Blocking work (shared-memory growth, waiting for a buffer, waiting for a step) runs in
threads (``asyncio.to_thread``) so the event loop keeps answering heartbeats and health
checks. Service errors map to status codes by :func:`.service.grpc_error_for`.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import grpc

from ckptd.daemon.auth import bearer_metadata
from ckptd.daemon.logs import get_logger
from ckptd.daemon.service import grpc_error_for
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon

log = get_logger("ckptd.daemon.handlers")
PEER_QUERY_TIMEOUT_S = 3.0
MAX_WAIT_S = 3600.0


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> Any:
    code, message = grpc_error_for(exc)
    await context.abort(code, message)


class ControlSnapshots:
    """Control-service RPCs of the snapshot path (local trainers)."""

    _daemon: Daemon

    async def BeginSnapshot(self, request: pb.BeginSnapshotRequest,
                            context: grpc.aio.ServicerContext) -> pb.BeginSnapshotResponse:
        """A write lease on the rank's free shared-memory buffer."""
        svc = self._daemon.snapshots
        timeout = request.timeout_seconds or 60.0
        try:
            w = await asyncio.to_thread(svc.begin, request.job, request.rank, request.step,
                                        request.nbytes, min(timeout, MAX_WAIT_S))
        except Exception as exc:
            return await _abort(context, exc)
        self._daemon.refresh_memory()
        return pb.BeginSnapshotResponse(lease_json=json.dumps(w.lease.to_json()))

    async def CommitSnapshot(self, request: pb.CommitSnapshotRequest,
                             context: grpc.aio.ServicerContext) -> pb.CommitSnapshotResponse:
        """Check the descriptor and hand the snapshot over to the daemon."""
        svc = self._daemon.snapshots
        try:
            svc.commit(request.job, request.rank, request.step, request.generation,
                       request.descriptor_json)
        except Exception as exc:
            return await _abort(context, exc)
        return pb.CommitSnapshotResponse(generation=request.generation)

    async def JobStatus(self, request: pb.JobStatusRequest,
                        context: grpc.aio.ServicerContext) -> pb.JobStatusResponse:
        """This daemon's and every known peer's view of the job."""
        return await self._daemon.job_status(request.job)

    async def WaitStep(self, request: pb.WaitStepRequest,
                       context: grpc.aio.ServicerContext) -> pb.WaitStepResponse:
        """Block until the step reaches the state here (or fails, or the deadline)."""
        svc = self._daemon.snapshots
        timeout = min(request.timeout_seconds or 60.0, MAX_WAIT_S)
        state, error = await asyncio.to_thread(
            svc.wait_step, request.job, request.step, request.state or pb.STEP_STATE_STAGED,
            timeout)
        return pb.WaitStepResponse(state=pb.StepState.ValueType(state), error=error)


class PeerSnapshots:
    """Peer-service RPCs of the snapshot path (other daemons)."""

    _daemon: Daemon

    async def LocalSnapshots(self, request: pb.LocalSnapshotsRequest,
                             context: grpc.aio.ServicerContext) -> pb.LocalSnapshotsResponse:
        """What this daemon holds of the job."""
        return self._daemon.local_snapshots(request.job)

    async def ReportPersisted(self, request: pb.ReportPersistedRequest,
                              context: grpc.aio.ServicerContext) -> pb.ReportPersistedResponse:
        """A daemon's ranks of a step are durable (or failed): the coordinator's input."""
        try:
            reports = [json.loads(r) for r in request.rank_reports_json]
            await self._daemon.persistence_report(request.job, request.step, request.node,
                                                  reports)
        except Exception as exc:
            return await _abort(context, exc)
        return pb.ReportPersistedResponse()

    async def StepOutcome(self, request: pb.StepOutcomeRequest,
                          context: grpc.aio.ServicerContext) -> pb.StepOutcomeResponse:
        """The coordinator's verdict on a step."""
        svc = self._daemon.snapshots
        if request.committed:
            svc.update(request.job, request.step, committed_to_storage=True, persisted=True)
        else:
            svc.update(request.job, request.step, error=request.error or "persist failed")
        return pb.StepOutcomeResponse()


async def query_peers(daemon: Daemon, job: str) -> list[pb.NodeView]:
    """``LocalSnapshots`` of every named peer, concurrently, each with a deadline."""
    cfg = daemon.config
    peers = [p for p in daemon.membership.peers.values() if not p.is_self]

    async def one(p: Any) -> pb.NodeView:
        stub = pb_grpc.PeerStub(daemon.membership.channel(p.address))
        try:
            local = await stub.LocalSnapshots(pb.LocalSnapshotsRequest(job=job),
                                              timeout=PEER_QUERY_TIMEOUT_S,
                                              metadata=bearer_metadata(cfg.token))
        except grpc.aio.AioRpcError as exc:
            return pb.NodeView(node=p.name or p.address, reachable=False,
                               error=f"{exc.code().name}: {exc.details()}")
        return pb.NodeView(node=local.node, reachable=True, local=local)

    return list(await asyncio.gather(*(one(p) for p in peers)))
