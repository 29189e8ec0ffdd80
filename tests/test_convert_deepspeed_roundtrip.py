"""DeepSpeed ZeRO-2 and ZeRO-3 (DP=4) -> universal -> ZeRO-2 at DP=3, bit-exact.

The issue's round trip: checkpoints written by ``tests/deepspeed_fixture.py`` (DeepSpeed's
file layout and flat partitioning, alignment padding included) go through the universal
format into ZeRO-2 files at another DP size. Checked on the output:

- every tensor (model weights, fp32 masters, ``exp_avg``, ``exp_avg_sq``, step) equals
  the fixture's originals bit for bit, read back through our DeepSpeed source;
- the flat partitions equal what the fixture itself writes at DP=3 (DeepSpeed's
  partitioning), the last rank without its padding as DeepSpeed's ``state_dict`` saves;
- :class:`deepspeed_fixture.TinyModel` gives bit-identical logits before (the source's
  weights, read with plain ``torch.load``) and after (the output's weights);
- where DeepSpeed imports: its ``zero_to_fp32`` reads the masters back, and a real
  DeepSpeed ZeRO-2 engine on 2 gloo ranks loads a DP=2 output with ``load_checkpoint``
  into the same fp32 partitions, Adam moments, step and weights (DeepSpeed 0.19 refuses
  a ZeRO checkpoint saved at another DP size, so the engine runs at the output's size).

Also: DeepSpeed's ``ds_to_universal`` runs on the benchmark's synthetic checkpoint and
gives the same per-parameter tensors as our conversion.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch
from daemon_harness import free_port

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.deepspeed import DeepSpeedSource

TAG = "global_step5"
SRC_DP, DST_DP = 4, 3




def _source_weights(root: Path, stage: int) -> dict[str, torch.Tensor]:
    """The model weights a user of the source checkpoint has, read without our code:
    ZeRO-2 ``module`` (bf16); ZeRO-3 (placeholders in ``module``): the fp32 masters cut
    out of the flat partitions by hand, as DeepSpeed's ``zero_to_fp32`` does."""
    d = root / TAG
    if stage != 3:
        return dict(fx.load_pt(d / "mp_rank_00_model_states.pt")["module"])
    ms = fx.load_pt(d / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    flats = [
        fx.load_pt(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"][
            "fp32_flat_groups"
        ]
        for r in range(SRC_DP)
    ]
    out = {n: b for n, b in ms["module"].items() if n in ms["buffer_names"]}
    for g, shapes in enumerate(ms["param_shapes"]):
        off = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            per = math.ceil(n / SRC_DP)
            whole = torch.cat([f[g][off : off + per] for f in flats])[:n]
            out[name] = whole.view(shape)
            off += per
    return out


def _optim_name(stage: int, rank: int) -> str:
    """The output's optim file: ``bf16_`` when its model weights are bf16 (a ZeRO-2
    source's module; a ZeRO-3 source gives fp32 weights), as a bf16 engine names it."""
    return f"{'bf16_' if stage == 2 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _convert_chain(
    tmp: Path, stage: int, seed: int, dst_dp: int = DST_DP, **layout: int
) -> tuple[dict, Path, Path]:
    """Fixture ZeRO-``stage`` at DP=4 -> universal -> ZeRO-2 at ``dst_dp`` (the
    fixture's param groups, as the live optimizer has them)."""
    state = fx.tiny_state(seed)
    src = tmp / f"z{stage}"
    fx.write_deepspeed(src, state, stage=stage, dp=SRC_DP, step=5)
    convert(str(src), str(tmp / "uni"), ConvertOptions())
    groups = tmp / "groups.json"  # the live optimizer's groups, in its order
    groups.write_text(json.dumps({"param_groups": [[n for n, _ in g] for g in fx.GROUPS]}))
    opts = ConvertOptions(
        target_format="deepspeed",
        target_layout=tuple(sorted({"dp": dst_dp, **layout}.items())),
        spec=str(groups),
    )
    r = convert(str(tmp / "uni"), str(tmp / "out"), opts)
    assert r.plan.target_format == "deepspeed"
    return state, src, tmp / "out"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_to_universal_to_zero2_other_dp_bit_exact(tmp_path: Path, stage: int) -> None:
    state, src, out = _convert_chain(tmp_path, stage, 30 + stage)
    assert set(os.listdir(out / TAG)) == {"mp_rank_00_model_states.pt"} | {
        _optim_name(stage, r) for r in range(DST_DP)
    }
    with DeepSpeedSource(str(out)) as s:
        assert (s.stage, s.dp) == (2, DST_DP)
    # Model and optimizer state, every tensor: what the source held, bit for bit (a
    # ZeRO-3 source has fp32 model weights: its masters).
    fx.assert_same_bits(fx.read_source(out), fx.expected_universal(state, stage, 5))

    # The partitions are DeepSpeed's own at DP=3 (the fixture writes them).
    fx.write_deepspeed(tmp_path / "ref", state, stage=2, dp=DST_DP, step=5)
    ref, got = tmp_path / "ref" / TAG, out / TAG
    model_states = "mp_rank_00_model_states.pt"
    a, b = fx.load_pt(ref / model_states), fx.load_pt(got / model_states)
    assert a["param_shapes"] == b["param_shapes"] and b["dp_world_size"] == DST_DP
    want_module = dict(a["module"]) if stage == 2 else _source_weights(src, 3)
    fx.assert_same_bits(dict(b["module"]), want_module)
    for r in range(DST_DP):
        x = fx.load_pt(ref / _optim_name(3, r))["optimizer_state_dict"]  # the fixture: no prefix
        y = fx.load_pt(got / _optim_name(stage, r))["optimizer_state_dict"]
        assert y["zero_stage"] == 2 and y["partition_count"] == [DST_DP] * len(fx.GROUPS)
        for g in range(len(fx.GROUPS)):
            want = x["single_partition_of_fp32_groups"][g]
            have = y["single_partition_of_fp32_groups"][g]
            pad = y["group_paddings"][g]
            assert have.numel() == want.numel() - pad and (pad == 0 or r == DST_DP - 1)
            assert torch.equal(have, want[: have.numel()])
            for k in ("exp_avg", "exp_avg_sq"):
                ours, theirs = y["base_optimizer_state"][g][k], x["base_optimizer_state"][g][k]
                assert torch.equal(ours, theirs[: have.numel()]), (r, g, k)
            assert float(y["base_optimizer_state"][g]["step"]) == 5.0

    # Forward pass: the model before (source weights) and after (output weights).
    before = fx.forward(_source_weights(src, stage))
    after = fx.forward(dict(b["module"]))
    assert torch.equal(before, after)
    # ... and from the fp32 masters (what training resumes from) on both sides.
    masters = {n: s["fp32"] for n, s in state["params"].items()} | state["buffers"]
    out_masters = {
        n[len("optim.state.") : -len(".fp32")]: t
        for n, t in fx.read_source(out).items()
        if n.endswith(".fp32")
    }
    assert torch.equal(fx.forward(masters), fx.forward(out_masters | state["buffers"]))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_to_fp32_reads_the_chain_output(tmp_path: Path, stage: int) -> None:
    z2f = pytest.importorskip("deepspeed.utils.zero_to_fp32")
    state, src, out = _convert_chain(tmp_path, stage, 40 + stage)
    before = z2f.get_fp32_state_dict_from_zero_checkpoint(str(src))
    after = z2f.get_fp32_state_dict_from_zero_checkpoint(str(out))
    want = {n: s["fp32"] for n, s in state["params"].items()} | state["buffers"]
    fx.assert_same_bits(dict(before), want)
    fx.assert_same_bits(dict(after), want)
    assert torch.equal(fx.forward(dict(before)), fx.forward(dict(after)))


ENGINE = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, sys.argv[3])
    import deepspeed
    import deepspeed_fixture as fx
    deepspeed.init_distributed(dist_backend="gloo")
    model = fx.TinyModel()
    params = dict(model.named_parameters())
    groups = [[params[n] for n, _ in g] for g in fx.GROUPS]
    opt = torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": 0.1}, {"params": groups[1], "weight_decay": 0.0}],
        lr=1e-3,
    )
    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False}
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    path, _ = eng.load_checkpoint(sys.argv[1], load_optimizer_states=True)
    assert path is not None, "load_checkpoint found no checkpoint"
    o = eng.optimizer
    flats = list(o.single_partition_of_fp32_groups)
    states = [o.optimizer.state[p] for p in flats]
    torch.save({
        "fp32": [p.detach().clone() for p in flats],
        "exp_avg": [s["exp_avg"].clone() for s in states],
        "exp_avg_sq": [s["exp_avg_sq"].clone() for s in states],
        # A fresh engine pads a tensor "step" like the partitions (DeepSpeed's
        # _restore_base_optimizer_state): its first element is the value.
        "step": [float(s["step"].reshape(-1)[0]) for s in states],
        "group_step": [g["step"] for g in o.optimizer.param_groups],
        "module": {k: v.detach().clone() for k, v in eng.module.state_dict().items()},
        "global_steps": eng.global_steps,
    }, f"{sys.argv[2]}.{os.environ['RANK']}")
    """
)




@pytest.mark.slow
def test_deepspeed_engine_loads_the_chain_output(tmp_path: Path) -> None:
    """Real DeepSpeed ZeRO-2 engines on 2 gloo ranks restore the DP=2 output of the
    ZeRO-3 DP=4 chain with ``load_checkpoint``: DeepSpeed's own partitioning of the
    same model must find every master, moment and step where we put them."""
    pytest.importorskip("deepspeed")
    # bf16=1: name the files as the bf16 engine below looks for them (the ZeRO-3
    # source's weights are fp32, so the default would be a non-bf16 run's names).
    state, _, out = _convert_chain(tmp_path, 3, 53, dst_dp=2, bf16=1)
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    port, dump, tests = str(free_port()), tmp_path / "loaded", str(Path(__file__).parent)
    procs = []
    for rank in range(2):
        env = fx.launcher_env(rank, 2, port)
        cmd = [sys.executable, str(script), str(out), str(dump), tests]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    ranks = [torch.load(f"{dump}.{r}", weights_only=True) for r in range(2)]
    bf16 = {n: s["fp32"].to(torch.bfloat16) for n, s in state["params"].items()}
    for g, group in enumerate(fx.GROUPS):
        numel = sum(math.prod(s) for _, s in group)
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            want = torch.cat([state["params"][n][kind].reshape(-1) for n, _ in group])
            have = torch.cat([r[kind][g] for r in ranks])  # DeepSpeed's partitions, in order
            assert have.numel() >= numel and torch.equal(have[:numel], want), (g, kind)
            assert not have[numel:].any()  # the alignment padding
        assert all(r["step"][g] == 5.0 and r["group_step"][g] == 5 for r in ranks)
    for r in ranks:
        assert r["global_steps"] == 5
        # The engine's params are bf16 (the converted fp32 weights rounded once), its
        # buffers keep their dtype.
        fx.assert_same_bits(r["module"], bf16 | state["buffers"])
    module = fx.load_pt(out / TAG / "mp_rank_00_model_states.pt")["module"]
    rounded = {k: v.to(torch.bfloat16) if k in bf16 else v for k, v in module.items()}
    assert torch.equal(fx.forward(ranks[0]["module"]), fx.forward(rounded))


@pytest.mark.slow
def test_ds_to_universal_agrees_with_ours_on_the_bench_checkpoint(tmp_path: Path) -> None:
    """The benchmark's synthetic ZeRO-2 checkpoint (with ``param_slice_mappings``) is
    complete enough for DeepSpeed's ``ds_to_universal``, and DeepSpeed's per-parameter
    output equals ours bit for bit (fp32 masters, moments, step)."""
    pytest.importorskip("deepspeed.checkpoint.ds_to_universal")
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import convert as bench  # bench/convert.py
    finally:
        sys.path.pop(0)
    groups = bench.gpt_shapes(64, 2, 500)
    src = bench.make_zero2(tmp_path / "ds", groups, 4, slice_mappings=True)
    tag = src / f"global_step{bench.STEP}"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(tag), "--output_folder", str(tmp_path / "dsu")]
    cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    convert(str(src), str(tmp_path / "ours"), ConvertOptions())
    from ckptd.formats.storage import LocalStorage
    from ckptd.formats.universal_reader import UniversalReader

    ours = UniversalReader.open(LocalStorage(tmp_path / "ours"), bench.STEP)
    names = [n for g in groups for n, _ in g]
    assert sorted(os.listdir(tmp_path / "dsu" / "zero")) == sorted([*names, "optimizer_state.pt"])
    for name in names:
        for kind in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            theirs = torch.load(tmp_path / "dsu" / "zero" / name / f"{kind}.pt", weights_only=True)
            theirs = theirs["param"] if isinstance(theirs, dict) else theirs
            mine = ours.read(f"optim.state.{name}.{kind}")
            assert mine.shape == theirs.shape and torch.equal(mine, theirs.to(mine.dtype)), (
                name,
                kind,
            )
