"""Daemon persistence (daemon/persist.py): snapshots -> universal format, no trainer.

Real save plans from the real planner for 2-4 ranks, descriptors built and round-tripped
through their JSON, payloads filled like a trainer fills shared memory, every rank
persisted with its pulls served by the sender's ``send_payload``, committed by the
coordinator, then read back with the real reader and compared bit for bit.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from planning_sim import make_locals

from ckptd.chunking import ChunkGrid
from ckptd.daemon.persist import (
    commit_step,
    persist_rank,
    recv_source,
    send_payload,
    staged_views,
)
from ckptd.daemon.ratelimit import (
    PROBE_PREFIX,
    ThrottledStorage,
    TokenBucket,
    limiter_from_config,
    measure_write_bandwidth,
)
from ckptd.dtypes import torch_dtype
from ckptd.errors import IntegrityError, InvalidKeyError
from ckptd.execute import piece_view
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.manifest_build import build_manifest, split_objects
from ckptd.formats.reader import CheckpointReader
from ckptd.formats.retention import BackgroundGC, RetentionPolicy
from ckptd.formats.storage import LocalStorage, Storage
from ckptd.formats.universal_reader import UniversalReader
from ckptd.formats.writer import WriterOptions
from ckptd.fragments import LocalEntry, RankLayout
from ckptd.placements import FlatShard, Replicated, Split
from ckptd.planner import PlanOptions, build_save_plan
from ckptd.snapshot import SnapshotDescriptor, array_records, build_descriptors

# Tensors up to 512 bytes go into packs, larger ones are arrays of their own: both paths.
WRITER = WriterOptions(workers=2, small_tensor_bytes=512)
# Small chunks, so that chunk grids cannot follow ZeRO's ragged pieces: transfers happen.
PLAN = PlanOptions(target_chunk_bytes=256, min_aligned_chunk_bytes=64)

MODEL = {
    "emb.w": (33, 17),
    "layers.0.w": (16, 12),
    "layers.0.b": (12,),
    "layers.1.w": (9, 7, 5),
    "norm.scale": (),
    "empty.w": (0, 4),
    "tiny.b": (3,),
}


def zero_layouts(world: int, align: int = 4) -> list[RankLayout]:
    """ZeRO-style flat partition of MODEL over ``world`` ranks (float32)."""
    names = sorted(MODEL)
    params = [(n, MODEL[n]) for n in names]
    flat = FlatShard.flat_size(params, align)
    bounds = [flat * r // world for r in range(world + 1)]
    out = []
    for r in range(world):
        fs = FlatShard.pack(params, bounds[r], align)
        n = bounds[r + 1] - bounds[r]
        metas, pieces = fs.resolve("flat", (n,), "float32")
        entry = LocalEntry(f"flat.{r}", (n,), "float32", pieces)
        out.append(RankLayout(r, (("dp", r),), metas, (entry,)))
    return out


def tp_layouts(world: int) -> list[RankLayout]:
    """Megatron-like: bf16 and fp32 tensors split on a dim, int64 and scalars replicated."""
    spec: dict[str, tuple[tuple[int, ...], str, int | None]] = {
        "w.bf16": ((24, 10), "bfloat16", 0),
        "w.fp32": ((6, 40), "float32", 1),
        "steps": ((5,), "int64", None),
        "scale": ((), "float32", None),
        "bias": ((8,), "float16", 0),
    }
    out = []
    for r in range(world):
        metas, entries = {}, []
        for name, (shape, dtype, dim) in spec.items():
            if dim is None:
                placement: Any = Replicated()
                local = shape
            else:
                step = -(-shape[dim] // world)
                start = min(r * step, shape[dim])
                local = tuple(
                    min(step, shape[dim] - start) if d == dim else s for d, s in enumerate(shape)
                )
                placement = Split(dim, r, world, global_size=shape[dim], uneven=True)
            ms, ps = placement.resolve(name, local, dtype)
            metas.update({m.name: m for m in ms})
            entries.append(LocalEntry(name, local, dtype, ps))
        out.append(RankLayout(r, (("tp", r),), tuple(metas.values()), tuple(entries)))
    return out


def global_tensors(layouts: list[RankLayout], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in {m.name: m for lay in layouts for m in lay.tensors}.values():
        dt = torch_dtype(m.dtype)
        if dt.is_floating_point:
            out[m.name] = torch.randn(m.shape, generator=g).to(dt)
        else:
            out[m.name] = torch.randint(-(2**40), 2**40, m.shape, generator=g).to(dt)
    return out


class Save:
    """One step saved through descriptors and payloads, as daemons would hold it."""

    def __init__(
        self, layouts: list[RankLayout], globals_: dict[str, torch.Tensor], step: int,
        codec: str = "raw",
    ) -> None:
        self.step = step
        self.world = len(layouts)
        plan = build_save_plan(layouts, PLAN)
        records = array_records(plan, dict.fromkeys(plan.tensors, codec), 1, WRITER)
        descs = build_descriptors(
            plan, layouts, records, job="job-a", step=step,
            nodes=[f"node-{r // 2}" for r in range(self.world)],
            rng=[{"torch": {"seed": 1000 + r}} for r in range(self.world)],
            objects=[{"epoch": 3, "lr": 0.5, "shard": r} for r in range(self.world)],
        )
        # The daemon only ever sees the JSON: persist from the parsed form.
        self.descs = [SnapshotDescriptor.loads(d.dumps()) for d in descs]
        assert self.descs == descs
        self.payloads = []
        for r, d in enumerate(self.descs):
            locals_ = make_locals(layouts[r], globals_, seed=r)
            payload = torch.full((d.nbytes,), 0xAB, dtype=torch.uint8)  # garbage in gaps
            for view, sp in zip(staged_views(d, payload), d.plan.staged):
                view.copy_(piece_view(locals_[sp.key], sp.piece))
            self.payloads.append(payload)
        self.policy = CodecPolicy(codec)
        self.fetches = 0

    def fetcher(self, rank: int):
        """``fetch_recv`` of ``rank``: a pull served by the sender's ``send_payload``."""

        def fetch(i, t):
            src, index = recv_source(self.descs[rank].plan, i)
            self.fetches += 1
            return send_payload(self.descs[src], self.payloads[src], rank, index, expect=t)

        return fetch

    def persist(self, storage: Storage, limiter=None, payloads=None, fetchers=None):
        payloads = payloads or self.payloads
        with ThreadPoolExecutor(self.world) as pool:  # daemons persist concurrently
            futs = [
                pool.submit(
                    persist_rank, d, payloads[r], storage,
                    (fetchers or {}).get(r, self.fetcher(r)), self.policy, WRITER, limiter,
                )
                for r, d in enumerate(self.descs)
            ]
            return [f.result() for f in futs]

    def commit(self, storage: Storage, reports, gc=None):
        d0 = self.descs[0]
        return commit_step(
            storage, self.step, self.world, list(reversed(reports)),  # any order
            d0.layouts_digest, tensors=d0.metas.keys(), gc=gc,
        )


def assert_bit_exact(storage: Storage, step: int, globals_: dict[str, torch.Tensor]) -> None:
    reader = UniversalReader.open(storage, step)
    assert sorted(reader.names()) == sorted(globals_)
    for name, want in globals_.items():
        got = reader.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
        assert torch.equal(got.reshape(-1).view(bits), want.reshape(-1).view(bits)), name


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zero_layout_with_transfers_bit_exact(tmp_path, world):
    layouts = zero_layouts(world)
    glob = global_tensors(layouts, seed=world)
    save = Save(layouts, glob, step=7)
    assert any(d.plan.recvs for d in save.descs), "the layout must need transfers"
    storage = LocalStorage(str(tmp_path))
    reports = save.persist(storage)
    assert [r["status"] for r in reports] == [None] * world
    assert save.fetches == sum(len(d.plan.recvs) for d in save.descs)
    out = save.commit(storage, reports)
    assert out.committed and not out.failures, out.error
    assert commit_mod.latest_step(storage) == 7
    assert_bit_exact(storage, 7, glob)

    m = UniversalReader.open(storage, 7).manifest
    assert m.layout["world_size"] == world
    assert m.layout["coords"] == [f"dp={r}" for r in range(world)]
    assert m.layout["digest"] == save.descs[0].layouts_digest
    assert m.rng == {f"dp={r}": {"torch": {"seed": 1000 + r}} for r in range(world)}
    assert m.state == {"epoch": 3, "lr": 0.5}
    assert m.per_rank_state == {"shard": {f"dp={r}": r for r in range(world)}}
    assert m.tensors["tiny.b"].packed and not m.tensors["emb.w"].packed
    assert m.tensors["empty.w"].chunks == ()
    assert storage.exists("step-000000007/emb.w/zarr.json")  # unpacked: array metadata
    assert out.bytes_written == sum(r["bytes"] for r in reports) + storage.size(
        "step-000000007/zarr.json"
    )


def test_tp_mixed_dtypes_zstd_bit_exact(tmp_path):
    layouts = tp_layouts(3)
    glob = global_tensors(layouts, seed=5)
    save = Save(layouts, glob, step=3, codec="zstd")
    storage = LocalStorage(str(tmp_path))
    out = save.commit(storage, save.persist(storage))
    assert out.committed, out.error
    assert_bit_exact(storage, 3, glob)


def test_zarr_python_reads_unpacked_array(tmp_path):
    zarr = pytest.importorskip("zarr")
    layouts = zero_layouts(2)
    glob = global_tensors(layouts, seed=1)
    save = Save(layouts, glob, step=1)
    storage = LocalStorage(str(tmp_path))
    assert save.commit(storage, save.persist(storage)).committed
    arr = zarr.open_array(str(tmp_path / "step-000000001" / "emb.w"), mode="r")
    assert torch.equal(torch.from_numpy(arr[...]), glob["emb.w"])


def test_same_bytes_as_in_memory_simulation(tmp_path):
    """The chunks land as the in-process byte-moving code assembles them."""
    from planning_sim import simulate_save

    layouts = zero_layouts(3)
    glob = global_tensors(layouts, seed=2)
    locals_ = [make_locals(lay, glob, seed=lay.rank) for lay in layouts]
    _, _, chunks = simulate_save(layouts, locals_, **PLAN.__dict__)
    save = Save(layouts, glob, step=2)
    storage = LocalStorage(str(tmp_path))
    assert save.commit(storage, save.persist(storage)).committed
    reader = CheckpointReader.open(storage, 2)
    assert {(n, c.index) for n, rec in reader.manifest.tensors.items() for c in rec.chunks} == set(
        chunks
    )
    for (name, index), want in chunks.items():
        rec = reader.record(name)
        got = reader.read_chunk(name, index, ChunkGrid(rec.shape, rec.chunk_shape).chunk_box(index))
        assert torch.equal(got, want), (name, index)


def test_failing_rank_leaves_no_step_and_previous_intact(tmp_path):
    layouts = zero_layouts(3)
    storage = LocalStorage(str(tmp_path))
    glob1 = global_tensors(layouts, seed=11)
    s1 = Save(layouts, glob1, step=1)
    assert s1.commit(storage, s1.persist(storage)).committed
    before = {k: storage.get(k) for k in storage.list("step-000000001")}

    glob2 = global_tensors(layouts, seed=12)
    s2 = Save(layouts, glob2, step=2)
    victim = next(r for r, d in enumerate(s2.descs) if d.plan.recvs)

    def broken(i, t):
        raise ConnectionError("peer daemon lost")

    reports = s2.persist(storage, fetchers={victim: broken})
    assert "peer daemon lost" in reports[victim]["status"]
    assert any(r["status"] is None and r["chunks"] for r in reports)  # others wrote bytes
    assert storage.list("step-000000002")  # ... that are on storage, uncommitted
    out = s2.commit(storage, reports)
    assert not out.committed and victim in out.failures
    assert storage.list("step-000000002") == []
    assert commit_mod.committed_steps(storage) == [1]
    assert commit_mod.latest_step(storage) == 1
    assert {k: storage.get(k) for k in storage.list("step-000000001")} == before
    assert_bit_exact(storage, 1, glob1)


def test_short_payload_and_missing_report_fail_cleanly(tmp_path):
    layouts = zero_layouts(2)
    storage = LocalStorage(str(tmp_path))
    save = Save(layouts, global_tensors(layouts, seed=3), step=4)
    short = [save.payloads[0], save.payloads[1][:8]]
    reports = save.persist(storage, payloads=short)
    assert reports[0]["status"] is None
    assert reports[1]["status"].startswith("InvalidKeyError")
    assert not save.commit(storage, reports).committed
    out = commit_step(storage, 4, 2, reports[:1], save.descs[0].layouts_digest)
    assert out.failures == {1: "no report from rank 1"}
    assert commit_mod.step_dirs(storage) == []


def test_committed_step_is_never_rewritten(tmp_path):
    layouts = zero_layouts(2)
    storage = LocalStorage(str(tmp_path))
    glob = global_tensors(layouts, seed=4)
    s1 = Save(layouts, glob, step=5)
    assert s1.commit(storage, s1.persist(storage)).committed
    before = {k: storage.get(k) for k in storage.list("step-000000005")}
    again = Save(layouts, global_tensors(layouts, seed=99), step=5)
    reports = again.persist(storage)
    assert all("CommitConflictError" in r["status"] for r in reports)
    assert not again.commit(storage, reports).committed
    # Even with (forged) successful reports the coordinator refuses to touch it.
    ok = [dict(r, status=None, chunks=[]) for r in reports]
    out = again.commit(storage, ok)
    assert not out.committed and "CommitConflictError" in out.failures[0]
    assert {k: storage.get(k) for k in storage.list("step-000000005")} == before
    assert_bit_exact(storage, 5, glob)


def test_send_payload_checks_index_and_plan(tmp_path):
    layouts = zero_layouts(3)
    save = Save(layouts, global_tensors(layouts, seed=6), step=1)
    dst = next(r for r, d in enumerate(save.descs) if d.plan.recvs)
    src, index = recv_source(save.descs[dst].plan, 0)
    t = save.descs[dst].plan.recvs[0]
    got = send_payload(save.descs[src], save.payloads[src], dst, index, expect=t)
    assert tuple(got.shape) == t.box.lengths and got.is_contiguous()
    with pytest.raises(InvalidKeyError):
        send_payload(save.descs[src], save.payloads[src], dst, 10_000)
    forged = type(t)(t.name, t.box, t.src, (t.dst + 1) % 3)  # another plan's view
    with pytest.raises(IntegrityError):
        send_payload(save.descs[src], save.payloads[src], dst, index, expect=forged)


def test_staged_views_are_zero_copy():
    layouts = tp_layouts(2)
    save = Save(layouts, global_tensors(layouts, seed=8), step=1)
    d, payload = save.descs[1], save.payloads[1]
    views = staged_views(d, payload)
    assert all(v.untyped_storage().data_ptr() == payload.untyped_storage().data_ptr()
               for v in views)
    views[0].view(torch.uint8).reshape(-1)[0] ^= 0xFF
    assert payload[d.pieces[0].offset] == (views[0].view(torch.uint8).reshape(-1)[0])


def test_manifest_split_objects_matches_saver_semantics():
    reports = [
        {"objects": {"a": 1, "b": [1, 2], "c": 0}, "coords": "tp=0"},
        {"objects": {"a": 1, "b": [1, 3]}, "coords": "tp=1"},
    ]
    state, per_rank = split_objects(reports)
    assert state == {"a": 1}
    assert per_rank == {"b": {"tp=0": [1, 2], "tp=1": [1, 3]}, "c": {"tp=0": 0}}
    with pytest.raises(IntegrityError):
        build_manifest(1, {}, [], "d", tensors=["x"])


# ---------------------------------------------------------------------- rate limiting


def test_token_bucket_with_fake_clock():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000, burst_bytes=100, clock=lambda: now[0], sleep=sleep)
    assert b.acquire(100) == 0  # the burst
    assert b.acquire(500) == pytest.approx(0.5)  # more than the bucket holds: debt
    assert b.acquire(1000) == pytest.approx(1.0)
    now[0] += 10  # idle: refills to the burst, not beyond
    assert b.acquire(100) == 0
    assert b.acquire(1) == pytest.approx(0.001)
    assert b.bytes_admitted == 1701


def test_token_bucket_threads_share_the_rate():
    b = TokenBucket(2_000_000, burst_bytes=0)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda: [b.acquire(50_000) for _ in range(4)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.95 * 800_000 / 2_000_000


def test_persist_honours_rate_limit(tmp_path):
    layouts = zero_layouts(2)
    save = Save(layouts, global_tensors(layouts, seed=9), step=1)
    storage = LocalStorage(str(tmp_path))
    rate = 20_000.0  # bytes/s; the raw-coded payload is ~5 KB: about 0.25 s per test run
    limiter = TokenBucket(rate, burst_bytes=1000)
    t0 = time.perf_counter()
    reports = save.persist(storage, limiter=limiter)
    elapsed = time.perf_counter() - t0
    assert all(r["status"] is None for r in reports)
    written = sum(r["bytes"] for r in reports)
    assert limiter.bytes_admitted >= written > 4000
    # Bytes admitted over the elapsed time never exceed the rate plus the burst ...
    assert limiter.bytes_admitted <= rate * elapsed + limiter.burst + 1
    # ... and the limiter is not much slower than the rate either.
    assert elapsed < limiter.bytes_admitted / rate + 2.0
    assert save.commit(storage, reports).committed


def test_limiter_from_config_share_and_probe(tmp_path):
    storage = LocalStorage(str(tmp_path))
    assert limiter_from_config(None, None) is None
    fixed = limiter_from_config(1 << 20, 0.5)
    assert fixed is not None and fixed.rate == 1 << 20  # bytes/s wins over a share
    given = limiter_from_config(None, 0.25, bandwidth_bytes_per_s=400e6)
    assert given is not None and given.rate == pytest.approx(100e6)
    measured = limiter_from_config(None, 0.5, storage=storage, probe_bytes=1 << 20)
    assert measured is not None and measured.rate > 0
    assert measure_write_bandwidth(storage, 1 << 16) > 0
    assert storage.list(PROBE_PREFIX) == []  # the probe cleans up after itself
    assert commit_mod.step_dirs(storage) == []
    with pytest.raises(ValueError):
        limiter_from_config(None, 0.5)


def test_throttled_storage_paces_plain_puts(tmp_path):
    inner = LocalStorage(str(tmp_path))
    b = TokenBucket(1e9, burst_bytes=0)
    s = ThrottledStorage(inner, b)
    s.put("a/b", b"x" * 100)
    batch = s.batch()
    batch.put("a/c", memoryview(bytearray(50)))
    batch.flush()
    assert b.bytes_admitted == 150
    assert s.get("a/b") == b"x" * 100 and s.list("a") == ["a/b", "a/c"]


# ------------------------------------------------------------------------ retention


def test_retention_applied_after_commit(tmp_path):
    layouts = zero_layouts(2)
    storage = LocalStorage(str(tmp_path))
    in_flight: set[int] = set()
    gc = BackgroundGC(storage, RetentionPolicy(keep_last=2), in_progress=lambda: set(in_flight))
    try:
        globs = {}
        for step in (1, 2, 3, 4):
            globs[step] = global_tensors(layouts, seed=step)
            save = Save(layouts, globs[step], step=step)
            in_flight.add(step)
            out = save.commit(storage, save.persist(storage), gc=gc)
            in_flight.discard(step)
            assert out.committed, out.error
        assert gc.drain(10)
    finally:
        gc.close()
    assert commit_mod.committed_steps(storage) == [3, 4]
    assert commit_mod.step_dirs(storage) == [3, 4]
    assert_bit_exact(storage, 4, globs[4])
    assert gc.errors == 0 and gc.runs >= 1


# ------------------------------------------------------- against the in-process save


def test_same_files_as_in_process_save(tmp_path):
    """One process: ``ckpt.save`` and the daemon path write the same objects, byte for
    byte, and the same manifest (but for its creation time)."""
    import json

    import ckpt
    from ckptd.formats.manifest import GROUP_META_KEY
    from ckptd.layout import build_rank_layout, local_tensor
    from ckptd.snapshot import build_descriptor
    from ckptd.statedict import flatten_state

    g = torch.Generator().manual_seed(21)
    state: dict[str, Any] = {
        "model": {
            "emb": torch.randn(40, 9, generator=g),
            "w": torch.randn(7, 5, generator=g).to(torch.bfloat16),
            "b": torch.randn(3, generator=g),
            "n": torch.tensor(2.5),
            "e": torch.empty(0, 3),
        },
        "step": 17,
        "sched": {"lr": 0.25},
    }
    policy = CodecPolicy("raw")
    old = ckpt.get_config()
    ckpt.configure(codec=policy, remote_codec=policy, writer=WRITER, plan=PLAN, retention=None)
    try:
        ckpt.save(state, 1, str(tmp_path / "inproc"))
    finally:
        ckpt.configure(old)

    flat = flatten_state(state)
    lay = build_rank_layout(flat, None, 0)
    plan = build_save_plan([lay], PLAN)
    records = array_records(plan, dict.fromkeys(plan.tensors, "raw"), policy.level, WRITER)
    objects = json.loads(json.dumps(flat.objects))
    desc = build_descriptor(
        plan, 0, [lay], records, job="j", step=1, nodes=["n0"], objects=objects
    )
    payload = torch.zeros(desc.nbytes, dtype=torch.uint8)
    for view, sp in zip(staged_views(desc, payload), desc.plan.staged):
        view.copy_(piece_view(local_tensor(flat.tensors[sp.key]), sp.piece))
    daemon = LocalStorage(str(tmp_path / "daemon"))

    def no_recv(i, t):
        raise AssertionError("one rank receives nothing")

    report = persist_rank(desc, payload, daemon, no_recv, policy, WRITER)
    assert report["status"] is None, report["status"]
    out = commit_step(daemon, 1, 1, [report], desc.layouts_digest, tensors=desc.metas)
    assert out.committed, out.error

    inproc = LocalStorage(str(tmp_path / "inproc"))
    keys = inproc.list("step-000000001")
    assert daemon.list("step-000000001") == keys
    for k in keys:
        if k.endswith(("/" + GROUP_META_KEY, "/COMMITTED")) and k.count("/") == 1:
            continue
        assert daemon.get(k) == inproc.get(k), k
    m_in = CheckpointReader.open(inproc, 1).manifest.to_json()
    m_d = CheckpointReader.open(daemon, 1).manifest.to_json()
    m_in.pop("created")
    m_d.pop("created")
    assert m_d == m_in
