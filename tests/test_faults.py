"""Fault tests of the whole save/load pipeline: crashes, corruption, write errors, bad input.

Every test runs the real client (``ckpt.save``/``ckpt.load``) on a local directory;
faults are injected with :class:`~ckptd.formats.storage.FaultyStorage` (the
``inject_faults`` fixture), by editing stored bytes, or by SIGKILLing a child process.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.errors import (
    CkptError,
    CommitConflictError,
    DistributedError,
    FormatVersionError,
    IntegrityError,
    InvalidKeyError,
    MissingKeysError,
    NotCommittedError,
    ReshardError,
)
from ckptd.formats.chunkcodec import crc32c
from ckptd.formats.storage import FaultPlan
from ckptd.formats.writer import WriterOptions
from ckptd.planner import PlanOptions

STEP1 = "step-000000001"
STEP2 = "step-000000002"

# Tensors above 1 KiB are stored as their own zarr arrays, smaller ones in a pack;
# 2 KiB chunks give the (64, 32) fp32 tensor four chunks: c/0/0 .. c/3/0.
SMALL_WRITER = WriterOptions(workers=2, small_tensor_bytes=1024)
SMALL_PLAN = PlanOptions(target_chunk_bytes=2048, min_aligned_chunk_bytes=512)


def make_state(seed: int) -> dict[str, Any]:
    """Deterministic state: one unpacked multi-chunk tensor, three packed ones, JSON."""
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(64, 32, generator=g),
        "small": torch.randn(16, generator=g),
        "half": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (20,), generator=g),
        "meta": {"lr": 0.5 * seed, "epoch": seed},
    }


def empty_like(state: dict[str, Any], fill: float = 0) -> dict[str, Any]:
    """Same keys, shapes and dtypes, tensors filled with ``fill``; JSON leaves blanked."""
    return {
        k: torch.full_like(v, fill) if isinstance(v, torch.Tensor) else {"lr": -1.0, "epoch": -1}
        for k, v in state.items()
    }


def assert_equal_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype, k
            assert torch.equal(got[k], v), f"tensor {k!r} differs"
        else:
            assert got[k] == v, k


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def manifest_doc(root: Path, step_dir: str = STEP1) -> dict[str, Any]:
    return json.loads((root / step_dir / "zarr.json").read_bytes())


def rewrite_manifest(root: Path, doc: dict[str, Any], step_dir: str = STEP1) -> None:
    """Write an edited manifest and fix the marker's checksum, so only the edit differs."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    (root / step_dir / "zarr.json").write_bytes(data)
    marker_path = root / step_dir / "COMMITTED"
    marker = json.loads(marker_path.read_bytes())
    marker["manifest_crc32c"] = crc32c(data)
    marker_path.write_bytes(json.dumps(marker).encode())


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture
def ck(ckpt_client: Any) -> Any:
    """The ckpt client configured for tiny chunks (several objects per tiny state)."""
    ckpt_client.configure(writer=SMALL_WRITER, plan=SMALL_PLAN)
    return ckpt_client


@pytest.fixture
def saved(ck: Any, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A committed step 1 of ``make_state(1)`` under ``tmp_path/ckpt``."""
    root = tmp_path / "ckpt"
    state = make_state(1)
    ck.save(state, 1, str(root))
    return root, state


def test_layout_of_the_fixture_checkpoint(saved: tuple[Path, dict[str, Any]]) -> None:
    """The other tests rely on this layout: four unpacked chunks of ``big``, one pack."""
    root, _ = saved
    files = files_under(root)
    for i in range(4):
        assert f"{STEP1}/big/c/{i}/0" in files
    assert f"{STEP1}/packs/r00000-00000.pack" in files
    tensors = manifest_doc(root)["attributes"]["ckpt"]["tensors"]
    assert not tensors["big"]["packed"]
    assert all(tensors[k]["packed"] for k in ("small", "half", "ids"))


# ------------------------------------------------------------------- corruption


def test_flipped_bit_in_unpacked_chunk(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    flip_bit(root / STEP1 / "big" / "c" / "2" / "0", 100)
    dst = empty_like(state)
    with pytest.raises(IntegrityError, match=r"tensor 'big' chunk \[2, 0\].*big/c/2/0.*checksum"):
        ck.load(dst, str(root))
    # The damage is confined to that chunk: everything else still loads.
    rest = {k: v for k, v in empty_like(state).items() if k != "big"}
    res = ck.load(rest, str(root))
    assert res.unexpected == ("big",)
    assert_equal_state(rest, {k: v for k, v in state.items() if k != "big"})


def test_flipped_bit_in_packed_chunk(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    rec = manifest_doc(root)["attributes"]["ckpt"]["tensors"]["half"]
    [[index, obj, offset, length, _crc, packed]] = rec["chunks"]
    assert packed and obj.startswith("packs/") and index == [0, 0]
    flip_bit(root / STEP1 / obj, offset + length // 2, bit=0)
    with pytest.raises(IntegrityError, match=r"tensor 'half' chunk \[0, 0\].*packs/.*checksum"):
        ck.load(empty_like(state), str(root))
    others = {k: v for k, v in empty_like(state).items() if k != "half"}
    ck.load(others, str(root))  # other members of the same pack are intact
    assert_equal_state(others, {k: v for k, v in state.items() if k != "half"})


def test_truncated_manifest(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    path = root / STEP1 / "zarr.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="manifest checksum mismatch"):
        ck.load(empty_like(state), str(root))
    # Even with a marker that agrees with the truncated bytes, the parser refuses them.
    marker_path = root / STEP1 / "COMMITTED"
    marker = json.loads(marker_path.read_bytes())
    marker["manifest_crc32c"] = crc32c(data[: len(data) // 2])
    marker_path.write_bytes(json.dumps(marker).encode())
    with pytest.raises(IntegrityError, match="not valid JSON"):
        ck.load(empty_like(state), str(root))


def test_altered_manifest_checksum_mismatch(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    doc = manifest_doc(root)
    stored = doc["attributes"]["ckpt"]["state"]
    lr = next(k for k in stored if "lr" in k)
    stored[lr] = 1e9  # valid JSON, wrong content
    (root / STEP1 / "zarr.json").write_bytes(json.dumps(doc).encode())
    dst = empty_like(state, fill=7)
    with pytest.raises(IntegrityError, match=r"zarr\.json: manifest checksum mismatch"):
        ck.load(dst, str(root))
    assert_equal_state(dst, empty_like(state, fill=7))


@pytest.mark.parametrize("victim", ["big/c/1/0", "packs/r00000-00000.pack"])
def test_missing_object_fails_before_any_tensor_is_touched(
    ck: Any, saved: tuple[Path, dict[str, Any]], victim: str
) -> None:
    root, state = saved
    (root / STEP1 / victim).unlink()
    dst = empty_like(state, fill=-7)
    with pytest.raises(IntegrityError, match=rf"missing 1 object.*{victim.split('/')[0]}"):
        ck.load(dst, str(root))
    assert_equal_state(dst, empty_like(state, fill=-7))  # not a single element written


def test_truncated_pack_is_an_integrity_error(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    pack = root / STEP1 / "packs" / "r00000-00000.pack"
    pack.write_bytes(pack.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"tensor '\w+' chunk \[0(, 0)?\]"):
        ck.load(empty_like(state), str(root))


# ------------------------------------------------------------------ write errors


FAULTS = {
    "chunk": FaultPlan(op="put", key_glob=f"{STEP2}/big/c/*", after=1, times=1),
    "array-metadata": FaultPlan(op="put", key_glob=f"{STEP2}/big/zarr.json", times=1),
    "pack": FaultPlan(op="put", key_glob=f"{STEP2}/packs/*", times=1),
    "manifest": FaultPlan(op="put", key_glob=f"{STEP2}/zarr.json", times=1),
    "marker": FaultPlan(op="put_if_absent", key_glob=f"{STEP2}/COMMITTED", times=1),
}


@pytest.mark.parametrize("where", list(FAULTS))
def test_write_error_mid_save_leaves_nothing_visible(
    ck: Any, inject_faults: Any, tmp_path: Path, where: str
) -> None:
    root = tmp_path / "ckpt"
    state1 = make_state(1)
    ck.save(state1, 1, str(root))
    stores = inject_faults(FAULTS[where])

    h = ck.save(make_state(2), 2, str(root), blocking=False)
    with pytest.raises((OSError, CkptError)) as ei:
        h.wait(timeout=60)
    # Single process: the injected error itself; coordinator phases: a DistributedError
    # naming rank 0 and the injected error.
    assert "injected fault" in str(ei.value)
    if where in ("manifest", "marker"):
        assert isinstance(ei.value, DistributedError) and 0 in ei.value.failures
    assert len(stores[0].injected) == 1

    assert not (root / STEP2).exists(), files_under(root)  # cleaned up, marker never written
    assert (root / "latest").read_text() == "1\n"
    with pytest.raises(NotCommittedError, match="step 2 is not committed"):
        ck.load(empty_like(state1), str(root), step=2)
    dst = empty_like(state1)
    assert ck.load(dst, str(root)).step == 1
    assert_equal_state(dst, state1)

    # The client recovers: the next save (the fault fired once) commits normally.
    state3 = make_state(3)
    ck.save(state3, 3, str(root))
    dst = empty_like(state3)
    assert ck.load(dst, str(root)).step == 3
    assert_equal_state(dst, state3)


# ----------------------------------------------------------------------- bad input


NEVER_WRITE = FaultPlan(op="*", error=AssertionError("storage was touched"))


@pytest.mark.parametrize(
    "key", ["a/../b", "../x", "/abs", "x\x00", "a\\b", "..", "a..b", ".hidden", "tab\there"]
)
def test_unsafe_state_keys_rejected_before_writing(
    ck: Any, inject_faults: Any, tmp_path: Path, key: str
) -> None:
    root = tmp_path / "ckpt"
    stores = inject_faults(NEVER_WRITE)
    with pytest.raises(InvalidKeyError, match="state key"):
        ck.save({"ok": torch.ones(4), key: torch.zeros(3)}, 1, str(root))
    with pytest.raises(InvalidKeyError):  # nested: the flattened key is checked
        ck.save({"ok": torch.ones(4), "m": {key: torch.zeros(3)}}, 1, str(root))
    assert all(not s.injected for s in stores)
    assert files_under(root) == []


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None, 2**70 * -1])
def test_bad_steps_rejected_before_writing(
    ck: Any, inject_faults: Any, tmp_path: Path, step: Any
) -> None:
    root = tmp_path / "ckpt"
    stores = inject_faults(NEVER_WRITE)
    with pytest.raises(InvalidKeyError, match="step must be a non-negative int"):
        ck.save({"ok": torch.ones(4)}, step, str(root))
    assert all(not s.injected for s in stores)
    assert files_under(root) == []


@pytest.mark.parametrize("bad_name", ["../x", "/abs", "a/b", "x\x00"])
def test_unsafe_logical_names_rejected_before_writing(
    ck: Any, inject_faults: Any, tmp_path: Path, bad_name: str
) -> None:
    """A Layout rename is another way to name a stored tensor: same rules as state keys."""
    root = tmp_path / "ckpt"
    stores = inject_faults(NEVER_WRITE)
    layout = ck.Layout(rename=lambda k: bad_name if k == "bad" else k)
    state = {"good": torch.ones(64, 32), "bad": torch.zeros(3)}
    with pytest.raises(InvalidKeyError):
        ck.save(state, 1, str(root), layout=layout)
    assert all(not s.injected for s in stores)
    assert files_under(root) == []


def test_resaving_a_committed_step_is_refused_and_keeps_it(
    ck: Any, saved: tuple[Path, dict[str, Any]]
) -> None:
    root, state = saved
    before = {f: (root / f).read_bytes() for f in files_under(root)}
    with pytest.raises(CommitConflictError, match="step 1 is already committed"):
        ck.save(make_state(9), 1, str(root))
    assert {f: (root / f).read_bytes() for f in files_under(root)} == before
    dst = empty_like(state)
    ck.load(dst, str(root))
    assert_equal_state(dst, state)


# -------------------------------------------------------------------- versions


def test_unknown_major_format_version(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    doc = manifest_doc(root)
    doc["attributes"]["ckpt"]["version"] = "2.0"
    rewrite_manifest(root, doc)
    dst = empty_like(state, fill=3)
    with pytest.raises(FormatVersionError, match=r"format version 2\.0 is not supported.*upgrade"):
        ck.load(dst, str(root))
    assert_equal_state(dst, empty_like(state, fill=3))


def test_newer_minor_format_version_loads(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    doc = manifest_doc(root)
    doc["attributes"]["ckpt"]["version"] = "1.9"
    rewrite_manifest(root, doc)
    dst = empty_like(state)
    ck.load(dst, str(root))
    assert_equal_state(dst, state)


# ------------------------------------------------------------------- mismatches


def test_dtype_mismatch_names_the_tensor(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    dst = empty_like(state)
    dst["big"] = torch.zeros(64, 32, dtype=torch.float64)
    with pytest.raises(ReshardError, match=r"tensor 'big'.*float32.*float64"):
        ck.load(dst, str(root))
    assert torch.equal(dst["big"], torch.zeros(64, 32, dtype=torch.float64))


def test_shape_mismatch_names_the_tensor(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    dst = empty_like(state)
    dst["small"] = torch.zeros(17)
    with pytest.raises(ReshardError, match=r"tensor 'small'.*\[16\].*\[17\]"):
        ck.load(dst, str(root))


def test_missing_and_unexpected_keys(ck: Any, saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    dst = empty_like(state)
    del dst["ids"]
    dst["extra"] = torch.zeros(5)
    with pytest.raises(MissingKeysError) as ei:
        ck.load(dst, str(root), strict=True)
    assert ei.value.missing == ["extra"] and ei.value.unexpected == ["ids"]
    assert "extra" in str(ei.value) and "ids" in str(ei.value)
    assert torch.equal(dst["big"], torch.zeros(64, 32))  # strict fails before reading

    res = ck.load(dst, str(root), strict=False)
    assert res.missing == ("extra",) and res.unexpected == ("ids",)
    assert torch.equal(dst["extra"], torch.zeros(5))
    want = {k: v for k, v in state.items() if k != "ids"}
    assert_equal_state({k: v for k, v in dst.items() if k != "extra"}, want)


# ------------------------------------------------------------ SIGKILL mid-save


def crash_state(seed: int) -> dict:
    """State saved by the child process: four unpacked tensors of 4 chunks, one packed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}": torch.randn(64, 32, generator=g) for i in range(4)}
    state["bias"] = torch.randn(8, generator=g)
    state["step"] = seed
    return state


_CHILD = """
import sys, time
import ckpt, ckpt.api
from ckptd.formats.storage import FaultPlan, FaultyStorage
from ckptd.formats.writer import WriterOptions
from ckptd.planner import PlanOptions

root, mode = sys.argv[1], sys.argv[2]
ckpt.configure(writer=WriterOptions(workers=2, small_tensor_bytes=1024),
               plan=PlanOptions(2048, 512), retention=None)
ckpt.save(crash_state(1), 1, root)  # blocking: committed before the crash


class SlowStorage(FaultyStorage):
    # Every put of step 2 says what it wrote, then takes its time (a slow disk).
    def _put(self, key, data):
        super()._put(key, data)
        if key.startswith("step-000000002/"):
            print("PUT", key, flush=True)
            time.sleep(0.5)


if mode == "slow":
    plans = []
else:  # "kill:OP:GLOB": the process SIGKILLs itself at that storage call
    _, op, glob = mode.split(":", 2)
    plans = [FaultPlan(op=op, key_glob=glob, kill=True)]
wrappers = {}
original = ckpt.api._storage

def storage(r, o):
    inner = original(r, o)
    if id(inner) not in wrappers:
        wrappers[id(inner)] = (SlowStorage if mode == "slow" else FaultyStorage)(inner, plans)
    return wrappers[id(inner)]

ckpt.api._storage = storage
h = ckpt.save(crash_state(2), 2, root, blocking=False)
print("STAGED", flush=True)
h.wait()
print("COMMITTED", flush=True)
"""


def _child(tmp_path: Path, root: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    if not script.exists():
        src = "\n".join([inspect.getsource(crash_state), textwrap.dedent(_CHILD)])
        script.write_text(src)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(script), str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _check_step2_invisible_then_recover(ck: Any, root: Path, leftover_expected: bool) -> None:
    """Step 1 intact and the latest; step 2 invisible; step 3 commits and GC cleans up."""
    assert (root / "latest").read_text() == "1\n"
    assert not (root / STEP2 / "COMMITTED").exists()
    if leftover_expected:
        assert (root / STEP2).is_dir()  # bytes of the interrupted save are there ...
    want1 = crash_state(1)
    dst = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in want1.items()}
    assert ck.load(dst, str(root)).step == 1  # ... but invisible
    assert_equal_state(dst, want1)
    pending = r"uncommitted .*\[2\]" if leftover_expected else ""
    with pytest.raises(NotCommittedError, match=pending):
        ck.load(dst, str(root), step=2)

    want3 = crash_state(3)
    ck.save(want3, 3, str(root))
    ck.wait(timeout=60)  # also drains retention, which collects the leftover
    assert not (root / STEP2).exists()
    assert (root / STEP1 / "COMMITTED").exists()  # keep_last=3 keeps step 1
    dst = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in want3.items()}
    assert ck.load(dst, str(root)).step == 3
    assert_equal_state(dst, want3)


@pytest.mark.slow
def test_sigkill_during_async_save(ck: Any, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    proc = _child(tmp_path, root, "slow")
    timer = threading.Timer(120, proc.kill)  # never hang the suite
    timer.start()
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("PUT "):
                break
        proc.send_signal(signal.SIGKILL)  # mid-write: chunks of step 2 are being put
        _out, err = proc.communicate(timeout=60)
    finally:
        timer.cancel()
    assert lines and lines[-1].startswith("PUT step-000000002/"), (lines, err)
    assert proc.returncode == -signal.SIGKILL
    _check_step2_invisible_then_recover(ck, root, leftover_expected=True)


# Where the coordinator dies (mid-chunk is the test above): while the manifest is
# written, and between the manifest and the commit marker.
KILL_POINTS = {
    "manifest": f"put:{STEP2}/zarr.json",
    "marker": f"put_if_absent:{STEP2}/COMMITTED",
}


@pytest.mark.slow
def test_sigkill_at_each_phase_of_the_commit(ck: Any, tmp_path: Path) -> None:
    procs = {}
    for name, mode in KILL_POINTS.items():  # concurrently: a child takes seconds to start
        (tmp_path / name).mkdir()
        procs[name] = _child(tmp_path / name, tmp_path / name / "ckpt", f"kill:{mode}")
    deadline = time.monotonic() + 120
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == -signal.SIGKILL, (name, out, err)
        assert "COMMITTED" not in out, (name, out, err)
    for name in procs:
        _check_step2_invisible_then_recover(ck, tmp_path / name / "ckpt", leftover_expected=True)
