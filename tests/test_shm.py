"""Shared-memory snapshots (``ckptd.daemon.shm`` / ``ckptd.daemon.snapshots``).

Crashes are real: child processes (a trainer, or a daemon) are SIGKILLed mid-write or
after committing, and a fresh process reads or adopts what they left.  Each test works in
its own directory under /dev/shm and removes it.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
import torch

from ckptd.daemon.shm import HEADER_SIZE, SnapshotBusyError, SnapshotError, TrainerMappings
from ckptd.daemon.snapshots import SnapshotStore
from ckptd.errors import InvalidKeyError, StagingBudgetError

MiB = 1 << 20
JOB = "job-7"


@pytest.fixture
def root() -> Iterator[str]:
    """A unique directory under /dev/shm (real POSIX shared memory), removed afterwards."""
    path = f"/dev/shm/ckptd-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def data(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def save(store: SnapshotStore, rank: int, step: int, nbytes: int, seed: int) -> None:
    w = store.slot(rank).begin(step, nbytes)
    w.view().copy_(data(nbytes, seed))
    w.commit({"step": step, "seed": seed, "specs": [["float32", [nbytes // 4]]]})


def assert_latest(store: SnapshotStore, rank: int, step: int, nbytes: int, seed: int) -> None:
    snap = store.slot(rank).latest()
    assert snap is not None, store.discarded
    with snap:
        assert (snap.info.step, snap.info.nbytes) == (step, nbytes)
        assert snap.descriptor["seed"] == seed
        assert torch.equal(snap.view(), data(nbytes, seed))


def child(code: str, *args: object) -> subprocess.Popen[str]:
    """A fresh Python process running ``code`` (``ARGS`` holds ``args`` as strings)."""
    prelude = "import sys; ARGS = sys.argv[1:]\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"child exited early with {proc.wait()}"
    return line.strip()


def sigkill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no cleanup of any kind runs in the child
    proc.wait()


def shm_rss() -> int:
    """Shared memory mapped and resident in this process (RssShmem), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def resident_fraction(path: str) -> float:
    """Fraction of the file's pages present in memory (``mincore`` on a fresh mapping)."""
    import ctypes

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)  # no MAP_POPULATE: no faults
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        arr = np.frombuffer(mm, dtype=np.uint8)  # only to learn the mapping's address
        rc = libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
        del arr
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(v & 1 for v in vec) / pages
    finally:
        mm.close()


def segment_files(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if ".b" in n and not n.endswith(".slot"))


# --------------------------------------------------------------------------- basics


def test_round_trip_and_double_buffering(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    assert store.slot(0).latest() is None
    save(store, 0, step=10, nbytes=3 * MiB + 5, seed=1)
    assert_latest(store, 0, 10, 3 * MiB + 5, 1)
    save(store, 0, step=11, nbytes=3 * MiB, seed=2)
    assert_latest(store, 0, 11, 3 * MiB, 2)
    files = segment_files(root)
    assert len(files) == 2  # two buffers, reused from now on
    save(store, 0, step=12, nbytes=3 * MiB, seed=3)
    assert_latest(store, 0, 12, 3 * MiB, 3)
    assert segment_files(root) == files
    info = store.slot(0).latest()
    assert info is not None and info.info.generation == 3
    info.release()
    save(store, 1, step=12, nbytes=0, seed=0)  # an empty snapshot is a snapshot too
    assert_latest(store, 1, 12, 0, 0)
    # An aborted or superseded write leaves the last committed snapshot in place.
    with pytest.raises(RuntimeError), store.slot(0).begin(13, MiB) as w:
        w.view().fill_(7)
        raise RuntimeError("trainer failed mid-copy")
    stale = store.slot(0).begin(13, MiB)
    store.slot(0).begin(13, MiB).abort()
    with pytest.raises(SnapshotError, match="superseded"):
        stale.commit({})
    assert_latest(store, 0, 12, 3 * MiB, 3)
    store.close(unlink=True)
    assert os.listdir(root) == []


def test_reader_pin_gives_backpressure(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(store, 0, 1, MiB, 1)
    snap = store.slot(0).latest()  # e.g. persistence reading step 1
    assert snap is not None
    save(store, 0, 2, MiB, 2)  # the other buffer: fine
    with pytest.raises(SnapshotBusyError, match="still being read"):
        store.slot(0).begin(3, MiB, timeout=0.1)  # would overwrite step 1 under the reader
    assert torch.equal(snap.view(), data(MiB, 1))
    snap.release()
    save(store, 0, 3, MiB, 3)
    assert_latest(store, 0, 3, MiB, 3)
    store.close(unlink=True)


def test_job_id_and_lease_validation(root: str) -> None:
    with pytest.raises(InvalidKeyError):
        SnapshotStore(root, "../etc", budget_bytes=MiB)
    store = SnapshotStore(root, JOB, budget_bytes=8 * MiB)
    w = store.slot(0).begin(1, 4096)
    lease = w.lease.to_json()
    with pytest.raises(InvalidKeyError):
        type(w.lease).from_json({**lease, "path": "/etc/passwd"})
    with pytest.raises(InvalidKeyError):
        type(w.lease).from_json({**lease, "nbytes": lease["capacity"] + 1})
    store.close(unlink=True)


# --------------------------------------------------------------------------- budget


def test_budget_exceeded_is_clear_and_keeps_previous(root: str) -> None:
    budget = 2 * (HEADER_SIZE + MiB) + 4096
    store = SnapshotStore(root, JOB, budget_bytes=budget)
    save(store, 0, 1, MiB, 1)
    save(store, 0, 2, MiB, 2)
    used = store.used_bytes()
    assert used == 2 * (HEADER_SIZE + MiB) <= budget
    with pytest.raises(StagingBudgetError) as e:
        store.slot(0).begin(3, 3 * MiB)
    msg = str(e.value)
    assert f"needs {3 * MiB} bytes" in msg and f"{budget}-byte" in msg and "intact" in msg
    assert store.used_bytes() == used
    assert_latest(store, 0, 2, MiB, 2)
    with pytest.raises(StagingBudgetError):  # another rank cannot take what is not there
        store.slot(1).begin(1, MiB)
    assert_latest(store, 0, 2, MiB, 2)
    store.close(unlink=True)


def test_growth_is_geometric_and_keeps_previous(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB, growth=1.5)
    save(store, 0, 1, MiB, 1)
    save(store, 0, 2, MiB, 2)
    w = store.slot(0).begin(3, MiB + 1)  # needs a larger buffer: 1.5 MiB, not 1 MiB + 1
    assert w.lease.capacity == MiB * 3 // 2
    assert_latest(store, 0, 2, MiB, 2)  # while the grown buffer is written
    w.view().copy_(data(MiB + 1, 3))
    w.commit({"seed": 3})
    assert_latest(store, 0, 3, MiB + 1, 3)
    assert len(segment_files(root)) == 2  # the replaced file is gone
    assert store.used_bytes() == 2 * HEADER_SIZE + MiB + MiB * 3 // 2
    save(store, 0, 4, 4 * MiB, 4)  # more than 1.5x: exactly what is needed
    assert_latest(store, 0, 4, 4 * MiB, 4)
    store.close(unlink=True)


# --------------------------------------------------------------------------- pre-faulting


def test_buffers_are_prefaulted_at_creation(root: str) -> None:
    n = 64 * MiB
    store = SnapshotStore(root, JOB, budget_bytes=256 * MiB)
    before = shm_rss()
    w = store.slot(0).begin(1, n)
    created = shm_rss()
    (path,) = segment_files(root)
    # Every page exists in the file (allocated at creation), and is mapped here already.
    assert resident_fraction(os.path.join(root, path)) == 1.0
    assert created - before >= n
    w.view().copy_(data(n, 5))
    assert shm_rss() - created < n // 16  # the copy itself faults no new pages in
    w.commit({})
    # Control: a segment that is only ftruncated has no pages: the check discriminates.
    plain = os.path.join(root, "control")
    with open(plain, "wb") as f:
        f.truncate(n)
    assert resident_fraction(plain) == 0.0
    store.slot(0).reserve(n)  # pre-allocates the other buffer ahead of the next save
    assert all(resident_fraction(os.path.join(root, p)) == 1.0 for p in segment_files(root))
    store.close(unlink=True)


# --------------------------------------------------------------------------- trainer side

TRAINER = """
import json, os, time
import torch
from ckptd.daemon.shm import TrainerMappings, WriteLease

def shm_rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024

lease = WriteLease.from_json(json.loads(ARGS[0]))
seed, mode = int(ARGS[1]), ARGS[2]
src = torch.randint(0, 256, (lease.nbytes,), dtype=torch.uint8,
                    generator=torch.Generator().manual_seed(seed))
maps = TrainerMappings()
r0 = shm_rss()
dst = maps.writable(lease)
r1 = shm_rss()
if mode == "crash":
    dst[: lease.nbytes // 2].copy_(src[: lease.nbytes // 2])
    print("half", flush=True)
    time.sleep(60)
dst.copy_(src)
r2 = shm_rss()
print(json.dumps({"attach": r1 - r0, "copy": r2 - r1}), flush=True)
"""


def test_trainer_attach_writes_daemon_reads(root: str) -> None:
    n = 32 * MiB
    store = SnapshotStore(root, JOB, budget_bytes=256 * MiB)
    w = store.slot(3).begin(5, n)
    proc = child(TRAINER, json.dumps(w.lease.to_json()), 42, "full")
    rss = json.loads(wait_line(proc))
    assert proc.wait() == 0
    # MAP_POPULATE: the trainer's page tables are filled at attach, not during its copy.
    assert rss["attach"] >= n and rss["copy"] < n // 16, rss
    w.commit({"tensors": ["w"]})
    snap = store.slot(3).latest()
    assert snap is not None and snap.descriptor == {"tensors": ["w"]}
    assert torch.equal(snap.view(), data(n, 42))
    snap.release()
    # A lease of a superseded write is refused on the trainer side, before any byte moves.
    old = store.slot(3).begin(6, MiB)
    store.slot(3).begin(6, MiB)
    maps = TrainerMappings()
    with pytest.raises(SnapshotError, match="not open for generation"):
        maps.writable(old.lease)
    maps.close()
    store.close(unlink=True)


def test_trainer_killed_mid_copy_keeps_previous(root: str) -> None:
    n = 8 * MiB
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(store, 0, 1, n, 1)
    w = store.slot(0).begin(2, n)
    proc = child(TRAINER, json.dumps(w.lease.to_json()), 2, "crash")
    assert wait_line(proc) == "half"
    sigkill(proc)
    assert_latest(store, 0, 1, n, 1)  # bit-exact: the crash hit the other buffer
    # The restarted trainer saves again: the new begin supersedes the dead one's write.
    w2 = store.slot(0).begin(2, n)
    with pytest.raises(SnapshotError):
        w.commit({})
    w2.view().copy_(data(n, 2))
    w2.commit({"seed": 2})
    assert_latest(store, 0, 2, n, 2)
    store.close(unlink=True)


# --------------------------------------------------------------------------- daemon restart

DAEMON = """
import time
import torch
from ckptd.daemon.snapshots import SnapshotStore

root, job = ARGS[0], ARGS[1]
store = SnapshotStore(root, job, budget_bytes=1 << 30)
def fill(rank, step, n, seed, commit=True):
    w = store.slot(rank).begin(step, n)
    w.view().copy_(torch.randint(0, 256, (n,), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(seed)))
    if commit:
        w.commit({"seed": seed})
fill(0, 1, 4 << 20, 1)
fill(0, 2, 4 << 20, 2)
fill(1, 2, 3 << 20, 12)
fill(0, 3, 4 << 20, 3, commit=False)  # killed in the middle of this one
print("ready", flush=True)
time.sleep(60)
"""


def test_adopt_after_daemon_sigkill(root: str) -> None:
    proc = child(DAEMON, root, JOB)
    assert wait_line(proc) == "ready"
    sigkill(proc)
    store = SnapshotStore(root, JOB, budget_bytes=1 << 30)
    report = store.adopt()
    assert {r: (i.step, i.generation) for r, i in report.kept.items()} == {0: (2, 2), 1: (2, 1)}
    reasons = [d.reason for d in report.discarded]
    assert any("interrupted write" in r for r in reasons), reasons
    assert_latest(store, 0, 2, 4 * MiB, 2)
    assert_latest(store, 1, 2, 3 * MiB, 12)
    assert store.used_bytes() == 3 * HEADER_SIZE + 11 * MiB
    # Saving goes on: generations continue, the adopted buffers are reused.
    files = segment_files(root)
    save(store, 0, 3, 4 * MiB, 30)
    assert_latest(store, 0, 3, 4 * MiB, 30)
    latest = store.slot(0).latest()
    assert latest is not None and latest.info.generation == 4
    latest.release()
    assert segment_files(root) == files
    store.close(unlink=True)


def test_slot_not_adopted_starts_over(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(store, 0, 1, MiB, 1)
    store.close()  # files stay
    fresh = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    assert fresh.slot(0).latest() is None  # no adopt(): never reads the old bytes
    assert segment_files(root) == []
    with pytest.raises(SnapshotError, match="before any slot"):
        fresh.adopt()
    fresh.close(unlink=True)


# --------------------------------------------------------------------------- integrity


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_corrupted_payload_is_never_returned(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(store, 0, 1, MiB, 1)
    (path,) = segment_files(root)
    flip_byte(os.path.join(root, path), HEADER_SIZE + 12345)
    assert store.slot(0).latest() is None
    assert "payload checksum mismatch" in store.discarded[-1].reason
    assert store.slot(0).latest() is None  # stays discarded
    save(store, 0, 2, MiB, 2)  # and the slot works on
    assert_latest(store, 0, 2, MiB, 2)
    # The same after a restart: adopt discards it and says why.
    store.close()
    (path,) = segment_files(root)
    flip_byte(os.path.join(root, path), HEADER_SIZE + MiB - 1)
    again = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    report = again.adopt()
    assert report.kept == {}
    assert any("payload checksum mismatch" in d.reason for d in report.discarded)
    assert again.slot(0).latest() is None
    again.close(unlink=True)


def test_stale_generation_is_discarded(root: str) -> None:
    store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(store, 0, 1, MiB, 1)  # generation 1 in buffer 0
    b0 = os.path.join(root, next(n for n in segment_files(root) if ".b0." in n))
    with open(b0, "rb") as f:
        old_copy = f.read()  # a complete, self-consistent buffer of generation 1
    save(store, 0, 2, MiB, 2)  # generation 2 in buffer 1
    save(store, 0, 3, MiB, 3)  # generation 3 in buffer 0
    store.close()
    with open(b0, "r+b") as f:  # an older copy put back in place of the committed one
        f.write(old_copy)
    again = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    report = again.adopt()
    assert report.kept == {}
    assert any("stale generation 1" in d.reason for d in report.discarded), report
    assert again.slot(0).latest() is None
    again.close()
    # A record that names another epoch: every buffer is a leftover, nothing is read.
    rec_path = os.path.join(root, f"ckptd-{JOB}.r0.slot")
    save_store = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    save(save_store, 0, 4, MiB, 4)
    save_store.close()
    with open(rec_path) as f:
        rec = json.load(f)
    rec["epoch"] ^= 1 << 40
    with open(rec_path, "w") as f:
        json.dump(rec, f)
    third = SnapshotStore(root, JOB, budget_bytes=64 * MiB)
    report = third.adopt()
    assert report.kept == {}
    assert any("epoch" in d.reason for d in report.discarded), report
    third.close(unlink=True)
