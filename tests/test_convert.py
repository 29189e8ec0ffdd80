"""ckpt-convert: universal, Hugging Face safetensors and PyTorch DCP, both directions.

Round trips are bit-exact; interruption is simulated by raising from the per-tensor
callback after K tensors (the state left behind is what a kill leaves: every tensor
reported done is durable); memory is measured in a subprocess with ru_maxrss.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckpt
from ckptd.converters.cli import main as cli
from ckptd.converters.convert import ConvertOptions, convert, parse_size, plan_conversion
from ckptd.converters.sources.base import SourceFormatError, SourceNotFoundError, TargetExistsError
from ckptd.converters.sources.namemap import parse_name_map
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_io import UniversalWriter
from ckptd.formats.universal_reader import UniversalReader


class Tiny(torch.nn.Module):
    """Embedding, a bf16-free MLP and a norm: enough to check a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.fc1 = torch.nn.Linear(32, 96)
        self.fc2 = torch.nn.Linear(96, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.head(self.norm(h))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _write_hf_sharded(d: Path, tensors: dict[str, torch.Tensor], per_shard: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: tensors[n].contiguous() for n in g}, str(d / fname), metadata={"format": "pt"}
        )
        weight_map |= {n: fname for n in g}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_hf(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k


def _hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    sd = dict(_tiny(seed).state_dict())
    sd["extra.bf16"] = torch.randn(33, 7).to(torch.bfloat16)
    sd["extra.scalar"] = torch.tensor(1.5, dtype=torch.float64)
    sd["extra.ids"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    sd["extra.empty"] = torch.empty(0, 5)
    return sd


# ------------------------------------------------------------------ round trips


def test_hf_sharded_to_universal_to_hf_bit_exact(tmp_path: Path) -> None:
    src = _hf_state()
    _write_hf_sharded(tmp_path / "hf", src, per_shard=3)
    r1 = convert(str(tmp_path / "hf"), str(tmp_path / "uni"))
    assert r1.tensors == len(src) and r1.plan.source_format == "hf"
    opts = ConvertOptions(target_format="hf", max_shard_size=parse_size("20KB"))
    r2 = convert(str(tmp_path / "uni"), str(tmp_path / "out"), opts)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(src)
    assert len(set(index["weight_map"].values())) > 1
    assert (out / ".ckpt-convert-complete").is_file()
    assert not list(out.glob(".*.partial")) and not (out / ".ckpt-convert-progress.json").exists()
    assert r2.plan.outputs[-1] == ".ckpt-convert-complete"
    _assert_bit_exact(_load_hf(out), src)

    ref, back = _tiny(0), _tiny(1)
    loaded = {k: v for k, v in _load_hf(out).items() if not k.startswith("extra.")}
    back.load_state_dict(loaded)
    ids = torch.randint(0, 50, (4, 9))
    assert torch.equal(ref(ids), back(ids))


def test_single_file_source_and_target(tmp_path: Path) -> None:
    src = _hf_state()
    save_file(src, str(tmp_path / "model.safetensors"))
    convert(str(tmp_path / "model.safetensors"), str(tmp_path / "uni"))
    convert(str(tmp_path / "uni"), str(tmp_path / "out"), ConvertOptions(target_format="hf"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    _assert_bit_exact(load_file(str(tmp_path / "out" / "model.safetensors")), src)


def _dcp_state() -> dict[str, torch.Tensor]:
    sd = {f"model.{k}": v for k, v in _tiny(3).state_dict().items()}
    sd["optim.state.fc1.weight.exp_avg"] = torch.randn(96, 32)
    sd["model.half"] = torch.randn(16, 3).half()
    return sd


def test_dcp_to_universal_to_dcp_bit_exact(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    src = _dcp_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**src, "meta.step": 7}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    r1 = convert(str(tmp_path / "dcp"), str(tmp_path / "uni"), ConvertOptions(step=7))
    assert r1.plan.source_format == "dcp" and r1.plan.skipped == ("meta.step",)
    uni = UniversalReader.open(LocalStorage(tmp_path / "uni"), 7)
    _assert_bit_exact({n: uni.read(n) for n in uni.names()}, src)
    convert(str(tmp_path / "uni"), str(tmp_path / "dcp2"), ConvertOptions(target_format="dcp"))
    got = {k: torch.full_like(v, -7) for k, v in src.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=str(tmp_path / "dcp2"), no_dist=True)
    _assert_bit_exact(got, src)
    assert (tmp_path / "dcp2" / ".ckpt-convert-complete").is_file()


def test_dcp_target_buckets_bound_files(tmp_path: Path) -> None:
    from ckptd.converters.sources.base import TensorInfo
    from ckptd.converters.targets.dcp import buckets

    infos = [TensorInfo(f"t{i}", "float32", (n,)) for i, n in enumerate([10, 10, 100, 5, 5])]
    groups = buckets(infos, 80)
    assert [[t.name for t in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_ckpt_save_to_hf_with_rename_and_weights_only(tmp_path: Path) -> None:
    model = _tiny(5)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randint(0, 50, (2, 3))).sum().backward()
    opt.step()
    ckpt.save({"model": model, "optim": opt, "epoch": 1}, step=3, root=str(tmp_path / "ck"))
    rules = {"rules": [{"pattern": r"model\.(.*)", "replace": r"\1"}]}
    (tmp_path / "map.json").write_text(json.dumps(rules))
    res = CliRunner().invoke(
        cli,
        [
            str(tmp_path / "ck"),
            str(tmp_path / "hf"),
            "--to",
            "hf",
            "--weights-only",
            "--rename-map",
            str(tmp_path / "map.json"),
            "--json",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["ok"] and summary["tensors"] == len(model.state_dict())
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(got) == sorted(model.state_dict())  # optim.* dropped, prefix stripped
    back = _tiny(9)
    back.load_state_dict(got)
    ids = torch.randint(0, 50, (3, 5))
    assert torch.equal(back(ids), model(ids))
    # Without --weights-only the optimizer state converts too (to universal).
    r = convert(str(tmp_path / "ck"), str(tmp_path / "uni"))
    names = UniversalReader.open(LocalStorage(tmp_path / "uni")).names()
    assert any(n.startswith("optim.state.") for n in names) and r.plan.source_step == 3
    reader = UniversalReader.open(LocalStorage(tmp_path / "uni"), 3)
    assert reader.manifest.state["epoch"] == 1  # trainer state carried over


def test_name_map_clash_is_a_plan_error(tmp_path: Path) -> None:
    save_file({"a.x": torch.zeros(2), "b.x": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    nm = parse_name_map({"rules": [{"pattern": r".*\.(x)", "replace": r"\1"}]})
    with pytest.raises(ValueError, match="both map to 'x'"):
        plan_conversion(
            str(tmp_path / "m.safetensors"), str(tmp_path / "u"), ConvertOptions(name_map=nm)
        )


# ------------------------------------------------------------- CLI behaviours


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    _write_hf_sharded(tmp_path / "hf", _hf_state(), per_shard=4)
    for to in ("universal", "hf", "dcp"):
        dst = tmp_path / f"out-{to}"
        res = CliRunner().invoke(
            cli, [str(tmp_path / "hf"), str(dst), "--to", to, "--dry-run", "--json"]
        )
        assert res.exit_code == 0, res.output
        plan = json.loads(res.stdout)
        assert plan["dry_run"] and plan["tensors"] == len(_hf_state())
        assert plan["bytes"] == sum(t.nbytes for t in _hf_state().values())
        assert plan["outputs"] and not dst.exists()
    text = CliRunner().invoke(cli, [str(tmp_path / "hf"), str(tmp_path / "x"), "--dry-run"])
    assert "tensors" in text.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("to", ["universal", "hf", "dcp"])
def test_overwrite_needed(tmp_path: Path, to: str) -> None:
    save_file(_hf_state(), str(tmp_path / "m.safetensors"))
    args = [str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--to", to]
    assert CliRunner().invoke(cli, args).exit_code == 0
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "--overwrite" in res.stderr
    with pytest.raises(TargetExistsError):
        convert(args[0], args[1], ConvertOptions(target_format=to))
    res = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output


def test_missing_source_exit_1(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, [str(tmp_path / "nope"), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 1
    assert "does not exist" in res.stderr and json.loads(res.stdout)["ok"] is False
    with pytest.raises(SourceNotFoundError):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert CliRunner().invoke(cli, ["only-one-arg"]).exit_code == 2
    assert not (tmp_path / "out").exists()


def test_lying_safetensors_header_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(8)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["b"]["shape"] = [16]  # says 64 bytes, offsets span 32
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(SourceFormatError, match=r"model\.safetensors: tensor 'b'.*lies"):
        convert(str(path), str(tmp_path / "out"))
    res = CliRunner().invoke(cli, [str(path), str(tmp_path / "out")])
    assert res.exit_code == 1 and "tensor 'b'" in res.stderr
    # Offsets past the end of a truncated file.
    save_file({"a": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(SourceFormatError, match=r"tensor .a.*past the end"):
        convert(str(path), str(tmp_path / "out"))


# -------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def _stop_after(k: int):
    seen: list[str] = []

    def cb(name: str, resumed: bool) -> None:
        if not resumed:
            seen.append(name)
            if len(seen) >= k:
                raise Interrupt(name)

    return cb, seen


def _big_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {f"layers.{i}.w": torch.randn(300, 1000, generator=g) for i in range(6)}  # > 1 MiB
    sd |= {f"layers.{i}.b": torch.randn(1000, generator=g) for i in range(6)}  # packed
    return sd


def test_interrupt_and_resume_universal(tmp_path: Path) -> None:
    src = _big_state()
    save_file(src, str(tmp_path / "m.safetensors"))
    cb, first = _stop_after(4)
    with pytest.raises(Interrupt):
        convert(str(tmp_path / "m.safetensors"), str(tmp_path / "uni"), on_tensor=cb)
    step_dir = tmp_path / "uni" / "step-000000000"
    assert not (step_dir / "COMMITTED").exists() and (step_dir / ".convert-progress.json").exists()
    progress = json.loads((step_dir / ".convert-progress.json").read_text())
    durable = set(progress["tensors"])
    assert durable and durable <= set(first)
    # Corrupt one recorded chunk: resume must notice (CRC32C) and rewrite that tensor.
    victim = sorted(n for n in durable if n.endswith(".w"))[0]
    chunk = next((step_dir / victim / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    res = convert(str(tmp_path / "m.safetensors"), str(tmp_path / "uni"))
    assert set(res.resumed) == durable - {victim}
    uni = UniversalReader.open(LocalStorage(tmp_path / "uni"))
    _assert_bit_exact({n: uni.read(n) for n in uni.names()}, src)
    assert not (step_dir / ".convert-progress.json").exists()


def test_interrupt_and_resume_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HF target makes windows durable in batches: tensors reported done lie in
    synced, recorded windows; a resume keeps the windows that still match their CRC32C
    (a corrupted one and everything after it in its shard is rewritten)."""
    from ckptd.converters.targets import hf as hf_target

    window = 1 << 20  # 3 windows per 3 MB shard, a sync after each
    monkeypatch.setattr(hf_target, "WINDOW_BYTES", window)
    monkeypatch.setattr(hf_target, "SYNC_BYTES", window)
    src = _big_state()
    save_file(src, str(tmp_path / "m.safetensors"))
    opts = ConvertOptions(target_format="hf", max_shard_size=parse_size("3MB"))
    cb, first = _stop_after(6)
    with pytest.raises(Interrupt):
        convert(str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), opts, on_tensor=cb)
    out = tmp_path / "hf"
    assert not (out / ".ckpt-convert-complete").exists()
    assert list(out.glob(".*.partial"))  # a shard was in progress
    progress = json.loads((out / ".ckpt-convert-progress.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 1  # the first shard was finished and renamed
    rec = progress["shards"][shards[0].name]
    assert rec["window"] == window and len(rec["windows"]) == -(-rec["size"] // window) > 1
    # Corrupt the finished shard's second window: tensors ending past 1 MiB are redone.
    with open(shards[0], "r+b") as f:
        f.seek(window + 100)
        f.write(b"\0" * 4096)
    (n,) = struct.unpack("<Q", shards[0].read_bytes()[:8])
    header = json.loads(shards[0].read_bytes()[8 : 8 + n])
    header.pop("__metadata__", None)
    redo = {k for k, v in header.items() if 8 + n + v["data_offsets"][1] > window}
    assert redo & set(first)
    res = convert(str(tmp_path / "m.safetensors"), str(out), opts)
    assert set(first) - redo <= set(res.resumed) and not set(res.resumed) & redo
    assert len(res.resumed) < len(src) and res.bytes_written < res.bytes
    _assert_bit_exact(_load_hf(out), src)
    assert not (out / ".ckpt-convert-progress.json").exists()
    # A finished conversion is not resumed again: it exists.
    assert (
        CliRunner().invoke(cli, [str(tmp_path / "m.safetensors"), str(out), "--to", "hf"]).exit_code
        == 1
    )


def test_interrupt_and_resume_dcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DCP target records each bucket file (size, CRC32C, DCP's write results) once it
    is fsync'd; a rerun reuses the files that still match and rewrites the others, and
    ``torch.distributed.checkpoint.load`` reads the result."""
    import torch.distributed.checkpoint as dcp

    from ckptd.converters.targets import dcp as dcp_target

    real = dcp_target.buckets  # ~2.6 MB buckets: several .distcp files for 7.2 MB
    monkeypatch.setattr(dcp_target, "buckets", lambda tensors, _: real(tensors, 5 << 19))
    src = _big_state()
    save_file(src, str(tmp_path / "m.safetensors"))
    opts = ConvertOptions(target_format="dcp")
    cb, first = _stop_after(7)
    with pytest.raises(Interrupt):
        convert(str(tmp_path / "m.safetensors"), str(tmp_path / "d"), opts, on_tensor=cb)
    out = tmp_path / "d"
    assert not (out / ".metadata").exists() and not (out / ".ckpt-convert-complete").exists()
    files = json.loads((out / ".ckpt-convert-progress.json").read_text())["files"]
    assert len(files) >= 2
    recorded = {i["fqn"]: f for f, rec in files.items() for i in rec["items"]}
    assert set(first) <= set(recorded)  # reported done only once recorded
    # Corrupt one recorded file: its CRC32C no longer matches, so it is written again.
    victim = sorted(files)[0]
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    fetched: list[str] = []
    res = convert(
        str(tmp_path / "m.safetensors"),
        str(out),
        opts,
        on_tensor=lambda n, resumed: None if resumed else fetched.append(n),
    )
    kept = {n for n, f in recorded.items() if f != victim}
    assert set(res.resumed) == kept and kept and not kept & set(fetched)
    assert set(fetched) == set(src) - kept
    got = {k: torch.full_like(v, -1) for k, v in src.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=str(out), no_dist=True)
    _assert_bit_exact(got, src)
    assert not (out / ".ckpt-convert-progress.json").exists()
    assert (out / ".ckpt-convert-complete").is_file()
    # Another plan over an interrupted conversion starts over: nothing is reused.
    with pytest.raises(Interrupt):
        convert(str(tmp_path / "m.safetensors"), str(tmp_path / "d2"), opts, on_tensor=cb)
    other = ConvertOptions(target_format="dcp", weights_only=True, step=3, overwrite=True)
    assert not convert(str(tmp_path / "m.safetensors"), str(tmp_path / "d2"), other).resumed


def test_resume_hf_through_cli_counts_resumed(tmp_path: Path) -> None:
    """Default window sizes: a 3 MB shard is one window, synced once; after an
    interruption right after the first shard, a rerun through the CLI verifies and keeps
    it, and its JSON summary counts its tensors as resumed."""
    src = _big_state()
    save_file(src, str(tmp_path / "m.safetensors"))
    opts = ConvertOptions(target_format="hf", max_shard_size=parse_size("3MB"))
    cb, first = _stop_after(5)
    with pytest.raises(Interrupt):
        convert(str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), opts, on_tensor=cb)
    args = [str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), "--to", "hf"]
    res = CliRunner().invoke(cli, [*args, "--max-shard-size", "3MB", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_tensors"] == len(first)
    _assert_bit_exact(_load_hf(tmp_path / "hf"), src)


def test_universal_writer_api(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    w = UniversalWriter(st, 2, fingerprint="x")
    a, b = torch.randn(700, 600), torch.arange(6).reshape(2, 3)
    w.add("a", a)
    w.add("b", b)
    w.set_state({"k": [1, 2]})
    w.commit()
    r = UniversalReader.open(st)
    assert r.step == 2 and r.names() == ["a", "b"] and r.meta("a").shape == (700, 600)
    from ckptd.fragments import Box

    assert torch.equal(r.read_box("a", Box((5, 10), (600, 7))), a[5:605, 10:17])
    assert torch.equal(r.read("b"), b) and r.manifest.state == {"k": [1, 2]}
    with pytest.raises(FileExistsError):
        UniversalWriter(st, 2)


# -------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch, safetensors.torch
    from ckptd.converters.convert import ConvertOptions, convert

    def hwm():  # this process's own high-water RSS (per address space, since exec)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    base, base_hwm = maxrss(), hwm()
    res = convert(sys.argv[1], sys.argv[2], ConvertOptions(target_format=sys.argv[3]))
    print(json.dumps({"base": base, "peak": maxrss(), "base_hwm": base_hwm, "peak_hwm": hwm(),
                      "largest": res.plan.largest_bytes, "bytes": res.bytes}))
    """
)


def _measure(script: Path, *args: str) -> dict[str, int]:
    """Run ``script`` in a grandchild: a direct child of this (large) pytest process
    inherits its ru_maxrss through fork+exec; one forked by ``sh`` does not."""
    out = subprocess.run(
        ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("to", ["universal", "hf", "dcp"])
def test_peak_rss_is_bounded(tmp_path: Path, to: str) -> None:
    """~528 MiB of safetensors (largest tensor 64 MiB) converted in a subprocess."""
    mib = 1 << 20
    src = tmp_path / "src"
    src.mkdir()
    for f in range(4):  # 4 files x (2 x 64 MiB + 8 x 0.5 MiB)
        g = torch.Generator().manual_seed(f)
        part = {f"f{f}.big{i}": torch.randn(16 * mib, generator=g) for i in range(2)}
        part |= {f"f{f}.small{i}": torch.randn(mib // 8, generator=g) for i in range(8)}
        save_file(part, str(src / f"model-{f:05d}.safetensors"))
        del part
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    m = _measure(script, str(src), str(tmp_path / "out"), to)
    assert m["bytes"] >= 512 * mib and m["largest"] == 64 * mib
    print(
        f"\n{to}: peak RSS {m['peak'] / mib:.0f} MiB (ru_maxrss), baseline after imports "
        f"{m['base'] / mib:.0f} MiB, conversion added {(m['peak'] - m['base']) / mib:.0f} MiB; "
        f"VmHWM {m['base_hwm'] / mib:.0f} -> {m['peak_hwm'] / mib:.0f} MiB"
    )
    bound = 2 * m["largest"] + 512 * mib
    assert m["peak"] <= bound + m["base"], m
    assert m["peak_hwm"] <= bound + m["base_hwm"], m
    if to == "hf":  # streamed in windows (3 x 16 MiB): not even one whole tensor is held
        assert m["peak"] - m["base"] < m["largest"], m
