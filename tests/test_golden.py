"""The golden corpus guards the on-disk format: today's reader must load yesterday's bytes.

``tests/golden/v1`` was written once by ``tests/golden/make_golden.py``; its data is
regenerated here from the same seed and compared bit for bit. Alterations that break
integrity or compatibility must fail to load with the right error; harmless ones
(unknown extra attributes, unrelated files, a newer minor version) must load. Every
test works on a copy in ``tmp_path``; the corpus itself is never modified.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptd.errors import FormatVersionError, IntegrityError, NotCommittedError
from ckptd.formats.chunkcodec import crc32c

GOLDEN = Path(__file__).resolve().parent / "golden"


def _load_maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mg = _load_maker()
STEP_DIR = f"step-{mg.STEP:09d}"
TENSORS = {
    "model.embed.weight": ("float32", [16, 8], False),
    "model.proj.weight": ("bfloat16", [16, 16], False),
    "model.norm.weight": ("float32", [8], True),
    "model.head.weight": ("bfloat16", [4, 8], True),
    "model.position_ids": ("int64", [32], True),
    "model.token_ids": ("int64", [6], True),
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A private copy of ``golden/v1`` (a checkpoint root) to load or alter."""
    dst = tmp_path / "v1"
    shutil.copytree(GOLDEN / "v1", dst)
    return dst


@pytest.fixture
def keep_global_rngs() -> Iterator[None]:
    """Loading restores the checkpoint's RNG state: put the test process's back after."""
    t, n, p = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(t)
    np.random.set_state(n)
    random.setstate(p)


def blank_state() -> dict[str, Any]:
    """The golden state's structure with every value wiped."""
    st = mg.golden_state()
    for k, t in st["model"].items():
        st["model"][k] = torch.full_like(t, 0)
    st["trainer"] = {k: "wiped" for k in st["trainer"]}
    return st


def check_loaded(ck: Any, root: Path, step: int | None = None) -> None:
    """Load ``root`` strictly and compare everything with the regenerated golden state."""
    st = blank_state()
    res = ck.load(st, str(root), step=step, strict=True)
    assert res.step == mg.STEP and res.missing == () and res.unexpected == ()
    want = mg.golden_state()
    for k, t in want["model"].items():
        got = st["model"][k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(got, t), f"{k} differs from the golden data"
    assert st["trainer"] == want["trainer"]
    # The RNG entry holds the seeded global state: the next draws must be identical.
    draws = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    mg.seed_global_rngs()
    assert torch.equal(draws[0], torch.rand(4))
    assert np.array_equal(draws[1], np.random.rand(4))
    assert draws[2] == [random.random() for _ in range(4)]


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / STEP_DIR / "zarr.json").read_bytes())


def rewrite_manifest(root: Path, doc: dict[str, Any]) -> None:
    """Write an edited manifest and a marker whose checksum matches it."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    (root / STEP_DIR / "zarr.json").write_bytes(data)
    path = root / STEP_DIR / "COMMITTED"
    marker = json.loads(path.read_bytes())
    marker["manifest_crc32c"] = crc32c(data)
    path.write_bytes(json.dumps(marker, sort_keys=True).encode())


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def chunk_of(root: Path, name: str, i: int = 0) -> tuple[Path, int, int]:
    """(object path, offset, length) of chunk ``i`` of tensor ``name``."""
    _idx, obj, off, length, _crc, _packed = manifest(root)["attributes"]["ckpt"]["tensors"][name][
        "chunks"
    ][i]
    return root / STEP_DIR / obj, off, length


# ---------------------------------------------------------------- must load


def test_corpus_is_the_expected_v1_checkpoint() -> None:
    """The corpus covers what it claims to (and nobody regenerated it with other data)."""
    root = GOLDEN / "v1"
    assert (root / "latest").read_text() == f"{mg.STEP}\n"
    doc = manifest(root)
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    m = doc["attributes"]["ckpt"]
    assert m["format"] == "ckptd-universal" and m["version"] == "1.0" and m["step"] == mg.STEP
    got = {n: (t["dtype"], t["shape"], t["packed"]) for n, t in m["tensors"].items()}
    assert got == TENSORS
    assert len(m["tensors"]["model.embed.weight"]["chunks"]) == 2
    # Both kinds of zstd frame are covered: compressed (int64 ramp) and raw blocks.
    frames = {n: chunk_of(root, n)[0].read_bytes()[chunk_of(root, n)[1] :][:5] for n in TENSORS}
    assert all(f[:4] == b"\x28\xb5\x2f\xfd" for f in frames.values())
    assert frames["model.position_ids"][4] != 0xE0 and frames["model.embed.weight"][4] == 0xE0
    assert m["state"]["trainer.run"] == "golden"
    assert list(m["rng"]) == ["rank=0"]
    marker = json.loads((root / STEP_DIR / "COMMITTED").read_bytes())
    assert marker["step"] == mg.STEP
    assert marker["manifest_crc32c"] == crc32c((root / STEP_DIR / "zarr.json").read_bytes())
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 64 * 1024, f"the golden corpus grew to {total} bytes"


def test_golden_loads_bit_exact(ckpt_client: Any, corpus: Path, keep_global_rngs: None) -> None:
    check_loaded(ckpt_client, corpus)
    check_loaded(ckpt_client, corpus, step=mg.STEP)


def test_unpacked_array_is_plain_zarr(corpus: Path) -> None:
    """Other tools read the unpacked arrays with zarr-python alone."""
    zarr = pytest.importorskip("zarr")
    arr = zarr.open_array(str(corpus / STEP_DIR / "model.embed.weight"), mode="r")
    assert arr.shape == (16, 8) and arr.chunks == (8, 8)
    want = mg.golden_state()["model"]["embed.weight"]
    assert np.array_equal(arr[:], want.numpy())


def _extra_attributes(root: Path) -> None:
    doc = manifest(root)
    doc["attributes"]["other_tool"] = {"owner": "someone else"}
    m = doc["attributes"]["ckpt"]
    m["future_field"] = {"nested": [1, 2, 3]}
    m["tensors"]["model.embed.weight"]["future_tensor_field"] = "ignored"
    m["layout"]["future_layout_field"] = 1
    rewrite_manifest(root, doc)


def _newer_minor_version(root: Path) -> None:
    doc = manifest(root)
    doc["attributes"]["ckpt"]["version"] = "1.7"
    rewrite_manifest(root, doc)


def _unrelated_files(root: Path) -> None:
    (root / STEP_DIR / "README.txt").write_text("notes from an operator\n")
    (root / STEP_DIR / "extra" / "c").mkdir(parents=True)
    (root / STEP_DIR / "extra" / "c" / "0").write_bytes(b"\x00" * 10)
    (root / "notes.txt").write_text("unrelated\n")
    (root / "tmp").mkdir()


def _extra_marker_field(root: Path) -> None:
    path = root / STEP_DIR / "COMMITTED"
    marker = json.loads(path.read_bytes())
    marker["future_marker_field"] = [1]
    path.write_bytes(json.dumps(marker).encode())


def _no_latest_file(root: Path) -> None:
    (root / "latest").unlink()  # a hint only: the committed steps are listed instead


MUST_LOAD: dict[str, Callable[[Path], None]] = {
    "extra-unknown-attributes": _extra_attributes,
    "newer-minor-version": _newer_minor_version,
    "unrelated-files": _unrelated_files,
    "extra-marker-field": _extra_marker_field,
    "no-latest-file": _no_latest_file,
}


@pytest.mark.parametrize("alteration", list(MUST_LOAD))
def test_harmless_alterations_load(
    ckpt_client: Any, corpus: Path, keep_global_rngs: None, alteration: str
) -> None:
    MUST_LOAD[alteration](corpus)
    check_loaded(ckpt_client, corpus)


# ---------------------------------------------------------------- must fail


def _flip_unpacked_chunk(root: Path) -> None:
    path, _off, length = chunk_of(root, "model.embed.weight", 1)
    flip_byte(path, length - 3)


def _flip_packed_chunk(root: Path) -> None:
    path, off, length = chunk_of(root, "model.position_ids")
    flip_byte(path, off + length // 2)


def _major_version_2(root: Path) -> None:
    doc = manifest(root)
    doc["attributes"]["ckpt"]["version"] = "2.0"
    rewrite_manifest(root, doc)


def _delete_marker(root: Path) -> None:
    (root / STEP_DIR / "COMMITTED").unlink()


def _truncate_manifest(root: Path) -> None:
    path = root / STEP_DIR / "zarr.json"
    path.write_bytes(path.read_bytes()[:1000])


def _unknown_dtype(root: Path) -> None:
    doc = manifest(root)
    doc["attributes"]["ckpt"]["tensors"]["model.norm.weight"]["dtype"] = "float7"
    rewrite_manifest(root, doc)


def _delete_chunk_object(root: Path) -> None:
    path, _off, _length = chunk_of(root, "model.embed.weight", 0)
    path.unlink()


MUST_FAIL: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "flip-byte-unpacked-chunk": (
        _flip_unpacked_chunk,
        IntegrityError,
        r"tensor 'model\.embed\.weight' chunk \[1, 0\].*checksum mismatch",
    ),
    "flip-byte-packed-chunk": (
        _flip_packed_chunk,
        IntegrityError,
        r"tensor 'model\.position_ids' chunk \[0\].*checksum mismatch",
    ),
    "major-version-2": (_major_version_2, FormatVersionError, r"format version 2\.0 .*upgrade"),
    "delete-commit-marker": (_delete_marker, NotCommittedError, "no committed checkpoint"),
    "truncate-manifest": (_truncate_manifest, IntegrityError, "manifest checksum mismatch"),
    "unknown-dtype": (_unknown_dtype, IntegrityError, "float7"),
    "delete-chunk-object": (_delete_chunk_object, IntegrityError, r"missing 1 object"),
}


@pytest.mark.parametrize("alteration", list(MUST_FAIL))
def test_damaging_alterations_fail(ckpt_client: Any, corpus: Path, alteration: str) -> None:
    alter, error, message = MUST_FAIL[alteration]
    alter(corpus)
    with pytest.raises(error, match=message):
        ckpt_client.load(blank_state(), str(corpus))
    if alteration == "delete-commit-marker":
        with pytest.raises(NotCommittedError, match=f"step {mg.STEP} is not committed"):
            ckpt_client.load(blank_state(), str(corpus), step=mg.STEP)
