"""Erasure protection of a group's snapshots across daemons, and rebuilding a lost node.

Model (``stripes.StripeGeometry``): each member's *protected payload* for a step is the
rank-ordered concatenation of the snapshots it holds (:class:`NodePayload`, a virtual
view: nothing is copied); stripe ``j`` codes block ``p`` of member ``(j + p) mod n`` and
member ``(j + k + q) mod n`` stores parity row ``q``.

Call order for one step of one job (every member of the group does the same):

1. The group agrees on a :class:`StripeGeometry` (members, m, every payload size) and a
   ``generation`` (a number that changes whenever the group's data of the step may have
   changed, e.g. a counter the coordinator bumps per protection round).
2. Each member builds ``NodePayload.from_store(snapshots, step)`` (it pins them) and
   registers it: ``blobs.serve_payload(job, step, payload, geometry)``; its
   ``DataServer`` now serves ``block/{job}/{step}/{node}/{p}``.
3. Each member calls :func:`encode_parity` with ``fetch_block = block_fetcher(...)``:
   it pulls the k data blocks of each stripe it holds parity of, piece by piece, and
   commits its parity rows to its parity ``SnapshotStore`` (job id ``{job}.parity``, one
   slot per stripe, double-buffered, re-adopted after a daemon restart); the store is
   served (``blobs.serve_parity``) as ``parity/{job}/{step}/{stripe}``.
4. Once every member reported its parity committed, the step is *protected*: members
   release the previous step's payload (``blobs.forget_payload(...).close()``).  Until
   then they keep it pinned, so a new save waits instead of destroying it.
5. After a node loss anyone calls :func:`rebuild_range` (or reads
   ``lost/{job}/{step}/{node}`` from any survivor's ``DataServer``): bytes of the lost
   member's payload, decoded per piece from any k verified shards of each stripe.

Integrity: a parity blob starts with a checksummed :class:`ParityHeader` (generation,
step, stripe, row, geometry digest) and a table with the CRC32C of every piece of the
parity row *and of the k data blocks it was computed from*.  A rebuild checks every piece
it uses against that table, so a corrupted, stale or foreign parity block, and a data
block that changed since it was protected, are excluded; the rebuilt piece is checked
against its recorded CRC too, so a rebuild never returns garbage: it raises
:class:`RebuildError` (a ``QuorumError``) naming the stripe and what was unusable.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import crc32c
import numpy as np

from ckptd.daemon.erasure import Buffer, ErasureCodec, as_array
from ckptd.daemon.shm import SnapshotError, check_job_id
from ckptd.daemon.snapshots import CompleteSnapshot, SnapshotStore
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient, PeerLostError
from ckptd.errors import CkptError, IntegrityError, InvalidKeyError, QuorumError, StorageError

__all__ = [
    "FetchBlock", "FetchParity", "NodePayload", "ParityHeader", "ParityInfo",
    "ProtectionBlobStore", "ProtectionError", "RebuildError", "RebuildInfo", "block_fetcher",
    "encode_parity", "parity_fetcher", "parity_job", "rebuild_info", "rebuild_range",
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


class RebuildError(QuorumError, StorageError):
    """More than m shards of a stripe are unavailable or invalid: the lost bytes cannot be
    rebuilt from memory; fall back to the persisted checkpoint.  (A ``StorageError`` too,
    so a ``DataServer`` reports it to the peer as a storage failure with this message.)"""


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


def _table(header: ParityHeader, raw: Buffer) -> np.ndarray:
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
    _check_codec(geometry, codec)
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


def _filled(got: np.ndarray | None, buf: np.ndarray) -> np.ndarray:
    """What a fetcher delivered: the array it returned, else the buffer it filled."""
    return buf if got is None else got


def _check_codec(g: StripeGeometry, codec: ErasureCodec) -> None:
    if (codec.k, codec.m) != (g.k, g.m):
        raise ValueError(f"codec RS({codec.k}+{codec.m}) does not match the group's "
                         f"RS({g.k}+{g.m})")


# -------------------------------------------------------------------------- rebuild


BATCH_BYTES = 8 << 20  # of a stripe's pieces rebuilt together: one request per shard


@dataclass
class _Parity:
    header: ParityHeader
    table: np.ndarray


def rebuild_range(geometry: StripeGeometry, lost_node: str, start: int, end: int, out: Buffer,
                  fetch_block: FetchBlock, fetch_parity: FetchParity, codec: ErasureCodec,
                  report: dict[tuple[int, int], str] | None = None, *, generation: int,
                  step: int | None = None, unavailable: Sequence[str] = (),
                  headers: dict[tuple[int, int], _Parity] | None = None,
                  pool: ThreadPoolExecutor | None = None,
                  bufs: dict[int, np.ndarray] | None = None) -> None:
    """Bytes ``[start, end)`` of ``lost_node``'s payload into ``out`` (a writable buffer).

    Per piece of each stripe involved: k valid shards (data blocks of other members first,
    then parity), each checked against the parity's CRC table, decoded, and the result
    checked against its recorded CRC.  A shard that fails (unreachable, corrupted, stale,
    another geometry) is excluded for the rest of the stripe and another one is used;
    ``unavailable`` members are never asked.  ``report`` collects ``(stripe, shard) ->
    reason`` for every excluded shard.  ``headers``: a dict kept across calls to skip
    re-reading parity headers (e.g. consecutive frames of one read).  Memory: n + 1 batches
    of ``BATCH_BYTES`` (pieces of one stripe are moved and decoded together), kept in
    ``bufs`` when given so that consecutive calls of one thread reuse them (fresh memory
    costs a page fault per 4 KiB, several times the copy itself on these VMs).
    Raises ``RebuildError`` (a ``QuorumError``) if a stripe has fewer than k valid shards.
    """
    _check_codec(geometry, codec)
    size = geometry.size(lost_node)
    if not 0 <= start <= end <= size:
        raise ValueError(f"range [{start}, {end}) outside {lost_node!r}'s {size}-byte payload")
    dst = as_array(out, writable=True, what="out")
    if len(dst) < end - start:
        raise ValueError(f"out holds {len(dst)} bytes, {end - start} needed")
    cache = headers if headers is not None else {}
    if bufs is None:
        bufs = {}  # per shard index, reused across pieces and stripes
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(geometry.k, thread_name_prefix="ckptd-rebuild")
    assert pool is not None
    try:
        for span in geometry.spans(lost_node, start, end):
            st = _Stripe(geometry, span.stripe, lost_node, set(unavailable), generation, step,
                         fetch_block, fetch_parity, cache, pool, bufs)
            st.load_headers()
            first = span.block_offset // geometry.piece_bytes
            last = (span.block_offset + span.length - 1) // geometry.piece_bytes
            per_batch = max(1, BATCH_BYTES // geometry.piece_bytes)
            for t0 in range(first, last + 1, per_batch):
                t1 = min(last + 1, t0 + per_batch)
                lo, hi = geometry.piece(t0)[0], geometry.piece(t1 - 1)[1]
                a, b = max(lo, span.block_offset), min(hi, span.block_offset + span.length)
                o = span.payload_offset - start + (a - span.block_offset)
                st.rebuild_pieces(codec, span.block, t0, t1, dst[o : o + b - a], a - lo)
            if report is not None:
                report.update({(span.stripe, s): r for s, r in st.bad.items()})
    finally:
        if own:
            pool.shutdown(wait=True)


class _Stripe:
    """Sources of one stripe during a rebuild: which shards are usable, and their CRCs."""

    def __init__(self, g: StripeGeometry, j: int, lost: str, unavailable: set[str],
                 generation: int, step: int | None, fetch_block: FetchBlock,
                 fetch_parity: FetchParity, cache: dict[tuple[int, int], _Parity],
                 pool: ThreadPoolExecutor | None, bufs: dict[int, np.ndarray]) -> None:
        self.g, self.j, self.lost = g, j, lost
        self.generation, self.step = generation, step
        self.fetch_block, self.fetch_parity = fetch_block, fetch_parity
        self.cache, self.pool, self.bufs = cache, pool, bufs
        self.bad: dict[int, str] = {}
        self.parity: dict[int, _Parity] = {}
        self.data_crc: np.ndarray | None = None
        for s in range(g.n):
            holder = g.holder(j, s)
            if holder == lost:
                self.bad[s] = "to rebuild"
            elif holder in unavailable:
                self.bad[s] = f"{holder} is unavailable"

    def load_headers(self) -> None:
        """Read and check every reachable parity header; agree on the data CRCs."""
        g = self.g
        for q in range(g.m):
            s = g.k + q
            if s in self.bad:
                continue
            got = self.cache.get((self.j, q))
            try:
                if got is None:
                    got = self._read_header(q)
                got.header.expect(g, self.j, q, self.generation, self.step)
            except Exception as exc:
                self.bad[s] = f"parity of {g.holder(self.j, s)}: {exc}"
                self.cache.pop((self.j, q), None)
                continue
            self.cache[(self.j, q)] = self.parity[q] = got
        # Rows computed from different data (a re-protected step mixed with an older
        # round of the same generation) must not be combined: the larger agreeing set wins.
        groups: dict[bytes, list[int]] = {}
        for q, par in self.parity.items():
            groups.setdefault(par.table[:, 1:].tobytes(), []).append(q)
        if groups:
            keep = max(groups.values(), key=len)
            for q in [q for q in self.parity if q not in keep]:
                self.bad[g.k + q] = "its data checksums disagree with the other parity rows"
                del self.parity[q]
            self.data_crc = self.parity[keep[0]].table[:, 1:]

    def _read_header(self, q: int) -> _Parity:
        holder = self.g.holder(self.j, self.g.k + q)
        raw = np.empty(ParityHeader.SIZE, np.uint8)
        raw = _filled(self.fetch_parity(holder, self.j, 0, raw), raw)
        header = ParityHeader.unpack(raw)
        header.expect(self.g, self.j, q, self.generation, self.step)  # before a big read
        tab = np.empty(header.table_bytes, np.uint8)
        if len(tab):
            tab = _filled(self.fetch_parity(holder, self.j, header.SIZE, tab), tab).copy()
        return _Parity(header, _table(header, tab))

    def rebuild_pieces(self, codec: ErasureCodec, p: int, t0: int, t1: int, out: np.ndarray,
                       skip: int) -> None:
        """Decode data block ``p``'s pieces ``[t0, t1)`` and copy their bytes from ``skip``
        to ``out``.  Each source shard's range of those pieces comes in one request (a
        round trip per piece made rebuilds latency-bound); the decode runs over the whole
        range at once (byte-wise code).

        The decoded pieces are checked against their recorded CRCs first; the sources are
        checked piece by piece only when one does not match (to find and exclude the bad
        shard, then decode again without it). A wrong source byte always changes the
        decoded bytes (every coefficient of an MDS decode row is non-zero), so a match
        proves the sources were right for these pieces, and checking them up front too
        spent as much CPU as the decode and the network together."""
        g = self.g
        lo, hi = g.piece(t0)[0], g.piece(t1 - 1)[1]
        n = hi - lo
        have: dict[int, np.ndarray] = {}
        whole = skip == 0 and len(out) == n
        target = out if whole else self._buf(-1, n)
        while True:
            usable = [s for s in range(g.n) if s not in self.bad]
            if len(usable) < g.k or self.data_crc is None:
                self._quorum()
            survivors = tuple(usable[: g.k])  # data first: no parity needed when possible
            todo = [s for s in survivors if s not in have]
            assert self.pool is not None
            futures = {s: self.pool.submit(self._fetch, s, lo, hi) for s in todo}
            for s, fut in futures.items():
                try:
                    have[s] = fut.result()
                except Exception as exc:
                    self._exclude(s, f"{g.holder(self.j, s)}: {exc}")
            if not all(s in have for s in survivors):
                continue
            plan = codec.decode_plan(survivors, (p,))
            codec.backend.apply(plan, [have[s] for s in survivors], [target])
            if not self._bad_pieces(target, lo, t0, t1, self.data_crc[:, p]):
                break
            bad = {s: t for s in survivors
                   if (t := self._bad_pieces(have[s], lo, t0, t1, self._want(s)))}
            if not bad:
                raise IntegrityError(
                    f"stripe {self.j} piece {t0}..{t1 - 1}: the rebuilt block {p} of "
                    f"{self.lost} does not match its recorded checksum although every "
                    "source did; refusing to return it")
            for s, t in bad.items():
                have.pop(s)
                self._exclude(s, f"{self._what(s)}: piece {t[0]} checksum mismatch "
                                 "(corrupted, or changed since the step was protected)")
        if not whole:
            out[:] = target[skip : skip + len(out)]

    def _bad_pieces(self, buf: np.ndarray, lo: int, t0: int, t1: int,
                    want: np.ndarray) -> list[int]:
        """Pieces of ``[t0, t1)`` whose bytes in ``buf`` (from block offset ``lo``) do not
        match their CRC32C in ``want``."""
        bad = []
        for t in range(t0, t1):
            a, b = (x - lo for x in self.g.piece(t))
            if crc32c.crc32c(buf[a:b]) != int(want[t]):
                bad.append(t)
        return bad

    def _want(self, s: int) -> np.ndarray:
        """The recorded per-piece CRC32Cs of shard ``s`` (a data block or a parity row)."""
        assert self.data_crc is not None
        return self.data_crc[:, s] if s < self.g.k else self.parity[s - self.g.k].table[:, 0]

    def _what(self, s: int) -> str:
        holder = self.g.holder(self.j, s)
        return f"data block {s} of {holder}" if s < self.g.k else \
            f"parity row {s - self.g.k} of {holder}"

    def _exclude(self, s: int, reason: str) -> None:
        self.bad[s] = reason
        if s >= self.g.k:
            self.cache.pop((self.j, s - self.g.k), None)

    def _fetch(self, s: int, lo: int, hi: int) -> np.ndarray:
        """Shard ``s``'s bytes ``[lo, hi)`` (of its block, or of its parity row), data
        past the end of a member's payload as zeros; a local view where the fetcher has
        one (not checked here: see :meth:`rebuild_pieces`)."""
        g, buf = self.g, self._buf(s, hi - lo)
        holder = g.holder(self.j, s)
        if s < g.k:
            valid = g.valid_bytes(holder, s, lo, hi)
            got = self.fetch_block(holder, s, lo, buf[:valid]) if valid else None
            if got is not None and valid == len(buf):
                return got
            if got is not None:
                buf[:valid] = got
            buf[valid:] = 0
            return buf
        par = self.parity[s - g.k]
        got = self.fetch_parity(holder, self.j, par.header.payload_offset + lo, buf)
        return buf if got is None else got

    def _buf(self, s: int, n: int) -> np.ndarray:
        buf = self.bufs.get(s)
        if buf is None or len(buf) < n:
            buf = self.bufs[s] = np.empty(max(n, self.g.piece_bytes), np.uint8)
        return buf[:n]

    def _quorum(self) -> None:
        g = self.g
        detail = "; ".join(f"shard {s} ({'data' if s < g.k else 'parity'} on "
                           f"{g.holder(self.j, s)}): {r}" for s, r in sorted(self.bad.items()))
        raise RebuildError(
            f"cannot rebuild {self.lost}'s data in stripe {self.j}: RS({g.k}+{g.m}) needs "
            f"{g.k} valid shards, {g.n - len(self.bad)} left ({detail}); at most {g.m} may be "
            "lost: fall back to the persisted checkpoint"
        )


# ------------------------------------------------------------------ client fetchers

Clients = Mapping[str, DataClient] | Callable[[str], DataClient]


def _client(clients: Clients, member: str) -> DataClient:
    try:
        return clients[member] if isinstance(clients, Mapping) else clients(member)
    except KeyError:
        raise PeerLostError(f"no data channel to {member!r}") from None


def block_fetcher(clients: Clients, job: str, step: int, *,
                  timeout: float | None = None) -> FetchBlock:
    """A ``fetch_block`` that reads ``block/{job}/{step}/{member}/{p}`` from the member."""
    check_job_id(job)

    def fetch(member: str, p: int, start: int, out: np.ndarray) -> None:
        _client(clients, member).get_range(f"block/{job}/{step}/{member}/{p}", start,
                                           start + len(out), out, timeout=timeout)
    return fetch


def parity_fetcher(clients: Clients, job: str, step: int, *,
                   timeout: float | None = None) -> FetchParity:
    """A ``fetch_parity`` that reads ``parity/{job}/{step}/{stripe}`` from the member."""
    check_job_id(job)

    def fetch(member: str, stripe: int, start: int, out: np.ndarray) -> None:
        _client(clients, member).get_range(f"parity/{job}/{step}/{stripe}", start,
                                           start + len(out), out, timeout=timeout)
    return fetch


@dataclass(frozen=True)
class RebuildInfo:
    """What a reader needs to rebuild a lost member's payload itself (from
    ``rebuild/{job}/{step}/{node}``): the step's stripe geometry and generation."""

    geometry: StripeGeometry
    generation: int
    node: str = ""  # the survivor that answered; its shards' shared-memory segments:
    payload: tuple[tuple[str, int, int], ...] = ()  # snapshots in rank order
    parity: tuple[tuple[int, str, int, int], ...] = ()  # (stripe, path, generation, nbytes)

    @classmethod
    def loads(cls, raw: Buffer) -> RebuildInfo:
        """Parse the JSON a survivor serves; ``ProtectionError`` if it is malformed."""
        try:
            obj = json.loads(bytes(raw))
            local = obj.get("local") or {}
            return cls(
                StripeGeometry.from_json(obj["geometry"]), int(obj["generation"]),
                str(local.get("node", "")),
                tuple((str(p), int(g), int(n)) for p, g, n in local.get("payload", [])),
                tuple((int(j), str(p), int(g), int(n))
                      for j, (p, g, n) in local.get("parity", {}).items()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtectionError(f"malformed rebuild info: {type(exc).__name__}: {exc}") from exc


def rebuild_info(client: DataClient, job: str, step: int, lost: str, *,
                 timeout: float | None = None) -> RebuildInfo:
    """Geometry and generation of ``lost``'s data of ``step``, from a survivor's
    ``DataServer``; it refuses (``RebuildError``) when the group cannot rebuild it."""
    raw = client.get(f"rebuild/{check_job_id(job)}/{step}/{lost}", timeout=timeout)
    return RebuildInfo.loads(raw)


# ----------------------------------------------------------------------- blob store

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
        self._headers: dict[tuple[str, int, int], dict[tuple[int, int], _Parity]] = {}
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
                       generation: int, cache: dict[tuple[int, int], _Parity]) -> None:
        for j, _ in geometry.data_blocks(lost):
            st = _Stripe(geometry, j, lost, {lost}, generation, step, self._fetch_block(job, step),
                         self._fetch_parity(job, step), cache, None, {})
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
        return _client(self.clients, member)

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
