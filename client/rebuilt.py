"""Reading a lost node's ranks: its payload rebuilt from the survivors' shards.

When a node of an erasure group is gone, its ranks' snapshot bytes exist only as the
other members' data blocks and parity rows. The loader rebuilds them in its own process:
it asks a survivor for the step's stripe geometry (``rebuild/`` key), pulls the k
shards of each stripe straight from the daemons holding them (``block/`` and
``parity/`` keys: this node's daemon over its unix data socket, peers over TCP) and
decodes them here (:func:`ckptd.daemon.protection.rebuild_range`: every shard and the
result checked against the parity's CRC table). Asking a survivor for the decoded bytes
(``lost/`` key) instead makes every byte cross one more socket and a busy Python server
twice; that path stays as the fallback for daemons that do not serve ``rebuild/``.

Reads come in large aligned windows, each fetched once and kept in a small LRU (a load
asks for many small tensors), and read ahead: loads go in payload order, so while one
window is copied out the next ones are being pulled and decoded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ckpt.daemon_client import DaemonClient
from ckptd.daemon.datachannel import BlobNotFoundError, PeerLostError, ProtocolError
from ckptd.daemon.erasure import ErasureCodec
from ckptd.daemon.protection import RebuildInfo, rebuild_info, rebuild_range

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


class RebuiltWindows:
    """Bytes of lost ranks, rebuilt in ``WINDOW_BYTES`` windows (see the module docstring).

    ``addresses``: data-channel address of every reachable daemon by node name. Thread-safe;
    a window being fetched by one reader is waited for by the others.
    """

    WINDOW_BYTES = 16 << 20
    KEEP = 10  # > AHEAD + readers in flight: a window is not evicted before it is used
    AHEAD = 2

    def __init__(self, addresses: Mapping[str, str] | None = None) -> None:
        self.addresses = dict(addresses or {})
        self._windows: OrderedDict[tuple[str, int, int], Future[np.ndarray]] = OrderedDict()
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
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def read_into(self, client: DaemonClient, held: HeldSnapshot, start: int, out: torch.Tensor,
                  local_address: str | None = None) -> None:
        """Bytes ``[start, start + len(out))`` of ``held.key`` (the lost member's payload)
        into ``out`` (uint8). ``local_address``: this node's daemon's data socket."""
        end, pos, W = start + out.numel(), start, self.WINDOW_BYTES
        dst = out.numpy()  # numpy copies: one memcpy, no intra-op thread pool to wake
        limit = held.offset + held.desc.nbytes  # this rank's part of the lost payload
        if end > limit:
            raise ValueError(f"{held.key}: bytes [{start}, {end}) beyond rank "
                             f"{held.desc.rank}'s part (ends at {limit})")
        while pos < end:
            w0 = pos // W * W
            self._read_ahead(client, held, w0 + W, limit, local_address)
            win = self._window(client, held, w0, min(w0 + W, limit), local_address)
            n = min(end, w0 + len(win)) - pos  # > 0: the window reaches past pos
            dst[pos - start : pos - start + n] = win[pos - w0 : pos - w0 + n]
            pos += n

    def _read_ahead(self, client: DaemonClient, held: HeldSnapshot, w0: int, limit: int,
                    local_address: str | None) -> None:
        W = self.WINDOW_BYTES
        claimed = []
        with self._lock:
            for w in range(w0, min(limit, w0 + self.AHEAD * W), W):
                fut, mine = self._claim((held.key, w, min(w + W, limit)))
                if mine:
                    claimed.append((w, fut))
            if claimed and self._prefetch is None:
                self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="ckpt-rebuilt")
            pool = self._prefetch
        for w, fut in claimed:  # a failed prefetch is dropped; a reader that needs it retries
            assert pool is not None
            pool.submit(self._run, fut, client, held, w, min(w + W, limit), local_address)

    def _window(self, client: DaemonClient, held: HeldSnapshot, w0: int, w1: int,
                local_address: str | None) -> np.ndarray:
        with self._lock:
            fut, mine = self._claim((held.key, w0, w1))  # ranks of one lost node share key[0]
        if mine:
            self._run(fut, client, held, w0, w1, local_address)
        return fut.result()

    def _claim(self, key: tuple[str, int, int]) -> tuple[Future[np.ndarray], bool]:
        """The window's future, and whether the caller must fetch it (under ``_lock``)."""
        fut = self._windows.get(key)
        if fut is not None:
            self._windows.move_to_end(key)
            return fut, False
        fut = self._windows[key] = Future()
        while len(self._windows) > self.KEEP:
            self._windows.popitem(last=False)
        return fut, True

    def _run(self, fut: Future[np.ndarray], client: DaemonClient, held: HeldSnapshot,
             w0: int, w1: int, local_address: str | None) -> None:
        try:
            buf = np.empty(w1 - w0, np.uint8)
            self._fill(client, held, w0, w1, buf, local_address)
            fut.set_result(buf)
        except BaseException as e:
            with self._lock:
                if self._windows.get((held.key, w0, w1)) is fut:
                    del self._windows[(held.key, w0, w1)]
            fut.set_exception(e)

    def _fill(self, client: DaemonClient, held: HeldSnapshot, w0: int, w1: int, out: np.ndarray,
              local_address: str | None) -> None:
        rb = self._local_rebuild(client, held, local_address)
        if rb is None:  # the survivor decodes and sends the bytes (older daemons)
            address = survivor_address(held, w0)
            client.data(address).get_range(held.key, w0, w1, out=memoryview(out))
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

        def fetch_block(member: str, p: int, start: int, buf: np.ndarray) -> None:
            if local and member == rb.info.node and rb.info.payload:
                rb.read_payload(client, p * g.block_bytes + start, buf)
                return
            client.data(address(member)).get_range(
                f"block/{rb.job}/{rb.step}/{member}/{p}", start, start + len(buf), buf)

        def fetch_parity(member: str, stripe: int, start: int, buf: np.ndarray) -> None:
            seg = rb.parity_segments.get(stripe) if local and member == rb.info.node else None
            if seg is not None:
                client.reader.read_into(seg[0], seg[1], start, memoryview(buf))
                return
            client.data(address(member)).get_range(
                f"parity/{rb.job}/{rb.step}/{stripe}", start, start + len(buf), buf)

        unavailable = [m for m in g.members
                       if m == rb.lost or (m not in self.addresses and m != client.node)]
        rebuild_range(g, rb.lost, w0, w1, out, fetch_block, fetch_parity, rb.codec,
                      generation=rb.info.generation, step=rb.step, unavailable=unavailable,
                      headers=rb.headers, pool=self._fetch_pool())

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
