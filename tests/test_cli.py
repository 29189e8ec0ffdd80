"""The ``ckpt`` command: ls / inspect / verify / gc, JSON output, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

import ckpt
from ckptd.cli import main
from ckptd.formats.commit import step_dir
from ckptd.formats.manifest import Manifest, parse_group_metadata
from ckptd.planner import PlanOptions

SMALL_CHUNKS = PlanOptions(target_chunk_bytes=1 << 20, min_aligned_chunk_bytes=1 << 18)


@contextlib.contextmanager
def configured(**changes: Any) -> Iterator[None]:
    """Temporarily change the process config of ``ckpt`` (restored even on failure)."""
    old = ckpt.get_config()
    ckpt.configure(retention=None, plan=SMALL_CHUNKS, **changes)
    try:
        yield
    finally:
        ckpt.configure(old)


def state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(1024, 768, generator=g),  # 3 MiB: 4 chunks of 768 KiB
        "bias": torch.randn(768, generator=g),  # packed
        "half": torch.randn(8, 8, generator=g).bfloat16(),  # packed
        "count": torch.tensor(step),  # packed, 0-d
        "trainer": {"step": step, "lr": 0.5},
    }


def save_steps(root: Path, steps: list[int], **options: Any) -> None:
    with configured():
        for s in steps:
            ckpt.save(state(s), s, str(root), **options)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def manifest_of(root: Path, step: int) -> Manifest:
    path = root / step_dir(step) / "zarr.json"
    return parse_group_metadata(path.read_bytes(), str(path))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Steps 1..5 committed, no retention."""
    save_steps(tmp_path, [1, 2, 3, 4, 5])
    return tmp_path


def test_ls(root: Path) -> None:
    (root / step_dir(9)).mkdir()  # an uncommitted leftover (or a save in flight)
    (root / step_dir(9) / "junk").write_bytes(b"x")
    res = invoke("ls", root, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and out["latest"] == 5 and out["root"] == f"file://{root}"
    rows = {r["step"]: r for r in out["steps"]}
    assert sorted(rows) == [1, 2, 3, 4, 5, 9]
    assert all(rows[s]["committed"] and rows[s]["tensors"] == 4 for s in range(1, 6))
    assert rows[5]["latest"] and not rows[4]["latest"] and not rows[9]["committed"]
    assert rows[5]["stored_bytes"] > 3 << 20
    text = invoke("ls", root)
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 6 and "(latest)" in lines[4] and "uncommitted" in lines[5]


def test_inspect(root: Path) -> None:
    res = invoke("inspect", root, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and out["step"] == 5 and out["version"] == "1.0"
    assert out["state"] == {"trainer.lr": 0.5, "trainer.step": 5}
    assert out["layout"]["world_size"] == 1
    tensors = {t["name"]: t for t in out["tensors"]}
    assert set(tensors) == {"w", "bias", "half", "count"}
    w = tensors["w"]
    assert w["dtype"] == "float32" and w["shape"] == [1024, 768] and not w["packed"]
    assert w["chunks"] == w["grid_chunks"] == 4 and w["chunk_shape"] == [256, 768]
    assert (
        w["logical_bytes"] == 1024 * 768 * 4 and w["codec"] == "raw"
    )  # auto: random fp32 does not pay
    assert tensors["half"]["dtype"] == "bfloat16" and tensors["half"]["packed"]
    assert tensors["count"]["shape"] == [] and tensors["count"]["dtype"] == "int64"
    assert out["stored_bytes"] == sum(t["stored_bytes"] for t in out["tensors"])

    older = json.loads(invoke("inspect", root, "--step", "2", "--json").stdout)
    assert older["step"] == 2
    text = invoke("inspect", root, "--step", "3")
    assert text.exit_code == 0
    assert "step 3 of" in text.stdout and "bfloat16" in text.stdout and "trainer" in text.stdout


def test_verify_ok(root: Path) -> None:
    res = invoke("verify", root, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and [r["step"] for r in out["steps"]] == [5]
    m = manifest_of(root, 5)
    report = out["steps"][0]
    assert report["chunks"] == sum(len(t.chunks) for t in m.tensors.values()) == 7
    assert report["bytes"] == sum(c.length for t in m.tensors.values() for c in t.chunks)
    assert report["failures"] == [] and res.stderr == ""  # no TTY: no progress bar

    every = json.loads(invoke("verify", root, "--all", "--json", "--workers", "2").stdout)
    assert [r["step"] for r in every["steps"]] == [1, 2, 3, 4, 5] and every["ok"]
    text = invoke("verify", root, "--step", "2", "--progress")
    assert text.exit_code == 0 and "step 2: 4 tensors, 7 chunks" in text.stdout
    assert "verify" in text.stderr and "100%" in text.stderr  # the forced progress bar


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_reports_every_flipped_bit(root: Path) -> None:
    m = manifest_of(root, 4)
    w = m.tensors["w"].chunks[1]
    flip_bit(root / step_dir(4) / w.object, 12345)
    half = m.tensors["half"].chunks[0]
    flip_bit(root / step_dir(4) / half.object, half.offset + 3)

    res = invoke("verify", root, "--step", "4")
    assert res.exit_code == 1
    errors = res.stderr.splitlines()
    assert any("tensor 'w' chunk [1, 0]" in e and "w/c/1/0" in e for e in errors), errors
    assert any("tensor 'half' chunk [0, 0]" in e and "packs/" in e for e in errors), errors
    assert all(e.startswith("ckpt: error: step 4: ") for e in errors) and len(errors) == 2
    assert "FAILED (2 problem(s))" in res.stdout

    out = json.loads(invoke("verify", root, "--all", "--json").stdout)
    assert not out["ok"]
    by_step = {r["step"]: r for r in out["steps"]}
    assert [s for s, r in by_step.items() if not r["ok"]] == [4]
    fails = by_step[4]["failures"]
    assert [(f["tensor"], f["chunk"]) for f in fails] == [("half", [0, 0]), ("w", [1, 0])]
    assert fails[1]["object"] == f"{step_dir(4)}/w/c/1/0"
    assert by_step[4]["chunks"] == 7  # kept reading after the first failure
    assert invoke("verify", root).exit_code == 0  # latest (5) is intact


def test_verify_damaged_manifest_and_missing_object(root: Path) -> None:
    meta = root / step_dir(5) / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:-10])
    res = invoke("verify", root, "--json")
    assert res.exit_code == 1
    fails = json.loads(res.stdout)["steps"][0]["failures"]
    assert len(fails) == 1 and "manifest checksum mismatch" in fails[0]["error"]
    assert "zarr.json" in res.stderr

    (root / step_dir(3) / "w" / "c" / "2" / "0").unlink()
    res = invoke("verify", root, "--step", "3")
    assert res.exit_code == 1 and "tensor 'w' chunk [2, 0]" in res.stderr
    assert "missing" in res.stderr

    # plain zarr readers depend on the array metadata objects of unpacked tensors
    (root / step_dir(1) / "w" / "zarr.json").unlink()
    meta = root / step_dir(2) / "w" / "zarr.json"
    meta.write_text(meta.read_text().replace("[1024,768]", "[1024,769]"))
    out = json.loads(invoke("verify", root, "--all", "--json").stdout)
    errors = {r["step"]: [f["error"] for f in r["failures"]] for r in out["steps"]}
    assert errors[4] == [] and len(errors[3]) == 1 and len(errors[5]) == 1
    assert len(errors[1]) == 1 and "array metadata is missing" in errors[1][0]
    assert len(errors[2]) == 1 and "disagrees with the manifest" in errors[2][0]


def test_gc_dry_run_then_real(root: Path) -> None:
    for leftover in (0, 9):  # older than the newest commit / newer (maybe in flight)
        (root / step_dir(leftover)).mkdir()
        (root / step_dir(leftover) / "junk").write_bytes(b"x")
    dry = invoke("gc", root, "--keep-last", "2", "--keep-every", "2", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan == {
        "ok": True,
        "root": f"file://{root}",
        "dry_run": True,
        "kept": [2, 4, 5],
        "deleted": [1, 3],
        "deleted_uncommitted": [0],
    }
    assert all((root / step_dir(s)).exists() for s in (0, 1, 2, 3, 4, 5, 9))

    real = invoke("gc", root, "--keep-last", "2", "--keep-every", "2", "--json")
    assert real.exit_code == 0
    assert json.loads(real.stdout) == {**plan, "dry_run": False}
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert left == [step_dir(s) for s in (2, 4, 5, 9)]

    text = invoke("gc", root, "--keep-last", "1", "--dry-run")
    assert text.exit_code == 0
    assert "would delete 2 committed step(s): [2, 4]" in text.stdout
    assert (root / step_dir(2)).exists()
    assert "deleted 2 committed" in invoke("gc", root, "--keep-last", "1").stdout
    assert json.loads(invoke("ls", root, "--json").stdout)["latest"] == 5


@pytest.mark.parametrize(
    "args",
    [
        ["gc", "ROOT"],  # --keep-last is required
        ["gc", "ROOT", "--keep-last", "0"],
        ["verify", "ROOT", "--step", "1", "--all"],
        ["verify", "ROOT", "--step", "-1"],
        ["ls", "ROOT", "--storage-option", "no-equals-sign"],
        ["ls", "ROOT", "--storage-option", "endpoint_url=http://x"],  # local root
        ["frobnicate", "ROOT"],
        ["ls"],
    ],
)
def test_usage_errors_exit_2(root: Path, args: list[str]) -> None:
    res = invoke(*[str(root) if a == "ROOT" else a for a in args])
    assert res.exit_code == 2, res.output
    assert "Usage:" in res.stderr or "Error:" in res.stderr


def test_missing_root_and_no_checkpoint_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    for cmd in (["ls"], ["inspect"], ["verify"], ["gc", "--keep-last", "1"]):
        res = invoke(cmd[0], missing, *cmd[1:])
        assert res.exit_code == 1, (cmd, res.output)
        assert res.stderr.startswith("ckpt: error: no checkpoint root at") and res.stdout == ""
    assert not missing.exists()  # the tool never creates a root

    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in ("ls", "inspect", "verify"):
        res = invoke(cmd, empty, "--json")
        assert res.exit_code == 1
        assert "no committed checkpoint" in res.stderr
        assert json.loads(res.stdout)["ok"] is False
    res = invoke("inspect", empty, "--step", "3")
    assert res.exit_code == 1 and "step 3 is not committed" in res.stderr


def test_not_committed_step_exit_1(root: Path) -> None:
    (root / step_dir(3) / "COMMITTED").unlink()
    for cmd in ("inspect", "verify"):
        res = invoke(cmd, root, "--step", "3", "--json")
        assert res.exit_code == 1
        assert len(res.stderr.splitlines()) == 1
        assert "step 3 is not committed" in res.stderr and "[1, 2, 4, 5]" in res.stderr
        assert "step 3 is not committed" in json.loads(res.stdout)["error"]


def ckpt_script() -> str:
    here = Path(sys.executable).with_name("ckpt")
    found = str(here) if here.exists() else shutil.which("ckpt")
    if found is None:
        pytest.skip("the ckpt console script is not installed")
    return found


def test_installed_console_script(root: Path) -> None:
    """The real entry point: exit status, JSON on stdout, one line per problem on stderr."""
    script = ckpt_script()
    w = manifest_of(root, 2).tensors["w"].chunks[3]
    flip_bit(root / step_dir(2) / w.object, 7)
    proc = subprocess.run(
        [script, "verify", str(root), "--all", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert not out["ok"] and [r["ok"] for r in out["steps"]] == [True, False, True, True, True]
    assert proc.stderr.splitlines() == [
        f"ckpt: error: step 2: tensor 'w' chunk [3, 0] ({step_dir(2)}/w/c/3/0): "
        "checksum mismatch (stored bytes are corrupt)"
    ]


@pytest.mark.s3
def test_s3_root_with_storage_options(s3_server: str, s3_bucket: Callable[[], str]) -> None:
    url = f"s3://{s3_bucket()}/run"
    opts = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    with configured():
        for s in (1, 2, 3):
            ckpt.save(state(s), s, url, storage_options=opts)
    flags = [f"--storage-option={k}={v}" for k, v in opts.items()]
    ls = invoke("ls", url, *flags, "--json")
    assert ls.exit_code == 0, ls.output
    assert [r["step"] for r in json.loads(ls.stdout)["steps"]] == [1, 2, 3]
    assert json.loads(invoke("verify", url, "--all", *flags, "--json").stdout)["ok"]
    assert json.loads(invoke("inspect", url, *flags, "--json").stdout)["step"] == 3
    gc = json.loads(invoke("gc", url, "--keep-last", "1", *flags, "--json").stdout)
    assert gc["deleted"] == [1, 2]
    nothing = invoke("ls", f"s3://{s3_bucket()}/empty", *flags)
    assert nothing.exit_code == 1 and "no committed checkpoint" in nothing.stderr
