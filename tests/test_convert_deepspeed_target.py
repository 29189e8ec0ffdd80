"""ckpt-convert to DeepSpeed ZeRO-1/2 (``--to deepspeed --target-layout dp=N``).

Round trips are bit-exact: universal -> DeepSpeed DP=3 -> universal, and DeepSpeed DP=2
(tests/deepspeed_fixture.py) -> DeepSpeed DP=4 equals what the fixture writes at DP=4
(less the last rank's padding, which DeepSpeed's own state_dict() leaves out). Where
DeepSpeed is installed its ``zero_to_fp32`` must read the output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import PlanError, TargetExistsError
from ckptd.converters.targets import deepspeed as ds_target
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_reader import UniversalReader

TAG = "global_step5"


def _opts(**layout: int) -> ConvertOptions:
    return ConvertOptions(target_format="deepspeed", target_layout=tuple(sorted(layout.items())))


def _universal(root: Path, step: int = 5) -> dict[str, torch.Tensor]:
    r = UniversalReader.open(LocalStorage(root), step)
    return {n: r.read(n) for n in r.names()}




@pytest.fixture
def ds2(tmp_path: Path) -> tuple[Path, dict]:
    state = fx.tiny_state(11)
    fx.write_deepspeed(tmp_path / "ds2", state, stage=2, dp=2, step=5)
    return tmp_path / "ds2", state


def test_universal_to_dp3_and_back_is_bit_exact(tmp_path: Path, ds2: tuple[Path, dict]) -> None:
    src, _ = ds2
    convert(str(src), str(tmp_path / "u1"), ConvertOptions())
    r = convert(str(tmp_path / "u1"), str(tmp_path / "ds3"), _opts(dp=3))
    assert r.plan.target_format == "deepspeed"
    files = os.listdir(tmp_path / "ds3" / TAG)
    assert sorted(files) == sorted(
        ["mp_rank_00_model_states.pt"]
        + [f"bf16_zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(3)]
    )
    assert (tmp_path / "ds3" / "latest").read_text() == TAG
    assert not (tmp_path / "ds3" / ".ckpt-convert-progress.json").exists()
    convert(str(tmp_path / "ds3"), str(tmp_path / "u2"), ConvertOptions())
    fx.assert_same_bits(_universal(tmp_path / "u2"), _universal(tmp_path / "u1"))


def test_dp2_to_dp4_matches_deepspeed_partitioning(tmp_path: Path, ds2: tuple[Path, dict]) -> None:
    src, state = ds2
    convert(str(src), str(tmp_path / "ds4"), _opts(dp=4, groups=2))
    fx.write_deepspeed(tmp_path / "ref4", state, stage=2, dp=4, step=5)
    ref, got = tmp_path / "ref4" / TAG, tmp_path / "ds4" / TAG
    model_states = "mp_rank_00_model_states.pt"
    a, b = fx.load_pt(ref / model_states), fx.load_pt(got / model_states)
    assert a["param_shapes"] == b["param_shapes"] and b["dp_world_size"] == 4
    assert b["ds_config"]["bf16"] == {"enabled": True}
    assert list(a["module"]) == list(b["module"]) and b["buffer_names"] == a["buffer_names"]
    fx.assert_same_bits(dict(b["module"]), dict(a["module"]))
    for r in range(4):
        name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        x = fx.load_pt(ref / name)["optimizer_state_dict"]
        y = fx.load_pt(got / f"bf16_{name}")["optimizer_state_dict"]  # bf16 weights: a bf16 run
        assert y["zero_stage"] == 2 and y["partition_count"] == [4, 4]
        assert y["base_optimizer_state_step"] == 5
        for g in range(2):
            want = x["single_partition_of_fp32_groups"][g]
            have = y["single_partition_of_fp32_groups"][g]
            pad = y["group_paddings"][g]
            assert have.numel() == want.numel() - pad and (pad == 0 or r == 3)
            assert torch.equal(have, want[: have.numel()])
            for k in ("exp_avg", "exp_avg_sq"):
                mine, ref_k = y["base_optimizer_state"][g][k], x["base_optimizer_state"][g][k]
                assert torch.equal(mine, ref_k[: have.numel()])
            assert float(y["base_optimizer_state"][g]["step"]) == 5.0
    fx.assert_same_bits(fx.read_source(tmp_path / "ds4"), fx.expected_universal(state, 2, 5))


def test_zero_to_fp32_reads_the_output(tmp_path: Path, ds2: tuple[Path, dict]) -> None:
    z2f = pytest.importorskip("deepspeed.utils.zero_to_fp32")
    src, state = ds2
    convert(str(src), str(tmp_path / "ds3"), _opts(dp=3))
    sd = z2f.get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ds3"))
    want = {n: s["fp32"] for n, s in state["params"].items()} | state["buffers"]
    fx.assert_same_bits(dict(sd), want)


def test_weights_only_writes_model_states_only(tmp_path: Path, ds2: tuple[Path, dict]) -> None:
    src, state = ds2
    opts = ConvertOptions(target_format="deepspeed", target_layout=(("dp", 4),), weights_only=True)
    convert(str(src), str(tmp_path / "w"), opts)
    assert os.listdir(tmp_path / "w" / TAG) == ["mp_rank_00_model_states.pt"]
    want = {k: v for k, v in fx.expected_universal(state, 2, 5).items() if k.startswith("model.")}
    fx.assert_same_bits(fx.read_source(tmp_path / "w"), want)


def test_interrupted_conversion_resumes(
    tmp_path: Path, ds2: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, state = ds2
    monkeypatch.setattr(ds_target, "_SYNC_BYTES", 0)  # record progress after every tensor
    seen: list[str] = []

    def stop(name: str, resumed: bool) -> None:
        seen.append(name)
        if len(seen) == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(src), str(tmp_path / "d"), _opts(dp=3), on_tensor=stop)
    assert not (tmp_path / "d" / "latest").exists()
    assert not (tmp_path / "d" / TAG / "mp_rank_00_model_states.pt").exists()
    r = convert(str(src), str(tmp_path / "d"), _opts(dp=3))
    assert len(r.resumed) >= 11
    fx.assert_same_bits(fx.read_source(tmp_path / "d"), fx.expected_universal(state, 2, 5))
    with pytest.raises(TargetExistsError):
        convert(str(src), str(tmp_path / "d"), _opts(dp=3))
    # A different layout over an interrupted one is "another conversion".
    r = convert(
        str(src),
        str(tmp_path / "d"),
        ConvertOptions(target_format="deepspeed", target_layout=(("dp", 2),), overwrite=True),
    )
    assert not r.resumed and len(os.listdir(tmp_path / "d" / TAG)) == 3


def test_param_groups_file_and_bad_layouts(tmp_path: Path, ds2: tuple[Path, dict]) -> None:
    src, state = ds2
    groups = [
        ["fc2.weight", "embed.weight"],
        ["norm.bias", "fc1.bias", "fc1.weight"],
        ["fc2.bias", "norm.weight"],
    ]
    spec = tmp_path / "groups.json"
    spec.write_text(json.dumps({"param_groups": groups}))
    opts = ConvertOptions(target_format="deepspeed", target_layout=(("dp", 2),), spec=str(spec))
    convert(str(src), str(tmp_path / "g"), opts)
    ms = fx.load_pt(tmp_path / "g" / TAG / "mp_rank_00_model_states.pt")
    assert [list(g) for g in ms["param_shapes"]] == groups
    fx.assert_same_bits(fx.read_source(tmp_path / "g"), fx.expected_universal(state, 2, 5))
    spec.write_text(json.dumps({"param_groups": [["fc2.weight"]]}))
    with pytest.raises(PlanError, match="missing"):
        convert(str(src), str(tmp_path / "g2"), opts)
    with pytest.raises(PlanError, match="zero=3"):
        convert(str(src), str(tmp_path / "g3"), _opts(dp=2, zero=3))
    with pytest.raises(PlanError, match="unknown"):
        convert(str(src), str(tmp_path / "g4"), _opts(dp=2, ep=2))


MEMORY_SCRIPT = """
import json, resource, sys
from ckptd.converters.convert import ConvertOptions, convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res = convert(sys.argv[1], sys.argv[2],
              ConvertOptions(target_format="deepspeed", target_layout=(("dp", 3),)))
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "largest": res.plan.largest_bytes, "bytes": res.bytes}))
"""


def test_peak_rss_is_bounded(tmp_path: Path) -> None:
    """A ~0.6 GiB ZeRO-2 DP=4 checkpoint (largest tensor 125 MiB) -> DP=3, in a grandchild."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import convert as bench  # bench/convert.py
    finally:
        sys.path.pop(0)
    bench.make_zero2(tmp_path / "src", bench.gpt_shapes(1024, 1, 32000), 4)
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run(
        [
            "/bin/sh",
            "-c",
            '"$0" "$@"; exit $?',
            sys.executable,
            str(script),
            str(tmp_path / "src"),
            str(tmp_path / "dst"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert m["bytes"] > 500 * mib and m["largest"] == 125 * mib
    print(f"\ndeepspeed target: conversion added {(m['peak'] - m['base']) / mib:.0f} MiB")
    assert m["peak"] - m["base"] <= 2 * m["largest"] + 512 * mib, m
