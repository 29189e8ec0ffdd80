"""The trainer's side of the daemon: control calls over the unix socket, bytes over the data
channel, and writable maps of this rank's shared-memory buffers.

One :class:`DaemonClient` per process (it keeps its gRPC channel, its buffer mappings and
a pool of data-channel clients, one per daemon address). Every call has a deadline; a
daemon that does not answer raises :class:`DaemonUnavailableError` naming the socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from typing import Any

import grpc
import torch

from ckptd.daemon.shm import SnapshotReader, TrainerMappings, WriteLease
from ckptd.daemon.transport import DataClient
from ckptd.errors import CkptError, InvalidKeyError, StagingBudgetError
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.rpc.v1 import daemon_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 60.0
_JOB_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class DaemonUnavailableError(CkptError, ConnectionError):
    """The node's daemon did not answer (not running, wrong socket, or overloaded)."""


class DaemonCallError(CkptError, RuntimeError):
    """The daemon refused a call; the message is the daemon's."""


def job_id_for(root: str, explicit: str | None = None) -> str:
    """The job id that names this job's snapshots in the daemons.

    Explicit (``ckpt.configure(job_id=...)``/``CKPT_JOB_ID``) or derived from the
    checkpoint root, so that a restarted job finds its snapshots without being told.
    """
    if explicit:
        return explicit
    base = _JOB_SAFE.sub("-", os.path.basename(root.rstrip("/")) or "job").strip("-.")[:40]
    digest = hashlib.sha256(root.encode()).hexdigest()[:12]
    return f"{base or 'job'}-{digest}"


class DaemonClient:
    """Calls into the daemon of this node (see the module docstring)."""

    def __init__(self, socket_path: str, token: str | None) -> None:
        self.socket_path = socket_path
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._token = (token or "unauthenticated").encode()
        self._channel = grpc.insecure_channel(
            f"unix:{socket_path}",
            options=[("grpc.max_receive_message_length", 256 << 20),
                     ("grpc.max_send_message_length", 256 << 20)],
        )
        self.control = pb_grpc.ControlStub(self._channel)
        self.mappings = TrainerMappings()
        self.reader = SnapshotReader()  # same-node loads read shared memory directly
        self._data: dict[str, DataClient] = {}
        self._lock = threading.Lock()
        self._status: pb.StatusResponse | None = None

    # ---------------------------------------------------------------- control calls
    def call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Invoke a Control RPC, mapping gRPC failures to typed errors."""
        try:
            return getattr(self.control, method)(request, timeout=timeout,
                                                 metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
                "connect" in (details or "").lower() or code is grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                raise DaemonUnavailableError(
                    f"ckptd at {self.socket_path} did not answer {method}: {details}") from None
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise StagingBudgetError(f"ckptd: {details}") from None
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidKeyError(f"ckptd: {details}") from None
            name = code.name if code is not None else "ERROR"
            raise DaemonCallError(f"ckptd {method} failed ({name}): {details}") from None

    def status(self) -> pb.StatusResponse:
        """The daemon's Status (cached: node name and addresses do not change)."""
        if self._status is None:
            self._status = self.call("Status", pb.StatusRequest(), timeout=10.0)
        return self._status

    @property
    def node(self) -> str:
        return self.status().node

    def begin(self, job: str, rank: int, step: int, nbytes: int,
              timeout: float = CALL_TIMEOUT_S) -> tuple[WriteLease, torch.Tensor]:
        """A lease on this rank's free buffer and a writable uint8 view of ``nbytes``."""
        reply = self.call("BeginSnapshot", pb.BeginSnapshotRequest(
            job=job, rank=rank, step=step, nbytes=nbytes, timeout_seconds=timeout),
            timeout=timeout + 10.0)
        lease = WriteLease.from_json(json.loads(reply.lease_json))
        return lease, self.mappings.writable(lease)

    def commit(self, lease: WriteLease, descriptor: bytes) -> None:
        """Hand the written snapshot over to the daemon."""
        self.call("CommitSnapshot", pb.CommitSnapshotRequest(
            job=lease.job_id, rank=lease.rank, step=lease.step, generation=lease.generation,
            descriptor_json=descriptor))

    def wait_step(self, job: str, step: int, state: int, timeout: float) -> tuple[int, str]:
        """Block until the step reaches ``state`` on this node's daemon (or fails)."""
        request = pb.WaitStepRequest(
            job=job, step=step, state=pb.StepState.ValueType(state), timeout_seconds=timeout)
        reply = self.call("WaitStep", request, timeout=timeout + 10.0)
        return reply.state, reply.error

    def job_status(self, job: str) -> pb.JobStatusResponse:
        """Every reachable daemon's view of ``job``."""
        return self.call("JobStatus", pb.JobStatusRequest(job=job))

    # ---------------------------------------------------------------- data channel
    def data(self, address: str) -> DataClient:
        """The pooled data-channel client of a daemon address."""
        with self._lock:
            client = self._data.get(address)
            if client is None:
                client = self._data[address] = DataClient(address, self._token)
            return client

    def close(self) -> None:
        """Close the channel, the data clients and the buffer mappings."""
        with self._lock:
            clients, self._data = list(self._data.values()), {}
        for c in clients:
            c.close()
        self.mappings.close()
        self.reader.close()
        self._channel.close()
