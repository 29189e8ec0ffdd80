"""Erasure protection of a staged step with the daemon's group, and serving lost members.

Wires :mod:`ckptd.daemon.protection` into the daemon (the pipeline calls
:meth:`GroupProtector.protect` for every staged step), in order:

1. the group: :func:`~ckptd.daemon.server.form_groups` over the nodes of the save (from
   the descriptors), the one holding this node; a group of at most m members cannot
   protect anything (logged; the step stays unprotected);
2. wait (bounded) until every member staged the step, and learn each member's payload
   size and its ranks' descriptors from its ``LocalSnapshots`` answer (kept here, so
   that a member's ranks can be described after it is gone);
3. serve this node's payload (``block/...``), compute this node's parity rows
   (``encode_parity``: pulls the k data blocks of each stripe from their owners), mark
   the step ``parity_held``;
4. wait (bounded) until every member holds its parity: the step is *protected*; the
   previous step's payload is released (until then it stayed pinned, so a new save could
   not overwrite the last protected step).

The generation of a protection round is a hash of the step and every member rank's
snapshot generation: parity of other data is never mistaken for this one's.
``lost_snapshots`` lists, for ``LocalSnapshots``, the ranks of unreachable members that
this node can serve rebuilt (``lost/{job}/{step}/{node}``), only while no more than m
members of the group are unreachable.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import TYPE_CHECKING, Any

from ckptd.daemon.blobstore import ProtectionBlobStore
from ckptd.daemon.erasure import ErasureCodec
from ckptd.daemon.logs import get_logger
from ckptd.daemon.protection import (
    NodePayload,
    ProtectionError,
    block_fetcher,
    encode_parity,
    parity_job,
)
from ckptd.daemon.service import StepProgress
from ckptd.daemon.snapshots import SnapshotStore
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient
from ckptd.errors import CkptError
from ckptd.rpc.v1 import daemon_pb2 as pb

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon

log = get_logger("ckptd.daemon.group")
MEMBER_WAIT_S = 120.0  # how long a round waits for the slowest member
POLL_S = 0.1


class ProtectionTimeout(CkptError, TimeoutError):
    """A member of the group did not stage or protect the step in time."""


class GroupProtector:
    """Protection rounds of this daemon (see the module docstring)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.node = cfg.node_name
        self.blobs = ProtectionBlobStore(self.node, self._client, is_lost=self._is_lost)
        for prefix in ("block", "parity", "lost", "rebuild"):
            daemon.blobs.route(prefix, self.blobs)
        self._parity: dict[str, SnapshotStore] = {}
        # (job, step) -> member node -> its RankSnapshots of the step (descriptors included)
        self.members: dict[tuple[str, int], dict[str, list[pb.RankSnapshot]]] = {}
        self.groups: dict[tuple[str, int], tuple[str, ...]] = {}
        self._served: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ a round
    def protect(self, job: str, prog: StepProgress) -> None:
        """Steps 1-4 of the module docstring for ``prog`` (raises on failure)."""
        from ckptd.daemon.server import form_groups

        cfg = self.daemon.config
        svc = self.daemon.snapshots
        step = prog.step
        group = next(g for g in form_groups(set(prog.nodes), cfg.erasure_n) if self.node in g)
        svc.update(job, step, group=tuple(group))
        if len(group) <= cfg.erasure_m:
            log.warning("erasure group too small to protect anything", job=job, step=step,
                        group=group, m=cfg.erasure_m)
            # Nothing will ever protect a newer step of this layout: holding older data
            # pinned would only block the next saves.
            self.release_older(job, step)
            return
        members = self._wait_members(job, step, group)
        sizes = {n: sum(s.nbytes for s in members[n]) for n in group}
        geometry = StripeGeometry(group, cfg.erasure_m, sizes)
        generation = _round_generation(step, members)
        store = svc.jobs[job].store
        payload = NodePayload.from_store(store, step, ranks=sorted(prog.ranks), verify=False)
        self.blobs.serve_payload(job, step, payload, geometry)
        with self._lock:
            self._served.setdefault(job, []).append(step)
        info = self._encode(geometry, job, step, generation)
        svc.update(job, step, parity_held=True)
        log.info("parity committed", job=job, step=step, stripes=len(info.blocks),
                 parity_bytes=info.parity_bytes, pulled=info.data_bytes,
                 seconds=round(info.seconds, 3))
        self._wait_parity(job, step, group)
        with self._lock:  # only a protected step's members are listed as rebuildable
            self.members[(job, step)] = members
            self.groups[(job, step)] = tuple(group)
        svc.update(job, step, protected=True)
        self.daemon.metrics.set_protection(len(group), cfg.erasure_m)
        self.release_older(job, step)

    def _encode(self, geometry: StripeGeometry, job: str, step: int, generation: int) -> Any:
        """``encode_parity``, retried while a data owner does not serve its blocks yet (it
        registers them once it has heard from every member too), bounded."""
        codec = ErasureCodec(geometry.k, self.daemon.config.erasure_m)
        deadline = time.monotonic() + MEMBER_WAIT_S
        while True:
            try:
                return encode_parity(geometry, self.node, job, step,
                                     block_fetcher(self._client, job, step), codec,
                                     self._parity_store(job), generation=generation)
            except ProtectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)

    def _wait_members(self, job: str, step: int,
                      group: list[str]) -> dict[str, list[pb.RankSnapshot]]:
        deadline = time.monotonic() + MEMBER_WAIT_S
        while True:
            found: dict[str, list[pb.RankSnapshot]] = {}
            for node in group:
                local = self._local(node, job)
                if local is None:
                    continue
                prog = next((s for s in local.steps if s.step == step), None)
                if prog is None or prog.state == pb.STEP_STATE_UNSPECIFIED:
                    continue
                snaps = [s for s in local.snapshots if s.step == step and not s.key]
                if sorted(s.rank for s in snaps) == sorted(prog.ranks):
                    found[node] = snaps
            if len(found) == len(group):
                return found
            if time.monotonic() > deadline:
                missing = sorted(set(group) - set(found))
                raise ProtectionTimeout(f"step {step}: group members {missing} did not stage "
                                        f"it within {MEMBER_WAIT_S} s; not protected")
            time.sleep(POLL_S)

    def _wait_parity(self, job: str, step: int, group: list[str]) -> None:
        deadline = time.monotonic() + MEMBER_WAIT_S
        while True:
            pending = []
            for node in group:
                local = self._local(node, job)
                st = next((s for s in local.steps if s.step == step), None) if local else None
                if st is None or not st.parity_held:
                    pending.append(node)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ProtectionTimeout(f"step {step}: members {pending} did not commit their "
                                        f"parity within {MEMBER_WAIT_S} s; not protected")
            time.sleep(POLL_S)

    def release_older(self, job: str, step: int) -> None:
        """Unpin the payloads of steps before ``step`` (protected or committed now: the
        older data is no longer the newest thing that survives a node loss)."""
        with self._lock:
            older = [s for s in self._served.get(job, []) if s < step]
            self._served[job] = [s for s in self._served.get(job, []) if s >= step]
            for s in older:
                self.members.pop((job, s), None)
                self.groups.pop((job, s), None)
        for s in older:
            payload = self.blobs.forget_payload(job, s)
            if payload is not None:
                payload.close()

    # ------------------------------------------------------------------ lost members
    def lost_snapshots(self, job: str) -> list[pb.RankSnapshot]:
        """Ranks of unreachable group members this node can serve rebuilt (see above)."""
        cfg = self.daemon.config
        out = []
        with self._lock:
            rounds = [(k, v, self.groups[k]) for k, v in self.members.items() if k[0] == job]
        for (_, step), members, group in rounds:
            down = [n for n in group if n != self.node and self._is_down(n)]
            if not down or len(down) > cfg.erasure_m:
                continue  # nothing to rebuild, or more lost than parity can rebuild
            for node in down:
                offset = 0
                for s in sorted(members[node], key=lambda s: s.rank):
                    out.append(pb.RankSnapshot(
                        rank=s.rank, step=step, generation=s.generation, nbytes=s.nbytes,
                        node=node, data_address=self.daemon.data_address,
                        descriptor_json=s.descriptor_json, key=f"lost/{job}/{step}/{node}",
                        offset=offset))
                    offset += s.nbytes
        return out

    # ------------------------------------------------------------------ plumbing
    def _local(self, node: str, job: str) -> pb.LocalSnapshotsResponse | None:
        if node == self.node:
            return self.daemon.local_snapshots(job, include_lost=False)
        try:
            reply: pb.LocalSnapshotsResponse = self.daemon.pipeline.call_node(
                node, "LocalSnapshots", pb.LocalSnapshotsRequest(job=job))
            return reply
        except Exception:  # not reachable (yet): the caller polls, bounded
            return None

    def _client(self, member: str) -> DataClient:
        return self.daemon.pipeline.data_client(member)

    def _is_lost(self, member: str) -> bool:
        peer = self.daemon.membership.peer_named(member)
        return peer is not None and peer.state == "lost"

    def _is_down(self, member: str) -> bool:
        peer = self.daemon.membership.peer_named(member)
        return peer is None or peer.state in ("lost", "suspect")

    def _parity_store(self, job: str) -> SnapshotStore:
        with self._lock:
            store = self._parity.get(job)
            if store is None:
                cfg = self.daemon.config
                store = self._parity[job] = SnapshotStore(cfg.shm_dir, parity_job(job),
                                                          cfg.memory_budget_bytes)
                self.blobs.serve_parity(job, store)
            return store

    def close(self) -> None:
        """Unpin every served payload and unmap the parity stores (files stay)."""
        with self._lock:
            served, self._served = self._served, {}
            stores, self._parity = list(self._parity.values()), {}
        for job, steps in served.items():
            for s in steps:
                payload = self.blobs.forget_payload(job, s)
                if payload is not None:
                    payload.close()
        for store in stores:
            store.close(unlink=False)


def _round_generation(step: int, members: dict[str, list[pb.RankSnapshot]]) -> int:
    h = hashlib.sha256(str(step).encode())
    for node in sorted(members):
        for s in sorted(members[node], key=lambda s: s.rank):
            h.update(f"{node}:{s.rank}:{s.generation}:{s.nbytes};".encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1

