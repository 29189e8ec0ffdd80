"""What a daemon's ``DataServer`` serves for erasure protection: its data blocks, the
parity it holds, and lost members' payloads rebuilt on the fly
(:class:`ProtectionBlobStore`; the model is in :mod:`ckptd.daemon.protection`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptd.daemon.erasure import ErasureCodec
from ckptd.daemon.protection import (
    Clients,
    FetchBlock,
    FetchParity,
    NodePayload,
    client_for,
    parity_job,
)
from ckptd.daemon.rebuild import ParityRecord, StripeSources, rebuild_range
from ckptd.daemon.shm import check_job_id
from ckptd.daemon.snapshots import CompleteSnapshot, SnapshotStore
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient, PeerLostError
from ckptd.errors import IntegrityError, InvalidKeyError, StorageError

WINDOW_BYTES = 16 << 20  # rebuilt bytes are cached in aligned windows of this size
WINDOWS_KEPT = 4

_INT = r"(0|[1-9][0-9]{0,18})"
_NODE = r"([A-Za-z0-9][A-Za-z0-9._:-]{0,252})"
_JOB = r"([^/]{1,128})"
_KEYS = {
    "block": re.compile(rf"block/{_JOB}/{_INT}/{_NODE}/{_INT}"),
    "parity": re.compile(rf"parity/{_JOB}/{_INT}/{_INT}"),
    "lost": re.compile(rf"lost/{_JOB}/{_INT}/{_NODE}"),
    "rebuild": re.compile(rf"rebuild/{_JOB}/{_INT}/{_NODE}"),
}


class ProtectionBlobStore:
    """What a daemon's ``DataServer`` serves for erasure protection (read-only keys):

    * ``block/{job}/{step}/{node}/{p}``: this node's data block p (``block_bytes``,
      zero-extended), after ``serve_payload``;
    * ``parity/{job}/{step}/{stripe}``: the parity blob of a stripe held here (header, CRC
      table, row), from the store given to ``serve_parity``;
    * ``lost/{job}/{step}/{node}``: a lost member's whole payload, rebuilt on the fly
      from the other members (geometry and generation from this node's parity of that
      step), so a restarted job reads a lost node's ranks from any survivor;
    * ``rebuild/{job}/{step}/{node}``: JSON ``{"geometry": ..., "generation": ...}`` of
      that rebuild, for a loader that pulls the ``block/`` and ``parity/`` shards itself
      and decodes in its own process (one hop less than ``lost/``: see
      :func:`rebuild_info`).

    ``clients``: this daemon's ``DataClient`` per peer name.  A peer that fails a fetch
    with ``PeerLostError`` is skipped for ``down_seconds``; ``is_lost`` (membership's
    view) marks peers never to ask.  Thread-safe (the server calls from many threads).
    """

    def __init__(self, node: str, clients: Clients, *, is_lost: Callable[[str], bool] | None = None,
                 timeout: float | None = None, down_seconds: float = 10.0,
                 backend: str | None = None) -> None:
        self.node, self.clients, self.timeout = node, clients, timeout
        self.is_lost, self.down_seconds, self.backend = is_lost, down_seconds, backend
        self._payloads: dict[tuple[str, int], tuple[NodePayload, StripeGeometry]] = {}
        self._parity: dict[str, SnapshotStore] = {}
        self._codecs: dict[tuple[int, int], ErasureCodec] = {}
        self._headers: dict[tuple[str, int, int], dict[tuple[int, int], ParityRecord]] = {}
        self._down: dict[str, float] = {}
        self._probed: dict[tuple[str, int, str, int], float] = {}
        self._windows: OrderedDict[tuple[str, int, str, int, int], np.ndarray] = OrderedDict()
        # One pool for every rebuild this store serves (not one per 4 MiB frame).
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="ckptd-rebuild")
        self._lock = threading.Lock()

    # -- registration (the daemon's protection loop)

    def serve_payload(self, job: str, step: int, payload: NodePayload,
                      geometry: StripeGeometry) -> None:
        """Serve ``payload`` as this node's data blocks of ``step`` (the caller keeps it open)."""
        if payload.size != geometry.size(self.node):
            raise ValueError(f"payload of {payload.size} bytes, the geometry says "
                             f"{geometry.size(self.node)}")
        with self._lock:
            self._payloads[(check_job_id(job), step)] = (payload, geometry)

    def forget_payload(self, job: str, step: int) -> NodePayload | None:
        """Stop serving a step's data blocks; returns the payload for the caller to close."""
        with self._lock:
            entry = self._payloads.pop((job, step), None)
        return entry[0] if entry else None

    def serve_parity(self, job: str, store: SnapshotStore) -> None:
        """Serve the parity blobs (and rebuilds) of ``job`` from ``store``."""
        if store.job_id != parity_job(job):
            raise ValueError(f"store {store.job_id!r} is not {parity_job(job)!r}")
        with self._lock:
            self._parity[job] = store

    def codec(self, k: int, m: int) -> ErasureCodec:
        with self._lock:
            c = self._codecs.get((k, m))
            if c is None:
                c = self._codecs[(k, m)] = ErasureCodec(k, m, self.backend)
            return c

    # -- BlobStore

    def size(self, key: str) -> int:
        kind, job, step, rest = self._parse(key)
        if kind == "block":
            return self._block(job, step, rest)[1].block_bytes
        if kind == "parity":
            with self._parity_snapshot(job, step, rest[0]) as snap:
                return snap.info.nbytes
        if kind == "rebuild":
            return len(self._rebuild_info(job, step, rest[0]))
        geometry, generation = self._restore_context(job, step, rest[0])
        # The server reports errors of ``size`` to the peer but drops the connection on
        # an error in ``read``: check the quorum here, so that a read that cannot succeed
        # is refused with the reason instead of looking like a lost peer.
        self._probe(job, step, rest[0], geometry, generation)
        return geometry.size(rest[0])

    def read(self, key: str, start: int, end: int) -> memoryview:
        kind, job, step, rest = self._parse(key)
        if kind == "block":
            payload, geometry = self._block(job, step, rest)
            base = int(rest[1]) * geometry.block_bytes
            return payload.view(base + start, base + end)
        if kind == "parity":
            # The pin is dropped before the server sends: a save of step+2 could reuse the
            # buffer meanwhile, which the reader's CRC checks turn into an excluded shard.
            with self._parity_snapshot(job, step, rest[0]) as snap:
                return memoryview(snap.view().numpy()[start:end])
        if kind == "rebuild":
            return memoryview(self._rebuild_info(job, step, rest[0]))[start:end]
        lost = rest[0]
        geometry, generation = self._restore_context(job, step, lost)
        w0 = start // WINDOW_BYTES * WINDOW_BYTES
        if end <= w0 + WINDOW_BYTES:  # inside one window (every frame of a window read)
            win = self._window(job, step, lost, geometry, generation, w0,
                               min(w0 + WINDOW_BYTES, geometry.size(lost)))
            return memoryview(win[start - w0 : end - w0])  # windows are never written again
        out = np.empty(end - start, np.uint8)
        pos = start
        while pos < end:
            w0 = pos // WINDOW_BYTES * WINDOW_BYTES
            w1 = min(w0 + WINDOW_BYTES, geometry.size(lost))
            win = self._window(job, step, lost, geometry, generation, w0, w1)
            n = min(end, w1) - pos
            out[pos - start : pos - start + n] = win[pos - w0 : pos - w0 + n]
            pos += n
        return memoryview(out)

    def forget_rebuilt(self) -> None:
        """Drop cached rebuilt windows and probes (the next read rebuilds and re-checks)."""
        with self._lock:
            self._windows.clear()
            self._probed.clear()

    def _window(self, job: str, step: int, lost: str, geometry: StripeGeometry,
                generation: int, w0: int, w1: int) -> np.ndarray:
        """Bytes ``[w0, w1)`` of a lost member's payload, rebuilt once and kept in a small
        LRU: a loader reads many small tensors, and each rebuild decodes whole pieces, so
        neighbouring reads must not decode the same pieces again."""
        key = (job, step, lost, generation, w0)
        with self._lock:
            hit = self._windows.get(key)
            if hit is not None:
                self._windows.move_to_end(key)
                return hit
            cache = self._headers.setdefault((job, step, generation), {})
        win = np.empty(w1 - w0, np.uint8)
        rebuild_range(geometry, lost, w0, w1, win, self._fetch_block(job, step),
                      self._fetch_parity(job, step), self.codec(geometry.k, geometry.m),
                      generation=generation, step=step, unavailable=[lost], headers=cache,
                      pool=self._pool)
        with self._lock:
            self._windows[key] = win
            while len(self._windows) > WINDOWS_KEPT:
                self._windows.popitem(last=False)
        return win

    def begin_put(self, key: str, nbytes: int) -> Any:
        raise StorageError(f"put {key!r}: protection keys are read-only")

    # -- internals

    def _parse(self, key: str) -> tuple[str, str, int, tuple[str, ...]]:
        kind = key.split("/", 1)[0]
        pattern = _KEYS.get(kind)
        match = pattern.fullmatch(key) if pattern else None
        if match is None:
            raise InvalidKeyError(f"malformed protection key {key!r}")
        job = check_job_id(match[1])
        return kind, job, int(match[2]), tuple(match.groups()[2:])

    def _payload(self, job: str, step: int) -> tuple[NodePayload, StripeGeometry]:
        with self._lock:
            entry = self._payloads.get((job, step))
        if entry is None:
            raise KeyError(f"node {self.node} serves no data blocks of job {job} step {step}")
        return entry

    def _block(self, job: str, step: int,
               rest: tuple[str, ...]) -> tuple[NodePayload, StripeGeometry]:
        node, p = rest[0], int(rest[1])
        payload, geometry = self._payload(job, step)
        if node != self.node or p >= geometry.k:
            raise KeyError(f"node {self.node} holds no data block {p} of {node!r} (blocks "
                           f"0..{geometry.k - 1} of {self.node} only)")
        return payload, geometry

    def _parity_snapshot(self, job: str, step: int, stripe: str) -> CompleteSnapshot:
        with self._lock:
            store = self._parity.get(job)
        j = int(stripe)
        # Never store.slot() an arbitrary number: it would create (and wipe) a slot.
        snap = store.slot(j).at_step(step, verify=False) if store and j in store.ranks() else None
        if snap is None:
            raise KeyError(f"node {self.node} holds no parity of job {job} step {step} "
                           f"stripe {stripe}")
        return snap

    def _restore_context(self, job: str, step: int, lost: str) -> tuple[StripeGeometry, int]:
        """Geometry and generation of ``step``, from any parity slot of it held here."""
        with self._lock:
            store = self._parity.get(job)
        for j in store.ranks() if store else []:
            snap = store.slot(j).at_step(step, verify=False)  # type: ignore[union-attr]
            if snap is None:
                continue
            with snap:
                desc = snap.descriptor
            geometry = StripeGeometry.from_json(desc["geometry"])
            if lost == self.node or lost not in geometry.members:
                raise KeyError(f"{lost!r} is not a lost member of {list(geometry.members)}")
            return geometry, int(desc["generation"])
        raise KeyError(f"node {self.node} holds no parity of job {job} step {step}: it cannot "
                       "rebuild a lost member's data")

    def _rebuild_info(self, job: str, step: int, lost: str) -> bytes:
        geometry, generation = self._restore_context(job, step, lost)
        self._probe(job, step, lost, geometry, generation)  # refuse early if it cannot work
        return json.dumps({"geometry": geometry.to_json(), "generation": generation,
                           "local": self._local_segments(job, step)}).encode()

    def _local_segments(self, job: str, step: int) -> dict[str, Any]:
        """This node's shards of ``step`` as shared-memory segments, for a loader on this
        node to read without a socket: the payload's snapshots in rank order and the
        parity blob of each stripe held here, each as ``[path, generation, nbytes]``.
        (The loader brackets every read with header checks and the CRC table, so a
        segment reused meanwhile is detected, never decoded.)"""
        out: dict[str, Any] = {"node": self.node, "payload": [], "parity": {}}
        with self._lock:
            entry = self._payloads.get((job, step))
            store = self._parity.get(job)
        if entry is not None:
            out["payload"] = [[s.path, s.info.generation, s.info.nbytes]
                              for s in entry[0].snapshots]
        for j in store.ranks() if store else []:
            snap = store.slot(j).at_step(step, verify=False)  # type: ignore[union-attr]
            if snap is not None:
                with snap:
                    out["parity"][str(j)] = [snap.path, snap.info.generation, snap.info.nbytes]
        return out

    PROBE_TTL_S = 5.0  # a loader sends a size() before every range: probe once, not each

    def _probe(self, job: str, step: int, lost: str, geometry: StripeGeometry,
               generation: int) -> None:
        """``RebuildError`` unless every stripe of ``lost``'s data has k shards that answer
        (parity headers read and checked, data blocks stat'ed); pieces are checked later.
        A successful probe is trusted for ``PROBE_TTL_S`` (reads still check every piece)."""
        key = (job, step, lost, generation)
        now = time.monotonic()
        with self._lock:
            if self._probed.get(key, 0.0) > now:
                return
            cache = self._headers.setdefault((job, step, generation), {})
        self._probe_stripes(job, step, lost, geometry, generation, cache)
        with self._lock:
            self._probed[key] = time.monotonic() + self.PROBE_TTL_S

    def _probe_stripes(self, job: str, step: int, lost: str, geometry: StripeGeometry,
                       generation: int, cache: dict[tuple[int, int], ParityRecord]) -> None:
        for j, _ in geometry.data_blocks(lost):
            st = StripeSources(geometry, j, lost, {lost}, generation, step,
                               self._fetch_block(job, step), self._fetch_parity(job, step),
                               cache, None, {})
            st.load_headers()
            for s in range(geometry.k):
                holder = geometry.holder(j, s)
                if s in st.bad or holder == self.node:
                    continue
                try:
                    self._usable(holder).stat(f"block/{job}/{step}/{holder}/{s}",
                                              timeout=self.timeout)
                except Exception as exc:
                    if isinstance(exc, PeerLostError):
                        with self._lock:
                            self._down[holder] = time.monotonic() + self.down_seconds
                    st.bad[s] = f"{holder}: {exc}"
            if geometry.n - len(st.bad) < geometry.k or st.data_crc is None:
                st._quorum()

    def _usable(self, member: str) -> DataClient:
        if self.is_lost is not None and self.is_lost(member):
            raise PeerLostError(f"{member} is marked lost")
        with self._lock:
            until = self._down.get(member, 0.0)
        if until > time.monotonic():
            raise PeerLostError(f"{member} failed recently; not asked again for now")
        return client_for(self.clients, member)

    def _remote(self, member: str, key: str, start: int, out: np.ndarray) -> None:
        client = self._usable(member)
        try:
            client.get_range(key, start, start + len(out), out, timeout=self.timeout)
        except PeerLostError:
            # Remember it: each frame of a ``lost/`` read would otherwise wait for the
            # dead peer's connection retries again.
            with self._lock:
                self._down[member] = time.monotonic() + self.down_seconds
            raise

    def _fetch_block(self, job: str, step: int) -> FetchBlock:
        def fetch(member: str, p: int, start: int, out: np.ndarray) -> None:
            if member == self.node:
                payload, geometry = self._payload(job, step)
                payload.read_into(p * geometry.block_bytes + start, out)
            else:
                self._remote(member, f"block/{job}/{step}/{member}/{p}", start, out)
        return fetch

    def _fetch_parity(self, job: str, step: int) -> FetchParity:
        def fetch(member: str, stripe: int, start: int, out: np.ndarray) -> None:
            if member == self.node:
                with self._parity_snapshot(job, step, str(stripe)) as snap:
                    src = snap.view().numpy()
                    if start + len(out) > len(src):
                        raise IntegrityError(f"parity blob of stripe {stripe} is too short")
                    out[:] = src[start : start + len(out)]
            else:
                self._remote(member, f"parity/{job}/{step}/{stripe}", start, out)
        return fetch
