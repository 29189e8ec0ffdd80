"""Erasure protection of a group's snapshots across daemons: the model, the parity blobs
and their encoding. Rebuilding a lost node is in :mod:`ckptd.daemon.rebuild`, what a
daemon serves (blocks, parity, rebuilt payloads) in :mod:`ckptd.daemon.blobstore`.

Model (``stripes.StripeGeometry``): each member's *protected payload* for a step is the
rank-ordered concatenation of the snapshots it holds (:class:`NodePayload`, a virtual
view: nothing is copied); stripe ``j`` codes block ``p`` of member ``(j + p) mod n`` and
member ``(j + k + q) mod n`` stores parity row ``q``.

Call order for one step of one job (every member of the group does the same):

1. The group agrees on a :class:`StripeGeometry` (members, m, every payload size) and a
   ``generation`` (a number that changes whenever the group's data of the step may have
   changed, e.g. a counter the coordinator bumps per protection round).
2. Each member builds ``NodePayload.from_store(snapshots, step)`` (it pins them) and
   registers it with its :class:`~ckptd.daemon.blobstore.ProtectionBlobStore`
   (``blobs``): ``blobs.serve_payload(job, step, payload, geometry)``; its
   ``DataServer`` now serves ``block/{job}/{step}/{node}/{p}``.
3. Each member calls :func:`encode_parity` with ``fetch_block = block_fetcher(...)``:
   it pulls the k data blocks of each stripe it holds parity of, piece by piece, and
   commits its parity rows to its parity ``SnapshotStore`` (job id ``{job}.parity``, one
   slot per stripe, double-buffered, re-adopted after a daemon restart); the store is
   served (``blobs.serve_parity``) as ``parity/{job}/{step}/{stripe}``.
4. Once every member reported its parity committed, the step is *protected*: members
   release the previous step's payload (``blobs.forget_payload(...).close()``).  Until
   then they keep it pinned, so a new save waits instead of destroying it.
5. After a node loss anyone calls :func:`~ckptd.daemon.rebuild.rebuild_range` (or reads
   ``lost/{job}/{step}/{node}`` from any survivor's ``DataServer``): bytes of the lost
   member's payload, decoded per piece from any k verified shards of each stripe.

Integrity: a parity blob starts with a checksummed :class:`ParityHeader` (generation,
step, stripe, row, geometry digest) and a table with the CRC32C of every piece of the
parity row *and of the k data blocks it was computed from*.  A rebuild checks every piece
it uses against that table, so a corrupted, stale or foreign parity block, and a data
block that changed since it was protected, are excluded; the rebuilt piece is checked
against its recorded CRC too, so a rebuild never returns garbage: it raises
:class:`~ckptd.daemon.rebuild.RebuildError` (a ``QuorumError``) naming the stripe and
what was unusable.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import crc32c
import numpy as np

from ckptd.daemon.erasure import Buffer, ErasureCodec, as_array
from ckptd.daemon.shm import SnapshotError, check_job_id
from ckptd.daemon.snapshots import CompleteSnapshot, SnapshotStore
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient, PeerLostError
from ckptd.errors import CkptError, IntegrityError

__all__ = [
    "Clients", "FetchBlock", "FetchParity", "NodePayload", "ParityHeader", "ParityInfo",
    "ProtectionError", "block_fetcher", "check_codec", "client_for", "encode_parity",
    "parity_fetcher", "parity_job", "parity_table",
]

FetchBlock = Callable[[str, int, int, np.ndarray], "np.ndarray | None"]
"""``fetch_block(member, p, start, out)``: bytes ``[start, start + len(out))`` of
``member``'s data block ``p`` into ``out``; raises if the member cannot deliver them.
May instead return a (read-only) array of exactly those bytes, e.g. a view of a local
shared-memory mapping: no copy; the rebuild's checksums catch a view that changes."""
FetchParity = Callable[[str, int, int, np.ndarray], "np.ndarray | None"]
"""``fetch_parity(member, stripe, start, out)``: bytes of ``member``'s parity blob of
``stripe`` (header, table, then the parity row) into ``out``, or returned (as above)."""


class ProtectionError(CkptError, RuntimeError):
    """A step could not be protected (a data owner did not deliver); retry the round."""


def parity_job(job: str) -> str:
    """Job id of the ``SnapshotStore`` that holds ``job``'s parity (one slot per stripe)."""
    return check_job_id(f"{check_job_id(job)}.parity")


# ----------------------------------------------------------------------- node payload


class NodePayload:
    """Read-only virtual concatenation of pinned snapshots (rank order); zero-extended.

    Owns the pins of the snapshots it is given: ``close()`` releases them (then a save may
    reuse their buffers).  Thread-safe for reads.
    """

    def __init__(self, snapshots: Sequence[CompleteSnapshot]) -> None:
        self.snapshots = sorted(snapshots, key=lambda s: s.info.rank)
        self._parts = [as_array(s.view().numpy()) for s in self.snapshots]
        self.offsets = np.cumsum([0] + [len(p) for p in self._parts]).tolist()
        self.size: int = self.offsets[-1]
        self._closed = False

    @classmethod
    def from_store(cls, store: SnapshotStore, step: int, ranks: Sequence[int] | None = None,
                   verify: bool = True) -> NodePayload:
        """The snapshots of ``step`` in ``store`` (of ``ranks``: each must have one; None:
        every rank that has one), pinned.  ``SnapshotError`` if a named rank has none."""
        snaps: list[CompleteSnapshot] = []
        try:
            for rank in (store.ranks() if ranks is None else ranks):
                snap = store.slot(rank).at_step(step, verify)
                if snap is None and ranks is not None:
                    raise SnapshotError(f"job {store.job_id} rank {rank}: no verified snapshot "
                                        f"of step {step} in memory")
                if snap is not None:
                    snaps.append(snap)
        except BaseException:
            for s in snaps:
                s.release()
            raise
        return cls(snaps)

    @property
    def ranks(self) -> list[int]:
        return [s.info.rank for s in self.snapshots]

    def read_into(self, start: int, out: Buffer) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))``; zeros past the end."""
        dst = as_array(out, writable=True, what="out")
        self._check()
        pos, end = start, start + len(dst)
        i = max(0, int(np.searchsorted(self.offsets, start, side="right")) - 1)
        while pos < end and i < len(self._parts):
            lo = pos - self.offsets[i]
            n = min(end - pos, len(self._parts[i]) - lo)
            if n > 0:
                dst[pos - start : pos - start + n] = self._parts[i][lo : lo + n]
                pos += n
            i += 1
        dst[pos - start :] = 0

    def view(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)``: zero-copy inside one snapshot, else a copy (only where a
        range straddles two snapshots or the end, so at most one frame per boundary)."""
        self._check()
        i = max(0, int(np.searchsorted(self.offsets, start, side="right")) - 1)
        if i < len(self._parts) and end <= self.offsets[i + 1]:
            lo = start - self.offsets[i]
            return memoryview(self._parts[i][lo : lo + end - start])
        out = np.empty(end - start, np.uint8)
        self.read_into(start, out)
        return memoryview(out)

    def close(self) -> None:
        """Release the pins (idempotent); the views must not be used afterwards."""
        self._closed = True
        self._parts = []
        for s in self.snapshots:
            s.release()

    def _check(self) -> None:
        if self._closed:
            raise SnapshotError("node payload was closed (its snapshots are released)")

    def __enter__(self) -> NodePayload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------- parity format

_MAGIC = b"CKPARITY"
_VERSION = 1
# magic, version, k, m, n, stripe, q, pieces, block, piece, generation, step, digest,
# table CRC; then the CRC32C of those bytes.  Then pieces x (1 + k) u32 CRCs (parity
# piece, data pieces 0..k-1), then padding to 64 bytes, then the parity row.
_HEAD = struct.Struct("<8sHHHHHHIQQQQQI")
_HEAD_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class ParityHeader:
    """What a parity blob says about itself; see the module docstring."""

    k: int
    m: int
    n: int
    stripe: int
    q: int
    pieces: int
    block_bytes: int
    piece_bytes: int
    generation: int
    step: int
    digest: int
    table_crc: int = 0

    SIZE = _HEAD.size + _HEAD_CRC.size

    @property
    def table_bytes(self) -> int:
        return self.pieces * (1 + self.k) * 4

    @property
    def payload_offset(self) -> int:
        return -(-(self.SIZE + self.table_bytes) // 64) * 64

    @property
    def blob_bytes(self) -> int:
        return self.payload_offset + self.block_bytes

    def pack(self) -> bytes:
        head = _HEAD.pack(_MAGIC, _VERSION, self.k, self.m, self.n, self.stripe, self.q,
                          self.pieces, self.block_bytes, self.piece_bytes, self.generation,
                          self.step, self.digest, self.table_crc)
        return head + _HEAD_CRC.pack(crc32c.crc32c(head))

    @classmethod
    def unpack(cls, buf: Buffer) -> ParityHeader:
        """Parse a header; ``IntegrityError`` if it is damaged or of another version."""
        raw = bytes(memoryview(buf).cast("B")[: cls.SIZE])
        if len(raw) < cls.SIZE or raw[:8] != _MAGIC:
            raise IntegrityError("not a parity block (bad magic or truncated header)")
        if crc32c.crc32c(raw[: _HEAD.size]) != _HEAD_CRC.unpack(raw[_HEAD.size :])[0]:
            raise IntegrityError("parity header checksum mismatch (damaged header)")
        f = _HEAD.unpack(raw[: _HEAD.size])
        if f[1] != _VERSION:
            raise IntegrityError(f"parity format version {f[1]} (this build reads {_VERSION})")
        return cls(*f[2:])

    def expect(self, geometry: StripeGeometry, stripe: int, q: int, generation: int,
               step: int | None) -> None:
        """``IntegrityError`` unless this is row ``q`` of ``stripe`` for that step/generation."""
        if self.generation != generation:
            raise IntegrityError(f"stale: generation {self.generation}, expected {generation}")
        if step is not None and self.step != step:
            raise IntegrityError(f"parity of step {self.step}, expected step {step}")
        want = (geometry.k, geometry.m, geometry.n, stripe, q, geometry.pieces,
                geometry.block_bytes, geometry.piece_bytes, geometry.digest)
        got = (self.k, self.m, self.n, self.stripe, self.q, self.pieces, self.block_bytes,
               self.piece_bytes, self.digest)
        if got != want:
            raise IntegrityError(f"belongs to another stripe or geometry: {self}")


def parity_table(header: ParityHeader, raw: Buffer) -> np.ndarray:
    """The CRC table (pieces x (1 + k) uint32), after checking its checksum."""
    arr = as_array(raw)[: header.table_bytes]
    if len(arr) != header.table_bytes or crc32c.crc32c(arr) != header.table_crc:
        raise IntegrityError("parity CRC table checksum mismatch")
    return arr.view("<u4").reshape(header.pieces, 1 + header.k).copy()


@dataclass(frozen=True)
class ParityInfo:
    """What :func:`encode_parity` committed: ``blocks`` are ``(stripe, q)``."""

    job: str
    step: int
    generation: int
    node: str
    blocks: tuple[tuple[int, int], ...]
    parity_bytes: int
    data_bytes: int  # bytes pulled from data owners (zero extension not counted)
    seconds: float


# --------------------------------------------------------------------------- encode


def encode_parity(geometry: StripeGeometry, node: str, job: str, step: int,
                  fetch_block: FetchBlock, codec: ErasureCodec, parity_store: SnapshotStore,
                  *, generation: int) -> ParityInfo:
    """Compute and commit ``node``'s parity rows of ``step`` (call order: module docstring).

    For each stripe ``node`` holds parity of, the k data blocks are pulled piece by piece
    (k fetches in flight, the next piece prefetched while this one is coded) and only this
    node's row is coded, straight into the parity slot's shared memory.  The slot is
    double-buffered: the parity of the previous step stays until this one commits.
    Raises ``ProtectionError`` if a data owner fails (nothing is committed for that stripe).
    """
    check_codec(geometry, codec)
    if parity_store.job_id != parity_job(job):
        raise ValueError(f"parity store of job {parity_store.job_id!r} is not {parity_job(job)!r}")
    t0, pulled = time.perf_counter(), 0
    done: list[tuple[int, int]] = []
    with ThreadPoolExecutor(2 * geometry.k, thread_name_prefix="ckptd-parity") as pool:
        for j, q in geometry.parity_blocks(node):
            pulled += _encode_stripe(geometry, j, q, job, step, generation, fetch_block, codec,
                                     parity_store, pool)
            done.append((j, q))
    return ParityInfo(job, step, generation, node, tuple(done), len(done) * geometry.block_bytes,
                      pulled, time.perf_counter() - t0)


def _encode_stripe(g: StripeGeometry, j: int, q: int, job: str, step: int, generation: int,
                   fetch_block: FetchBlock, codec: ErasureCodec, store: SnapshotStore,
                   pool: ThreadPoolExecutor) -> int:
    k, data_members = g.k, g.stripe(j)[0]
    head = ParityHeader(k, g.m, g.n, j, q, g.pieces, g.block_bytes, g.piece_bytes, generation,
                        step, g.digest)
    w = store.slot(j).begin(step, head.blob_bytes)
    pulled = 0
    try:
        blob = as_array(w.view().numpy(), writable=True)
        parity = blob[head.payload_offset : head.blob_bytes]
        table = np.zeros((g.pieces, 1 + k), "<u4")
        bufs = [[np.empty(min(g.piece_bytes, g.block_bytes), np.uint8) for _ in range(k)]
                for _ in range(2)]  # double-buffered: piece t+1 arrives while t is coded

        def pull(t: int) -> list[Future[int]]:
            lo, hi = g.piece(t)
            return [pool.submit(_pull_piece, g, fetch_block, data_members[p], p, lo, hi,
                                bufs[t % 2][p][: hi - lo]) for p in range(k)]

        pending = pull(0) if g.pieces else []
        for t in range(g.pieces):
            futures, lo, hi = pending, *g.piece(t)
            try:
                crcs = [f.result() for f in futures]
            except Exception as exc:
                raise ProtectionError(f"job {job} step {step}: stripe {j}: data owner failed: "
                                      f"{exc}; the stripe's previous parity is kept") from exc
            pending = pull(t + 1) if t + 1 < g.pieces else []
            table[t, 1:] = crcs
            out = parity[lo:hi]
            codec.encode_rows([q], [b[: hi - lo] for b in bufs[t % 2]], [out])
            table[t, 0] = crc32c.crc32c(out)
            pulled += sum(g.valid_bytes(data_members[p], p, lo, hi) for p in range(k))
        raw = table.tobytes()
        head = replace(head, table_crc=crc32c.crc32c(raw))
        blob[: head.SIZE] = np.frombuffer(head.pack(), np.uint8)
        blob[head.SIZE : head.SIZE + len(raw)] = np.frombuffer(raw, np.uint8)
        w.commit({"kind": "ckptd-parity", "job": job, "step": step, "generation": generation,
                  "stripe": j, "q": q, "geometry": g.to_json()})
    except BaseException:
        for f in pending:  # never leave a fetch writing into buffers after we return
            f.cancel()
        w.abort()
        raise
    return pulled


def _pull_piece(g: StripeGeometry, fetch: FetchBlock, member: str, p: int, lo: int, hi: int,
                out: np.ndarray) -> int:
    """Block ``p``'s ``[lo, hi)`` of ``member`` into ``out`` (zero-extended); its CRC32C."""
    valid = g.valid_bytes(member, p, lo, hi)
    if valid:
        got = fetch(member, p, lo, out[:valid])
        if got is not None:
            out[:valid] = got
    out[valid:] = 0
    return crc32c.crc32c(out)


def check_codec(g: StripeGeometry, codec: ErasureCodec) -> None:
    """``ValueError`` unless ``codec`` is the group's RS(k+m)."""
    if (codec.k, codec.m) != (g.k, g.m):
        raise ValueError(f"codec RS({codec.k}+{codec.m}) does not match the group's "
                         f"RS({g.k}+{g.m})")


# ------------------------------------------------------------------ client fetchers

Clients = Mapping[str, DataClient] | Callable[[str], DataClient]


def client_for(clients: Clients, member: str) -> DataClient:
    """``member``'s data channel; ``PeerLostError`` if there is none."""
    try:
        return clients[member] if isinstance(clients, Mapping) else clients(member)
    except KeyError:
        raise PeerLostError(f"no data channel to {member!r}") from None


def block_fetcher(clients: Clients, job: str, step: int, *,
                  timeout: float | None = None) -> FetchBlock:
    """A ``fetch_block`` that reads ``block/{job}/{step}/{member}/{p}`` from the member."""
    check_job_id(job)

    def fetch(member: str, p: int, start: int, out: np.ndarray) -> None:
        client_for(clients, member).get_range(f"block/{job}/{step}/{member}/{p}", start,
                                           start + len(out), out, timeout=timeout)
    return fetch


def parity_fetcher(clients: Clients, job: str, step: int, *,
                   timeout: float | None = None) -> FetchParity:
    """A ``fetch_parity`` that reads ``parity/{job}/{step}/{stripe}`` from the member."""
    check_job_id(job)

    def fetch(member: str, stripe: int, start: int, out: np.ndarray) -> None:
        client_for(clients, member).get_range(f"parity/{job}/{step}/{stripe}", start,
                                           start + len(out), out, timeout=timeout)
    return fetch
