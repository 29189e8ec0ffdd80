"""zarr-python reads ckptd checkpoints: plain zarr on unpacked arrays, CheckpointStore on all."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

import ckpt
from ckptd.errors import IntegrityError, NotCommittedError
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.commit import step_dir
from ckptd.formats.manifest import Manifest, parse_group_metadata
from ckptd.formats.storage import LocalStorage, open_storage
from ckptd.formats.zarr_store import CheckpointStore, open_zarr, read_tensor
from ckptd.planner import PlanOptions

SMALL_CHUNKS = PlanOptions(target_chunk_bytes=1 << 20, min_aligned_chunk_bytes=1 << 18)


@contextlib.contextmanager
def configured(**changes: Any) -> Iterator[None]:
    """Temporarily change the process config of ``ckpt`` (restored even on failure)."""
    old = ckpt.get_config()
    ckpt.configure(retention=None, **changes)
    try:
        yield
    finally:
        ckpt.configure(old)


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mostly_zero = torch.zeros(1024, 1024)
    mostly_zero[::97, ::13] = 1.5
    return {
        "big": torch.randn(1536, 1024, generator=g),  # 6 MiB, 6 chunks of 1 MiB
        "ragged": torch.randn(300_007, generator=g),  # prime length: clipped edge chunk
        "mostly_zero": mostly_zero,  # compressible: real zstd frames
        "big_bf16": torch.randn(1024, 1024, generator=g).bfloat16(),
        "big_i64": torch.arange(300_000, dtype=torch.int64) * 7 - 5,
        "small": torch.randn(16, 8, generator=g),
        "small_bf16": torch.randn(7, generator=g).bfloat16(),
        "small_i64": torch.tensor([1, -2, 3, 2**62], dtype=torch.int64),
        "small_f16": torch.randn(3, 5, generator=g).half(),
        "small_u8": torch.arange(11, dtype=torch.uint8),
        "mask": torch.rand(33, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-42, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "empty_i64": torch.empty(0, dtype=torch.int64),
    }


def as_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """What users do: numpy -> torch, then view the bits as the real dtype."""
    t = torch.from_numpy(np.array(arr, order="C", copy=True))
    return t.view(dtype) if t.dtype != dtype else t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return bool(torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("zarr-interop")
    state = make_state()
    # zstd-adaptive exercises both kinds of zstd frame; the default (auto) is raw/zstd.
    with configured(plan=SMALL_CHUNKS, codec=CodecPolicy(codec="zstd-adaptive")):
        ckpt.save({**state, "epoch": 3}, 7, str(root))
    return root, state


def manifest_of(root: Path, step: int) -> Manifest:
    path = root / step_dir(step) / "zarr.json"
    return parse_group_metadata(path.read_bytes(), str(path))


def test_layout_is_what_the_tests_assume(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = saved
    m = manifest_of(root, 7)
    unpacked = {n for n, r in m.tensors.items() if not r.packed}
    assert unpacked == {"big", "ragged", "mostly_zero", "big_bf16", "big_i64"}
    assert len(m.tensors["big"].chunks) == 6
    assert len(m.tensors["ragged"].chunks) >= 2
    assert 300_007 % m.tensors["ragged"].chunk_shape[0] != 0  # an edge chunk is clipped
    assert set(m.tensors) == set(state)


PLAIN_ZARR_SCRIPT = r"""
import hashlib, json, sys
import zarr, zarr.storage
step_dir, names = sys.argv[1], json.loads(sys.argv[2])
store = zarr.storage.LocalStore(step_dir, read_only=True)
out = {}
for name in names:
    arr = zarr.open_array(store=store, path=name, mode="r")
    data = arr[...]
    out[name] = [list(data.shape), str(data.dtype), hashlib.sha256(data.tobytes()).hexdigest(),
                 arr.attrs["ckpt_dtype"]]
assert not [m for m in sys.modules if m.split(".")[0] in ("ckpt", "ckptd", "torch")]
print(json.dumps(out))
"""


def test_plain_zarr_reads_unpacked_arrays_without_ckptd(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """(a) zarr.open_array on a LocalStore, in a process that never imports ckptd or torch."""
    root, state = saved
    names = sorted(n for n, r in manifest_of(root, 7).tensors.items() if not r.packed)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_ZARR_SCRIPT, str(root / step_dir(7)), json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for name in names:
        t = state[name].contiguous()
        raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
        want_hash = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        assert got[name][0] == list(t.shape)
        assert got[name][2] == want_hash, name
        assert got[name][3] == str(t.dtype).removeprefix("torch.")
    assert got["big_bf16"][1] == "uint16"


def test_plain_zarr_in_process(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = saved
    store = zarr.storage.LocalStore(root / step_dir(7), read_only=True)
    for name in ("big", "ragged", "mostly_zero", "big_bf16", "big_i64"):
        arr = zarr.open_array(store=store, path=name, mode="r")
        assert bits_equal(as_torch(arr[...], state[name].dtype), state[name]), name
    part = zarr.open_array(store=store, path="big", mode="r")[300:700, 5:9]
    assert bits_equal(torch.from_numpy(part), state["big"][300:700, 5:9])


def test_open_zarr_reads_every_tensor(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """(b) every tensor, packed ones, 0-d and zero-size included, bit-exactly."""
    root, state = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component" warnings
        group = open_zarr(root)
        assert set(group.array_keys()) == set(state)
        assert not list(group.group_keys())
    assert group.attrs["ckpt"]["step"] == 7
    assert group.attrs["ckpt"]["state"] == {"epoch": 3}
    for name, want in state.items():
        arr = group[name]
        assert isinstance(arr, zarr.Array)
        assert arr.shape == tuple(want.shape), name
        assert bits_equal(as_torch(arr[...], want.dtype), want), name
        assert bits_equal(read_tensor(arr), want), name
        assert arr.attrs["ckpt_dtype"] == str(want.dtype).removeprefix("torch.")
    assert group["big_bf16"].dtype == np.uint16
    assert read_tensor(group["scalar"]).shape == ()
    assert bits_equal(torch.from_numpy(group["small"][3:9, 2]), state["small"][3:9, 2])
    group.store.close()


def test_open_zarr_variants(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = saved
    storage = LocalStorage(root)
    for group in (open_zarr(storage, 7), open_zarr(str(root), step=7), open_zarr(root, None)):
        assert bits_equal(read_tensor(group["small_bf16"]), state["small_bf16"])
    with pytest.raises(NotCommittedError, match="step 8 is not committed"):
        open_zarr(storage, 8)
    with pytest.raises(NotCommittedError, match="no committed checkpoint"):
        open_zarr(LocalStorage(root / "nothing-here"))


def test_codecs_compressed_and_raw_block_frames(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """(c) zstd-adaptive wrote real zstd frames for the mostly-zero tensor and raw-block
    frames for random data; plain zarr and open_zarr decode both."""
    root, state = saved
    m = manifest_of(root, 7)
    step = root / step_dir(7)
    for c in m.tensors["mostly_zero"].chunks:
        assert c.length < (1 << 20) // 20  # really compressed
    for c in m.tensors["big"].chunks:
        data = (step / c.object).read_bytes()
        assert data[:4] == b"\x28\xb5\x2f\xfd" and data[4] == 0xE0  # raw-block frame
        assert c.length > 1 << 20
    store = zarr.storage.LocalStore(step, read_only=True)
    group = open_zarr(root)
    for name in ("mostly_zero", "big"):
        plain = zarr.open_array(store=store, path=name, mode="r")[...]
        assert bits_equal(torch.from_numpy(plain), state[name])
        assert bits_equal(read_tensor(group[name]), state[name])


@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_other_codec_chains(tmp_path: Path, codec: str) -> None:
    state = make_state(seed=1)
    with configured(plan=SMALL_CHUNKS, codec=CodecPolicy(codec=codec)):
        ckpt.save(state, 1, str(tmp_path))
    m = manifest_of(tmp_path, 1)
    assert {r.codec for r in m.tensors.values()} == {codec}
    store = zarr.storage.LocalStore(tmp_path / step_dir(1), read_only=True)
    assert bits_equal(
        torch.from_numpy(zarr.open_array(store=store, path="big", mode="r")[...]), state["big"]
    )
    group = open_zarr(tmp_path)
    for name, want in state.items():
        assert bits_equal(read_tensor(group[name]), want), name


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_corrupt_chunks_raise_integrity_error(tmp_path: Path) -> None:
    state = make_state(seed=2)
    with configured(plan=SMALL_CHUNKS):
        ckpt.save(state, 3, str(tmp_path))
    m = manifest_of(tmp_path, 3)
    step = tmp_path / step_dir(3)
    big = m.tensors["big"].chunks[2]
    flip_bit(step / big.object, 1000)
    small = m.tensors["small_i64"].chunks[0]
    flip_bit(step / small.object, small.offset + small.length - 1)

    group = open_zarr(tmp_path)
    with pytest.raises(IntegrityError, match=r"tensor 'big' chunk \[2, 0\].*checksum mismatch"):
        group["big"][...]
    with pytest.raises(IntegrityError, match=r"tensor 'small_i64' chunk \[0\]"):
        group["small_i64"][...]
    assert bits_equal(read_tensor(group["big_bf16"]), state["big_bf16"])  # others still read
    unchecked = open_zarr(tmp_path, verify=False)
    assert not bits_equal(read_tensor(unchecked["big"]), state["big"])  # raw frame: silent

    (step / m.tensors["ragged"].chunks[0].object).unlink()
    with pytest.raises(IntegrityError, match=r"tensor 'ragged' chunk \[0\].*missing"):
        group["ragged"][...]  # never silently the fill value


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(it: Any) -> list[str]:
    return [k async for k in it]


def test_store_api(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, _ = saved
    storage = LocalStorage(root)
    store = CheckpointStore(storage)
    m = store.manifest
    assert store.step == 7 and store.read_only and not store.supports_writes
    assert store == CheckpointStore(storage, 7)
    top = set(run(collect(store.list_dir(""))))
    assert top == {"zarr.json", *m.tensors}  # no COMMITTED, no packs/
    assert set(run(collect(store.list_dir("big")))) == {"zarr.json", "c"}
    assert set(run(collect(store.list_dir("big/c")))) == {str(i) for i in range(6)}
    assert set(run(collect(store.list_dir("scalar/")))) == {"c", "zarr.json"}  # 0-d: key "c"
    keys = run(collect(store.list()))
    assert keys == sorted(keys) and "small/c/0/0" in keys and "empty/zarr.json" in keys
    assert run(collect(store.list_prefix("big/c/"))) == [f"big/c/{i}/0" for i in range(6)]
    assert run(store.exists("small/zarr.json")) and run(store.exists("scalar/c"))
    assert not run(store.exists("COMMITTED")) and not run(store.exists("empty/c/0/0"))

    proto = default_buffer_prototype()
    meta = json.loads(run(store.get("small_bf16/zarr.json", proto)).to_bytes())
    assert meta["data_type"] == "uint16" and meta["attributes"]["ckpt_dtype"] == "bfloat16"
    assert run(store.get("nope/zarr.json", proto)) is None
    rec = m.tensors["small_i64"].chunks[0]
    whole = run(store.get("small_i64/c/0", proto)).to_bytes()
    assert len(whole) == rec.length == run(store.getsize("small_i64/c/0"))
    for req, want in [
        (RangeByteRequest(2, 9), whole[2:9]),
        (OffsetByteRequest(5), whole[5:]),
        (SuffixByteRequest(4), whole[-4:]),
    ]:
        assert run(store.get("small_i64/c/0", proto, req)).to_bytes() == want
    parts = run(
        store.get_partial_values(proto, [("big/c/1/0", RangeByteRequest(0, 4)), ("missing", None)])
    )
    assert parts[0].to_bytes() == b"\x28\xb5\x2f\xfd" and parts[1] is None
    meta_size = (root / step_dir(7) / "big" / "zarr.json").stat().st_size
    assert run(store.getsize("big/zarr.json")) == meta_size
    with pytest.raises(FileNotFoundError):
        run(store.getsize("COMMITTED"))
    with pytest.raises(ValueError, match="read-only"):
        run(store.set("x", proto.buffer.from_bytes(b"1")))
    with pytest.raises(ValueError, match="read-only"):
        run(store.delete("big/zarr.json"))
    with pytest.raises(ValueError, match="read-only"):
        store.with_read_only(False)
    assert store.with_read_only(True) == store


def test_uncommitted_step_is_refused(tmp_path: Path) -> None:
    with configured():
        ckpt.save({"w": torch.ones(3)}, 1, str(tmp_path))
    (tmp_path / step_dir(1) / "COMMITTED").unlink()
    with pytest.raises(NotCommittedError, match="step 1 is not committed"):
        CheckpointStore(LocalStorage(tmp_path), 1)


def test_fsspec_memory_root(tmp_path: Path) -> None:
    """Any fsspec URL: the store reads ranges through FsspecStorage too."""
    import uuid

    root = f"memory://ckptd-zarr-{uuid.uuid4().hex[:8]}"
    state = {"a": torch.randn(600, 1000), "b": torch.arange(5)}
    with configured(plan=SMALL_CHUNKS):
        ckpt.save(state, 2, root)
    storage = open_storage(root)
    group = open_zarr(storage)
    for name, want in state.items():
        assert bits_equal(read_tensor(group[name]), want)
    storage.delete_prefix("")
