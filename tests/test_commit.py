"""The commit protocol: markers, ``latest``, visibility of uncommitted and interrupted saves."""

from __future__ import annotations

import json

import pytest

from ckptd.errors import CommitConflictError, IntegrityError, NotCommittedError
from ckptd.formats.commit import (
    LATEST_KEY,
    commit,
    committed_steps,
    is_committed,
    latest_step,
    marker_key,
    parse_step_dir,
    read_marker,
    require_committed,
    step_dir,
    uncommit,
    uncommitted_steps,
)
from ckptd.formats.storage import FaultPlan, FaultyStorage, LocalStorage, MemoryStorage, Storage


@pytest.fixture(params=["memory", "local"])
def store(request, tmp_path) -> Storage:
    return MemoryStorage() if request.param == "memory" else LocalStorage(tmp_path)


def save(storage: Storage, step: int, chunks: int = 4) -> None:
    """A miniature save: every writer's chunks, then the manifest, then commit."""
    d = step_dir(step)
    for i in range(chunks):
        storage.put(f"{d}/w{i}/c0", f"{step}:{i}".encode())
    storage.put(f"{d}/zarr.json", json.dumps({"step": step}).encode())
    commit(storage, step, {"manifest_crc32c": 1234 + step})


def test_step_dir_names() -> None:
    assert step_dir(42) == "step-000000042"
    assert parse_step_dir("step-000000042") == 42
    assert parse_step_dir(step_dir(12_345_678_901)) == 12_345_678_901
    for bad in ["step-42", "step-0000000042", "step-00000004x", "latest", "step-000000042/"]:
        assert parse_step_dir(bad) is None
    for bad_step in [-1, True, 1.0]:
        with pytest.raises(ValueError):
            step_dir(bad_step)  # type: ignore[arg-type]


def test_commit_writes_marker_then_latest(store: Storage) -> None:
    save(store, 1)
    marker = read_marker(store, 1)
    assert marker["step"] == 1 and marker["manifest_crc32c"] == 1235
    assert marker["marker_version"] == 1 and marker["wall_time"] > 0
    assert store.get(LATEST_KEY) == b"1\n"
    assert latest_step(store) == 1
    with pytest.raises(ValueError, match="reserved"):
        commit(store, 2, {"step": 3})


def test_latest_moves_only_after_commit(store: Storage) -> None:
    save(store, 1)
    d = step_dir(2)
    store.put(f"{d}/w0/c0", b"x")
    store.put(f"{d}/zarr.json", b"{}")
    assert latest_step(store) == 1
    assert uncommitted_steps(store) == [2]
    assert committed_steps(store) == [1]
    commit(store, 2, {})
    assert latest_step(store) == 2 and store.get(LATEST_KEY) == b"2\n"


def test_latest_never_moves_backwards(store: Storage) -> None:
    save(store, 5)
    assert commit(store, 3, {}) is False  # an older save finishing late
    assert latest_step(store) == 5
    assert committed_steps(store) == [3, 5]


def test_double_commit_conflicts(store: Storage) -> None:
    save(store, 1)
    before = store.get(marker_key(1))
    with pytest.raises(CommitConflictError):
        commit(store, 1, {"manifest_crc32c": 0})
    assert store.get(marker_key(1)) == before


def test_uncommitted_step_is_invisible(store: Storage) -> None:
    save(store, 1)
    store.put(f"{step_dir(7)}/w0/c0", b"partial")
    assert not is_committed(store, 7)
    assert latest_step(store) == 1
    with pytest.raises(NotCommittedError) as info:
        require_committed(store, 7)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "step 7" in message and "[1]" in message and "[7]" in message
    require_committed(store, 1)
    with pytest.raises(NotCommittedError, match="committed steps: none"):
        require_committed(MemoryStorage(), 3)


def test_interrupted_save_leaves_older_checkpoint_intact(store: Storage) -> None:
    save(store, 1)
    snapshot = {k: store.get(k) for k in store.list()}
    faulty = FaultyStorage(
        store,
        FaultPlan(
            op="put", key_glob="step-000000002/w*", after=2, error=OSError("injected: disk full")
        ),
    )
    with pytest.raises(OSError, match="injected"):
        save(faulty, 2)
    assert {k: store.get(k) for k in store.list() if k.startswith(step_dir(1))} == {
        k: v for k, v in snapshot.items() if k.startswith(step_dir(1))
    }
    assert store.get(LATEST_KEY) == b"1\n"
    assert latest_step(store) == 1 and committed_steps(store) == [1]
    assert uncommitted_steps(store) == [2]


def test_crash_between_marker_and_latest_is_repaired_by_next_commit(store: Storage) -> None:
    save(store, 1)
    faulty = FaultyStorage(store, FaultPlan(op="put", key_glob=LATEST_KEY))
    save(faulty, 2)  # the failed hint update is logged, not raised: step 2 is committed
    assert is_committed(store, 2)  # the marker is the commit point
    assert latest_step(store) == 1  # ``latest`` is only a hint, one step behind
    save(store, 3)
    assert latest_step(store) == 3


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xfe", b"-1", b"99\n"])
def test_stale_or_corrupt_latest_falls_back_to_listing(store: Storage, content: bytes) -> None:
    save(store, 1)
    save(store, 2)
    store.put(LATEST_KEY, content)
    assert latest_step(store) == 2


def test_latest_pointing_at_deleted_step(store: Storage) -> None:
    save(store, 1)
    save(store, 2)
    uncommit(store, 2)
    assert store.get(LATEST_KEY) == b"2\n"
    assert latest_step(store) == 1
    store.delete(LATEST_KEY)
    assert latest_step(store) == 1
    uncommit(store, 1)
    assert latest_step(store) is None


def test_corrupt_marker_is_an_integrity_error(store: Storage) -> None:
    store.put(marker_key(4), b"{not json")
    store.put(marker_key(5), json.dumps({"step": 6}).encode())
    for step in (4, 5):
        with pytest.raises(IntegrityError, match="COMMITTED"):
            read_marker(store, step)
    with pytest.raises(NotCommittedError):
        read_marker(store, 9)


def test_uncommit_deletes_marker_first(store: Storage) -> None:
    save(store, 1)
    save(store, 2)
    faulty = FaultyStorage(store, FaultPlan(op="delete_prefix"))
    with pytest.raises(OSError):
        uncommit(faulty, 1)
    assert not is_committed(store, 1)  # invisible although its contents remain
    assert uncommitted_steps(store) == [1]
    uncommit(store, 1)
    assert store.list(step_dir(1)) == [] and committed_steps(store) == [2]


@pytest.mark.s3
def test_commit_on_s3_is_create_only_across_clients(s3_storage_factory) -> None:
    storage = s3_storage_factory()
    other = s3_storage_factory(bucket=storage.url.split("/")[2])  # a second coordinator
    save(storage, 1)
    with pytest.raises(CommitConflictError):
        commit(other, 1, {"manifest_crc32c": 0})
    assert read_marker(other, 1)["manifest_crc32c"] == 1235
    save(other, 2)
    assert latest_step(storage) == 2 and committed_steps(storage) == [1, 2]


def test_failed_latest_update_still_commits(tmp_path) -> None:
    """The marker is the commit point: a failing `latest` put is logged, not raised."""
    from ckptd.formats import commit as commit_mod

    inner = LocalStorage(tmp_path)
    st = FaultyStorage(inner, FaultPlan(op="put", key_glob="latest", error=OSError("disk full")))
    assert commit_mod.commit(st, 4, {}) is False
    assert commit_mod.is_committed(inner, 4)
    assert commit_mod.latest_step(inner) == 4  # found by listing
