"""Retention policy selection, garbage collection of leftovers, and the background GC."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.formats.commit import commit, committed_steps, latest_step, step_dir, uncommitted_steps
from ckptd.formats.retention import BackgroundGC, RetentionPolicy, apply_retention
from ckptd.formats.storage import FaultPlan, FaultyStorage, MemoryStorage, Storage


def save(storage: Storage, step: int) -> None:
    storage.put(f"{step_dir(step)}/w0/c0", b"data")
    commit(storage, step, {"manifest_crc32c": 0})


def leftover(storage: Storage, step: int) -> None:
    storage.put(f"{step_dir(step)}/w0/c0", b"partial")


def test_select_examples() -> None:
    assert RetentionPolicy(keep_last=2).select([5, 1, 3, 2, 4]) == ([4, 5], [1, 2, 3])
    assert RetentionPolicy(keep_last=2, keep_every=3).select(range(1, 8)) == (
        [3, 6, 7],
        [1, 2, 4, 5],
    )
    assert RetentionPolicy(keep_last=0).select([1, 2]) == ([2], [1])  # latest always kept
    assert RetentionPolicy().select([]) == ([], [])


def test_invalid_policy() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_every=0)


@given(
    steps=st.lists(st.integers(0, 10_000), max_size=60),
    keep_last=st.integers(0, 10),
    keep_every=st.one_of(st.none(), st.integers(1, 50)),
)
def test_select_properties(steps: list[int], keep_last: int, keep_every: int | None) -> None:
    keep, delete = RetentionPolicy(keep_last, keep_every).select(steps)
    unique = sorted(set(steps))
    assert sorted(keep + delete) == unique and not set(keep) & set(delete)
    assert keep == sorted(keep) and delete == sorted(delete)
    if unique:
        assert unique[-1] in keep
    assert set(unique[len(unique) - keep_last :] if keep_last else []) <= set(keep)
    for s in delete:
        assert keep_every is None or s % keep_every != 0
        assert s not in unique[-max(keep_last, 1) :]


def test_apply_retention_deletes_via_uncommit() -> None:
    storage = MemoryStorage()
    for step in range(1, 7):
        save(storage, step)
    deleted = apply_retention(storage, RetentionPolicy(keep_last=2, keep_every=3))
    assert deleted == [1, 2, 4]
    assert committed_steps(storage) == [3, 5, 6] and latest_step(storage) == 6
    assert storage.list_dirs() == [step_dir(s) for s in (3, 5, 6)]


def test_gc_of_leftovers_respects_in_progress() -> None:
    storage = MemoryStorage()
    for step in (1, 4):
        save(storage, step)
    for step in (2, 3, 7):
        leftover(storage, step)
    assert apply_retention(storage, RetentionPolicy(keep_last=5), in_progress={3}) == [2]
    # 3 is a save in flight, 7 is newer than every committed step (may not be registered)
    assert uncommitted_steps(storage) == [3, 7]
    assert apply_retention(storage, RetentionPolicy(gc_uncommitted=False)) == []
    assert uncommitted_steps(storage) == [3, 7]


def test_in_progress_committed_step_is_not_deleted() -> None:
    storage = MemoryStorage()
    for step in range(1, 5):
        save(storage, step)
    assert apply_retention(storage, RetentionPolicy(keep_last=1), in_progress={2}) == [1, 3]
    assert committed_steps(storage) == [2, 4]


class GatedStorage(MemoryStorage):
    """Blocks every delete_prefix until ``gate`` is set, to hold a GC run in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _delete_prefix(self, prefix: str) -> None:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        super()._delete_prefix(prefix)


def test_background_gc_does_not_block_saves() -> None:
    storage = GatedStorage()
    for step in range(1, 5):
        save(storage, step)
    with BackgroundGC(storage, RetentionPolicy(keep_last=1)) as gc:
        gc.submit()
        assert storage.entered.wait(5)  # the worker is stuck deleting
        started = time.perf_counter()
        save(storage, 5)  # a save proceeds meanwhile
        for _ in range(50):
            gc.submit()  # coalesced while one plain run is queued
        assert time.perf_counter() - started < 1.0
        assert not gc.drain(timeout=0.05)
        storage.gate.set()
        assert gc.drain(timeout=10)
        assert gc.runs == 2 and gc.errors == 0
    assert committed_steps(storage) == [5]


def test_background_gc_logs_errors_and_keeps_going(caplog) -> None:
    inner = MemoryStorage()
    for step in range(1, 4):
        save(inner, step)
    storage = FaultyStorage(inner, FaultPlan(op="delete", times=1, error=OSError("injected")))
    with caplog.at_level(logging.ERROR, logger="ckptd.formats.retention"):
        gc = BackgroundGC(storage, RetentionPolicy(keep_last=1))
        gc.submit()
        assert gc.drain(timeout=10)
        assert gc.errors == 1 and "retention run" in caplog.text and "injected" in caplog.text
        gc.submit()
        gc.close()
    assert committed_steps(inner) == [3]
    gc.close()  # idempotent
    with pytest.raises(RuntimeError):
        gc.submit()


def test_background_gc_reads_in_progress_when_it_runs() -> None:
    storage = MemoryStorage()
    save(storage, 1)
    leftover(storage, 2)
    save(storage, 3)
    active: set[int] = set()
    with BackgroundGC(storage, RetentionPolicy(keep_last=3), in_progress=lambda: active) as gc:
        active.add(2)  # registered after construction, before the run
        gc.submit()
        assert gc.drain(timeout=10)
        assert uncommitted_steps(storage) == [2]
        active.clear()
        gc.submit(in_progress={9})
        assert gc.drain(timeout=10)
    assert uncommitted_steps(storage) == []
