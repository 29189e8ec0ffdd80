"""Megatron legacy per-rank checkpoints <-> universal through ``ckpt-convert``.

A tiny LLaMA-like model (GQA 4 heads / 2 kv heads, SwiGLU, vocab 100 padded to
128 * tp, 4 layers) in canonical Megatron names goes HF safetensors -> Megatron
TP2xPP2 -> universal -> Megatron TP1xPP4 -> universal, bit-exactly. Also: replicate
policies (check_equal / take_first / average) on drifted replicas, expert-parallel rank
directories, optimizer state of Megatron's non-distributed optimizer (rank files built
around a real AdamW) in and out, ``--weights-only``, and resuming an interrupted
conversion to Megatron.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources import detect_source
from ckptd.converters.sources.base import SourceFormatError

HEADS, KV, HEAD_DIM, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 8, 32, 48, 100, 4
QKV_ROWS = (HEADS + 2 * KV) * HEAD_DIM


def canonical() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    out = {
        "embedding.word_embeddings.weight": r(VOCAB, HIDDEN),
        "output_layer.weight": r(VOCAB, HIDDEN, dtype=torch.bfloat16),
        "decoder.final_layernorm.weight": r(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        out[p + "self_attention.linear_qkv.weight"] = r(QKV_ROWS, HIDDEN)
        out[p + "self_attention.linear_qkv.layer_norm_weight"] = r(HIDDEN)
        out[p + "self_attention.linear_proj.weight"] = r(HIDDEN, HEADS * HEAD_DIM)
        out[p + "mlp.linear_fc1.weight"] = r(2 * FFN, HIDDEN)
        out[p + "mlp.linear_fc1.layer_norm_weight"] = r(HIDDEN)
        out[p + "mlp.linear_fc2.weight"] = r(HIDDEN, FFN)
    return out


def read_universal(path: str) -> dict[str, torch.Tensor]:
    from ckptd.converters.sources.universal import UniversalSource

    with UniversalSource(path, None, 1) as src:
        return {t.name: src.read(t.name) for t in src.tensors()}


def rank_model(root: str, rank_dir: str, it: int = 0) -> dict[str, torch.Tensor]:
    f = os.path.join(root, f"iter_{it:07d}", rank_dir, "model_optim_rng.pt")
    obj = torch.load(f, weights_only=True)
    assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == it
    return obj["model"]


@pytest.fixture()
def megatron_tp2pp2(tmp_path):
    ref = canonical()
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(ref, str(hf / "model.safetensors"))
    meg = tmp_path / "meg22"
    opts = ConvertOptions(
        target_format="megatron",
        target_layout=(("tp", 2), ("pp", 2)),
        variables=(("heads", HEADS),),
    )
    convert(str(hf), str(meg), opts)
    return ref, meg


def test_megatron_layout_on_disk(megatron_tp2pp2):
    ref, meg = megatron_tp2pp2
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (meg / ".ckpt-convert-complete").is_file()
    dirs = sorted(os.listdir(meg / "iter_0000000"))
    assert dirs == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    r0 = rank_model(str(meg), "mp_rank_00_000")
    r1 = rank_model(str(meg), "mp_rank_01_000")
    # vocab 100 padded to 256 over tp=2: rank 0 holds rows 0..99 then zero padding
    emb = ref["embedding.word_embeddings.weight"]
    assert r0["embedding.word_embeddings.weight"].shape == (128, HIDDEN)
    assert torch.equal(r0["embedding.word_embeddings.weight"][:VOCAB], emb)
    assert not r0["embedding.word_embeddings.weight"][VOCAB:].any()
    assert not r1["embedding.word_embeddings.weight"].any()
    assert "output_layer.weight" not in r0
    # GQA order: tp rank 0 holds query group 0 = [q heads 0,1; k head 0; v head 0]
    qkv = ref["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (
        qkv[: HEADS * HEAD_DIM],
        qkv[HEADS * HEAD_DIM : (HEADS + KV) * HEAD_DIM],
        qkv[(HEADS + KV) * HEAD_DIM :],
    )
    want = torch.cat([q[:16], k[:8], v[:8]])
    assert torch.equal(r0["decoder.layers.0.self_attention.linear_qkv.weight"], want)
    want1 = torch.cat([q[16:], k[8:], v[8:]])
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_qkv.weight"], want1)
    # SwiGLU: fc1 on tp rank 1 = [gate half 1; up half 1]
    fc1 = ref["decoder.layers.1.mlp.linear_fc1.weight"]
    want = torch.cat([fc1[FFN // 2 : FFN], fc1[FFN + FFN // 2 :]])
    assert torch.equal(r1["decoder.layers.1.mlp.linear_fc1.weight"], want)
    # pipeline stage 1 numbers its layers from 0: local layer 0 is global layer 2
    s1 = rank_model(str(meg), "mp_rank_00_001")
    assert sorted({k.split(".")[2] for k in s1 if k.startswith("decoder.layers.")}) == ["0", "1"]
    proj = ref["decoder.layers.2.self_attention.linear_proj.weight"]
    assert torch.equal(s1["decoder.layers.0.self_attention.linear_proj.weight"], proj[:, :16])
    assert s1["output_layer.weight"].dtype == torch.bfloat16


def test_round_trip_tp2pp2_to_tp1pp4(megatron_tp2pp2, tmp_path):
    ref, meg = megatron_tp2pp2
    assert detect_source(str(meg)) == "megatron"
    uni1, meg14, uni2 = tmp_path / "uni1", tmp_path / "meg14", tmp_path / "uni2"
    convert(str(meg), str(uni1))  # variables from the sidecar the target wrote
    got1 = read_universal(str(uni1))
    assert got1.keys() == ref.keys()
    for name, t in ref.items():
        assert got1[name].dtype == t.dtype and torch.equal(got1[name], t), name
    convert(
        str(uni1),
        str(meg14),
        ConvertOptions(
            target_format="megatron",
            target_step=7,
            target_layout=(("tp", 1), ("pp", 4)),
            variables=(("heads", HEADS),),
        ),
    )
    assert sorted(os.listdir(meg14 / "iter_0000007")) == [f"mp_rank_00_{p:03d}" for p in range(4)]
    last = rank_model(str(meg14), "mp_rank_00_003", it=7)
    assert last["output_layer.weight"].shape == (128, HIDDEN)  # vocab padded to 128 * tp
    # the source reading explicit variables instead of the sidecar
    explicit = {"heads": HEADS, "kv_heads": KV, "head_dim": HEAD_DIM, "hidden": HIDDEN,
                "ffn": FFN, "vocab": VOCAB, "layers": LAYERS}  # fmt: skip
    res = convert(str(meg14), str(uni2), ConvertOptions(variables=tuple(explicit.items())))
    assert res.plan.source_step == 7
    got2 = read_universal(str(uni2))
    assert got2.keys() == ref.keys()
    for name, t in ref.items():
        assert got2[name].dtype == t.dtype and torch.equal(got2[name], t), name


def test_truncated_pt_is_a_typed_error_naming_the_file(megatron_tp2pp2, tmp_path):
    _, meg = megatron_tp2pp2
    f = meg / "iter_0000000" / "mp_rank_01_001" / "model_optim_rng.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceFormatError, match=r"mp_rank_01_001/model_optim_rng\.pt"):
        convert(str(meg), str(tmp_path / "out"))


def test_replicas_that_differ_are_an_error(megatron_tp2pp2, tmp_path):
    _, meg = megatron_tp2pp2
    f = meg / "iter_0000000" / "mp_rank_01_000" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=True)
    obj["model"]["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] += 1
    torch.save(obj, f)
    with pytest.raises(SourceFormatError, match="differs"):
        convert(str(meg), str(tmp_path / "out"))


def test_pickle_payload_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    d = tmp_path / "m" / "iter_0000001" / "mp_rank_00"
    d.mkdir(parents=True)
    torch.save(
        {"model": {"w": torch.zeros(2)}, "x": Evil()},
        d / "model_optim_rng.pt",
        pickle_module=pickle,
    )
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(SourceFormatError, match=r"mp_rank_00/model_optim_rng\.pt"):
        convert(str(tmp_path / "m"), str(tmp_path / "out"))


def test_cli_var_and_target_layout_flags(tmp_path):
    """`ckpt-convert --to megatron --target-layout tp=2,pp=2 --var heads=..` and back."""
    from click.testing import CliRunner

    from ckptd.converters.cli import main

    ref = canonical()
    (tmp_path / "hf").mkdir()
    save_file(ref, str(tmp_path / "hf" / "model.safetensors"))
    run = CliRunner().invoke
    args = ["--to", "megatron", "--target-layout", "tp=2,pp=2", "--var", f"heads={HEADS}"]
    res = run(main, [str(tmp_path / "hf"), str(tmp_path / "meg"), *args, "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "meg" / "iter_0000000")) == [
        f"mp_rank_{t:02d}_{p:03d}" for t in range(2) for p in range(2)
    ]
    res = run(main, [str(tmp_path / "meg"), str(tmp_path / "uni"), "--var", f"heads={HEADS}"])
    assert res.exit_code == 0, res.output
    got = read_universal(str(tmp_path / "uni"))
    assert all(torch.equal(got[n], t) for n, t in ref.items())
    bad = run(main, [str(tmp_path / "hf"), str(tmp_path / "x"), "--to", "megatron",
                     "--target-layout", "tp=2,zz=3", "--var", f"heads={HEADS}"])  # fmt: skip
    assert bad.exit_code == 1 and "zz" in bad.output


# ------------------------------------------------------------ replicate policies


def _policy_spec(tmp_path, policy: str) -> str:
    """The shipped megatron_llama spec with every ``replicate`` given ``policy``."""
    from importlib import resources

    text = resources.files("ckptd.converters.spec").joinpath("specs", "megatron_llama.ckspec")
    path = tmp_path / f"llama_{policy}.ckspec"
    path.write_text(text.read_text().replace(": replicate", f": replicate(policy={policy})"))
    return str(path)


@pytest.mark.parametrize("policy", ["check_equal", "take_first", "average"])
def test_replicate_policies_on_drifted_replicas(megatron_tp2pp2, tmp_path, policy):
    from ckptd.converters.sources.megatron import MegatronSource

    ref, meg = megatron_tp2pp2
    name = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    f = meg / "iter_0000000" / "mp_rank_01_000" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=True)
    drifted = ref[name] + torch.linspace(0.0, 1.0, HIDDEN)  # tp rank 1's copy drifted
    obj["model"][name] = drifted
    torch.save(obj, f)
    spec = _policy_spec(tmp_path, policy)
    if policy == "check_equal":
        with pytest.raises(SourceFormatError, match=rf"mp_rank_01_000.*{name}.*differs"):
            convert(str(meg), str(tmp_path / "out"), ConvertOptions(spec=spec))
        return
    want = ref[name] if policy == "take_first" else (
        (ref[name].double() + drifted.double()) / 2).float()
    assert not torch.equal(want, ref[name]) or policy == "take_first"
    convert(str(meg), str(tmp_path / "uni"), ConvertOptions(spec=spec))
    got = read_universal(str(tmp_path / "uni"))
    assert torch.equal(got[name], want)
    assert all(torch.equal(got[n], t) for n, t in ref.items() if n != name)
    # ranged reads (what the HF target streams) average region by region, 3 floats at a time
    with MegatronSource(str(meg), None, 1, spec=spec) as src:
        buf = bytearray(HIDDEN * 4)
        for start in range(0, len(buf), 12):
            n = min(12, len(buf) - start)
            src.read_range(name, start, memoryview(buf)[start : start + n])
    assert torch.equal(torch.frombuffer(buf, dtype=torch.float32), want)


def test_average_refuses_integer_replicas(tmp_path):
    ref = {"decoder.final_layernorm.weight": torch.arange(4, dtype=torch.int32)}
    for t in range(2):
        d = tmp_path / "m" / "iter_0000001" / f"mp_rank_{t:02d}"
        d.mkdir(parents=True)
        torch.save({"model": {k: v + t for k, v in ref.items()}}, d / "model_optim_rng.pt")
    spec = tmp_path / "s.ckspec"
    spec.write_text("decoder.final_layernorm.weight : replicate(policy=average)\n")
    with pytest.raises(SourceFormatError, match=r"mp_rank_01.*final_layernorm.*averaged"):
        convert(str(tmp_path / "m"), str(tmp_path / "o"), ConvertOptions(spec=str(spec)))


# -------------------------------------------------------- expert-parallel rank dirs


def canonical_moe() -> dict[str, torch.Tensor]:
    """canonical() with layers 1 and 3 turned into MoE layers of 2 experts."""
    g = torch.Generator().manual_seed(9)
    out = canonical()
    for i in (1, 3):
        p = f"decoder.layers.{i}."
        for k in ("mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_weight",
                  "mlp.linear_fc2.weight"):  # fmt: skip
            del out[p + k]
        out[p + "pre_mlp_layernorm.weight"] = torch.randn(HIDDEN, generator=g)
        out[p + "mlp.router.weight"] = torch.randn(2, HIDDEN, generator=g)
        for e in range(2):
            b = f"{p}mlp.experts.local_experts.{e}."
            out[b + "linear_fc1.weight"] = torch.randn(2 * 16, HIDDEN, generator=g)
            out[b + "linear_fc2.weight"] = torch.randn(HIDDEN, 16, generator=g)
    return out


def test_expert_parallel_only_rank_dirs(tmp_path):
    """pp=1, ep=2: Megatron names the dirs mp_rank_TT_EEE, which read as stages unless
    the sidecar, --var or the files' args say otherwise."""
    import json

    ref = canonical_moe()
    (tmp_path / "hf").mkdir()
    save_file(ref, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    convert(str(tmp_path / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("ep", 2)),
        variables=(("heads", HEADS),)))  # fmt: skip
    assert sorted(os.listdir(meg / "iter_0000000")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    e1 = rank_model(str(meg), "mp_rank_01_001")
    assert torch.equal(e1["decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.weight"],
                       ref["decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"][:, 8:])
    convert(str(meg), str(tmp_path / "u1"))  # the sidecar says ep=2, pp=1
    got = read_universal(str(tmp_path / "u1"))
    assert got.keys() == ref.keys() and all(torch.equal(got[n], t) for n, t in ref.items())
    side = json.loads((meg / "ckptd_megatron.json").read_text())
    (meg / "ckptd_megatron.json").unlink()
    variables = tuple(side["variables"].items())
    with pytest.raises(SourceFormatError, match="pass --var ep=N --var pp=1"):  # as stages
        convert(str(meg), str(tmp_path / "u2"), ConvertOptions(variables=variables))
    convert(str(meg), str(tmp_path / "u3"),
            ConvertOptions(variables=(*variables, ("ep", 2))))  # fmt: skip
    got = read_universal(str(tmp_path / "u3"))
    assert all(torch.equal(got[n], t) for n, t in ref.items())
    # or Megatron's own args in the rank files (argparse.Namespace, allowed by weights_only)
    import argparse

    for d in os.listdir(meg / "iter_0000000"):
        f = meg / "iter_0000000" / d / "model_optim_rng.pt"
        obj = torch.load(f, weights_only=True)
        obj["args"] = argparse.Namespace(pipeline_model_parallel_size=1,
                                         expert_model_parallel_size=2)  # fmt: skip
        torch.save(obj, f)
    convert(str(meg), str(tmp_path / "u4"), ConvertOptions(variables=variables))
    got = read_universal(str(tmp_path / "u4"))
    assert all(torch.equal(got[n], t) for n, t in ref.items())


# ------------------------------------------------------------------ optimizer state

ITER = 7
SCHED = {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": ITER * 64, "warmup_steps": 4,
         "decay_steps": 1000, "decay_style": "cosine"}  # fmt: skip


def _no_wd(key: str, t: torch.Tensor) -> bool:
    """Megatron-Core's default weight-decay exemption: 1-D tensors and biases."""
    return t.dim() == 1 or key.endswith(".bias")


def _groups_first_appearance(model: dict[str, torch.Tensor]) -> dict[bool, list[str]]:
    """Megatron's param groups in the order older versions build them (first appearance
    of each class in named_parameters order)."""
    groups: dict[bool, list[str]] = {}
    for k, t in model.items():
        groups.setdefault(_no_wd(k, t), []).append(k)
    return groups


def optimizer_globals() -> tuple[dict, dict, dict]:
    """bf16 weights, their fp32 masters, and Adam moments (all canonical)."""
    g = torch.Generator().manual_seed(21)
    masters = {k: v.float() for k, v in canonical().items()}
    weights = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    moments = {k: {"exp_avg": torch.randn(v.shape, generator=g) * 1e-3,
                   "exp_avg_sq": torch.randn(v.shape, generator=g).abs() * 1e-6}
               for k, v in masters.items()}  # fmt: skip
    return weights, masters, moments


def optimizer_entries(model: dict, local: dict) -> dict:
    """A rank file's ``optimizer``, ``opt_param_scheduler`` and ``rng_state`` as Megatron
    writes them with the non-distributed optimizer: Float16OptimizerWithFloat16Params
    over a real torch AdamW whose params are ``model``'s keys (in order), with fp32
    masters and moments from ``local["fp32"]``, ``local["exp_avg"]``, ``local["exp_avg_sq"]``."""
    import random

    import numpy as np

    groups = _groups_first_appearance(model)
    params = {k: torch.nn.Parameter(local["fp32"][k].clone()) for k in model}
    opt = torch.optim.AdamW(
        [{"params": [params[k] for k in ks], "wd_mult": 0.0 if no_wd else 1.0,
          "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
         for no_wd, ks in groups.items()],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # fmt: skip
    for k, prm in params.items():
        opt.state[prm] = {"step": torch.tensor(float(ITER)), "exp_avg": local["exp_avg"][k],
                          "exp_avg_sq": local["exp_avg_sq"][k]}  # fmt: skip
    return {
        "optimizer": {"optimizer": opt.state_dict(),
                      "fp32_from_fp16_params": [[params[k].detach() for k in ks]
                                                for ks in groups.values()]},
        "opt_param_scheduler": SCHED,
        "rng_state": [{"random_rng_state": random.getstate(),
                       "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state()}],
    }  # fmt: skip


@pytest.fixture()
def megatron_with_optimizer(tmp_path):
    """TP2xPP2 rank files as Megatron writes them with the non-distributed optimizer
    (Float16OptimizerWithFloat16Params over a real torch AdamW, args, RNG state).

    Each kind of tensor is cut into rank shards by converting it as if it were the
    weights (the slicing the weight round trips check); the optimizer around them is
    built the way Megatron builds it."""
    import argparse


    weights, masters, moments = optimizer_globals()
    kinds = {"model": weights, "fp32": masters,
             **{k: {n: m[k] for n, m in moments.items()} for k in ("exp_avg", "exp_avg_sq")}}
    shards = {}
    for kind, tensors in kinds.items():
        (tmp_path / f"hf_{kind}").mkdir()
        save_file(tensors, str(tmp_path / f"hf_{kind}" / "model.safetensors"))
        convert(str(tmp_path / f"hf_{kind}"), str(tmp_path / f"cut_{kind}"), ConvertOptions(
            target_format="megatron", target_layout=(("tp", 2), ("pp", 2)),
            variables=(("heads", HEADS),)))  # fmt: skip
        shards[kind] = tmp_path / f"cut_{kind}"
    meg = tmp_path / "meg"
    for t in range(2):
        for p in range(2):
            d = f"mp_rank_{t:02d}_{p:03d}"
            local = {k: rank_model(str(shards[k]), d) for k in kinds}
            obj = {
                "args": argparse.Namespace(tensor_model_parallel_size=2,
                                           pipeline_model_parallel_size=2, num_layers=LAYERS),
                "checkpoint_version": 3.0,
                "iteration": ITER,
                "model": local["model"],
                **optimizer_entries(local["model"], local),
            }  # fmt: skip
            (meg / f"iter_{ITER:07d}" / d).mkdir(parents=True)
            torch.save(obj, meg / f"iter_{ITER:07d}" / d / "model_optim_rng.pt")
    (meg / "latest_checkpointed_iteration.txt").write_text(str(ITER))
    return meg, (weights, masters, moments)


EXPLICIT = (("heads", HEADS), ("kv_heads", KV), ("head_dim", HEAD_DIM), ("hidden", HIDDEN),
            ("ffn", FFN), ("vocab", VOCAB), ("layers", LAYERS))  # fmt: skip


def _expected_universal(weights, masters, moments) -> dict[str, torch.Tensor]:
    out = dict(weights)
    for n in weights:
        out[f"optim.state.{n}.fp32"] = masters[n]
        out[f"optim.state.{n}.exp_avg"] = moments[n]["exp_avg"]
        out[f"optim.state.{n}.exp_avg_sq"] = moments[n]["exp_avg_sq"]
        out[f"optim.state.{n}.step"] = torch.tensor(float(ITER))
    return out


def test_optimizer_state_round_trip_tp2pp2_to_tp1pp4(megatron_with_optimizer, tmp_path):
    meg, globals_ = megatron_with_optimizer
    want = _expected_universal(*globals_)
    convert(str(meg), str(tmp_path / "uni"), ConvertOptions(variables=EXPLICIT))
    got = read_universal(str(tmp_path / "uni"))
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    # -> Megatron TP1xPP4 with the optimizer, -> universal again: bit-exact
    meg14 = tmp_path / "meg14"
    convert(str(tmp_path / "uni"), str(meg14), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 4)),
        variables=(("heads", HEADS),)))  # fmt: skip
    convert(str(meg14), str(tmp_path / "uni2"))
    got2 = read_universal(str(tmp_path / "uni2"))
    assert got2.keys() == want.keys()
    for n, t in want.items():
        assert got2[n].dtype == t.dtype and torch.equal(got2[n], t), n
    # a stage-1 file loads into an AdamW built the way Megatron builds it
    obj = torch.load(meg14 / f"iter_{ITER:07d}" / "mp_rank_00_001" / "model_optim_rng.pt",
                     weights_only=True)  # fmt: skip
    assert obj["opt_param_scheduler"] == SCHED and obj["iteration"] == ITER
    model = obj["model"]
    groups = _groups_first_appearance(model)
    assert list(groups) == [False, True]  # this rank's order matches the written one
    params = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in model.items()}
    opt = torch.optim.AdamW([{"params": [params[k] for k in ks]} for ks in groups.values()])
    opt.load_state_dict(obj["optimizer"]["optimizer"])
    _, masters, moments = globals_
    key, glob = "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.1."
    glob += "self_attention.linear_proj.weight"  # pp=4: stage 1's layer 0 is layer 1
    assert torch.equal(opt.state[params[key]]["exp_avg"], moments[glob]["exp_avg"])
    assert float(opt.state[params[key]]["step"]) == ITER
    wd, no_wd = opt.param_groups
    assert (wd["wd_mult"], no_wd["wd_mult"]) == (1.0, 0.0)
    assert wd["betas"] == (0.9, 0.95) and wd["weight_decay"] == 0.1  # carried from the source
    fp32 = obj["optimizer"]["fp32_from_fp16_params"]
    assert [len(g) for g in fp32] == [len(ks) for ks in groups.values()]
    assert torch.equal(fp32[0][groups[False].index(key)], masters[glob])


def test_weights_only_drops_megatron_optimizer(megatron_with_optimizer, tmp_path):
    meg, (weights, _, _) = megatron_with_optimizer
    res = convert(str(meg), str(tmp_path / "m"), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 2)), weights_only=True,
        variables=EXPLICIT))  # fmt: skip
    assert res.plan.dropped and all(n.startswith("optim.") for n in res.plan.dropped)
    for d in ("mp_rank_00_000", "mp_rank_00_001"):
        obj = torch.load(tmp_path / "m" / f"iter_{ITER:07d}" / d / "model_optim_rng.pt",
                         weights_only=True)  # fmt: skip
        assert "optimizer" not in obj
    convert(str(tmp_path / "m"), str(tmp_path / "u"))
    got = read_universal(str(tmp_path / "u"))
    assert got.keys() == weights.keys()
    assert all(torch.equal(got[n], t) for n, t in weights.items())


def test_optimizer_group_that_fits_no_class_is_a_typed_error(megatron_with_optimizer, tmp_path):
    meg, _ = megatron_with_optimizer
    f = meg / f"iter_{ITER:07d}" / "mp_rank_01_001" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    groups = obj["optimizer"]["optimizer"]["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[0]["params"][:-1], (
        [groups[0]["params"][-1], *groups[1]["params"]])  # a custom no-weight-decay rule
    torch.save(obj, f)
    with pytest.raises(SourceFormatError, match=r"mp_rank_01_001/model_optim_rng\.pt: "
                       "optimizer param group 0"):  # fmt: skip
        convert(str(meg), str(tmp_path / "u"), ConvertOptions(variables=EXPLICIT))


# ------------------------------------------------------------------------------ resume


def test_interrupted_megatron_conversion_resumes(megatron_with_optimizer, tmp_path):
    from ckptd.converters.convert import plan_conversion
    from ckptd.converters.sources.base import TargetExistsError

    meg, globals_ = megatron_with_optimizer
    uni = tmp_path / "uni"
    convert(str(meg), str(uni), ConvertOptions(variables=EXPLICIT))
    opts = ConvertOptions(target_format="megatron", target_layout=(("tp", 2), ("pp", 2)),
                          variables=(("heads", HEADS),))  # fmt: skip
    dst = tmp_path / "dst"

    def stage1(name: str) -> bool:
        return name.removeprefix("optim.state.").startswith(
            ("decoder.layers.2.", "decoder.layers.3.", "output_layer.", "decoder.final_"))

    stage0 = [n for n in read_universal(str(uni)) if not stage1(n)]

    def stop(name: str, resumed: bool) -> None:
        # the first report comes once stage 0's files are durable: stop before stage 1
        assert not stage1(name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(uni), str(dst), opts, on_tensor=stop)
    it = dst / f"iter_{ITER:07d}"
    assert not (dst / "latest_checkpointed_iteration.txt").exists()
    assert not (dst / ".ckpt-convert-complete").exists()
    assert (it / "mp_rank_01_000" / "model_optim_rng.pt").exists()
    assert not (it / "mp_rank_00_001" / "model_optim_rng.pt").exists()
    assert plan_conversion(str(uni), str(dst), opts).destination == "resumable"
    # a damaged stage-0 file fails its checksum and is written again
    f = it / "mp_rank_00_000" / "model_optim_rng.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    res = convert(str(uni), str(dst), opts)
    assert not res.resumed  # every stage-0 tensor is also in the damaged file
    with pytest.raises(KeyboardInterrupt):  # interrupt a fresh run again, then resume it
        convert(str(uni), str(tmp_path / "dst2"), opts, on_tensor=stop)
    res = convert(str(uni), str(tmp_path / "dst2"), opts)
    assert set(res.resumed) == set(stage0) and len(stage0) > 10
    for d in (dst, tmp_path / "dst2"):
        convert(str(d), str(tmp_path / f"back_{d.name}"))
        got = read_universal(str(tmp_path / f"back_{d.name}"))
        want = _expected_universal(*globals_)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], t) for n, t in want.items())
    with pytest.raises(TargetExistsError):
        convert(str(uni), str(dst), opts)


def test_fp32_moe_optimizer_is_chained_dense_then_experts(tmp_path):
    """fp32 params: FP32Optimizer form (no masters); with experts, Megatron's
    ChainedOptimizer list (dense optimizer, then the expert-parallel one)."""
    g = torch.Generator().manual_seed(5)
    weights = canonical_moe()
    weights["output_layer.weight"] = weights["output_layer.weight"].float()
    full = dict(weights)
    for n, t in weights.items():
        full[f"optim.state.{n}.exp_avg"] = torch.randn(t.shape, generator=g)
        full[f"optim.state.{n}.exp_avg_sq"] = torch.randn(t.shape, generator=g).abs()
        full[f"optim.state.{n}.step"] = torch.tensor(3.0)
    (tmp_path / "hf").mkdir()
    save_file(full, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    convert(str(tmp_path / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("pp", 2), ("ep", 2)),
        variables=(("heads", HEADS),)))  # fmt: skip
    obj = torch.load(meg / "iter_0000000" / "mp_rank_01_001_001" / "model_optim_rng.pt",
                     weights_only=True)  # fmt: skip
    dense, expert = obj["optimizer"]
    assert "fp32_from_fp16_params" not in dense and "state" in dense  # FP32Optimizer
    assert [g["is_expert_parallel"] for g in expert["param_groups"]] == [True]
    keys = [k for k in obj["model"] if ".local_experts." in k]
    assert keys == ["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
                    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]
    # local expert 0 of EP rank 1 is global expert 1; tp rank 1 holds fc2's columns 8..15
    want = full["optim.state.decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"
                ".exp_avg"][:, 8:]  # fmt: skip
    assert torch.equal(expert["state"][1]["exp_avg"], want)
    convert(str(meg), str(tmp_path / "u"))
    got = read_universal(str(tmp_path / "u"))
    assert got.keys() == full.keys()
    assert all(torch.equal(got[n], t) for n, t in full.items())


def test_weights_only_drops_optimizer_state_before_the_name_map(megatron_with_optimizer,
                                                                tmp_path):
    """A weights name map (HF LLaMA) has no rules for optimizer state: --weights-only
    drops it first instead of failing the map's coverage check."""
    from ckptd.converters.sources.namemap import load_name_map

    meg, (weights, _, _) = megatron_with_optimizer
    hf_map = load_name_map("reverse:hf_llama_to_megatron")
    convert(str(meg), str(tmp_path / "hf"), ConvertOptions(
        target_format="hf", name_map=hf_map, weights_only=True, variables=EXPLICIT))  # fmt: skip
    convert(str(tmp_path / "hf"), str(tmp_path / "back"), ConvertOptions(
        name_map=load_name_map("hf_llama_to_megatron"), variables=EXPLICIT))  # fmt: skip
    back = read_universal(str(tmp_path / "back"))
    assert set(back) == set(weights)
    for k, v in weights.items():
        assert torch.equal(back[k], v), k
