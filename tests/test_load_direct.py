"""Loads read chunk bytes straight into the caller's tensors where the layout allows.

A chunk that one copy fills, or that consecutive row ranges of several destination
tensors fill (a resharded load in one process), is read with one scattered read and
checksummed over its parts; every other chunk goes through a reused scratch buffer.
Both paths must give the same bits, and a corrupt chunk is caught on both.
"""

from __future__ import annotations

import os

import pytest
import torch

import ckpt
from ckpt.config import Config
from ckptd.errors import IntegrityError
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.reader import CheckpointReader


@pytest.fixture(autouse=True)
def _fresh_client():
    ckpt.configure(Config(codec=CodecPolicy(codec="raw")))  # bf16 would be compressed
    yield
    ckpt.shutdown()
    ckpt.configure(Config())


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of chunks read straight into tensors vs decoded through a buffer."""
    calls = {"into": 0, "buffered": 0}
    into, buffered = CheckpointReader.read_chunk_into, CheckpointReader.read_chunk

    def read_into(self, *a, **k):  # type: ignore[no-untyped-def]
        ok = into(self, *a, **k)
        calls["into"] += ok
        return ok

    def read_buffered(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["buffered"] += 1
        return buffered(self, *a, **k)

    monkeypatch.setattr(CheckpointReader, "read_chunk_into", read_into)
    monkeypatch.setattr(CheckpointReader, "read_chunk", read_buffered)
    return calls


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(1000, 700, generator=g),  # 2.8 MB: large enough for O_DIRECT
        "vec": torch.randn(12345, generator=g).to(torch.bfloat16),
        "small": torch.randn(7, 3, generator=g),
    }


def _row_split(state: dict[str, torch.Tensor], parts: int) -> tuple[dict, ckpt.Layout]:
    flat, rules = {}, {}
    for k, v in state.items():
        for i, view in enumerate(torch.chunk(v, parts, dim=0)):
            flat[f"{k}#{i}"] = view
            rules[f"{k}#{i}"] = ckpt.Split(0, i, parts, global_size=v.shape[0], uneven=True)
    return flat, ckpt.Layout(rules=rules, rename=lambda k: k.split("#", 1)[0])


def test_same_layout_reads_into_the_tensors(tmp_path, counted) -> None:
    src = _state()
    ckpt.save(src, 1, str(tmp_path))
    out = {k: torch.full_like(v, -1) for k, v in src.items()}
    ckpt.load(out, str(tmp_path), strict=True)
    assert all(torch.equal(out[k], src[k]) for k in src)
    assert counted["buffered"] == 0 and counted["into"] >= 3


def test_row_resharded_load_scatters_one_read_over_the_parts(tmp_path, counted) -> None:
    src = _state()
    ckpt.save(src, 1, str(tmp_path))
    dst = {k: torch.full_like(v, -1) for k, v in src.items()}
    flat, layout = _row_split(dst, 3)
    ckpt.load(flat, str(tmp_path), layout=layout, strict=True)
    assert all(torch.equal(dst[k], src[k]) for k in src)
    assert counted["buffered"] == 0


def test_column_resharded_load_goes_through_the_buffer(tmp_path, counted) -> None:
    src = {"big": _state()["big"]}
    ckpt.save(src, 1, str(tmp_path))
    dst = torch.full_like(src["big"], -1)
    flat = {f"big#{i}": v for i, v in enumerate(torch.chunk(dst, 2, dim=1))}
    layout = ckpt.Layout(
        rules={k: ckpt.Split(1, i, 2) for i, k in enumerate(flat)},
        rename=lambda k: k.split("#", 1)[0],
    )
    ckpt.load(flat, str(tmp_path), layout=layout, strict=True)
    assert torch.equal(dst, src["big"])
    assert counted["buffered"] >= 1 and counted["into"] == 0


@pytest.mark.parametrize("split", [False, True])
def test_corrupt_chunk_is_caught_on_the_direct_path(tmp_path, split: bool) -> None:
    src = {"big": _state()["big"]}
    ckpt.save(src, 1, str(tmp_path))
    chunks = [
        os.path.join(d, f)
        for d, _, fs in os.walk(tmp_path / "step-000000001" / "big")
        for f in fs
        if f != "zarr.json"
    ]
    path = max(chunks, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    dst = {"big": torch.zeros_like(src["big"])}
    flat, layout = _row_split(dst, 3) if split else (dst, None)
    with pytest.raises(IntegrityError, match="big"):
        ckpt.load(flat, str(tmp_path), layout=layout, strict=True)
