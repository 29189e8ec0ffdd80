"""Windowed streaming into the Hugging Face target, and byte ranges from every source.

The HF target writes each shard as aligned windows filled with ``Fetch.range``; these
tests shrink the window to one 4 KiB page so that windows cut tensors (and, after odd
sized bf16 / uint8 tensors, elements) at arbitrary bytes. ``Source.read_range`` is
checked against the whole tensor's bytes for every source format (a conformance suite:
random ranges, empty ranges, ranges that cross DeepSpeed partition boundaries).
"""

from __future__ import annotations

import errno
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources import open_source
from ckptd.converters.sources.base import PlanError, Source, raw_bytes
from ckptd.converters.targets import hf as hf_target
from ckptd.converters.targets import windows


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def _mixed_state() -> dict[str, torch.Tensor]:
    """Odd byte sizes (bf16 x 77, uint8 x 5) so that later fp32 tensors start unaligned."""
    g = torch.Generator().manual_seed(7)
    return {
        "a.bf16": torch.randn(11, 7, generator=g).to(torch.bfloat16),
        "b.u8": torch.arange(5, dtype=torch.uint8),
        "c.w": torch.randn(40, 33, generator=g),
        "d.scalar": torch.tensor(2.5, dtype=torch.float64),
        "e.empty": torch.empty(0, 3),
        "f.w": torch.randn(3, 1500, generator=g),
        "g.i64": torch.arange(999, dtype=torch.int64).reshape(27, 37),
    }


def _megatron(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from test_convert_megatron import HEADS, canonical

    ref = canonical()
    (tmp / "meg-hf").mkdir()
    save_file(ref, str(tmp / "meg-hf" / "model.safetensors"))
    opts = ConvertOptions(
        target_format="megatron",
        target_layout=(("tp", 2), ("pp", 2)),
        variables=(("heads", HEADS),),
    )
    convert(str(tmp / "meg-hf"), str(tmp / "meg"), opts)
    return tmp / "meg", ref


def _make(kind: str, tmp: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint of ``kind`` under ``tmp`` and the tensors it holds, by name."""
    if kind in ("hf", "universal"):
        state = _mixed_state()
        save_file(state, str(tmp / "m.safetensors"))
        if kind == "hf":
            return str(tmp / "m.safetensors"), state
        convert(str(tmp / "m.safetensors"), str(tmp / "uni"))
        return str(tmp / "uni"), state
    if kind.startswith("deepspeed"):
        stage = int(kind[-1])
        ds = fx.tiny_state(stage)
        fx.write_deepspeed(tmp / "ds", ds, stage=stage, dp=4, step=5)
        return str(tmp / "ds"), fx.expected_universal(ds, stage, 5)
    if kind == "megatron":
        path, ref = _megatron(tmp)
        return str(path), ref
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        state = {k: v for k, v in _mixed_state().items() if v.dtype != torch.uint8}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(dict(state), checkpoint_id=str(tmp / "dcp"), no_dist=True)
        return str(tmp / "dcp"), state
    raise AssertionError(kind)


KINDS = ["hf", "universal", "deepspeed2", "deepspeed3", "megatron", "dcp"]


@pytest.fixture()
def small_windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One page per window, a sync every two windows."""
    monkeypatch.setattr(hf_target, "WINDOW_BYTES", windows.ALIGN)
    monkeypatch.setattr(hf_target, "SYNC_BYTES", 2 * windows.ALIGN)
    yield


@pytest.mark.parametrize("kind", KINDS)
def test_read_range_matches_whole_tensor_bytes(tmp_path: Path, kind: str) -> None:
    path, _ = _make(kind, tmp_path)
    rng = random.Random(kind)
    with open_source(path) as src:
        for info in src.tensors():
            whole = bytes(raw_bytes(src.read(info.name)))
            n = len(whole)
            cuts = {0, n, *(rng.randint(0, n) for _ in range(6))}
            ranges = [(a, b) for a in cuts for b in cuts if a <= b]
            rng.shuffle(ranges)
            for a, b in ranges[:12]:
                out = bytearray(b - a)
                src.read_range(info.name, a, memoryview(out))
                assert bytes(out) == whole[a:b], (info.name, a, b)
            # Consecutive pieces, as the window writer asks for them.
            got = bytearray(n)
            for lo in range(0, n, 37):
                hi = min(n, lo + 37)
                src.read_range(info.name, lo, memoryview(got)[lo:hi])
            assert bytes(got) == whole, info.name
            with pytest.raises(PlanError):
                src.read_range(info.name, n, memoryview(bytearray(1)))


@pytest.mark.parametrize("kind", KINDS)
def test_small_windows_to_hf_bit_exact(tmp_path: Path, kind: str, small_windows: None) -> None:
    path, want = _make(kind, tmp_path)
    out = tmp_path / "out"
    res = convert(path, str(out), ConvertOptions(target_format="hf"))
    _assert_bit_exact(load_file(str(out / "model.safetensors")), want)
    assert res.bytes_written == os.path.getsize(out / "model.safetensors") > windows.ALIGN
    assert not (out / ".ckpt-convert-progress.json").exists()


def test_stream_never_reads_whole_tensors(
    tmp_path: Path, small_windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain moves from a DeepSpeed source go through byte ranges only: ``read`` (a whole
    tensor) is never called, so memory is the windows whatever the tensor sizes."""
    from ckptd.converters.sources.deepspeed import DeepSpeedSource

    path, want = _make("deepspeed2", tmp_path)

    def refuse(self: Source, name: str) -> torch.Tensor:
        raise AssertionError(f"whole read of {name}")

    monkeypatch.setattr(DeepSpeedSource, "read", refuse)
    opts = ConvertOptions(target_format="hf", weights_only=True)
    convert(path, str(tmp_path / "out"), opts)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    _assert_bit_exact(got, {k: v for k, v in want.items() if k.startswith("model.")})


def test_without_o_direct_on_tmpfs(tmp_path: Path, small_windows: None) -> None:
    """tmpfs refuses O_DIRECT at open: the window writer writes buffered instead."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path, want = _make("hf", tmp_path)
    out = Path("/dev/shm") / f"ckpt-hf-{os.getpid()}"
    try:
        convert(path, str(out), ConvertOptions(target_format="hf"))
        _assert_bit_exact(load_file(str(out / "model.safetensors")), want)
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_o_direct_refused_at_write_goes_buffered(
    tmp_path: Path, small_windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems accept O_DIRECT at open and refuse the write (EINVAL): the
    writer clears O_DIRECT on the open file and writes the window again."""
    path, want = _make("hf", tmp_path)
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(windows.os, "pwrite", pwrite)
    convert(path, str(tmp_path / "out"), ConvertOptions(target_format="hf"))
    assert refused  # O_DIRECT was tried first
    _assert_bit_exact(load_file(str(tmp_path / "out" / "model.safetensors")), want)


def test_window_writer_rejects_unaligned_windows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        windows.WindowWriter(str(tmp_path / "x"), 1000, truncate=True)


def test_window_writer_allocates_the_file_up_front(tmp_path: Path) -> None:
    """Blocks are allocated before the first window is written (parallel O_DIRECT
    writes on ext4; a full disk fails at once); the file is cut to its size at the end."""
    size = 3 * windows.ALIGN + 123
    path = tmp_path / "f"
    with windows.WindowWriter(str(path), windows.ALIGN, truncate=True, size=size) as w:
        if os.stat(path).st_blocks * 512 < size:
            pytest.skip("this filesystem does not support fallocate")
        for k in range(4):
            n = min(windows.ALIGN, size - k * windows.ALIGN)
            w.put(k, n, lambda view, k=k: view.__setitem__(slice(None), bytes([k]) * view.nbytes))
        crcs = w.drain()
        w.sync(size)
    data = path.read_bytes()
    assert len(data) == size and sorted(crcs) == [0, 1, 2, 3]
    assert data == b"".join(
        bytes([k]) * min(windows.ALIGN, size - k * windows.ALIGN) for k in range(4)
    )


def test_workers_set_writer_threads_and_output_is_identical(
    tmp_path: Path, small_windows: None
) -> None:
    """``--workers N`` gives the HF target ``N // 2`` writer threads (1..8; default 4 ->
    the 2 it was measured with); the file is the same byte for byte whatever N."""
    import threading

    assert [hf_target.writer_threads(n) for n in (1, 2, 4, 9, 64)] == [1, 1, 2, 4, 8]
    path, want = _make("hf", tmp_path)  # ~8 one-page windows: tensors reported mid-write
    outs = {}
    for workers in (1, 4, 16):
        seen: set[str] = set()

        def note(name: str, resumed: bool, seen: set[str] = seen) -> None:
            seen.update(t.name for t in threading.enumerate() if t.name.startswith("ckpt-window"))

        out = tmp_path / f"out{workers}"
        convert(path, str(out), ConvertOptions(target_format="hf", workers=workers), on_tensor=note)
        assert 1 <= len(seen) <= hf_target.writer_threads(workers), (workers, seen)
        outs[workers] = (out / "model.safetensors").read_bytes()
        _assert_bit_exact(load_file(str(out / "model.safetensors")), want)
    assert outs[1] == outs[4] == outs[16]
