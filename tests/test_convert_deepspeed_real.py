"""ckpt-convert on checkpoints written by DeepSpeed itself (ZeRO-1/2/3, 2 gloo ranks, CPU).

Real DeepSpeed optimizer files pickle DeepSpeed objects (``LossScaler``,
``ZeroStageEnum``, ``fragment_address``); the source must read them through inert
stand-ins with ``weights_only=True`` and convert every tensor. The reference values
are computed by DeepSpeed in the writer processes (its own ``zero_to_fp32`` for the
fp32 masters, the engine's module for the bf16 weights) and saved as plain tensors,
so this process never unpickles anything but tensors. Skipped without ``deepspeed``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.deepspeed import DeepSpeedObject, DeepSpeedSource, load_pt
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_reader import UniversalReader

try:
    import deepspeed  # noqa: F401
except Exception as e:  # any import failure: not usable here
    pytest.skip(f"deepspeed is not importable ({type(e).__name__}: {e})", allow_module_level=True)

STEPS = 3
WRITER = textwrap.dedent(
    """
    import os, sys, torch
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(7, 13), torch.nn.ReLU(), torch.nn.Linear(13, 5), torch.nn.LayerNorm(5)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
               "bf16": {"enabled": True}, "zero_force_ds_cpu_optimizer": False}
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            x = torch.randn(2, 7, generator=g).to(torch.bfloat16)
            loss = eng(x).float().pow(2).mean()
            eng.backward(loss)
            eng.step()
        out = os.path.join(root, f"z{stage}")
        eng.save_checkpoint(out)
        bf16 = {k: v.detach().clone() for k, v in eng.module.state_dict().items()}
        torch.distributed.barrier()
        if rank == 0:
            # DeepSpeed's own consolidation (trusted here: it is DeepSpeed's file).
            fp32 = get_fp32_state_dict_from_zero_checkpoint(out)
            torch.save({"fp32": dict(fp32), "bf16": bf16}, os.path.join(root, f"ref{stage}.pt"))
        torch.distributed.barrier()
    """
).replace("STEPS", str(STEPS))




@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds-real")
    script = root / "writer.py"
    script.write_text(WRITER)
    fx.run_ranks(script, root, "DeepSpeed writer")
    return root


def _universal(root: Path) -> dict[str, torch.Tensor]:
    r = UniversalReader.open(LocalStorage(root))
    return {n: r.read(n) for n in r.names()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_real_deepspeed_zero_to_universal(real_checkpoints: Path, stage: int) -> None:
    src = real_checkpoints / f"z{stage}"
    ref = torch.load(real_checkpoints / f"ref{stage}.pt", weights_only=True)
    with DeepSpeedSource(str(src)) as s:
        assert s.stage == stage and s.dp == 2
    r = convert(str(src), str(real_checkpoints / f"uni{stage}"), ConvertOptions())
    assert r.plan.source_format == "deepspeed" and r.plan.source_step == STEPS
    got = _universal(real_checkpoints / f"uni{stage}")
    params = sorted(ref["fp32"])
    want = {"model." + p for p in params} | {
        f"optim.state.{p}.{k}" for p in params for k in ("fp32", "exp_avg", "exp_avg_sq", "step")
    }
    assert set(got) == want
    for p in params:
        master = ref["fp32"][p]
        assert torch.equal(got[f"optim.state.{p}.fp32"], master), p
        if stage == 3:  # module holds placeholders: the model weights are the masters
            assert torch.equal(got[f"model.{p}"], master), p
        else:
            assert torch.equal(got[f"model.{p}"], ref["bf16"][p]), p
            assert torch.equal(master.to(torch.bfloat16), ref["bf16"][p]), p
        assert got[f"optim.state.{p}.exp_avg"].shape == master.shape
        assert bool((got[f"optim.state.{p}.exp_avg_sq"] >= 0).all())
        assert got[f"optim.state.{p}.exp_avg"].abs().sum() > 0, p
        assert float(got[f"optim.state.{p}.step"]) == STEPS


def test_real_optimizer_file_gives_inert_standins(real_checkpoints: Path) -> None:
    f = next((real_checkpoints / "z2").glob("global_step*/*optim_states.pt"))
    osd = load_pt(str(f), meta=True)["optimizer_state_dict"]
    scaler, stage = osd["loss_scaler"], osd["zero_stage"]
    assert isinstance(scaler, DeepSpeedObject) and isinstance(stage, DeepSpeedObject)
    assert scaler.qualname == "deepspeed.runtime.fp16.loss_scaler.LossScaler"
    assert scaler.state["cur_scale"] == 1.0 and int(stage) == 2
    frag = next(iter(osd["param_slice_mappings"][0].values()))
    assert frag.qualname == "deepspeed.utils.tensor_fragment.fragment_address"
    assert set(frag.state) == {"numel", "start"}
    assert "deepspeed" not in {type(v).__module__.split(".")[0] for v in (scaler, stage, frag)}


def test_real_files_read_without_torch_load(real_checkpoints: Path) -> None:
    """Every file a real engine writes is read by the torch-free metadata reader (no
    fallback to torch.load), and agrees with torch's meta-device loading."""
    from meta_compare import assert_same_meta, torch_meta

    from ckptd.converters.sources.deepspeed_files import STANDINS
    from ckptd.converters.sources.torchfile import load_meta

    files = sorted(real_checkpoints.rglob("*.pt"))
    assert files
    for f in files:
        assert_same_meta(load_meta(str(f), STANDINS), torch_meta(str(f)), str(f))
