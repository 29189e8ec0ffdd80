"""DeepSpeed PipelineModule checkpoints (pipeline parallel) -> universal and ZeRO-2.

The fixture writes what a ``PipelineModule`` engine saves (``tests/deepspeed_fixture.py``
``write_deepspeed_pipe``): per-layer weight files ``layer_{idx:02d}[-model_{tp:02d}]-
model_states.pt``, per mp rank (``stage * tp + tp_rank``) a model-states file with no
``module`` and the stage's ``param_shapes``, and the stage's ZeRO partitions per DP rank.
The source names tensors as the ``PipelineModule`` does (``{layer}.{name}``, tied modules
``tied_modules.{key}.{name}``) and must give every tensor bit-exact. Where DeepSpeed is
installed, a real PipelineModule engine on 2 gloo ranks (CPU) writes PP=2 ZeRO-1
checkpoints (fp32; bf16; bf16 with fp32 gradient accumulation, DeepSpeed's BF16_Optimizer)
whose every tensor must equal what DeepSpeed's own accessors report in the writers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch
from click.testing import CliRunner

from ckptd.converters.cli import main as cli
from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources import detect_source
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.deepspeed import DeepSpeedSource
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_reader import UniversalReader

TAG = "global_step5"
VARS = tuple(sorted(fx.MP_VARS.items()))


def _universal(root: Path) -> dict[str, torch.Tensor]:
    r = UniversalReader.open(LocalStorage(root))
    return {n: r.read(n) for n in r.names()}


def _model(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


@pytest.mark.parametrize(
    ("zero", "dp", "model_axis", "tied_file"),
    [(1, 2, True, False), (2, 2, False, False), (1, 3, True, True)],
)
def test_pp2_to_universal_bit_exact(
    tmp_path: Path, zero: int, dp: int, model_axis: bool, tied_file: bool
) -> None:
    layers = fx.TINY_PIPE
    if tied_file:  # the head's TiedLayerSpec without forward_fn: a second file of the tie
        layers = (*layers[:-1], dataclasses.replace(layers[-1], file=True))
    state = fx.pipe_state(fx.TINY_PIPE_SHAPES, 7)
    src = fx.write_deepspeed_pipe(
        tmp_path / "pp", state, layers, dp=dp, zero=zero, model_axis=model_axis
    )
    files = sorted(os.listdir(src / TAG))
    rank = "-model_00" if model_axis else ""
    idx = [0, 1, 2, 4, 5, 6] if tied_file else [0, 1, 2, 4, 5]
    assert files == sorted(
        [f"bf16_zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp)
         for m in range(2)] + [f"layer_{i:02d}{rank}-model_states.pt" for i in idx]
        + [f"mp_rank_{m:02d}_model_states.pt" for m in range(2)]
    )  # fmt: skip
    assert detect_source(str(src)) == "deepspeed"
    with DeepSpeedSource(str(src)) as s:
        assert (s.pp, s.tp, s.stage, s.dp, s.step) == (2, 1, zero, dp, 5)
        # read_range (what the HF target streams) agrees with whole reads, both kinds
        for name in ("model.2.weight", "optim.state.tied_modules.embed.weight.exp_avg"):
            whole = s.read(name)
            raw = whole.reshape(-1).view(torch.uint8).numpy().tobytes()
            buf = bytearray(len(raw) - 9)
            s.read_range(name, 5, memoryview(buf))
            assert bytes(buf) == raw[5:-4]
    r = convert(str(src), str(tmp_path / "uni"), ConvertOptions())
    assert r.plan.source_format == "deepspeed" and r.plan.source_step == 5
    got = _universal(tmp_path / "uni")
    want = fx.expected_universal(state, zero, 5)
    fx.assert_same_bits(got, want)
    assert torch.equal(fx.pipe_forward(_model(got)), fx.pipe_forward(_model(want)))
    masters = {k.removeprefix("optim.state.").removesuffix(".fp32"): v
               for k, v in got.items() if k.endswith(".fp32")}  # fmt: skip
    fp32 = {n: p["fp32"] for n, p in state["params"].items()} | state["buffers"]
    assert torch.equal(fx.pipe_forward(masters | state["buffers"]), fx.pipe_forward(fp32))


def test_pp2_tp2_megatron_names_assembled_with_the_spec(tmp_path: Path) -> None:
    state = fx.pipe_state(fx.GPT_PIPE_SHAPES, 8)
    src = fx.write_deepspeed_pipe(tmp_path / "pp", state, fx.GPT_PIPE, dp=2, tp=2)
    names = os.listdir(src / TAG)
    assert {f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(4)
            for t in range(2)} <= set(names)  # fmt: skip
    assert len([n for n in names if n.startswith("mp_rank_")]) == 4  # (stage, tp) -> s*2+t
    with DeepSpeedSource(str(src), variables=fx.MP_VARS) as s:
        assert (s.pp, s.tp, s.dp) == (2, 2, 2)
        name = "optim.state.1.self_attention.query_key_value.weight.exp_avg"  # fused, split
        whole = s.read(name)
        buf = bytearray(whole.numel() * 4 - 10)
        s.read_range(name, 6, memoryview(buf))
        assert bytes(buf) == whole.numpy().tobytes()[6:-4]
    convert(str(src), str(tmp_path / "uni"), ConvertOptions(variables=VARS))
    fx.assert_same_bits(_universal(tmp_path / "uni"), fx.expected_universal(state, 1, 5))
    with pytest.raises(SourceFormatError, match=r"TP rank 0 \(mp_rank_00, mp_rank_02\)"):
        DeepSpeedSource(str(src))  # no model variables: the spec cannot be compiled


def test_pp_to_zero2_at_another_dp(tmp_path: Path) -> None:
    state = fx.pipe_state(fx.TINY_PIPE_SHAPES, 9)
    src = fx.write_deepspeed_pipe(tmp_path / "pp", state, fx.TINY_PIPE, dp=2, zero=1)
    layout = (("dp", 3), ("groups", 2), ("zero", 2))
    opts = ConvertOptions(target_format="deepspeed", target_layout=layout)
    convert(str(src), str(tmp_path / "z2"), opts)
    out = tmp_path / "z2" / TAG
    assert sorted(os.listdir(out)) == sorted(
        ["mp_rank_00_model_states.pt"]
        + [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)]
    )
    ms = fx.load_pt(out / "mp_rank_00_model_states.pt")
    assert [list(g) for g in ms["param_shapes"]] == [
        ["tied_modules.embed.weight", "2.weight", "4.weight"],
        ["2.bias", "4.bias", "5.weight", "5.bias"],
    ]
    fx.assert_same_bits(fx.read_source(tmp_path / "z2"), fx.expected_universal(state, 2, 5))


def _rewrite(path: Path, drop: str) -> None:
    sd = torch.load(path, weights_only=True)
    del sd[drop]
    torch.save(sd, path)


def test_missing_layer_files_and_tensors_are_typed_errors(tmp_path: Path) -> None:
    state = fx.pipe_state(fx.TINY_PIPE_SHAPES, 10)
    src = fx.write_deepspeed_pipe(tmp_path / "pp", state, fx.TINY_PIPE, dp=2)
    (src / TAG / "layer_02-model_00-model_states.pt").unlink()
    miss = "layer_02-model_00-model_states.pt: missing; it holds param '2.weight'"
    with pytest.raises(SourceFormatError, match=re.escape(miss)):
        convert(str(src), str(tmp_path / "u"), ConvertOptions())
    assert not (tmp_path / "u").exists()
    src = fx.write_deepspeed_pipe(tmp_path / "pp2", state, fx.TINY_PIPE, dp=2)
    _rewrite(src / TAG / "layer_04-model_00-model_states.pt", "bias")
    with pytest.raises(SourceFormatError, match=re.escape("no tensor 'bias' (param '4.bias'")):
        DeepSpeedSource(str(src))
    # a tied module whose every occurrence has forward_fn: in no layer file
    layers = (dataclasses.replace(fx.TINY_PIPE[0], file=False), *fx.TINY_PIPE[1:])
    src = fx.write_deepspeed_pipe(tmp_path / "pp3", state, layers, dp=2)
    with pytest.raises(SourceFormatError, match=r"'tied_modules\.embed\.weight': no layer file"):
        DeepSpeedSource(str(src))
    gpt = fx.write_deepspeed_pipe(tmp_path / "tp", fx.pipe_state(fx.GPT_PIPE_SHAPES, 1),
                                  fx.GPT_PIPE, dp=1, tp=2)  # fmt: skip
    (gpt / TAG / "layer_01-model_01-model_states.pt").unlink()
    with pytest.raises(SourceFormatError, match=r"layer_01-model_01-model_states\.pt: missing"):
        DeepSpeedSource(str(gpt), variables=fx.MP_VARS)


def test_dry_run_lists_the_tensors(tmp_path: Path) -> None:
    state = fx.pipe_state(fx.TINY_PIPE_SHAPES, 11)
    src = fx.write_deepspeed_pipe(tmp_path / "pp", state, fx.TINY_PIPE, dp=2)
    res = CliRunner().invoke(cli, [str(src), str(tmp_path / "u"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["source"] == {"format": "deepspeed", "path": str(src), "step": 5}
    want = fx.expected_universal(state, 1, 5)
    assert doc["tensors"] == len(want) and not (tmp_path / "u").exists()
    assert {m[1]: (m[2], m[3]) for m in doc["moves"]} == {
        k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in want.items()
    }


# ------------------------------------------------- a real PipelineModule engine (CPU, gloo)

STEPS = 3
WRITER = textwrap.dedent(
    """
    import os, sys, torch
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    root = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])

    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(11, 6))
        def forward(self, ids):
            return self.weight[ids]

    class Scale(torch.nn.Module):  # a layer with a buffer and no parameters
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.rand(6) + 0.5)
        def forward(self, h):
            return h * self.scale.to(h.dtype)

    def head(emb, h):
        return h @ emb.weight.T

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out.float().reshape(-1, 11), y.reshape(-1))

    # bf16 with fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer (no zero_stage)
    for name, bf16, acc in (("fp32", False, None), ("bf16", True, None), ("bf16acc", True, "fp32")):
        torch.manual_seed(0)
        layers = [TiedLayerSpec("embed", Emb), LayerSpec(Scale), LayerSpec(torch.nn.Linear, 6, 9),
                  torch.nn.ReLU(), LayerSpec(torch.nn.Linear, 9, 6),
                  LayerSpec(torch.nn.LayerNorm, 6), TiedLayerSpec("embed", Emb, forward_fn=head)]
        model = PipelineModule(layers=layers, num_stages=2, loss_fn=loss_fn,
                               partition_method="uniform")
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 1}, "bf16": {"enabled": bf16},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        if acc:
            cfg["data_types"] = {"grad_accum_dtype": acc}
        eng, _, _, _ = deepspeed.initialize(model=model, config=cfg,
                                            model_parameters=list(model.parameters()))
        g = torch.Generator().manual_seed(1)
        def batches():
            while True:
                x = torch.randint(0, 11, (2, 5), generator=g)
                yield x, x
        it = batches()
        for _ in range(STEPS):
            eng.train_batch(data_iter=it)
        eng.save_checkpoint(os.path.join(root, name))
        # DeepSpeed's own view of each parameter (its fragment accessors), plain tensors
        ref = {n: {"model": p.detach().clone(), "fp32": safe_get_full_fp32_param(p),
                   "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                   "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
               for n, p in model.named_parameters()}
        ref.update({n: {"model": b.detach().clone()} for n, b in model.named_buffers()})
        torch.save(ref, os.path.join(root, f"ref-{name}-{rank}.pt"))
        torch.distributed.barrier()
    """
).replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def real_pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # any import failure: not usable here
        pytest.skip(f"deepspeed is not importable ({type(e).__name__}: {e})")
    root = tmp_path_factory.mktemp("ds-pipe-real")
    (root / "writer.py").write_text(WRITER)
    fx.run_ranks(root / "writer.py", root, "DeepSpeed pipeline writer")
    return root


@pytest.mark.parametrize("run", ["fp32", "bf16", "bf16acc"])
def test_real_pipeline_module_checkpoint(real_pipe: Path, run: str, tmp_path: Path) -> None:
    src = real_pipe / run
    files = os.listdir(src / f"global_step{STEPS}")
    assert {f"layer_{i:02d}-model_states.pt" for i in range(6)} <= set(files)
    with DeepSpeedSource(str(src)) as s:
        assert (s.pp, s.tp, s.stage, s.dp, s.step) == (2, 1, 1, 1, STEPS)
    convert(str(src), str(tmp_path / "uni"), ConvertOptions())
    got = _universal(tmp_path / "uni")
    want: dict[str, torch.Tensor] = {}
    for rank in range(2):  # both stages hold the tied embedding: their copies agree
        ref = torch.load(real_pipe / f"ref-{run}-{rank}.pt", weights_only=True)
        for n, kinds in ref.items():
            for k, v in kinds.items():
                key = f"model.{n}" if k == "model" else f"optim.state.{n}.{k}"
                assert torch.equal(want.setdefault(key, v), v), key
    steps = {k for k in got if k.endswith(".step")}
    assert all(float(got[k]) == STEPS for k in steps)
    assert {k.removesuffix(".step") for k in steps} == {
        k.removesuffix(".fp32") for k in want if k.endswith(".fp32")
    }
    fx.assert_same_bits({k: v for k, v in got.items() if k not in steps}, want)
    assert "model.tied_modules.embed.weight" in got and "model.1.scale" in got
