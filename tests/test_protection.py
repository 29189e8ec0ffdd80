"""Erasure protection across daemons (``daemon/stripes.py``, ``daemon/protection.py``,
``daemon/rebuild.py``, ``daemon/blobstore.py``).

Each simulated node has its own ``SnapshotStore`` (snapshots) and parity store under
``tmp_path`` and a real ``DataServer`` on 127.0.0.1 serving a ``ProtectionBlobStore``;
nodes talk only through ``DataClient``s.  A lost node is one whose server is closed.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckptd.daemon.blobstore import ProtectionBlobStore
from ckptd.daemon.erasure import ErasureCodec
from ckptd.daemon.protection import (
    NodePayload,
    block_fetcher,
    encode_parity,
    parity_fetcher,
    parity_job,
)
from ckptd.daemon.rebuild import RebuildError, rebuild_info, rebuild_range
from ckptd.daemon.shm import SnapshotReader
from ckptd.daemon.snapshots import SnapshotStore
from ckptd.daemon.stripes import StripeGeometry
from ckptd.daemon.transport import DataClient, DataServer
from ckptd.errors import InvalidKeyError, QuorumError, StorageError

JOB, STEP, TOKEN, MiB = "job-1", 7, b"t" * 32, 1 << 20


# ------------------------------------------------------------------ geometry (pure)


@pytest.mark.parametrize("n", range(2, 11))
def test_geometry_any_m_losses_recoverable(n: int) -> None:
    for m in range(1, n):
        g = StripeGeometry([f"n{i}" for i in range(n)], m, [1000 * (i + 1) for i in range(n)],
                           piece_bytes=256)
        k = g.k
        for j in range(n):  # every member holds exactly one shard of every stripe
            data, parity = g.stripe(j)
            assert sorted(data + parity) == sorted(g.members)
            assert all(g.holder(j, s) == (data + parity)[s] for s in range(n))
        for node in g.members:
            assert len(g.data_blocks(node)) == k and len(g.parity_blocks(node)) == m
            for j, p in g.data_blocks(node):
                assert g.stripe(j)[0][p] == node and g.shard_of(node, j) == p
            for j, q in g.parity_blocks(node):
                assert g.stripe(j)[1][q] == node
        losses = list(itertools.combinations(g.members, m))
        for lost in random.Random(n * 31 + m).sample(losses, min(len(losses), 40)):
            for j in range(n):
                data, parity = g.stripe(j)
                assert sum(x not in lost for x in data + parity) >= k


def test_geometry_spans_and_sizes() -> None:
    g = StripeGeometry(["a", "b", "c", "d"], 2, {"a": 1000, "b": 0, "c": 1, "d": 130})
    assert g.block_bytes == 512 and g.k == 2
    spans = g.spans("a", 100, 1000)
    assert [(s.block, s.block_offset, s.payload_offset, s.length) for s in spans] == [
        (0, 100, 100, 412), (1, 0, 512, 488)]
    assert spans[0].stripe == 0 and spans[1].stripe == 3  # stripe (i - p) mod n
    assert g.valid_bytes("c", 0, 0, 512) == 1 and g.valid_bytes("c", 1, 0, 512) == 0
    assert StripeGeometry.from_json(g.to_json()) == g
    assert StripeGeometry(["a", "b"], 1, [0, 0]).block_bytes == 0
    with pytest.raises(ValueError):
        g.spans("a", 0, 1025)
    with pytest.raises(ValueError):
        StripeGeometry(["a", "b"], 2, [1, 1])


def test_encode_rows_matches_encode() -> None:
    codec = ErasureCodec(4, 3)
    rng = np.random.default_rng(1)
    data = [rng.integers(0, 256, 4099, dtype=np.uint8) for _ in range(4)]
    full = codec.encode(data)
    for q in range(3):
        assert np.array_equal(codec.encode_rows([q], data)[0], full[q])
    assert [np.array_equal(a, b) for a, b in zip(codec.encode_rows([2, 0], data),
                                                 [full[2], full[0]])] == [True, True]


def test_slot_previous_until_reused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, JOB, 64 * MiB)
    slot = store.slot(0)
    for step in (1, 2):
        w = slot.begin(step, 100)
        w.view().fill_(step)
        w.commit({"step": step})
    prev = slot.previous()
    assert prev is not None and prev.info.step == 1 and int(prev.view()[0]) == 1
    prev.release()
    snap = slot.at_step(1)
    assert snap is not None and snap.info.step == 1
    snap.release()
    slot.begin(3, 100).abort()  # reuses step 1's buffer: it is gone from now on
    assert slot.previous() is None and slot.at_step(1) is None
    assert slot.at_step(2) is not None
    store.close(unlink=True)


# ------------------------------------------------------------- a simulated group


def payload_bytes(node: int, size: int, seed: int = 0) -> bytes:
    return np.random.default_rng([node, size, seed]).integers(0, 256, size, np.uint8).tobytes()


class Node:
    """One daemon's protection state: snapshots, parity, a DataServer, clients to peers."""

    def __init__(self, root: Path, name: str, index: int, size: int,
                 peers: dict[str, DataClient]) -> None:
        self.name = name
        self.snapshots = SnapshotStore(root / "snap", JOB, 256 * MiB)
        self.parity = SnapshotStore(root / "parity", parity_job(JOB), 256 * MiB)
        self.data = payload_bytes(index, size)
        self.save(self.data)
        self.blobs = ProtectionBlobStore(name, peers, timeout=5.0)
        self.blobs.serve_parity(JOB, self.parity)
        self.server = DataServer("127.0.0.1:0", TOKEN, self.blobs)
        self.address = self.server.start()
        self.payload: NodePayload | None = None

    def save(self, data: bytes) -> None:
        """Two ranks per node: the payload split unevenly (rank order matters)."""
        self.data = data
        cut = len(data) // 3
        for rank, part in ((2 * len(self.name), data[:cut]), (2 * len(self.name) + 1, data[cut:])):
            w = self.snapshots.slot(rank).begin(STEP, len(part))
            if part:
                w.view().numpy()[:] = np.frombuffer(part, np.uint8)
            w.commit({"rank": rank})

    def register(self, geometry: StripeGeometry) -> None:
        if self.payload is not None:
            self.payload.close()
        self.payload = NodePayload.from_store(self.snapshots, STEP)
        self.blobs.serve_payload(JOB, STEP, self.payload, geometry)

    def close(self) -> None:
        self.server.close()
        if self.payload is not None:
            self.payload.close()
        self.snapshots.close(unlink=True)
        self.parity.close(unlink=True)


class Group:
    def __init__(self, root: Path, sizes: list[int], m: int, piece: int) -> None:
        self.peers: dict[str, DataClient] = {}
        names = [f"node-{i}" for i in range(len(sizes))]
        self.nodes = {x: Node(root / x, x, i, s, self.peers)
                      for i, (x, s) in enumerate(zip(names, sizes))}
        for x, node in self.nodes.items():
            self.peers[x] = DataClient(node.address, TOKEN, timeout=5.0, retries=1)
        self.geometry = StripeGeometry(names, m, sizes, piece_bytes=piece)
        self.codec = ErasureCodec(self.geometry.k, m)
        self.generation = 1

    def protect(self, generation: int, only: list[str] | None = None) -> None:
        self.generation = generation
        for node in self.nodes.values():
            node.register(self.geometry)
        for x in only or list(self.nodes):
            info = encode_parity(self.geometry, x, JOB, STEP, block_fetcher(self.peers, JOB, STEP),
                                 self.codec, self.nodes[x].parity, generation=generation)
            assert len(info.blocks) == self.geometry.m

    def lose(self, *names: str) -> None:
        for x in names:
            self.nodes[x].server.close()

    def rebuild(self, lost: str, start: int, end: int, unavailable: list[str],
                report: dict | None = None) -> bytes:
        out = bytearray(end - start)
        rebuild_range(self.geometry, lost, start, end, out, block_fetcher(self.peers, JOB, STEP),
                      parity_fetcher(self.peers, JOB, STEP), self.codec, report,
                      generation=self.generation, step=STEP, unavailable=unavailable)
        return bytes(out)

    def close(self) -> None:
        for c in self.peers.values():
            c.close()
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def group(tmp_path: Path) -> Iterator:
    made: list[Group] = []

    def make(sizes: list[int], m: int, piece: int = 4096) -> Group:
        g = Group(tmp_path, sizes, m, piece)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


SIZES = {
    "empty": [0, 0, 0, 0],
    "tiny": [1, 0, 5, 3],
    "odd": [100_003, 7, 65, 99_999],
}


def check_rebuilds(g: Group, lost: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    for x in lost:
        want = g.nodes[x].data
        assert g.rebuild(x, 0, len(want), lost) == want
        for _ in range(5):
            a = rng.randrange(len(want) + 1)
            b = rng.randrange(a, len(want) + 1)
            assert g.rebuild(x, a, b, lost) == want[a:b]


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("lost", [["node-1"], ["node-0", "node-3"], ["node-2", "node-3"]])
def test_rebuild_lost_members_4_2(group, sizes: list[int], lost: list[str]) -> None:
    g = group(sizes, m=2)
    g.protect(generation=1)
    g.lose(*lost)
    check_rebuilds(g, lost)


def test_rebuild_xor_3_1(group) -> None:
    g = group([50_000, 12_345, 1], m=1)
    g.protect(generation=1)
    for lost in g.nodes:
        check_rebuilds(g, [lost], seed=len(lost))  # nothing closed: unavailable suffices
    g.lose("node-1")
    check_rebuilds(g, ["node-1"])
    with pytest.raises(QuorumError, match="stripe"):
        g.rebuild("node-1", 0, 100, ["node-1", "node-2"])


def test_three_lost_is_quorum_error(group) -> None:
    g = group([20_000, 20_000, 20_000, 20_000], m=2)
    g.protect(generation=1)
    g.lose("node-0", "node-1", "node-2")
    report: dict = {}
    with pytest.raises(RebuildError, match=r"stripe \d+.*persisted checkpoint"):
        g.rebuild("node-0", 0, 20_000, ["node-0"], report)  # the others fail on contact
    assert any("unreachable" in r or "lost" in r for r in report.values()) or report == {}


def corrupt_parity(node: Node, stripe: int, offset_from_end: int = 1) -> None:
    """Flip one byte of a parity row in the parity store's shared-memory file."""
    snap = node.parity.slot(stripe).latest(verify=False)
    assert snap is not None
    with snap:
        size = snap.info.nbytes
    seg = node.parity.slot(stripe).segments[node.parity.slot(stripe).committed[1]]
    fd = os.open(seg.path, os.O_RDWR)
    try:
        pos = 4096 + size - offset_from_end  # after the 4 KiB segment header
        byte = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([byte[0] ^ 0x5A]), pos)
    finally:
        os.close(fd)


def test_corrupted_parity_excluded(group) -> None:
    g = group([30_000, 29_000, 31_000, 5_000], m=2)
    g.protect(generation=1)
    for holder in g.nodes.values():  # every parity block of the group is corrupted once
        for j, _ in g.geometry.parity_blocks(holder.name):
            corrupt_parity(holder, j)
            break
    g.lose("node-1")
    report: dict = {}
    assert g.rebuild("node-1", 0, 29_000, ["node-1"], report) == g.nodes["node-1"].data
    assert any("checksum mismatch" in r for r in report.values())
    # With two members lost, a stripe that then has a corrupted parity cannot decode:
    with pytest.raises(QuorumError, match="checksum mismatch"):
        g.rebuild("node-1", 0, 29_000, ["node-1", "node-2"])


def test_stale_parity_excluded(group) -> None:
    g = group([40_000, 40_000, 40_000, 40_000], m=2)
    g.protect(generation=1)
    for i, node in enumerate(g.nodes.values()):  # the step is saved again: new data
        node.save(payload_bytes(i, 40_000, seed=1))
    stale = "node-3"
    g.protect(generation=2, only=[x for x in g.nodes if x != stale])
    g.lose("node-0")
    report: dict = {}
    assert g.rebuild("node-0", 0, 40_000, ["node-0"], report) == g.nodes["node-0"].data
    assert any("stale: generation 1" in r for r in report.values())
    with pytest.raises(QuorumError, match="stale"):
        g.rebuild("node-0", 0, 40_000, ["node-0", "node-1"])


def test_changed_data_detected(group) -> None:
    """Parity of the right generation but a data owner whose bytes changed since: the
    data block is excluded by the recorded data checksums, never decoded into garbage."""
    g = group([10_000, 10_000, 10_000, 10_000], m=2)
    g.protect(generation=1)
    g.nodes["node-1"].save(payload_bytes(1, 10_000, seed=9))  # data in stripe 0
    g.nodes["node-1"].register(g.geometry)
    report: dict = {}
    assert g.rebuild("node-0", 0, 10_000, ["node-0"], report) == g.nodes["node-0"].data
    assert any("changed since" in r for r in report.values())


def test_blob_store_serves_lost_payload(group) -> None:
    g = group([70_001, 3, 66_000, 12_345], m=2)
    g.protect(generation=1)
    g.lose("node-0", "node-2")
    client = g.peers["node-3"]
    for x in ("node-0", "node-2"):
        key = f"{JOB}/{STEP}/{x}"
        assert client.stat(f"lost/{key}") == len(g.nodes[x].data)
        assert bytes(client.get(f"lost/{key}")) == g.nodes[x].data
        assert bytes(client.get_range(f"lost/{key}", 5, 6001)) == g.nodes[x].data[5:6001]
    g.lose("node-1")
    g.nodes["node-3"].blobs.forget_rebuilt()  # what it rebuilt before stays valid otherwise
    with pytest.raises(StorageError, match="persisted checkpoint"):
        client.get(f"lost/{JOB}/{STEP}/node-0")


def test_rebuild_info_lets_a_reader_decode_itself(group) -> None:
    """``rebuild/`` gives geometry, generation and the answering node's shared-memory
    segments: a reader pulling ``block/``/``parity/`` shards and decoding in its own
    process gets the lost payload bit-exact; the segments hold the node's exact bytes."""
    g = group([70_001, 3, 66_000, 12_345], m=2)
    g.protect(generation=7)
    g.lose("node-0", "node-2")
    info = rebuild_info(g.peers["node-3"], JOB, STEP, "node-0")
    assert (info.geometry.digest, info.generation, info.node) == (g.geometry.digest, 7, "node-3")
    reader, parts = SnapshotReader(), []
    for path, generation, n in info.payload:
        parts.append(bytearray(n))
        reader.read_into(path, generation, 0, memoryview(parts[-1]))
    reader.close()
    assert b"".join(parts) == g.nodes["node-3"].data
    assert {j for j, *_ in info.parity} == {j for j, _ in g.geometry.parity_blocks("node-3")}
    out = bytearray(len(g.nodes["node-0"].data))
    rebuild_range(info.geometry, "node-0", 0, len(out), out, block_fetcher(g.peers, JOB, STEP),
                  parity_fetcher(g.peers, JOB, STEP), ErasureCodec(2, 2),
                  generation=info.generation, step=STEP, unavailable=["node-0", "node-2"])
    assert bytes(out) == g.nodes["node-0"].data
    with pytest.raises(KeyError):  # not lost: nothing to rebuild
        g.nodes["node-3"].blobs.size(f"rebuild/{JOB}/{STEP}/node-3")
    g.lose("node-1")
    g.nodes["node-3"].blobs.forget_rebuilt()
    with pytest.raises(StorageError, match="persisted checkpoint"):  # refused up front
        rebuild_info(g.peers["node-3"], JOB, STEP, "node-0")


def test_blob_store_keys_validated(group) -> None:
    g = group([1000, 1000, 1000], m=1)
    g.protect(generation=1)
    blobs = g.nodes["node-0"].blobs
    assert blobs.size(f"block/{JOB}/{STEP}/node-0/1") == g.geometry.block_bytes
    assert blobs.size(f"parity/{JOB}/{STEP}/{g.geometry.parity_blocks('node-0')[0][0]}") > 0
    for bad in ("block/../7/node-0/0", "block/job-1/07/node-0/0", "parity/job-1/7/x",
                "lost/job-1/7/no de", "other/job-1/7", "block/.job/7/node-0/0"):
        with pytest.raises(InvalidKeyError):
            blobs.size(bad)
    for missing in (f"block/{JOB}/{STEP}/node-1/0", f"block/{JOB}/{STEP}/node-0/2",
                    f"block/{JOB}/8/node-0/0", f"parity/{JOB}/{STEP}/9",
                    f"lost/{JOB}/{STEP}/node-0", f"lost/{JOB}/{STEP}/node-9"):
        with pytest.raises(KeyError):
            blobs.size(missing)
    with pytest.raises(StorageError):
        blobs.begin_put(f"block/{JOB}/{STEP}/node-0/0", 1)


def test_node_payload_reads() -> None:
    class Fake:
        def __init__(self, rank: int, data: bytes) -> None:
            import torch
            self.info = type("I", (), {"rank": rank})()
            self._t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.empty(0, dtype=torch.uint8)
            self.released = False

        def view(self):
            return self._t

        def release(self) -> None:
            self.released = True

    parts = [Fake(3, b"world"), Fake(1, b"hello "), Fake(2, b"")]
    p = NodePayload(parts)  # type: ignore[arg-type]
    assert p.size == 11 and p.ranks == [1, 2, 3]
    out = bytearray(16)
    p.read_into(0, out)
    assert bytes(out) == b"hello world\0\0\0\0\0"
    assert bytes(p.view(4, 8)) == b"o wo" and bytes(p.view(9, 14)) == b"ld\0\0\0"
    p.close()
    assert all(x.released for x in parts)


@pytest.mark.slow
def test_rebuild_few_mib(group) -> None:
    sizes = [3 * MiB + 17, 2 * MiB, 3 * MiB, MiB - 5]
    g = group(sizes, m=2, piece=1 << 20)
    g.protect(generation=1)
    g.lose("node-0", "node-3")
    check_rebuilds(g, ["node-0", "node-3"], seed=3)
    client = g.peers["node-1"]
    assert bytes(client.get(f"lost/{JOB}/{STEP}/node-0")) == g.nodes["node-0"].data
