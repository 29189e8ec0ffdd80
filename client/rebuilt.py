"""Reading a lost node's ranks: its payload rebuilt from the survivors' shards.

When a node of an erasure group is gone, its ranks' snapshot bytes exist only as the
other members' data blocks and parity rows. The loader rebuilds them in its own process:
it asks a survivor for the step's stripe geometry (``rebuild/`` key), pulls the k
shards of each stripe straight from the daemons holding them (``block/`` and
``parity/`` keys: this node's daemon over its unix data socket, peers over TCP) and
decodes them here (:func:`ckptd.daemon.rebuild.rebuild_range`: the result checked
against the parity's CRC table, and each shard too when the result does not match).
Shards in this node's shared memory are used in place. Asking a survivor for the decoded
bytes (``lost/`` key) instead makes every byte cross one more socket and a busy Python
server twice; that path stays as the fallback for daemons that do not serve ``rebuild/``.

A read that covers whole windows nobody has fetched yet is decoded straight into the
caller's tensor. Other reads come in large aligned windows, each fetched once and kept
in a small LRU (a load asks for many small tensors), and read ahead: loads go in payload
order, so while one window is copied out the next ones are being pulled and decoded.
Window and shard buffers are reused. Both matter on these VMs, where fresh memory costs
up to 3 s/GiB to fault in (measured): a fresh 16 MiB buffer per window faulted in twice
the rebuilt bytes, which cost more than the network and the decode together.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ckpt.daemon_client import DaemonClient
from ckptd.daemon.datachannel import BlobNotFoundError, PeerLostError, ProtocolError
from ckptd.daemon.erasure import ErasureCodec
from ckptd.daemon.rebuild import RebuildInfo, rebuild_info, rebuild_range

if TYPE_CHECKING:
    from ckpt.memory_load import HeldSnapshot


@dataclass
class _LocalRebuild:
    """How this process rebuilds one lost member's payload (one per ``lost/`` key)."""

    info: RebuildInfo
    job: str
    step: int
    lost: str
    codec: ErasureCodec
    headers: dict = field(default_factory=dict)  # parity headers, checked once per stripe

    @property
    def parity_segments(self) -> dict[int, tuple[str, int]]:
        return {j: (path, gen) for j, path, gen, _ in self.info.parity}

    def read_payload(self, client: DaemonClient, start: int, out: np.ndarray) -> None:
        """Bytes of the answering survivor's payload (its snapshots in rank order, as in
        ``NodePayload``) straight from its shared memory; it is on this node."""
        pos, base = start, 0
        end = start + len(out)
        for path, gen, n in self.info.payload:
            lo, hi = max(pos, base), min(end, base + n)
            if lo < hi:
                view = memoryview(out[lo - start : hi - start])
                client.reader.read_into(path, gen, lo - base, view)
                pos = hi
            base += n
        if pos < end:
            raise ValueError(f"bytes [{pos}, {end}) are beyond {self.info.node}'s payload")

    def payload_view(self, client: DaemonClient, start: int, nbytes: int) -> np.ndarray | None:
        """The same bytes as a read-only view of the shared memory when they lie in one
        snapshot (no copy), else None."""
        base = 0
        for path, gen, n in self.info.payload:
            if base <= start and start + nbytes <= base + n:
                view = client.reader.view(path, gen, start - base, nbytes)
                return np.frombuffer(view, np.uint8)
            base += n
        return None


@dataclass
class _Window:
    """One window of the LRU: its bytes (once fetched) and who is reading them."""

    fut: Future[np.ndarray]
    buf: np.ndarray | None = None  # the pooled WINDOW_BYTES buffer behind fut's result
    pins: int = 0  # readers copying out of it right now
    evicted: bool = False  # out of the LRU: recycle the buffer once unpinned and done


class RebuiltWindows:
    """Bytes of lost ranks, rebuilt in ``WINDOW_BYTES`` windows (see the module docstring).

    ``addresses``: data-channel address of every reachable daemon by node name. Thread-safe;
    a window being fetched by one reader is waited for by the others.
    """

    WINDOW_BYTES = 16 << 20  # windows served by a survivor (``lost/``)
    KEEP_BYTES = 160 << 20  # LRU bound: > read-ahead + reads in flight, in bytes
    AHEAD_BYTES = 4 << 20  # read ahead of a window read (at least two windows)

    def __init__(self, addresses: Mapping[str, str] | None = None) -> None:
        self.addresses = dict(addresses or {})
        self._windows: OrderedDict[tuple[str, int, int], _Window] = OrderedDict()
        self._kept = 0  # bytes of the windows in the LRU
        self._free: list[np.ndarray] = []  # buffers of evicted windows
        self._shard_bufs = threading.local()  # rebuild_range's per-thread shard buffers
        self._rebuilds: dict[str, _LocalRebuild | None] = {}
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._prefetch: ThreadPoolExecutor | None = None
        self._fetch: ThreadPoolExecutor | None = None  # shard pulls of a rebuild

    def close(self) -> None:
        """Stop prefetching and drop every window (idempotent; reads may start again)."""
        with self._lock:
            pools, self._prefetch, self._fetch = (self._prefetch, self._fetch), None, None
            self._windows.clear()
            self._free.clear()
            self._kept = 0
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def read_into(self, client: DaemonClient, held: HeldSnapshot, start: int, out: torch.Tensor,
                  local_address: str | None = None) -> None:
        """Bytes ``[start, start + len(out))`` of ``held.key`` (the lost member's payload)
        into ``out`` (uint8). ``local_address``: this node's daemon's data socket."""
        end, pos = start + out.numel(), start
        dst = out.numpy()  # numpy copies: one memcpy, no intra-op thread pool to wake
        limit = held.offset + held.desc.nbytes  # this rank's part of the lost payload
        if end > limit:
            raise ValueError(f"{held.key}: bytes [{start}, {end}) beyond rank "
                             f"{held.desc.rank}'s part (ends at {limit})")
        bounds = self._bounds(limit)
        while pos < end:
            run = self._direct_run(held, pos, end, bounds)
            if run > pos:  # whole windows nobody fetched: decode straight into ``out``
                self._fill(client, held, pos, run, dst[pos - start : run - start], local_address)
                pos = run
                continue
            w0, w1 = bounds(pos)
            # Read ahead from this read's last window (or its end): the whole windows
            # in between are left to the direct path.
            t0, t1 = bounds(end - 1)
            self._read_ahead(client, held, max(w1, end if t1 == end else t0), bounds,
                             local_address)
            entry = self._window(client, held, w0, w1, local_address)
            try:
                win = entry.fut.result()
                n = min(end, w1) - pos  # > 0: the window reaches past pos
                dst[pos - start : pos - start + n] = win[pos - w0 : pos - w0 + n]
            finally:
                self._unpin(entry)
            pos += n

    def _bounds(self, limit: int) -> Callable[[int], tuple[int, int]]:
        """The window ``[w0, w1)`` holding a payload offset: ``WINDOW_BYTES``-aligned,
        clipped to ``limit``. (One stripe piece per window, so that no piece is decoded
        by two windows, measured slower: three times the requests for the many tensors
        smaller than a window, and the daemons' per-request cost dominates.)"""
        W = self.WINDOW_BYTES
        return lambda pos: (pos // W * W, min(pos // W * W + W, limit))

    def _direct_run(self, held: HeldSnapshot, pos: int, end: int,
                    bounds: Callable[[int], tuple[int, int]]) -> int:
        """The end of the run of whole windows from ``pos`` to at most ``end`` that no
        reader has fetched or claimed; ``pos`` if there is none (``pos`` is inside a
        window, or the window at ``pos`` is in the LRU).

        Such windows are decoded straight into the caller's tensor: no window buffer to
        fault in (fresh memory costs up to 3 s/GiB on these VMs, measured) and no copy.
        Windows already in the LRU are copied from it, so a read-ahead is never wasted.
        """
        run = pos
        with self._lock:
            while run < end:
                w0, w1 = bounds(run)
                if w0 != run or w1 > end or (held.key, w0, w1) in self._windows:
                    break
                run = w1
        return run

    def _read_ahead(self, client: DaemonClient, held: HeldSnapshot, pos: int,
                    bounds: Callable[[int], tuple[int, int]], local_address: str | None) -> None:
        claimed = []
        limit = held.offset + held.desc.nbytes
        with self._lock:
            first = bounds(pos) if pos < limit else (pos, pos)
            count = max(2, self.AHEAD_BYTES // max(1, first[1] - first[0]))  # windows ahead
            for _ in range(count):
                if pos >= limit:
                    break
                w0, w1 = bounds(pos)
                entry, mine = self._claim((held.key, w0, w1))
                if mine:
                    claimed.append((w0, w1, entry))
                pos = w1
            if claimed and self._prefetch is None:
                self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="ckpt-rebuilt")
            pool = self._prefetch
        for w0, w1, entry in claimed:  # a failed prefetch is dropped; a reader retries
            assert pool is not None
            pool.submit(self._run, entry, client, held, w0, w1, local_address)

    def _window(self, client: DaemonClient, held: HeldSnapshot, w0: int, w1: int,
                local_address: str | None) -> _Window:
        """The window's entry, pinned: the caller reads ``entry.fut.result()`` and then
        calls :meth:`_unpin`."""
        with self._lock:
            entry, mine = self._claim((held.key, w0, w1))  # ranks of one lost node share key[0]
            entry.pins += 1
        if mine:
            self._run(entry, client, held, w0, w1, local_address)
        return entry

    def _claim(self, key: tuple[str, int, int]) -> tuple[_Window, bool]:
        """The window's entry, and whether the caller must fetch it (under ``_lock``)."""
        entry = self._windows.get(key)
        if entry is not None:
            self._windows.move_to_end(key)
            return entry, False
        entry = self._windows[key] = _Window(Future())
        self._kept += key[2] - key[1]
        while self._kept > self.KEEP_BYTES and len(self._windows) > 1:
            (_, w0, w1), old = self._windows.popitem(last=False)
            self._kept -= w1 - w0
            old.evicted = True
            self._recycle(old)
        return entry, True

    def _recycle(self, entry: _Window) -> None:
        """Return an evicted, unread, finished window's buffer to the pool (under ``_lock``)."""
        if entry.evicted and entry.pins == 0 and entry.fut.done() and entry.buf is not None:
            self._free.append(entry.buf)
            entry.buf = None

    def _unpin(self, entry: _Window) -> None:
        with self._lock:
            entry.pins -= 1
            self._recycle(entry)

    def _run(self, entry: _Window, client: DaemonClient, held: HeldSnapshot,
             w0: int, w1: int, local_address: str | None) -> None:
        try:
            with self._lock:
                fit = [i for i, f in enumerate(self._free) if len(f) >= w1 - w0]
                buf = self._free.pop(fit[-1]) if fit else None
            if buf is None:
                buf = np.empty(w1 - w0, np.uint8)
            entry.buf = buf
            self._fill(client, held, w0, w1, buf[: w1 - w0], local_address)
            entry.fut.set_result(buf[: w1 - w0])
        except BaseException as e:
            with self._lock:
                if self._windows.get((held.key, w0, w1)) is entry:
                    del self._windows[(held.key, w0, w1)]
                    self._kept -= w1 - w0
                entry.buf = None  # a failed window's buffer is not reused (nor read)
            entry.fut.set_exception(e)
            return
        with self._lock:
            self._recycle(entry)  # evicted while it was being fetched

    def _fill(self, client: DaemonClient, held: HeldSnapshot, w0: int, w1: int, out: np.ndarray,
              local_address: str | None) -> None:
        rb = self._local_rebuild(client, held, local_address)
        if rb is None:  # the survivor decodes and sends the bytes (older daemons)
            client.data(survivor_address(held, w0)).get_range(
                held.key, w0, w1, out=memoryview(out))
            return

        def address(member: str) -> str:
            if member == client.node and local_address:
                return local_address
            try:
                return self.addresses[member]
            except KeyError:
                raise PeerLostError(f"{member} is not reachable") from None

        g = rb.info.geometry
        local = rb.info.node == client.node  # its shards can be read from shared memory

        # Shards in this node's shared memory are used in place (views: no copy); the
        # rebuild's checksums reject them if a new snapshot reuses the memory meanwhile.
        def fetch_block(member: str, p: int, start: int, buf: np.ndarray) -> np.ndarray | None:
            if local and member == rb.info.node and rb.info.payload:
                at = p * g.block_bytes + start
                view = rb.payload_view(client, at, len(buf))
                if view is None:
                    rb.read_payload(client, at, buf)
                return view
            client.data(address(member)).get_range(
                f"block/{rb.job}/{rb.step}/{member}/{p}", start, start + len(buf), buf)
            return None

        def fetch_parity(member: str, stripe: int, start: int,
                         buf: np.ndarray) -> np.ndarray | None:
            seg = rb.parity_segments.get(stripe) if local and member == rb.info.node else None
            if seg is not None:
                return np.frombuffer(client.reader.view(seg[0], seg[1], start, len(buf)), np.uint8)
            client.data(address(member)).get_range(
                f"parity/{rb.job}/{rb.step}/{stripe}", start, start + len(buf), buf)
            return None

        unavailable = [m for m in g.members
                       if m == rb.lost or (m not in self.addresses and m != client.node)]
        bufs = getattr(self._shard_bufs, "bufs", None)
        if bufs is None:
            bufs = self._shard_bufs.bufs = {}
        rebuild_range(g, rb.lost, w0, w1, out, fetch_block, fetch_parity, rb.codec,
                      generation=rb.info.generation, step=rb.step, unavailable=unavailable,
                      headers=rb.headers, pool=self._fetch_pool(), bufs=bufs)

    def _local_rebuild(self, client: DaemonClient, held: HeldSnapshot,
                       local_address: str | None) -> _LocalRebuild | None:
        with self._setup_lock:  # once per lost member, not once per concurrent window
            with self._lock:
                if held.key in self._rebuilds:
                    return self._rebuilds[held.key]
            return self._setup(client, held, local_address)

    def _setup(self, client: DaemonClient, held: HeldSnapshot,
               local_address: str | None) -> _LocalRebuild | None:
        job, step, lost = held.desc.job, held.desc.step, held.node
        rb: _LocalRebuild | None = None
        # This node's daemon first: if it is a survivor, its shards are read from memory.
        for address in dict.fromkeys([*([local_address] if local_address else []),
                                      survivor_address(held, 0)]):
            try:
                info = rebuild_info(client.data(address), job, step, lost)
            except (BlobNotFoundError, ProtocolError):  # not a survivor, or an older daemon
                continue
            rb = _LocalRebuild(info, job, step, lost,
                               ErasureCodec(info.geometry.k, info.geometry.m))
            break
        with self._lock:
            return self._rebuilds.setdefault(held.key, rb)

    def _fetch_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._fetch is None:
                self._fetch = ThreadPoolExecutor(4, thread_name_prefix="ckpt-shards")
            return self._fetch


SPREAD_BYTES = 16 << 20  # granularity at which served rebuilt reads alternate survivors


def survivor_address(held: HeldSnapshot, start: int) -> str:
    """Which survivor serves bytes at ``start`` of a lost rank: decoding costs the serving
    daemon CPU, so reads are spread over all of them."""
    if held.rebuild_addresses:
        return held.rebuild_addresses[(start // SPREAD_BYTES) % len(held.rebuild_addresses)]
    return held.data_address
