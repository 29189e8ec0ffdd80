"""Megatron-core ``torch_dist`` MoE (expert-parallel) checkpoints through ``ckpt-convert``.

A tiny Mixtral (GQA, padded vocabulary, 4 layers, every MLP a mixture of 4 SwiGLU
experts) goes Hugging Face -> legacy Megatron TP2xPP2xEP2 rank files (the converter's
Megatron target, tested elsewhere), and every rank's local tensors get the keys and
global offsets Megatron-core's ``sharded_state_dict`` gives them (the fixture follows
``transformer/moe/experts.py`` of core 0.16):

- ``sequential``: ``SequentialMLP`` in a homogeneous block: one ``ShardedTensor`` per
  local expert under ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight``, axes
  ``(layer, global expert = ep_rank * local_experts + local index, ...)``, fc1's gate/up
  halves at fragments ``tp`` and ``TP + tp`` of ``2 * TP`` (the SwiGLU factory), fc2
  split on its last axis; optimizer ``fp32_param`` in the flattened form.
- ``grouped``: ``GroupedMLP``: the same key and global shape, one shard per (layer, EP
  rank, TP fragment) holding all the rank's experts; optimizer state in model space, and
  a ``common.pt`` without the MoE args (experts and moe_ffn come from the shapes).
- ``singleton``: ``singleton_local_shards``: layer-numbered keys, one key per global
  expert (``...mlp.experts.experts.<g>.linear_fc1.weight_w`` / ``_v`` for gate / up),
  dense fc1 split the same way.

Router (``mlp.router.weight``) and ``pre_mlp_layernorm`` are replicated (one writer).
The torch_dist -> universal result must equal the legacy -> universal one bit for bit
(per-expert tensors ``decoder.layers.{i}.mlp.experts.local_experts.{g}.*`` with the
global index), and torch_dist -> Megatron TP1xEP2 and -> Hugging Face Mixtral must equal
what the originals give. A model whose MoE layers interleave with dense ones
(``moe_layer_freq=2``: Megatron-core then writes layer-numbered keys) reads back equal to
its canonical tensors, and unknown expert layouts are typed errors naming the key.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_hf_megatron import (
    HEADS,
    HIDDEN,
    KV,
    LAYERS,
    VOCAB,
    hf_mixtral,
    rank_models_ep,
)
from test_convert_megatron import canonical_moe, read_universal
from test_convert_megatron_dist import _LAYER, assemble, flattened, write_aux
from test_convert_megatron_dist import TP_AXIS as DENSE_TP_AXIS

from ckptd.converters.convert import ConvertOptions, convert, plan_conversion
from ckptd.converters.sources import detect_source
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.megatron_dist_keys import MoEKeyError, Part
from ckptd.converters.sources.namemap import load_name_map

TP, PP, EP = 2, 2, 2
EXPERTS, MOE_FFN, FFN = 4, 32, 96
MIXTRAL = "hf_mixtral_to_megatron"
KINDS = (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("fp32_param", "fp32"))
TP_AXIS = {  # the dense model's tensor-parallel axes, plus:
    **DENSE_TP_AXIS,
    # Qwen2-MoE-like models (tests/test_convert_shared_experts.py): the qkv bias splits
    # like its weight; SharedExpertMLP is an MLP on the tp group (fc1 gated, fc2 row)
    "self_attention.linear_qkv.bias": 0,
    "mlp.shared_experts.linear_fc1.weight": 0,
    "mlp.shared_experts.linear_fc2.weight": 1,
}
#: gated fc1 weights, which MLP.sharded_state_dict saves through the SwiGLU factory
GLU_FC1 = ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")

Shard = tuple[str, tuple[int, ...], tuple[torch.Tensor, tuple[int, ...]]]  # key, gshape, ...


def hf_moe(experts: int = EXPERTS) -> dict[str, torch.Tensor]:
    """A tiny MixtralForCausalLM state dict with ``experts`` SwiGLU experts per layer."""
    return hf_mixtral(experts, MOE_FFN, seed=23)


def _to_megatron(src: Path, dst: Path, layout: tuple[tuple[str, int], ...], **kw: object) -> Path:
    opts = ConvertOptions(target_format="megatron", target_layout=layout,
                          variables=(("heads", HEADS),), **kw)  # type: ignore[arg-type]  # fmt: skip
    convert(str(src), str(dst), opts)
    return dst


def _safetensors(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def mcore_shards(
    meg: Path, form: str, layers: int, prefix: str = "", only: tuple[int, int, int] | None = None
) -> list[Shard]:
    """The shards Megatron-core's ``sharded_state_dict`` gives the TP2xPP2xEP2 rank files
    of ``meg`` (keys without layer numbers for a homogeneous block unless ``singleton``
    or ``numbered``), replicas written once (lowest tp / ep rank, as ``replica_id`` 0);
    ``only``: those of one (tp, pp, ep) rank."""
    local_layers = layers // PP
    out: list[Shard] = []
    # GroupedMLP: (key, global shape, layer, ep, row, col) -> [(global expert, local)]
    grouped: dict[tuple[object, ...], list[tuple[int, torch.Tensor]]] = {}
    for (tp, pp, ep), model in sorted(rank_models_ep(meg).items()):
        if only is not None and (tp, pp, ep) != only:
            continue
        per = 1 + max((int(m.group(1)) for k in model for m in [_EXPERT.match(_sub(k))] if m),
                      default=-1)  # fmt: skip
        experts = per * EP
        for key, t in model.items():
            m = _LAYER.match(key)
            layer = int(m.group(1)) + pp * local_layers if m else None
            sub = m.group(2) if m else key
            x = _EXPERT.match(sub) if m else None
            if x is None:  # dense: replicated over EP, Megatron writes replica 0 only
                if ep == 0 and (TP_AXIS.get(sub) is not None or tp == 0):
                    out += _dense(key, sub, layer, t, tp, form, layers, prefix)
                continue
            assert layer is not None
            g, param = ep * per + int(x.group(1)), x.group(2)
            for gkey, gshape, (local, off) in _expert(layer, g, param, t, tp, form, layers,
                                                     experts, prefix):  # fmt: skip
                if form != "grouped":
                    out.append((gkey, gshape, (local, off)))
                    continue
                # the rank's experts in one tensor on the expert axis
                grouped.setdefault((gkey, gshape, layer, ep, *off[2:]), []).append((g, local))
    for (gkey, gshape, layer, _, *rest), parts in grouped.items():
        parts.sort(key=lambda p: p[0])
        local = torch.cat([t for _, t in parts], dim=1)
        out.append((gkey, gshape, (local, (layer, parts[0][0], *rest))))  # type: ignore[arg-type]
    return out


def _sub(key: str) -> str:
    m = _LAYER.match(key)
    return m.group(2) if m else key


def _halves(t: torch.Tensor, tp: int) -> list[tuple[torch.Tensor, int, int]]:
    """SwiGLU factory: (gate, offset, size), (up, offset, size) on the fused axis 0."""
    gate, up = torch.chunk(t, 2, dim=0)
    n = gate.shape[0]
    return [(gate, tp * n, 2 * TP * n), (up, (TP + tp) * n, 2 * TP * n)]


def _dense(key: str, sub: str, layer: int | None, t: torch.Tensor, tp: int, form: str,
           layers: int, prefix: str) -> list[Shard]:  # fmt: skip
    axis = TP_AXIS.get(sub)
    if sub in GLU_FC1 and form == "singleton":  # _w / _v, each whole
        gate, up = torch.chunk(t, 2, dim=0)
        n = gate.shape[0]
        base = f"{prefix}decoder.layers.{layer}.{sub}"
        return [(f"{base}_{h}", (TP * n, t.shape[1]), (x, (tp * n, 0)))
                for h, x in (("w", gate), ("v", up))]  # fmt: skip
    if sub in GLU_FC1:
        pieces = _halves(t, tp)
    elif axis is not None:
        pieces = [(t, tp * t.shape[axis], TP * t.shape[axis])]
    else:
        pieces = [(t, 0, 0)]
    out: list[Shard] = []
    for local, off, size in pieces:
        shape, offsets = list(local.shape), [0] * local.dim()
        if axis is not None:
            shape[axis], offsets[axis] = size, off
        if layer is None:
            out.append((f"{prefix}{key}", tuple(shape), (local, tuple(offsets))))
        elif form == "singleton" or form == "numbered":
            out.append((f"{prefix}decoder.layers.{layer}.{sub}", tuple(shape),
                        (local, tuple(offsets))))  # fmt: skip
        else:  # stacked on the layer axis
            out.append((f"{prefix}decoder.layers.{sub}", (layers, *shape),
                        (local[None], (layer, *offsets))))  # fmt: skip
    return out


def _expert(layer: int, g: int, param: str, t: torch.Tensor, tp: int, form: str, layers: int,
            experts: int, prefix: str) -> list[Shard]:  # fmt: skip
    """One local expert tensor of expert ``g``: fc1 [gate; up] rows split over TP, fc2
    columns split over TP."""
    if param == "linear_fc1.weight":
        pieces = [(x, (off, 0), (size, t.shape[1])) for x, off, size in _halves(t, tp)]
    else:
        c = t.shape[1]
        pieces = [(t, (0, tp * c), (t.shape[0], TP * c))]
    if form == "singleton":
        base = f"{prefix}decoder.layers.{layer}.mlp.experts.experts.{g}.{param}"
        if param == "linear_fc1.weight":
            n = pieces[0][0].shape[0]
            return [(f"{base}_{h}", (TP * n, t.shape[1]), (x, (tp * n, 0)))
                    for h, (x, _, _) in zip("wv", pieces, strict=True)]  # fmt: skip
        return [(base, size, (x, off)) for x, off, size in pieces]
    if form == "numbered":
        key = f"{prefix}decoder.layers.{layer}.mlp.experts.experts.{param}"
        return [(key, (experts, *size), (x[None], (g, *off))) for x, off, size in pieces]
    key = f"{prefix}decoder.layers.mlp.experts.experts.{param}"
    return [(key, (layers, experts, *size), (x[None, None], (layer, g, *off)))
            for x, off, size in pieces]  # fmt: skip


def moe_args(experts: int | None) -> argparse.Namespace:
    """common.pt ``args``; without ``experts`` no MoE entries (derived from the shapes)."""
    a = argparse.Namespace(num_attention_heads=HEADS, num_query_groups=KV,
                           group_query_attention=True, num_layers=LAYERS, hidden_size=HIDDEN,
                           ffn_hidden_size=FFN, vocab_size=VOCAB)  # fmt: skip
    if experts is not None:
        a.num_experts, a.moe_ffn_hidden_size, a.expert_model_parallel_size = experts, MOE_FFN, EP
    return a


def save_dist(root: Path, shards: list[Shard], args: argparse.Namespace, it: int = 100) -> None:
    import torch.distributed.checkpoint as dcp

    state = assemble(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(root / f"iter_{it:07d}"), no_dist=True)
    write_aux(root, it, args=args)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Originals, legacy TP2xPP2xEP2 files, their universal form, optimizer references and
    one torch_dist directory per form."""
    tmp = tmp_path_factory.mktemp("mdist-moe")
    hf = _safetensors(tmp / "hf", hf_moe())
    layout = (("tp", TP), ("pp", PP), ("ep", EP))
    meg = _to_megatron(hf, tmp / "meg", layout, name_map=load_name_map(MIXTRAL))
    convert(str(meg), str(tmp / "uni-legacy"))
    legacy_u = read_universal(str(tmp / "uni-legacy"))
    opt: dict[str, dict[str, torch.Tensor]] = {}
    opt_meg: dict[str, Path] = {}
    for i, (kind, _) in enumerate(KINDS):
        g = torch.Generator().manual_seed(200 + i)
        opt[kind] = {n: torch.randn(t.shape, generator=g) for n, t in legacy_u.items()}
        src = _safetensors(tmp / f"opt-{kind}", opt[kind])
        opt_meg[kind] = _to_megatron(src, tmp / f"meg-{kind}", layout)
    dists = {}
    for form in ("sequential", "grouped", "singleton"):
        shards = mcore_shards(meg, form, LAYERS)
        for kind, _ in KINDS:
            pre = f"optimizer.state.{kind}."
            if kind == "fp32_param" and form != "grouped":  # GroupedMLP: no flattened form
                shards += flattened(mcore_shards(opt_meg[kind], form, LAYERS), pre)
            else:
                shards += mcore_shards(opt_meg[kind], form, LAYERS, pre)
        dists[form] = tmp / f"dist-{form}"
        save_dist(dists[form], shards, moe_args(None if form == "grouped" else EXPERTS))
    return {"tmp": tmp, "hf": hf, "meg": meg, "legacy": legacy_u, "opt": opt, "dist": dists}


FORMS = ["sequential", "grouped", "singleton"]


@pytest.mark.parametrize("form", FORMS)
def test_moe_to_universal_equals_legacy_and_originals(moe, tmp_path, form):
    root = moe["dist"][form]
    assert detect_source(str(root)) == "megatron_dist"
    res = convert(str(root), str(tmp_path / "u"))
    assert res.plan.source_step == 100
    got = read_universal(str(tmp_path / "u"))
    legacy_u = moe["legacy"]
    weights = {n: t for n, t in got.items() if not n.startswith("optim.")}
    assert weights.keys() == legacy_u.keys()
    for name, t in legacy_u.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t), name
    # per-expert tensors with the global expert index, equal to the HF originals
    ref = hf_moe()
    for i in range(LAYERS):
        for e in range(EXPERTS):
            b, h = (f"decoder.layers.{i}.mlp.experts.local_experts.{e}.",
                    f"model.layers.{i}.block_sparse_moe.experts.{e}.")  # fmt: skip
            want = torch.cat([ref[h + "w1.weight"], ref[h + "w3.weight"]])
            assert torch.equal(got[b + "linear_fc1.weight"], want), (i, e)
            assert torch.equal(got[b + "linear_fc2.weight"], ref[h + "w2.weight"]), (i, e)
        assert torch.equal(got[f"decoder.layers.{i}.mlp.router.weight"],
                           ref[f"model.layers.{i}.block_sparse_moe.gate.weight"])  # fmt: skip
    for kind, suffix in KINDS:
        for name, t in moe["opt"][kind].items():
            assert torch.equal(got[f"optim.state.{name}.{suffix}"], t), (form, kind, name)
    assert len(got) == 4 * len(legacy_u)


def test_moe_to_megatron_tp1_ep2_equals_originals(moe, tmp_path):
    """torch_dist -> legacy TP1xPP1xEP2 rank files equal HF -> TP1xPP1xEP2 ones."""
    layout = (("tp", 1), ("ep", 2))
    ref_dir = _to_megatron(moe["hf"], tmp_path / "ref", layout, name_map=load_name_map(MIXTRAL))
    got_dir = _to_megatron(moe["dist"]["sequential"], tmp_path / "meg", layout,
                           weights_only=True)  # fmt: skip
    want, got = _ep_ranks(ref_dir, 0), _ep_ranks(got_dir, 100)
    assert sorted(got) == sorted(want) == [0, 1]  # mp_rank_00_000, mp_rank_00_001
    for rank, model in want.items():
        assert list(got[rank]) == list(model), rank  # Megatron's named_parameters order
        for k, t in model.items():
            assert got[rank][k].dtype == t.dtype and torch.equal(got[rank][k], t), (rank, k)
    # EP rank 1 holds global experts 2 and 3 as its local 0 and 1
    e1 = got[1]
    assert {k.split(".")[6] for k in e1 if ".local_experts." in k} == {"0", "1"}
    ref = hf_moe()["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    assert torch.equal(e1["decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"], ref)


def _ep_ranks(root: Path, it: int) -> dict[int, dict[str, torch.Tensor]]:
    """Model dicts of a TP1xPP1xEPn run (``mp_rank_00_EEE``) by EP rank."""
    d = root / f"iter_{it:07d}"
    out = {}
    for name in sorted(os.listdir(d)):
        obj = torch.load(d / name / "model_optim_rng.pt", weights_only=True)
        out[int(name.removeprefix("mp_rank_00_"))] = obj["model"]
    return out


@pytest.mark.parametrize("form", ["sequential", "singleton"])
def test_moe_to_hf_mixtral_equals_originals(moe, tmp_path, form):
    # through a weights-only universal checkpoint: build_plan applies a name map before it
    # drops optimizer names, and the Mixtral map has no rules for optim.state.*
    convert(str(moe["dist"][form]), str(tmp_path / "u"), ConvertOptions(weights_only=True))
    variables = (("heads", HEADS), ("kv_heads", KV), ("head_dim", HIDDEN // HEADS),
                 ("moe_ffn", MOE_FFN))  # fmt: skip
    opts = ConvertOptions(target_format="hf", variables=variables,
                          name_map=load_name_map(f"reverse:{MIXTRAL}"))  # fmt: skip
    convert(str(tmp_path / "u"), str(tmp_path / "hf"), opts)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ref = hf_moe()
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


def test_variables_from_args_or_shapes(moe, tmp_path):
    seq = plan_conversion(str(moe["dist"]["sequential"]), str(tmp_path / "a"),
                          ConvertOptions(weights_only=True))  # fmt: skip
    grp = plan_conversion(str(moe["dist"]["grouped"]), str(tmp_path / "b"),
                          ConvertOptions(weights_only=True))  # fmt: skip
    for plan in (seq, grp):
        assert plan.to_json()["tensors"] == len(moe["legacy"])
    from ckptd.converters.sources.megatron_dist import MegatronDistSource

    for form in ("sequential", "grouped"):  # grouped: common.pt without num_experts
        src = MegatronDistSource(str(moe["dist"][form]), None, 1)
        assert src.variables["experts"] == EXPERTS and src.variables["moe_ffn"] == MOE_FFN


# ---------------------------------------------------- MoE layers between dense layers


def test_interleaved_moe_and_dense_layers(tmp_path):
    """moe_layer_freq=2 (layers 1 and 3 MoE): Megatron-core writes layer-numbered keys;
    they read back to the canonical tensors, optimizer state included."""
    from test_convert_megatron import HEADS as H
    from test_convert_megatron import HIDDEN as HID
    from test_convert_megatron import KV as KVH

    ref = canonical_moe()
    layout = (("tp", TP), ("pp", PP), ("ep", EP))
    meg = _to_megatron(_safetensors(tmp_path / "c", ref), tmp_path / "meg", layout)
    g = torch.Generator().manual_seed(7)
    avg = {n: torch.randn(t.shape, generator=g) for n, t in ref.items()}
    meg_avg = _to_megatron(_safetensors(tmp_path / "c-avg", avg), tmp_path / "meg-avg", layout)
    shards = mcore_shards(meg, "numbered", 4)
    shards += flattened(mcore_shards(meg_avg, "numbered", 4), "optimizer.state.exp_avg.")
    keys = {k for k, _, _ in shards}
    assert "decoder.layers.3.mlp.experts.experts.linear_fc1.weight" in keys
    assert "decoder.layers.2.mlp.linear_fc1.weight" in keys
    args = argparse.Namespace(num_attention_heads=H, num_query_groups=KVH, num_layers=4,
                              hidden_size=HID, ffn_hidden_size=48, vocab_size=100)  # fmt: skip
    save_dist(tmp_path / "dist", shards, args)
    convert(str(tmp_path / "dist"), str(tmp_path / "u"))
    got = read_universal(str(tmp_path / "u"))
    assert got.keys() == set(ref) | {f"optim.state.{n}.exp_avg" for n in ref}
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
        assert torch.equal(got[f"optim.state.{n}.exp_avg"], avg[n]), n


# ------------------------------------------------------------------------ errors


def _rewrite(moe, tmp_path: Path, form: str, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of torch_dist ``form`` with its global state edited by ``edit(state)``."""
    import torch.distributed.checkpoint as dcp

    src = moe["dist"][form] / "iter_0000100"
    state = {}
    md = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    for k, item in md.items():
        if hasattr(item, "size"):
            state[k] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(src), no_dist=True)
        state = {k: v for k, v in state.items() if not k.startswith("optimizer.")}
        edit(state)
        root = tmp_path / "bad"
        dcp.save(state, checkpoint_id=str(root / "iter_0000100"), no_dist=True)
    shutil.copy(src / "common.pt", root / "iter_0000100" / "common.pt")
    shutil.copy(src / "metadata.json", root / "iter_0000100" / "metadata.json")
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    return root


FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def _grouped_raw(state: dict[str, torch.Tensor]) -> None:
    """GroupedMLP's raw ``weight1`` ([hidden, experts * 2 ffn]) under the sharded key."""
    t = state.pop(FC1)
    state[FC1] = t.permute(0, 3, 1, 2).reshape(t.shape[0], t.shape[3], -1).contiguous()


def _local_index(state: dict[str, torch.Tensor]) -> None:
    t = state.pop(FC1)
    for e in range(t.shape[1]):
        state[f"decoder.layers.mlp.experts.local_experts.{e}.linear_fc1.weight"] = t[:, e].clone()


def _fewer_experts(state: dict[str, torch.Tensor]) -> None:
    state[FC1] = state[FC1][:, :3].clone()


def _unknown_param(state: dict[str, torch.Tensor]) -> None:
    state["decoder.layers.mlp.experts.experts.linear_fc3.weight"] = state[FC1].clone()


def _gate_without_up(state: dict[str, torch.Tensor]) -> None:
    del state["decoder.layers.1.mlp.experts.experts.2.linear_fc1.weight_v"]


@pytest.mark.parametrize(
    "form, edit, error, match",
    [
        ("sequential", _grouped_raw, MoEKeyError,
         rf"'{FC1}': shape \[4, 64, 256\] is not \[layers, experts, out, in\]"),
        ("sequential", _local_index, MoEKeyError,
         r"'decoder\.layers\.mlp\.experts\.local_experts\.0\.linear_fc1\.weight': a per-expert "
         r"key with a local expert index"),
        ("sequential", _fewer_experts, MoEKeyError,
         r"decoder\.layers\.0: linear_fc1\.weight of experts \[0, 1, 2\] \(from "
         rf"\['{FC1}'\]\) does not match the router \(4 experts\)"),
        ("sequential", _unknown_param, MoEKeyError,
         r"'decoder\.layers\.mlp\.experts\.experts\.linear_fc3\.weight': unknown expert key"),
        ("singleton", _gate_without_up, SourceFormatError,
         r"'decoder\.layers\.1\.mlp\.experts\.local_experts\.2\.linear_fc1\.weight': expected "
         r"one key or a gate/up pair"),
    ],
)  # fmt: skip
def test_unknown_expert_layouts_are_typed_errors(moe, tmp_path, form, edit, error, match):
    bad = _rewrite(moe, tmp_path, form, edit)
    with pytest.raises(error, match=match) as e:
        plan_conversion(str(bad), str(tmp_path / "u"), ConvertOptions())
    assert isinstance(e.value, SourceFormatError) and "iter_0000100" in str(e.value)


def test_partly_written_tensor_is_a_typed_error(moe, tmp_path):
    """A stacked key whose chunks cover only some layers (MoE layers between dense ones
    saved stacked) must not read unwritten memory."""
    import pickle

    bad = tmp_path / "bad"
    shutil.copytree(moe["dist"]["sequential"], bad)
    path = bad / "iter_0000100" / ".metadata"
    md = pickle.loads(path.read_bytes())
    md.state_dict_metadata[FC1].chunks.clear()
    path.write_bytes(pickle.dumps(md))
    with pytest.raises(SourceFormatError, match=rf"'{FC1}': its chunks hold 0 of 65536"):
        plan_conversion(str(bad), str(tmp_path / "u"), ConvertOptions())


def test_fragment_holding_several_experts():
    """Flattened state whose expert axis is cut per EP rank (2 experts a fragment)."""
    full = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).reshape(2, 4, 6, 3)
    frags = (2, 2, 2, 1)  # layers, EP ranks, fc1 halves, columns
    local = [s // f for s, f in zip(full.shape, frags, strict=True)]
    stored = torch.empty(*frags, math.prod(local))
    for idx in torch.cartesian_prod(*(torch.arange(f) for f in frags)).tolist():
        box = tuple(slice(i * n, (i + 1) * n) for i, n in zip(idx, local, strict=True))
        stored[tuple(idx)] = full[box].reshape(-1)
    for layer in range(2):
        for e in range(4):
            p = Part("k", (layer, e), (2, 4), (6, 3), frags)
            offsets, lengths = p.box()
            box = tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))
            assert torch.equal(p.finish(stored[box].clone()), full[layer, e]), (layer, e)


# ----------------------------------------------------------- 4 gloo ranks (slow)


def _save_rank(rank: int, world: int, meg: str, form: str, path: str) -> None:
    """Megatron ranks ``r % world == rank`` on one gloo rank: their shards as
    ``ShardedTensor`` s (one chunk per shard, as Megatron-core writes), then dcp.save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard as TShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    ranks = [(t, p, e) for p in range(PP) for e in range(EP) for t in range(TP)]
    mine: list[Shard] = []
    for i, r in enumerate(ranks):
        if i % world == rank:
            mine += mcore_shards(Path(meg), form, LAYERS, only=r)
    keys = dict.fromkeys((k, s) for k, s, _ in mcore_shards(Path(meg), form, LAYERS))
    state = {}
    for key, gshape in keys:  # every rank, every key, same order (a collective)
        local = [TShard.from_tensor_and_offsets(t.contiguous(), list(off), rank)
                 for k, _, (t, off) in mine if k == key]  # fmt: skip
        state[key] = init_from_local_shards(local, *gshape, process_group=dist.group.WORLD)
    dcp.save(state, checkpoint_id=path)


def _body(p, meg: str, form: str, path: str) -> None:  # type: ignore[no-untyped-def]
    p.phase(4, _save_rank, meg, form, path)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["sequential", "grouped"])
def test_four_gloo_ranks_expert_shards(moe, tmp_path, form):
    """Chunks per (layer, expert, TP fragment) or per (layer, EP rank, TP fragment)."""
    from mp_harness import run
    from torch.distributed.checkpoint import FileSystemReader

    root = tmp_path / "td4"
    d = root / "iter_0000007"
    run(_body, 4, (str(moe["meg"]), form, str(d)), timeout=120)
    write_aux(root, 7, args=moe_args(EXPERTS))
    convert(str(root), str(tmp_path / "u"))
    got = read_universal(str(tmp_path / "u"))
    assert got.keys() == moe["legacy"].keys()
    for name, t in moe["legacy"].items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    md = FileSystemReader(str(d)).read_metadata().state_dict_metadata
    fc1 = md["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    per_layer = EXPERTS if form == "sequential" else EP
    assert len(fc1.chunks) == LAYERS * per_layer * 2 * TP  # gate and up fragments
