"""Megatron legacy checkpoints with virtual (interleaved) pipeline parallelism.

Megatron-LM saves a rank's model chunks as ``model0`` .. ``model{vpp-1}``; chunk ``v``
of pipeline rank ``p`` holds the layers of stage ``v * pp + p`` of a ``pp * vpp``-stage
pipeline, numbered from 0. Checked here: an 8-layer HF LLaMA goes -> Megatron
TP2xPP2xVPP2 -> universal -> Megatron TP1xPP4 -> HF bit-exactly; the VPP files hold the
right global layers (tensors compared with the HF originals, and a Megatron-style
forward over the chunks as stages gives the HF logits); optimizer state of the
non-distributed optimizer (param groups over all chunks, as Megatron-Core builds them)
and of the distributed optimizer (per-chunk buffers) reads to the same universal
tensors as the same state without VPP; damaged files and layer counts that do not
divide are typed errors naming the file.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from megatron_distopt_fixture import rewrite_as_distributed
from models_tiny import llama_forward, megatron_llama_forward
from safetensors.torch import load_file, save_file
from test_convert_hf_megatron import HD, HEADS, KV, VOCAB, hf_llama, hf_mixtral
from test_convert_megatron import (  # noqa: F401  (megatron_with_optimizer: a fixture)
    EXPLICIT,
    ITER,
    SCHED,
    _expected_universal,
    _groups_first_appearance,
    megatron_with_optimizer,
    optimizer_entries,
    optimizer_globals,
    read_universal,
)
from test_convert_megatron import HEADS as OPT_HEADS

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import PlanError, SourceFormatError
from ckptd.converters.sources.megatron import MegatronSource, load_torch_file
from ckptd.converters.sources.namemap import load_name_map

LAYERS8 = 8
TP, PP, VPP = 2, 2, 2
PER_CHUNK = LAYERS8 // (PP * VPP)


def rank_file(root: Path, t: int, p: int, it: int = 0) -> Path:
    return root / f"iter_{it:07d}" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"


def load(f: Path) -> dict[str, Any]:
    """A rank file, weights-only (Megatron's ``args`` Namespace allowed)."""
    obj = load_torch_file(str(f))
    assert isinstance(obj, dict)
    return obj


def stage_models(root: Path, tp: int, pp: int, vpp: int, it: int = 0
                 ) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """``{(tp rank, stage): chunk model}``: chunk v of pipeline rank p as stage v*pp + p,
    the plain-pipeline view Megatron's interleaved layout is equivalent to."""
    out = {}
    for t in range(tp):
        for p in range(pp):
            obj = load(rank_file(root, t, p, it))
            for v in range(vpp):
                out[(t, v * pp + p)] = obj[f"model{v}"]
    return out


def to_megatron(src: Path, dst: Path, layout: Mapping[str, int], heads: int = HEADS,
                **kw: Any) -> None:
    """``ckpt-convert SRC DST --to megatron --target-layout ... --var heads=..``."""
    convert(str(src), str(dst), ConvertOptions(
        target_format="megatron", target_layout=tuple(sorted(layout.items())),
        variables=(("heads", heads),), **kw))  # fmt: skip


@pytest.fixture(scope="module")
def vpp_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF (8 layers) -> TP2xPP2xVPP2 -> universal -> TP1xPP4 -> HF."""
    tmp = tmp_path_factory.mktemp("vpp")
    (tmp / "hf").mkdir()
    save_file(hf_llama(layers=LAYERS8), str(tmp / "hf" / "model.safetensors"))
    to_megatron(tmp / "hf", tmp / "meg", {"tp": TP, "pp": PP, "vpp": VPP},
                name_map=load_name_map("hf_llama_to_megatron"))  # fmt: skip
    convert(str(tmp / "meg"), str(tmp / "uni"))
    to_megatron(tmp / "uni", tmp / "meg14", {"tp": 1, "pp": 4})
    convert(str(tmp / "meg14"), str(tmp / "hf2"), ConvertOptions(
        target_format="hf", name_map=load_name_map("reverse:hf_llama_to_megatron")))  # fmt: skip
    return tmp


def test_vpp_round_trip_is_bit_exact(vpp_chain: Path) -> None:
    ref = hf_llama(layers=LAYERS8)
    got = load_file(str(vpp_chain / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    # the plain TP1xPP4 files hold what the four virtual stages held, layer for layer
    plain = {k: m for k, m in stage_models(vpp_chain / "meg", TP, PP, VPP).items() if k[0] == 0}
    for s in range(PP * VPP):
        p1 = load(rank_file(vpp_chain / "meg14", 0, s))["model"]
        name = "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
        assert torch.equal(p1[name], plain[(0, s)][name]), s


def test_vpp_files_hold_model_chunks_with_global_layers(vpp_chain: Path) -> None:
    ref = hf_llama(layers=LAYERS8)
    meg = vpp_chain / "meg"
    for t in range(TP):
        for p in range(PP):
            obj = load(rank_file(meg, t, p))
            assert "model" not in obj and sorted(k for k in obj if k.startswith("model")) == [
                "model0", "model1"]  # fmt: skip
            for v in range(VPP):
                chunk = obj[f"model{v}"]
                local = {int(k.split(".")[2]) for k in chunk if k.startswith("decoder.layers.")}
                assert local == set(range(PER_CHUNK)), (t, p, v)
                # embedding on chunk 0 of rank 0; output layer and final norm on the
                # last chunk of the last rank
                assert ("embedding.word_embeddings.weight" in chunk) == (p == 0 and v == 0)
                last = p == PP - 1 and v == VPP - 1
                assert ("output_layer.weight" in chunk) == last
                assert ("decoder.final_layernorm.weight" in chunk) == last
            assert "args" not in obj  # Megatron then skips check_checkpoint_args
    # chunk 1 of pipeline rank 0 is stage 2: local layer 1 is global layer 5; tp rank 1
    # holds the second half of linear_proj's input columns
    c = load(rank_file(meg, 1, 0))["model1"]
    o_proj = ref["model.layers.5.self_attn.o_proj.weight"]
    half = HEADS * HD // TP
    assert torch.equal(c["decoder.layers.1.self_attention.linear_proj.weight"], o_proj[:, half:])
    # chunk 0 of rank 1 is stage 1: local layer 0 is global layer 2; GQA order on tp 0
    c = load(rank_file(meg, 0, 1))["model0"]
    q, k, v = (ref[f"model.layers.2.self_attn.{x}_proj.weight"] for x in "qkv")
    qkv = c["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.cat([q[: 2 * HD], k[:HD], v[:HD]]))
    # chunk 1 of rank 1 is stage 3, the last: layer 7 and the norms
    c = load(rank_file(meg, 0, 1))["model1"]
    assert torch.equal(c["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       ref["model.layers.7.input_layernorm.weight"])  # fmt: skip
    assert torch.equal(c["decoder.final_layernorm.weight"], ref["model.norm.weight"])
    side = json.loads((meg / "ckptd_megatron.json").read_text())
    assert (side["tp"], side["pp"], side["vpp"]) == (TP, PP, VPP)


def test_forward_over_chunks_as_stages_equals_hf(vpp_chain: Path) -> None:
    """Running the chunks as stages v*pp + p, Megatron's interleaved order, gives the HF
    model's logits: a chunk placed on the wrong stage would change them."""
    ids = torch.tensor([3, 17, 99, 0, 42, 42, 7, 64])
    ref = hf_llama(layers=LAYERS8)
    want = llama_forward(ref, ids, HEADS, KV)
    got = megatron_llama_forward(stage_models(vpp_chain / "meg", TP, PP, VPP), ids, HEADS, KV,
                                 VOCAB)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_source_reports_vpp(vpp_chain: Path) -> None:
    with MegatronSource(str(vpp_chain / "meg"), None, 1) as src:
        assert (src.tp, src.pp, src.vpp) == (TP, PP, VPP)
        assert src.source_state().state["megatron"]["vpp"] == VPP
        assert {t.name for t in src.tensors()} >= {
            f"decoder.layers.{i}.mlp.linear_fc2.weight" for i in range(LAYERS8)}  # fmt: skip


def test_mixtral_through_expert_parallel_vpp_ranks_is_bit_exact(tmp_path: Path) -> None:
    """Experts and chunks together: HF Mixtral (4 layers) -> TP2xPP2xEP2xVPP2 -> HF."""
    ref = hf_mixtral()
    (tmp_path / "hf").mkdir()
    save_file(ref, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    to_megatron(tmp_path / "hf", meg, {"tp": 2, "pp": 2, "ep": 2, "vpp": 2},
                name_map=load_name_map("hf_mixtral_to_megatron"))  # fmt: skip
    # rank (tp 0, pp 1, ep 1), chunk 1 = stage 3 = layer 3; its local expert 0 is expert 1
    obj = load(meg / "iter_0000000" / "mp_rank_00_001_001" / "model_optim_rng.pt")
    fc2 = obj["model1"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
    w2 = ref["model.layers.3.block_sparse_moe.experts.1.w2.weight"]
    assert torch.equal(fc2, w2[:, : w2.shape[1] // 2])
    convert(str(meg), str(tmp_path / "hf2"), ConvertOptions(
        target_format="hf", name_map=load_name_map("reverse:hf_mixtral_to_megatron")))  # fmt: skip
    got = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


# ------------------------------------------------------------------- optimizer state


def write_vpp_with_optimizer(tmp: Path, tp: int, pp: int, vpp: int) -> Path:
    """``test_convert_megatron``'s optimizer globals (4 layers, bf16 weights, fp32
    masters, Adam moments) as a TP x PP x VPP run with the non-distributed optimizer
    saves them: each rank's Float16OptimizerWithFloat16Params over a real AdamW whose
    param groups run over all model chunks in order (Megatron-Core's
    ``_get_param_groups(model_chunks)``: chunk 0's parameters, then chunk 1's).

    The tensors are cut into chunk shards by converting each kind as if it were the
    weights (the slicing the weight round trips check)."""


    weights, masters, moments = optimizer_globals()
    kinds = {"model": weights, "fp32": masters,
             **{k: {n: m[k] for n, m in moments.items()} for k in ("exp_avg", "exp_avg_sq")}}
    layout = {"tp": tp, "pp": pp, "vpp": vpp}
    cut = {}
    for kind, tensors in kinds.items():
        (tmp / f"hf_{kind}").mkdir()
        save_file(tensors, str(tmp / f"hf_{kind}" / "model.safetensors"))
        to_megatron(tmp / f"hf_{kind}", tmp / f"cut_{kind}", layout, heads=OPT_HEADS)
        cut[kind] = tmp / f"cut_{kind}"
    meg = tmp / "meg_vpp"
    for t in range(tp):
        for p in range(pp):
            local = {kind: load(rank_file(d, t, p))
                     for kind, d in cut.items()}  # fmt: skip
            # every kind's chunks in Megatron's order, under chunk-qualified names
            q = {kind: {f"model{v}.{k}": x for v in range(vpp)
                        for k, x in obj_[f"model{v}"].items()}
                 for kind, obj_ in local.items()}  # fmt: skip
            obj: dict[str, Any] = {
                "args": argparse.Namespace(tensor_model_parallel_size=tp,
                                           pipeline_model_parallel_size=pp,
                                           virtual_pipeline_model_parallel_size=vpp),
                "checkpoint_version": 3.0,
                "iteration": ITER,
                **{f"model{v}": local["model"][f"model{v}"] for v in range(vpp)},
                **optimizer_entries(q["model"], q),
            }  # fmt: skip
            rank_file(meg, t, p, ITER).parent.mkdir(parents=True)
            torch.save(obj, rank_file(meg, t, p, ITER))
    (meg / "latest_checkpointed_iteration.txt").write_text(str(ITER))
    return meg


@pytest.fixture()
def vpp_optimizer(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(TP2xPP2xVPP2 root with the non-distributed optimizer, expected universal)."""
    (tmp_path / "v").mkdir()
    meg = write_vpp_with_optimizer(tmp_path / "v", TP, PP, VPP)
    return meg, _expected_universal(*optimizer_globals())


def _assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


def test_vpp_optimizer_reads_like_the_same_state_without_vpp(
    vpp_optimizer: tuple[Path, dict[str, torch.Tensor]],
    megatron_with_optimizer: tuple[Path, Any],  # noqa: F811  (the imported fixture)
    tmp_path: Path,
) -> None:
    meg, want = vpp_optimizer
    convert(str(meg), str(tmp_path / "uni_vpp"), ConvertOptions(variables=EXPLICIT))
    got = read_universal(str(tmp_path / "uni_vpp"))
    _assert_same(got, want)
    # the very same state saved by a TP2xPP2 run without VPP reads to the same tensors
    plain, _ = megatron_with_optimizer
    convert(str(plain), str(tmp_path / "uni_plain"), ConvertOptions(variables=EXPLICIT))
    _assert_same(got, read_universal(str(tmp_path / "uni_plain")))


def test_vpp_optimizer_written_in_megatron_order_and_read_back(
    vpp_optimizer: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """universal -> TP2xPP2xVPP2 with the optimizer: the file loads into an AdamW built
    over the chunks the Megatron way, and reads back bit-exactly."""
    meg, want = vpp_optimizer
    convert(str(meg), str(tmp_path / "uni"), ConvertOptions(variables=EXPLICIT))
    out = tmp_path / "meg_out"
    to_megatron(tmp_path / "uni", out, {"tp": TP, "pp": PP, "vpp": VPP}, heads=OPT_HEADS)
    convert(str(out), str(tmp_path / "uni2"))
    _assert_same(read_universal(str(tmp_path / "uni2")), want)
    obj = load(rank_file(out, 1, 1, ITER))
    model = {f"model{v}.{k}": w for v in range(VPP) for k, w in obj[f"model{v}"].items()}
    groups = _groups_first_appearance(model)
    params = {k: torch.nn.Parameter(torch.zeros(w.shape)) for k, w in model.items()}
    opt = torch.optim.AdamW([{"params": [params[k] for k in ks]} for ks in groups.values()])
    opt.load_state_dict(obj["optimizer"]["optimizer"])
    _, masters, moments = optimizer_globals()
    # rank (tp 1, pp 1) chunk 1 is stage 3 (4 layers: one per chunk): layer 3
    key = "model1.decoder.layers.0.mlp.linear_fc2.weight"
    glob = moments["decoder.layers.3.mlp.linear_fc2.weight"]["exp_avg"]
    assert torch.equal(opt.state[params[key]]["exp_avg"], glob[:, glob.shape[1] // 2 :])
    fp32 = obj["optimizer"]["fp32_from_fp16_params"]
    i = groups[False].index(key)
    want_master = masters["decoder.layers.3.mlp.linear_fc2.weight"]
    assert torch.equal(fp32[0][i], want_master[:, want_master.shape[1] // 2 :])
    assert obj["opt_param_scheduler"] == SCHED


#: (bucket size, tied embeddings), as in test_convert_megatron_distopt: small buckets
#: (several in chunk 0 of stage 0, none elsewhere), and a tied embedding's own bucket
DIST_LAYOUTS = {"buckets": {"bucket_size": 1100}, "tied": {"bucket_size": None, "tied": True}}


@pytest.mark.parametrize("layout", sorted(DIST_LAYOUTS))
def test_vpp_distributed_optimizer_reads_like_the_non_distributed(
    vpp_optimizer: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, layout: str
) -> None:
    meg, want = vpp_optimizer
    dist = tmp_path / "meg_dist"
    shutil.copytree(meg, dist)
    rewrite_as_distributed(dist, pp=PP, dp=2, **DIST_LAYOUTS[layout])  # type: ignore[arg-type]
    state = torch.load(rank_file(dist, 0, 0, ITER).parent / "distrib_optim.pt",
                       weights_only=True)  # fmt: skip
    assert sorted(k for k in state if isinstance(k, int)) == [0, 1]  # a buffer per chunk
    convert(str(dist), str(tmp_path / "uni"), ConvertOptions(variables=EXPLICIT))
    _assert_same(read_universal(str(tmp_path / "uni")), want)


def test_vpp_distributed_optimizer_with_chunks_swapped_is_an_error(
    vpp_optimizer: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Buffers of chunk 0 and chunk 1 in the wrong order do not fit (sizes differ: the
    embedding is in chunk 0 of stage 0): an error naming the file."""
    meg, _ = vpp_optimizer
    dist = tmp_path / "meg_dist"
    shutil.copytree(meg, dist)
    rewrite_as_distributed(dist, pp=PP, dp=2, bucket_size=None)
    f = rank_file(dist, 0, 0, ITER).parent / "distrib_optim.pt"
    state = torch.load(f, weights_only=True)
    state[0], state[1] = state[1], state[0]
    torch.save(state, f)
    with pytest.raises(SourceFormatError, match=r"distrib_optim\.pt.*model chunk 0"):
        convert(str(dist), str(tmp_path / "uni"), ConvertOptions(variables=EXPLICIT))


# ------------------------------------------------------------------------ bad input


def _edit(f: Path, fn: Any) -> None:
    obj = torch.load(f, weights_only=False)
    fn(obj)
    torch.save(obj, f)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda o: o.pop("model1"), r"lack \['model1'\].*incomplete"),
        (lambda o: o.update(model2=o["model1"]), r"3 model chunk\(s\).*holds 2"),
        (lambda o: o.update(model=o["model0"]), r"both 'model' and model chunks"),
    ],
    ids=["missing-chunk", "extra-chunk", "model-and-chunks"],
)
def test_inconsistent_model_chunks_are_typed_errors_naming_the_file(
    vpp_chain: Path, tmp_path: Path, damage: Any, match: str
) -> None:
    meg = tmp_path / "meg"
    shutil.copytree(vpp_chain / "meg", meg)
    f = rank_file(meg, 1, 1)
    _edit(f, damage)
    with pytest.raises(SourceFormatError, match=match) as e:
        MegatronSource(str(meg), None, 1)
    assert str(f) in str(e.value)


def test_layers_that_do_not_divide_are_typed_errors(vpp_chain: Path, tmp_path: Path) -> None:
    # source: 6 layers cannot be 4 virtual stages; the error names the rank file
    with pytest.raises(SourceFormatError, match=r"6 layers do not divide over pp=2 x vpp=2") as e:
        MegatronSource(str(vpp_chain / "meg"), None, 1, variables={"layers": 6})
    assert "mp_rank_00_000/model_optim_rng.pt" in str(e.value)
    # a chunk holding more local layers than its share (here: 4 layers given for 8)
    with pytest.raises(SourceFormatError, match=r"model chunk 0 holds local layer 1"):
        MegatronSource(str(vpp_chain / "meg"), None, 1, variables={"layers": 4})
    # target: 8 layers over pp=2 x vpp=3
    with pytest.raises(PlanError, match=r"8 layers do not divide over pp=2 x vpp=3"):
        to_megatron(vpp_chain / "uni", tmp_path / "bad", {"tp": 1, "pp": 2, "vpp": 3})
    assert not (tmp_path / "bad").exists()


def test_cli_target_layout_vpp(vpp_chain: Path, tmp_path: Path) -> None:
    """``--target-layout tp=1,pp=2,vpp=4`` from the CLI: 8 layers, one per chunk."""
    from click.testing import CliRunner

    from ckptd.converters.cli import main

    res = CliRunner().invoke(main, [str(vpp_chain / "uni"), str(tmp_path / "m"), "--to",
                                    "megatron", "--target-layout", "tp=1,pp=2,vpp=4",
                                    "--var", f"heads={HEADS}"])  # fmt: skip
    assert res.exit_code == 0, res.output
    models = stage_models(tmp_path / "m", 1, 2, 4)
    uni = read_universal(str(vpp_chain / "uni"))
    for s in range(8):
        name = "decoder.layers.0.mlp.linear_fc2.weight"
        assert torch.equal(models[(0, s)][name], uni[f"decoder.layers.{s}.mlp.linear_fc2.weight"])
