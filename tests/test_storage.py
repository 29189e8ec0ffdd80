"""Storage conformance suite (every backend subclasses StorageTests) plus backend specifics."""

from __future__ import annotations

import array
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from ckptd.errors import CommitConflictError, InvalidKeyError, StorageError
from ckptd.formats.keys import join_key, validate_key, validate_name
from ckptd.formats.storage import (
    FaultPlan,
    FaultyStorage,
    FsspecStorage,
    LocalStorage,
    MemoryStorage,
    ObjectNotFoundError,
    Storage,
    open_storage,
)

BAD_KEYS = [
    "",
    "../x",
    "a/../b",
    "/abs",
    "a//b",
    "a/",
    "./a",
    "a/./b",
    "nul\x00byte",
    "tab\tkey",
    "back\\slash",
    "x" * 256,
]


class StorageTests:
    """Behaviour every Storage backend must have. Subclasses provide ``storage``."""

    @pytest.fixture
    def storage(self) -> Storage:
        pytest.fail("a StorageTests subclass must provide the `storage` fixture")

    def test_round_trip(self, storage: Storage) -> None:
        payload = bytes(range(256)) * 40
        storage.put("step-1/w0/chunk", payload)
        storage.put("empty", b"")
        assert storage.get("step-1/w0/chunk") == payload
        assert storage.get("empty") == b""
        assert storage.size("step-1/w0/chunk") == len(payload)
        assert storage.size("empty") == 0
        assert storage.exists("step-1/w0/chunk")
        assert not storage.exists("step-1/w0")  # a prefix is not an object
        assert not storage.exists("step-1/w0/other")

    def test_overwrite_replaces(self, storage: Storage) -> None:
        storage.put("k", b"old-and-longer")
        storage.put("k", b"new")
        assert storage.get("k") == b"new"
        assert storage.list() == ["k"]

    def test_get_range(self, storage: Storage) -> None:
        storage.put("r", b"0123456789")
        cases = {(0, 4): b"0123", (3, 7): b"3456", (8, 10): b"89", (8, 99): b"89",
                 (10, 12): b"", (42, 50): b"", (5, 5): b""}  # fmt: skip
        for (start, end), expected in cases.items():
            assert storage.get_range("r", start, end) == expected, (start, end)

    def test_get_into(self, storage: Storage) -> None:
        storage.put("r", b"0123456789")
        buf = bytearray(4)
        assert storage.get_into("r", 3, memoryview(buf)) == 4 and buf == b"3456"
        tail = bytearray(b"xxxx")
        assert storage.get_into("r", 8, memoryview(tail)) == 2 and tail[:2] == b"89"
        with pytest.raises(FileNotFoundError):
            storage.get_into("nope/x", 0, memoryview(bytearray(2)))

    def test_get_range_rejects_inverted_range(self, storage: Storage) -> None:
        storage.put("r", b"0123")
        with pytest.raises(ValueError):
            storage.get_range("r", 3, 1)
        with pytest.raises(ValueError):
            storage.get_range("r", -1, 2)

    def test_missing_object(self, storage: Storage) -> None:
        for call in (
            lambda: storage.get("nope/x"),
            lambda: storage.size("nope/x"),
            lambda: storage.get_range("nope/x", 0, 4),
            lambda: storage.get_range("nope/x", 2, 2),
            lambda: storage.delete("nope/x", missing_ok=False),
        ):
            with pytest.raises(ObjectNotFoundError) as info:
                call()
            assert isinstance(info.value, FileNotFoundError)
            assert isinstance(info.value, StorageError)
            assert "nope/x" in str(info.value)
        storage.delete("nope/x")  # missing_ok by default

    def test_size_of_prefix_is_not_found(self, storage: Storage) -> None:
        storage.put("d/obj", b"1")
        with pytest.raises(ObjectNotFoundError):
            storage.size("d")

    def test_list_and_list_dirs(self, storage: Storage) -> None:
        for key in ["b/2", "a/1", "a/sub/3", "ab/4", "top"]:
            storage.put(key, key.encode())
        assert storage.list() == ["a/1", "a/sub/3", "ab/4", "b/2", "top"]
        assert storage.list("a") == ["a/1", "a/sub/3"]  # not "ab/4": prefixes are directories
        assert storage.list("a/") == ["a/1", "a/sub/3"]
        assert storage.list("top") == []
        assert storage.list("missing") == []
        assert storage.list_dirs() == ["a", "ab", "b"]
        assert storage.list_dirs("a") == ["sub"]
        assert storage.list_dirs("missing") == []

    def test_delete(self, storage: Storage) -> None:
        storage.put("d/x", b"1")
        storage.put("d/y", b"2")
        storage.delete("d/x")
        assert storage.list() == ["d/y"]
        assert not storage.exists("d/x")

    def test_delete_prefix(self, storage: Storage) -> None:
        for key in ["s/1", "s/deep/2", "s2/3", "t/4"]:
            storage.put(key, b"x")
        storage.delete_prefix("s")
        assert storage.list() == ["s2/3", "t/4"]
        assert storage.list_dirs() == ["s2", "t"]
        storage.delete_prefix("s")  # idempotent
        storage.delete_prefix("never-existed")
        storage.delete_prefix("")
        assert storage.list() == []
        assert storage.list_dirs() == []

    def test_put_if_absent_conflict(self, storage: Storage) -> None:
        storage.put_if_absent("step-1/COMMITTED", b"first")
        with pytest.raises(CommitConflictError) as info:
            storage.put_if_absent("step-1/COMMITTED", b"second")
        assert isinstance(info.value, FileExistsError)
        assert "step-1/COMMITTED" in str(info.value)
        assert storage.get("step-1/COMMITTED") == b"first"

    def test_put_if_absent_races_have_one_winner(self, storage: Storage) -> None:
        if not storage.supports_conditional_put:
            pytest.skip("put_if_absent is not atomic on this backend")
        barrier = threading.Barrier(8)

        def attempt(i: int) -> bool:
            barrier.wait()
            try:
                storage.put_if_absent("marker", str(i).encode())
                return True
            except CommitConflictError:
                return False

        with ThreadPoolExecutor(8) as pool:
            wins = list(pool.map(attempt, range(8)))
        assert wins.count(True) == 1
        assert storage.get("marker") == str(wins.index(True)).encode()

    def test_overwrite_is_atomic_for_readers(self, storage: Storage) -> None:
        size = 1 << 20
        versions = [bytes([i]) * size for i in range(4)]
        storage.put("big", versions[0])
        stop = threading.Event()
        seen: list[bytes] = []

        def reader() -> None:
            while not stop.is_set():
                seen.append(storage.get("big"))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(12):
                storage.put("big", versions[i % 4])
        finally:
            stop.set()
            thread.join()
        assert seen and all(blob in versions for blob in seen)

    def test_memoryview_and_typed_buffers(self, storage: Storage) -> None:
        raw = bytearray(b"abcdefgh")
        storage.put("mv", memoryview(raw)[2:6])
        storage.put("ba", raw)
        floats = array.array("f", [1.0, 2.0, 3.0])
        storage.put("typed", memoryview(floats))
        storage.put_if_absent("mv-marker", memoryview(b"m"))
        assert storage.get("mv") == b"cdef"
        assert storage.get("ba") == bytes(raw)
        assert storage.get("typed") == floats.tobytes()
        assert storage.get("mv-marker") == b"m"

    def test_concurrent_puts_from_a_thread_pool(self, storage: Storage) -> None:
        keys = [f"step-2/w{i % 4}/c{i}" for i in range(32)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: storage.put(k, k.encode()), keys))
        assert storage.list("step-2") == sorted(keys)
        assert all(storage.get(k) == k.encode() for k in keys)

    def test_key_validation(self, storage: Storage) -> None:
        key_calls = [("get",), ("put", b"x"), ("put_if_absent", b"x"), ("exists",),
                     ("size",), ("delete",), ("get_range", 0, 1)]  # fmt: skip
        for bad in BAD_KEYS:
            calls = list(key_calls)
            if bad not in ("", "a/"):  # valid listing prefixes: the root, a trailing "/"
                calls += [("list",), ("list_dirs",), ("delete_prefix",)]
            for name, *args in calls:
                with pytest.raises(InvalidKeyError):
                    getattr(storage, name)(bad, *args)
        assert storage.list() == []


class TestLocalStorage(StorageTests):
    @pytest.fixture
    def storage(self, tmp_path) -> Storage:
        return LocalStorage(tmp_path / "root")

    def test_no_temp_files_left_and_temps_hidden(self, storage: LocalStorage) -> None:
        storage.put("a/b", b"1")
        storage.put_if_absent("a/c", b"2")
        assert sorted(os.listdir(os.path.join(storage.root, "a"))) == ["b", "c"]
        # an in-flight temp file of another writer is not a key
        open(os.path.join(storage.root, "a", f".d.tmp-{uuid.uuid4().hex}"), "wb").close()
        assert storage.list() == ["a/b", "a/c"]

    def test_put_is_fsynced_then_renamed(self, storage: LocalStorage, monkeypatch) -> None:
        events: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
            real_fsync(fd)

        def replace(src: str, dst: str) -> None:
            events.append("rename")
            real_replace(src, dst)

        storage.put("existing-dir-warmup", b"")
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        storage.put("k", b"data")
        assert events == ["fsync-file", "rename", "fsync-dir"]

    def test_failed_write_leaves_old_object_and_no_temp(self, storage, monkeypatch) -> None:
        storage.put("k", b"old")

        def broken_fsync(fd: int) -> None:
            raise OSError(5, "disk on fire")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(StorageError, match="disk on fire"):
            storage.put("k", b"new")
        monkeypatch.undo()
        assert storage.get("k") == b"old"
        assert os.listdir(storage.root) == ["k"]

    def test_large_object(self, storage: LocalStorage) -> None:
        payload = memoryview(os.urandom(1 << 20) * 64)  # 64 MiB, no copy on put
        storage.put("big", payload)
        assert storage.size("big") == len(payload)
        assert storage.get_range("big", len(payload) - 3, len(payload)) == payload[-3:]


class TestMemoryStorage(StorageTests):
    @pytest.fixture
    def storage(self) -> Storage:
        return MemoryStorage()


class TestFsspecMemory(StorageTests):
    @pytest.fixture
    def storage(self):
        storage = FsspecStorage(f"memory://ckptd-test-{uuid.uuid4().hex}")
        yield storage
        storage.delete_prefix("")
        storage.close()

    def test_transient_errors_are_retried(self, storage: FsspecStorage, monkeypatch) -> None:
        storage.put("k", b"v")
        failures = iter([ConnectionResetError("reset"), TimeoutError("slow")])
        real = storage.fs.cat_file

        def flaky(path, *args, **kwargs):
            for exc in failures:
                raise exc
            return real(path, *args, **kwargs)

        monkeypatch.setattr(storage.fs, "cat_file", flaky)
        assert storage.get("k") == b"v"

    def test_persistent_errors_become_storage_errors(self, storage, monkeypatch) -> None:
        calls = []

        def down(*args, **kwargs):
            calls.append(1)
            raise ConnectionRefusedError("endpoint down")

        monkeypatch.setattr(storage.fs, "pipe_file", down)
        with pytest.raises(StorageError, match="endpoint down") as info:
            storage.put("k", b"v")
        assert "'k'" in str(info.value)
        assert len(calls) == storage.retries + 1


@pytest.mark.s3
class TestS3Storage(StorageTests):
    @pytest.fixture
    def storage(self, s3_storage_factory) -> Storage:
        return s3_storage_factory()

    def test_capabilities(self, storage: Storage) -> None:
        assert storage.supports_conditional_put
        assert not storage.supports_atomic_rename

    def test_missing_bucket_is_a_storage_error(self, s3_server: str) -> None:
        with open_storage(
            f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/root",
            endpoint_url=s3_server,
            key="testing",
            secret="testing",
        ) as storage:
            with pytest.raises(StorageError):
                storage.put("k", b"v")
            with pytest.raises(ObjectNotFoundError):
                storage.get("k")


def test_open_storage_dispatch(tmp_path) -> None:
    assert isinstance(open_storage(tmp_path / "a"), LocalStorage)
    local = open_storage(f"file://{tmp_path}/b")
    assert isinstance(local, LocalStorage) and local.root == str(tmp_path / "b")
    mem = open_storage(f"memory://ckptd-{uuid.uuid4().hex}")
    assert isinstance(mem, FsspecStorage) and not mem.supports_conditional_put
    with pytest.raises(TypeError):
        open_storage(tmp_path, endpoint_url="http://127.0.0.1:1")


def test_keys_helpers() -> None:
    assert validate_key("step-000000001/model.w/0.0") == "step-000000001/model.w/0.0"
    assert join_key("", "a", "b/c") == "a/b/c"
    with pytest.raises(InvalidKeyError, match=r"\.\./x"):
        validate_key("../x")
    with pytest.raises(InvalidKeyError):
        join_key("a", "..", "b")
    assert validate_name("run-1.v2") == "run-1.v2"
    for bad in ["", ".hidden", "a/b", "x" * 129, "sp ace"]:
        with pytest.raises(InvalidKeyError):
            validate_name(bad)


class TestFaultyStorage:
    def test_fails_after_n_matching_calls(self) -> None:
        faulty = FaultyStorage(
            MemoryStorage(),
            FaultPlan(op="put", key_glob="step-*/w*", after=2, error=OSError("injected")),
        )
        faulty.put("step-1/w0/a", b"1")
        faulty.put("step-1/manifest", b"m")  # does not match the glob
        faulty.put("step-1/w1/b", b"2")
        with pytest.raises(OSError, match="injected"):
            faulty.put("step-1/w2/c", b"3")
        with pytest.raises(OSError):
            faulty.put("step-1/w3/d", b"4")  # times=None: every later call fails too
        assert faulty.injected == [("put", "step-1/w2/c"), ("put", "step-1/w3/d")]
        assert faulty.inner.list() == ["step-1/manifest", "step-1/w0/a", "step-1/w1/b"]

    def test_times_and_op_globs(self) -> None:
        faulty = FaultyStorage(
            MemoryStorage(),
            [FaultPlan(op="put*", times=1), FaultPlan(op="get", error=TimeoutError("t"))],
        )
        with pytest.raises(OSError):
            faulty.put_if_absent("m", b"1")
        faulty.put_if_absent("m", b"1")
        with pytest.raises(TimeoutError):
            faulty.get("m")
        assert faulty.exists("m") and faulty.list() == ["m"]

    def test_kill_terminates_the_process(self, tmp_path) -> None:
        code = (
            "from ckptd.formats.faults import FaultPlan, FaultyStorage\n"
            "from ckptd.formats.storage import LocalStorage\n"
            f"s = FaultyStorage(LocalStorage({str(tmp_path)!r}), FaultPlan(kill=True, after=1))\n"
            "s.put('a', b'1')\ns.put('b', b'2')\nprint('survived')\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert proc.returncode == -9, proc.stderr
        assert b"survived" not in proc.stdout
        assert LocalStorage(tmp_path).list() == ["a"]


@pytest.mark.parametrize("size", [(1 << 20) + 7, 20 * (1 << 20) + 4096, 3 << 20])
def test_local_batch_direct_io_roundtrip(tmp_path, size: int) -> None:
    """Large batch writes go through O_DIRECT (bounce buffer, padded tail truncated)."""
    import numpy as np

    from ckptd.formats import posix_io

    st = LocalStorage(tmp_path)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    view = memoryview(data)[3:]  # an unaligned source address
    batch = st.batch()
    batch.put("step/x", view)
    batch.flush()
    assert st.get("step/x") == view.tobytes()
    assert st.size("step/x") == view.nbytes
    assert posix_io.write_direct(str(tmp_path / "probe"), view)  # O_DIRECT works here


def test_local_batch_falls_back_where_direct_io_is_refused() -> None:
    """tmpfs refuses O_DIRECT: large batch writes fall back to buffered writes."""
    import tempfile

    import numpy as np

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        st = LocalStorage(d)
        data = np.arange(3 << 20, dtype=np.uint8)
        batch = st.batch()
        batch.put("s/x", memoryview(data))
        batch.flush()
        assert st.get("s/x") == data.tobytes()
