"""Rebuilding a lost member's payload from the other members' shards (the decode side of
:mod:`ckptd.daemon.protection`).

:func:`rebuild_range` decodes bytes of the lost member's payload, per piece of each
stripe, from any k verified shards: data blocks of the other members first, then parity.
Every shard piece used is checked against the CRC table of a parity blob of the stripe,
and every decoded piece against its recorded CRC, so a rebuild never returns garbage: it
raises :class:`RebuildError` (a ``QuorumError``) naming the stripe and what was unusable.
A survivor's ``DataServer`` runs it for ``lost/`` reads
(:class:`~ckptd.daemon.blobstore.ProtectionBlobStore`); a loader can run it in its own
process from :func:`rebuild_info` (``ckpt/rebuilt.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

import crc32c
import numpy as np

from ckptd.daemon.erasure import Buffer, ErasureCodec, as_array
from ckptd.daemon.protection import (
    FetchBlock,
    FetchParity,
    ParityHeader,
    ProtectionError,
    check_codec,
    parity_table,
)
from ckptd.daemon.shm import check_job_id
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient
from ckptd.errors import IntegrityError, QuorumError, StorageError

__all__ = [
    "BATCH_BYTES", "ParityRecord", "RebuildError", "RebuildInfo", "StripeSources",
    "rebuild_info", "rebuild_range",
]


class RebuildError(QuorumError, StorageError):
    """More than m shards of a stripe are unavailable or invalid: the lost bytes cannot be
    rebuilt from memory; fall back to the persisted checkpoint.  (A ``StorageError`` too,
    so a ``DataServer`` reports it to the peer as a storage failure with this message.)"""


BATCH_BYTES = 8 << 20  # of a stripe's pieces rebuilt together: one request per shard


@dataclass
class ParityRecord:
    """A parity blob's checked header and CRC table (cached across reads)."""

    header: ParityHeader
    table: np.ndarray


def rebuild_range(geometry: StripeGeometry, lost_node: str, start: int, end: int, out: Buffer,
                  fetch_block: FetchBlock, fetch_parity: FetchParity, codec: ErasureCodec,
                  report: dict[tuple[int, int], str] | None = None, *, generation: int,
                  step: int | None = None, unavailable: Sequence[str] = (),
                  headers: dict[tuple[int, int], ParityRecord] | None = None,
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
    check_codec(geometry, codec)
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
            st = StripeSources(geometry, span.stripe, lost_node, set(unavailable), generation,
                               step, fetch_block, fetch_parity, cache, pool, bufs)
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


class StripeSources:
    """Sources of one stripe during a rebuild: which shards are usable, and their CRCs."""

    def __init__(self, g: StripeGeometry, j: int, lost: str, unavailable: set[str],
                 generation: int, step: int | None, fetch_block: FetchBlock,
                 fetch_parity: FetchParity, cache: dict[tuple[int, int], ParityRecord],
                 pool: ThreadPoolExecutor | None, bufs: dict[int, np.ndarray]) -> None:
        self.g, self.j, self.lost = g, j, lost
        self.generation, self.step = generation, step
        self.fetch_block, self.fetch_parity = fetch_block, fetch_parity
        self.cache, self.pool, self.bufs = cache, pool, bufs
        self.bad: dict[int, str] = {}
        self.parity: dict[int, ParityRecord] = {}
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

    def _read_header(self, q: int) -> ParityRecord:
        holder = self.g.holder(self.j, self.g.k + q)
        raw = np.empty(ParityHeader.SIZE, np.uint8)
        raw = _filled(self.fetch_parity(holder, self.j, 0, raw), raw)
        header = ParityHeader.unpack(raw)
        header.expect(self.g, self.j, q, self.generation, self.step)  # before a big read
        tab = np.empty(header.table_bytes, np.uint8)
        if len(tab):
            tab = _filled(self.fetch_parity(holder, self.j, header.SIZE, tab), tab).copy()
        return ParityRecord(header, parity_table(header, tab))

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

    def _quorum(self) -> NoReturn:
        g = self.g
        detail = "; ".join(f"shard {s} ({'data' if s < g.k else 'parity'} on "
                           f"{g.holder(self.j, s)}): {r}" for s, r in sorted(self.bad.items()))
        raise RebuildError(
            f"cannot rebuild {self.lost}'s data in stripe {self.j}: RS({g.k}+{g.m}) needs "
            f"{g.k} valid shards, {g.n - len(self.bad)} left ({detail}); at most {g.m} may be "
            "lost: fall back to the persisted checkpoint"
        )


def _filled(got: np.ndarray | None, buf: np.ndarray) -> np.ndarray:
    """What a fetcher delivered: the array it returned, else the buffer it filled."""
    return buf if got is None else got


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
