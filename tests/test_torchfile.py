"""The torch-free reader of ``torch.save`` files (``converters/sources/torchfile.py``).

It must agree with ``torch.load(map_location="meta")`` on every file it reads, refuse
(by deferring to torch.load) whatever it does not model, and let a DeepSpeed -> HF or
-> universal conversion run in a process where torch cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch
from meta_compare import assert_same_meta, torch_meta
from safetensors.torch import load_file

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.deepspeed_files import STANDINS, UnsafePickleError, load_pt
from ckptd.converters.sources.torchfile import MetaTensor, NeedsTorchLoad, load_meta


def _objects() -> dict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=g)
    bf = torch.arange(40, dtype=torch.bfloat16)
    return {
        "fp32": base,
        "slice": base[2:4],  # a storage offset
        "transposed": base.t(),  # not contiguous
        "bf16_view": bf[5:25].view(4, 5),
        "again": bf,  # one storage, two tensors
        "int64": torch.arange(7),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "param": torch.nn.Parameter(torch.ones(2, 3)),
        "half": torch.ones(3, dtype=torch.float16),
        "bool": torch.tensor([True, False]),
        "nested": OrderedDict(a=[torch.zeros(2), (torch.ones(1), 5)], b={"c": "text"}),
        "size": torch.Size([2, 3]),
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "set": {1, 2},
        "bytes": b"\x00\xffab",
        "none": None,
        "float": 0.25,
    }


def test_agrees_with_torch_meta_loading(tmp_path: Path) -> None:
    path = str(tmp_path / "obj.pt")
    obj = _objects()
    torch.save(obj, path)
    got = load_meta(path)
    assert_same_meta(got, torch_meta(path), "obj")
    # the offsets point at the right bytes
    with open(path, "rb") as f:
        for key in ("fp32", "slice", "bf16_view", "int64", "scalar", "param", "half"):
            t, m = obj[key], got[key]
            assert isinstance(m, MetaTensor) and m.is_contiguous(), key
            f.seek(m.file_offset)
            raw = f.read(m.numel() * m.element_size())
            assert raw == t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(), key
    assert not got["transposed"].is_contiguous()


def test_deepspeed_fixture_files_take_the_torch_free_path(tmp_path: Path) -> None:
    """The fixture's ZeRO-2/3 files (with the DeepSpeed stand-ins) need no fallback."""
    for stage in (2, 3):
        ck = fx.write_deepspeed(tmp_path / f"z{stage}", fx.tiny_state(), stage=stage, dp=2)
        files = sorted(Path(ck).rglob("*.pt"))
        assert files
        for f in files:
            assert_same_meta(load_meta(str(f), STANDINS), torch_meta(str(f)), str(f))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/ckptd-torchfile-pwned",))


def test_unknown_global_defers_to_torch_and_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2), "p": _Payload()}, path)
    with pytest.raises(NeedsTorchLoad, match=r"global (posix|os)\.system"):
        load_meta(str(path))
    with pytest.raises(UnsafePickleError, match=r"evil\.pt"):
        load_pt(str(path), meta=True)
    assert not os.path.exists("/tmp/ckptd-torchfile-pwned")


def test_truncated_and_corrupt_files_are_typed_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"x": torch.ones(100)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceFormatError, match=r"cut\.pt: cannot read"):
        load_pt(str(tmp_path / "cut.pt"), meta=True)
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(SourceFormatError, match=r"junk\.pt: "):
        load_pt(str(tmp_path / "junk.pt"), meta=True)


def test_a_tensor_past_its_storage_is_refused(tmp_path: Path) -> None:
    """Metadata that points outside its storage never becomes a read range."""
    path = tmp_path / "t.pt"
    torch.save({"x": torch.ones(4)}, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    # the storage numel (BININT1 4 in the persistent id) -> 2
    members[pkl] = members[pkl].replace(b"K\x04t", b"K\x02t", 1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, members[n])
    with pytest.raises(SourceFormatError, match="runs past its storage"):
        load_pt(str(path), meta=True)


_NO_TORCH = textwrap.dedent("""
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch imported during the conversion: {name}")

    sys.meta_path.insert(0, _Block())
    from ckptd.converters.convert import ConvertOptions, convert
    from ckptd.converters.sources.namemap import NameMap

    src, dst, to = sys.argv[1:4]
    convert(src, dst, ConvertOptions(target_format=to))
    assert "torch" not in sys.modules
""")


@pytest.mark.parametrize("to", ["hf", "universal"])
def test_deepspeed_conversion_runs_without_torch(tmp_path: Path, to: str) -> None:
    ck = fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(), stage=2, dp=2)
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(ck), str(tmp_path / "a"), to],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    convert(str(ck), str(tmp_path / "b"), ConvertOptions(target_format=to))  # torch loaded
    if to == "hf":
        a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(
            str(tmp_path / "b" / "model.safetensors"))  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                       if p.is_file())  # fmt: skip
        assert len(files) > 2
        for rel in files:
            a, b = (tmp_path / "a" / rel).read_bytes(), (tmp_path / "b" / rel).read_bytes()
            if rel.name in ("zarr.json", "COMMITTED"):  # equal but for the times written
                a, b = _timeless(a), _timeless(b)
            assert a == b, rel


def _timeless(raw: bytes) -> object:
    doc = json.loads(raw)
    doc.pop("wall_time", None)
    doc.get("attributes", {}).get("ckpt", {}).pop("created", None)
    doc.pop("manifest_crc32c", None)  # of the manifest, which holds its time
    return doc
