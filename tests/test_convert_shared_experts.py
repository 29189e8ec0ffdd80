"""MoE models with shared experts, router bias and expert biases through ``ckpt-convert``.

A tiny Qwen2-MoE (GQA 4 heads / 2 kv heads with q/k/v biases, 4 layers, every MLP a
top-k mixture of 4 SwiGLU experts plus a gated shared expert of a different width) goes
Hugging Face -> Megatron legacy TP2xPP2xEP2 (``--rename-map hf_qwen2_moe_to_megatron``)
-> universal -> Megatron TP1xPP1xEP4 -> Hugging Face, bit-exactly. The rank files hold
the shared expert as Megatron-core's SharedExpertMLP does (``transformer/moe/
shared_experts.py`` of core 0.16: an MLP on the tensor-parallel group, fc1 column-
parallel with ``[gate_r; up_r]`` per TP rank, fc2 row-parallel, ``gate_weight``
replicated; not expert-parallel: the same tensors on every EP rank under the same
name), and a forward from them (pre-softmax top-k routing, the sigmoid-gated shared
expert) gives the Hugging Face logits.

The same model with the router's ``expert_bias`` buffer (aux-loss-free balancing,
persistent, fp32; ``local_tokens_per_expert`` is not persistent) as a torch_dist
checkpoint in each key form of ``tests/test_convert_megatron_dist_moe.py`` reads back
equal to the legacy source's universal form. A LLaMA-MoE with ``--add-bias-linear``
(dense, router and routed-expert biases) round-trips through TP2xPP2xEP2 rank files
that split the biases as Megatron's column/row-parallel layers do.

``shared_ffn`` is derived from the shapes by the Megatron target and the legacy source.
At the end, the Megatron optimizer around these modules: the shared expert's parameters
in ``named_parameters`` order (``gate_weight`` first), and optimizer state of a model
with the ``expert_bias`` buffer (which has none) written and read back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from megatron_distopt_fixture import rewrite_as_distributed
from models_tiny import megatron_moe_forward, qwen2_moe_forward
from safetensors.torch import load_file, save_file
from test_convert_hf_megatron import (
    HD,
    HEADS,
    HIDDEN,
    KV,
    LAYERS,
    VOCAB,
    _hf_attention,
    _hf_embeddings,
    rank_models_ep,
    seeded_randn,
)
from test_convert_megatron import canonical_moe, rank_model, read_universal
from test_convert_megatron_dist_moe import _ep_ranks, mcore_shards, moe_args, save_dist

import ckpt
from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import PlanError
from ckptd.converters.sources.megatron import RANK_FILE, SIDECAR
from ckptd.converters.sources.namemap import load_name_map
from ckptd.converters.spec import MissingVariableError, compile_spec, load_shipped

EXPERTS, MOE_FFN, SHARED_FFN = 4, 32, 48  # the shared expert is wider, as in Qwen2-MoE
QWEN = "hf_qwen2_moe_to_megatron"
SHARED_GATE = "mlp.shared_expert_gate.weight"
# shared_ffn is derived from the shapes; the fixture passes it as Megatron runs state it,
# and test_shared_ffn_is_derived_from_the_shapes checks that the same files come without
VARS = (("heads", HEADS), ("shared_ffn", SHARED_FFN))


def hf_qwen2_moe() -> dict[str, torch.Tensor]:
    """A tiny Qwen2MoeForCausalLM state dict (names as ``transformers`` saves them)."""
    r = seeded_randn(31)

    w = _hf_embeddings(r)
    s = 1 / math.sqrt(HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        _hf_attention(w, p, r)
        for x, rows in (("q", HEADS * HD), ("k", KV * HD), ("v", KV * HD)):
            w[f"{p}self_attn.{x}_proj.bias"] = r(rows, scale=0.5)
        w[p + "input_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "mlp.gate.weight"] = r(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            b = f"{p}mlp.experts.{e}."
            w[b + "gate_proj.weight"] = r(MOE_FFN, HIDDEN, scale=s)
            w[b + "up_proj.weight"] = r(MOE_FFN, HIDDEN, scale=s)
            w[b + "down_proj.weight"] = r(HIDDEN, MOE_FFN, scale=1 / math.sqrt(MOE_FFN))
        b = p + "mlp.shared_expert."
        w[b + "gate_proj.weight"] = r(SHARED_FFN, HIDDEN, scale=s)
        w[b + "up_proj.weight"] = r(SHARED_FFN, HIDDEN, scale=s)
        w[b + "down_proj.weight"] = r(HIDDEN, SHARED_FFN, scale=1 / math.sqrt(SHARED_FFN))
        w[p + SHARED_GATE] = r(1, HIDDEN, scale=s)
    return w


def _shared_fc1(hf: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The canonical Megatron shared-expert fc1 of ``layer``: [gate; up] rows."""
    h = f"model.layers.{layer}.mlp.shared_expert."
    return torch.cat([hf[h + "gate_proj.weight"], hf[h + "up_proj.weight"]])


def _megatron(src: Path, dst: Path, layout: tuple[tuple[str, int], ...], **kw: object) -> Path:
    convert(str(src), str(dst), ConvertOptions(
        target_format="megatron", target_layout=layout, variables=VARS, **kw))  # type: ignore[arg-type]  # fmt: skip
    return dst


def _ep4_ranks(root: Path) -> dict[tuple[int, int, int], dict[str, torch.Tensor]]:
    """A TP1xPP1xEP4 run's model dicts keyed (tp, pp, ep) like :func:`rank_models_ep`."""
    return {(0, 0, e): m for e, m in _ep_ranks(root, 0).items()}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("qwen2-moe")
    (tmp / "hf").mkdir()
    save_file(hf_qwen2_moe(), str(tmp / "hf" / "model.safetensors"))
    _megatron(tmp / "hf", tmp / "meg222", (("tp", 2), ("pp", 2), ("ep", 2)),
              name_map=load_name_map(QWEN))  # fmt: skip
    convert(str(tmp / "meg222"), str(tmp / "uni"))
    _megatron(tmp / "uni", tmp / "meg114", (("tp", 1), ("pp", 1), ("ep", 4)))
    convert(str(tmp / "meg114"), str(tmp / "hf2"), ConvertOptions(
        target_format="hf", name_map=load_name_map(f"reverse:{QWEN}")))  # fmt: skip
    return tmp


def test_qwen2_moe_round_trip_through_expert_parallel_ranks_is_bit_exact(qwen: Path) -> None:
    ref = hf_qwen2_moe()
    got = load_file(str(qwen / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    # the universal form holds the canonical (unfused per rank) Megatron tensors
    uni = read_universal(str(qwen / "uni"))
    m = "decoder.layers.2.mlp.shared_experts."
    assert torch.equal(uni[m + "linear_fc1.weight"], _shared_fc1(ref, 2))
    assert torch.equal(uni[m + "gate_weight"], ref[f"model.layers.2.{SHARED_GATE}"])
    a = "model.layers.2.self_attn."
    assert torch.equal(uni["decoder.layers.2.self_attention.linear_qkv.bias"],
                       torch.cat([ref[a + f"{x}_proj.bias"] for x in "qkv"]))  # fmt: skip


def test_shared_expert_shards_are_split_as_megatron_does(qwen: Path) -> None:
    ref = hf_qwen2_moe()
    ranks = rank_models_ep(qwen / "meg222")
    assert sorted(ranks) == [(t, p, e) for t in range(2) for p in range(2) for e in range(2)]
    half = SHARED_FFN // 2
    # global layer 3 is local layer 1 of stage 1
    h, b = "model.layers.3.mlp.shared_expert.", "decoder.layers.1.mlp.shared_experts."
    gate, up, down = (ref[h + f"{x}_proj.weight"] for x in ("gate", "up", "down"))
    for (t, p, e), m in ranks.items():
        if p != 1:
            continue
        fc1, fc2 = m[b + "linear_fc1.weight"], m[b + "linear_fc2.weight"]
        # column-parallel fc1 of a gated unit: this tp rank's gate rows, then its up rows
        assert fc1.shape == (2 * half, HIDDEN) and fc2.shape == (HIDDEN, half), (t, e)
        rows = slice(t * half, (t + 1) * half)
        assert torch.equal(fc1, torch.cat([gate[rows], up[rows]])), (t, e)
        assert torch.equal(fc2, down[:, rows]), (t, e)  # row-parallel: input columns
        # the gate is [1, hidden] and whole on every rank; nothing is expert-numbered
        assert torch.equal(m[b + "gate_weight"], ref[f"model.layers.3.{SHARED_GATE}"])
        assert not [k for k in m if "shared_experts" in k and "local_experts" in k]
    # replicated over EP: EP rank 1 holds the very same shared expert as EP rank 0
    for t in range(2):
        for k, v in ranks[(t, 1, 0)].items():
            if ".local_experts." not in k:
                assert torch.equal(ranks[(t, 1, 1)][k], v), (t, k)
    # EP rank 1 holds routed experts 2 and 3 as its local 0 and 1
    m = ranks[(1, 1, 1)]
    e3 = "model.layers.3.mlp.experts.3."
    mine = m["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
    rows = slice(MOE_FFN // 2, MOE_FFN)
    assert torch.equal(mine, torch.cat([ref[e3 + "gate_proj.weight"][rows],
                                        ref[e3 + "up_proj.weight"][rows]]))  # fmt: skip
    # tp rank 1 holds query group 1's biases: [q heads 2, 3; k head 1; v head 1]
    a = "model.layers.3.self_attn."
    q, k, v = (ref[a + f"{x}_proj.bias"] for x in "qkv")
    assert torch.equal(m["decoder.layers.1.self_attention.linear_qkv.bias"],
                       torch.cat([q[2 * HD:], k[HD:], v[HD:]]))  # fmt: skip
    # TP1xPP1xEP4: one routed expert per EP rank, the whole shared expert on each
    ep4 = _ep4_ranks(qwen / "meg114")
    assert sorted(os.listdir(qwen / "meg114" / "iter_0000000")) == [
        f"mp_rank_00_{e:03d}" for e in range(4)]
    for (_, _, e), m in ep4.items():
        assert {k.split(".")[6] for k in m if ".local_experts." in k} == {"0"}
        assert torch.equal(m["decoder.layers.3.mlp.shared_experts.linear_fc1.weight"],
                           torch.cat([gate, up])), e  # fmt: skip
        w = m["decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.weight"]
        assert torch.equal(w, ref[f"model.layers.3.mlp.experts.{e}.down_proj.weight"]), e


@pytest.mark.parametrize("top_k", [1, 2])
def test_qwen2_moe_forward_equal_from_hf_and_megatron_ranks(qwen: Path, top_k: int) -> None:
    ids = torch.tensor([3, 17, 99, 0, 42, 42, 7, 64, 5, 88, 23, 51])
    ref = hf_qwen2_moe()
    want = qwen2_moe_forward(ref, ids, HEADS, KV, top_k)
    for name, ranks in (("meg222", rank_models_ep(qwen / "meg222")),
                        ("meg114", _ep4_ranks(qwen / "meg114"))):  # fmt: skip
        got = megatron_moe_forward(ranks, ids, HEADS, KV, VOCAB, top_k, pre_softmax=True)
        assert got.shape == (len(ids), VOCAB)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    # the shared expert, its gate and the q/k/v biases all take part in the logits
    for edit in ("mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight",
                 "self_attn.k_proj.bias"):  # fmt: skip
        changed = dict(ref)
        for i in range(LAYERS):
            n = f"model.layers.{i}.{edit}"
            changed[n] = torch.zeros_like(ref[n])
        assert not torch.allclose(qwen2_moe_forward(changed, ids, HEADS, KV, top_k), want), edit


def test_shared_experts_need_their_width(qwen: Path, tmp_path: Path) -> None:
    """The width of the shared expert's gate/up parts is a spec variable: the Megatron
    formats derive it from the shapes, but a source that derives no variables (the
    universal format) needs it to split linear_fc1 by name map, and says which to pass."""
    with pytest.raises(MissingVariableError, match=r"'shared_ffn' has no value.*pass shared_ffn="):
        convert(str(qwen / "uni"), str(tmp_path / "hf"), ConvertOptions(
            target_format="hf", name_map=load_name_map(f"reverse:{QWEN}"),
            variables=(("heads", HEADS), ("kv_heads", KV), ("head_dim", HD),
                       ("moe_ffn", MOE_FFN))))  # fmt: skip
    key = "decoder.layers.0.mlp.shared_experts.linear_fc1.weight"
    spec = compile_spec(load_shipped("megatron_llama"), {"tp": 2, "layers": LAYERS},
                        coords={"tp": 1})  # fmt: skip
    with pytest.raises(MissingVariableError, match="shared_ffn"):
        spec.layout_for([key])
    spec = compile_spec(load_shipped("megatron_llama"), {"tp": 2, "layers": LAYERS,
                                                         "shared_ffn": 6}, coords={"tp": 1})
    assert spec.layout_for([key]).rules[key] == ckpt.Fused(0, parts=(6, 6), index=1, count=2)


def test_shared_ffn_is_derived_from_the_shapes(qwen: Path, tmp_path: Path) -> None:
    """No ``--var shared_ffn`` anywhere: the Megatron target derives it from the canonical
    shared fc1 (rows / 2), the legacy source from a rank's TP shard of it (rows / 2 x TP),
    also without the sidecar (rank files as Megatron-LM writes them); an explicit --var
    still wins."""
    ref = hf_qwen2_moe()
    heads = (("heads", HEADS),)
    meg = tmp_path / "meg"
    convert(str(qwen / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("pp", 2), ("ep", 2)),
        variables=heads, name_map=load_name_map(QWEN)))  # fmt: skip
    side = json.loads((meg / SIDECAR).read_text())
    assert side["variables"]["shared_ffn"] == SHARED_FFN
    # the very rank files that --var shared_ffn gave, in the same order
    want = rank_models_ep(qwen / "meg222")
    got = rank_models_ep(meg)
    assert got.keys() == want.keys()
    for r, m in want.items():
        assert list(got[r]) == list(m), r
        assert all(torch.equal(got[r][k], t) for k, t in m.items()), r
    # HF -> Megatron -> universal -> Megatron (TP1xPP1xEP4) -> HF
    convert(str(meg), str(tmp_path / "uni"))
    uni = read_universal(str(tmp_path / "uni"))
    assert all(torch.equal(uni[n], t) for n, t in read_universal(str(qwen / "uni")).items())
    convert(str(tmp_path / "uni"), str(tmp_path / "meg114"), ConvertOptions(
        target_format="megatron", target_layout=(("ep", 4),), variables=heads))  # fmt: skip
    rev = load_name_map(f"reverse:{QWEN}")
    convert(str(tmp_path / "meg114"), str(tmp_path / "hf"),
            ConvertOptions(target_format="hf", name_map=rev))  # fmt: skip
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert back.keys() == ref.keys() and all(torch.equal(back[n], t) for n, t in ref.items())
    # without the sidecar the legacy source reads the width off a TP shard (48 of 96 rows
    # of [gate_r; up_r] on each of 2 TP ranks): the reverse map splits fc1 with it
    (meg / SIDECAR).unlink()
    given = tuple((k, v) for k, v in side["variables"].items()
                  if k not in ("shared_ffn", "experts", "moe_ffn"))  # fmt: skip
    convert(str(meg), str(tmp_path / "hf2"), ConvertOptions(
        target_format="hf", name_map=rev, variables=given))  # fmt: skip
    back = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert back.keys() == ref.keys() and all(torch.equal(back[n], t) for n, t in ref.items())
    # an explicit --var wins over the shapes (here a wrong one, so the split fails)
    with pytest.raises(PlanError, match="fused parts sum to 32"):
        convert(str(tmp_path / "uni"), str(tmp_path / "bad"), ConvertOptions(
            target_format="megatron", variables=(*heads, ("shared_ffn", 16))))  # fmt: skip


# ------------------------------------------- torch_dist with shared experts, expert_bias


@pytest.fixture(scope="module")
def with_expert_bias(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The Qwen2-MoE model plus a router ``expert_bias`` per layer as legacy TP2xPP2xEP2
    rank files, their universal form, and one torch_dist directory per key form."""
    tmp = tmp_path_factory.mktemp("qwen2-moe-dist")
    tensors = read_universal(str(qwen / "uni"))
    g = torch.Generator().manual_seed(5)
    bias = {f"decoder.layers.{i}.mlp.router.expert_bias": torch.randn(EXPERTS, generator=g)
            for i in range(LAYERS)}  # fmt: skip
    (tmp / "canon").mkdir()
    save_file({**tensors, **bias}, str(tmp / "canon" / "model.safetensors"))
    meg = _megatron(tmp / "canon", tmp / "meg", (("tp", 2), ("pp", 2), ("ep", 2)))
    assert rank_models_ep(meg)[(1, 1, 1)]["decoder.layers.0.mlp.router.expert_bias"].dtype == (
        torch.float32)
    convert(str(meg), str(tmp / "uni"))
    dists = {}
    for form in ("sequential", "grouped", "singleton"):
        args = moe_args(None if form == "grouped" else EXPERTS)  # grouped: from the shapes
        if form != "grouped":
            args.moe_shared_expert_intermediate_size = SHARED_FFN
            args.moe_router_enable_expert_bias = True
        shards = mcore_shards(meg, form, LAYERS)
        keys = {k for k, _, _ in shards}
        layer = "decoder.layers.0." if form == "singleton" else "decoder.layers."
        fc1 = f"{layer}mlp.shared_experts.linear_fc1.weight"
        want = {f"{fc1}_w", f"{fc1}_v"} if form == "singleton" else {fc1}  # SwiGLU factory
        want |= {f"{layer}mlp.shared_experts.{n}" for n in ("linear_fc2.weight", "gate_weight")}
        assert want | {f"{layer}mlp.router.expert_bias"} <= keys, form
        dists[form] = tmp / f"dist-{form}"
        save_dist(dists[form], shards, args)
    return {"legacy": read_universal(str(tmp / "uni")), "bias": bias, "dist": dists}


@pytest.mark.parametrize("form", ["sequential", "grouped", "singleton"])
def test_torch_dist_with_shared_experts_and_expert_bias(with_expert_bias, tmp_path, form):
    dist = with_expert_bias["dist"][form]
    convert(str(dist), str(tmp_path / "u"))
    got, legacy = read_universal(str(tmp_path / "u")), with_expert_bias["legacy"]
    assert got.keys() == legacy.keys()
    for n, t in legacy.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    for n, t in with_expert_bias["bias"].items():
        assert torch.equal(got[n], t), n
    ref = hf_qwen2_moe()
    for i in range(LAYERS):
        h, m = f"model.layers.{i}.mlp.shared_expert.", f"decoder.layers.{i}.mlp.shared_experts."
        assert torch.equal(got[m + "linear_fc2.weight"], ref[h + "down_proj.weight"]), i
        assert torch.equal(got[m + "linear_fc1.weight"], _shared_fc1(ref, i)), i
    # shared_ffn comes from common.pt's args or, without them, the shapes: the reverse
    # map can cut the shared expert's fc1 with no --var
    convert(str(dist), str(tmp_path / "hf"), ConvertOptions(
        target_format="hf", name_map=load_name_map(f"reverse:{QWEN}")))  # fmt: skip
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for n, t in ref.items():
        assert torch.equal(back[n], t), n
    # expert_bias has no Qwen2-MoE name: it passes through under its Megatron name
    assert sorted(set(back) - set(ref)) == sorted(with_expert_bias["bias"])


# ------------------------------------------------- --add-bias-linear (routed-expert biases)

LHEADS, LKV, LHEAD_DIM, LHIDDEN, LFFN, LMOE_FFN = 4, 2, 8, 32, 48, 16  # canonical_moe()'s


def canonical_moe_biased() -> dict[str, torch.Tensor]:
    """``canonical_moe()`` (layers 1 and 3 MoE with 2 experts) with every bias
    ``--add-bias-linear`` gives Megatron-core: linear_qkv, linear_proj, the dense MLP, the
    router, each expert's fc1/fc2; plus the router's fp32 ``expert_bias``."""
    g = torch.Generator().manual_seed(13)
    out = canonical_moe()
    qkv_rows = (LHEADS + 2 * LKV) * LHEAD_DIM
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        out[p + "self_attention.linear_qkv.bias"] = torch.randn(qkv_rows, generator=g)
        out[p + "self_attention.linear_proj.bias"] = torch.randn(LHIDDEN, generator=g)
        if p + "mlp.router.weight" not in out:
            out[p + "mlp.linear_fc1.bias"] = torch.randn(2 * LFFN, generator=g)
            out[p + "mlp.linear_fc2.bias"] = torch.randn(LHIDDEN, generator=g)
            continue
        out[p + "mlp.router.bias"] = torch.randn(2, generator=g)
        out[p + "mlp.router.expert_bias"] = torch.randn(2, generator=g)
        for e in range(2):
            b = f"{p}mlp.experts.local_experts.{e}."
            out[b + "linear_fc1.bias"] = torch.randn(2 * LMOE_FFN, generator=g)
            out[b + "linear_fc2.bias"] = torch.randn(LHIDDEN, generator=g)
    return out


def test_expert_biases_round_trip_split_as_megatron_does(tmp_path: Path) -> None:
    ref = canonical_moe_biased()
    (tmp_path / "hf").mkdir()
    save_file(ref, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    convert(str(tmp_path / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("pp", 2), ("ep", 2)),
        variables=(("heads", LHEADS),)))  # fmt: skip
    # global layer 3 (MoE) is local layer 1 of stage 1; global expert 1 is EP rank 1's 0
    g3, b = "decoder.layers.3.", "decoder.layers.1."
    e_g, e_l = g3 + "mlp.experts.local_experts.1.", b + "mlp.experts.local_experts.0."
    half = LMOE_FFN // 2
    fc1_b = ref[e_g + "linear_fc1.bias"]
    for t in range(2):
        m = rank_model(str(meg), f"mp_rank_{t:02d}_001_001")
        # column-parallel gated fc1: [gate_t; up_t]; row-parallel fc2: the whole bias
        want = torch.cat([fc1_b[t * half:(t + 1) * half],
                          fc1_b[LMOE_FFN + t * half:LMOE_FFN + (t + 1) * half]])  # fmt: skip
        assert torch.equal(m[e_l + "linear_fc1.bias"], want), t
        assert torch.equal(m[e_l + "linear_fc2.bias"], ref[e_g + "linear_fc2.bias"]), t
        for n in ("mlp.router.bias", "mlp.router.expert_bias", "self_attention.linear_proj.bias"):
            assert torch.equal(m[b + n], ref[g3 + n]), (t, n)
    # a dense layer's fc1 bias is split like its gated weight (layer 0, tp rank 1)
    m = rank_model(str(meg), "mp_rank_01_000_000")
    dense = ref["decoder.layers.0.mlp.linear_fc1.bias"]
    assert torch.equal(m["decoder.layers.0.mlp.linear_fc1.bias"],
                       torch.cat([dense[LFFN // 2:LFFN], dense[LFFN + LFFN // 2:]]))  # fmt: skip
    convert(str(meg), str(tmp_path / "u"))
    got = read_universal(str(tmp_path / "u"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    convert(str(tmp_path / "u"), str(tmp_path / "meg1"), ConvertOptions(
        target_format="megatron", variables=(("heads", LHEADS),)))  # fmt: skip
    assert rank_model(str(tmp_path / "meg1"), "mp_rank_00").keys() == ref.keys()
    convert(str(tmp_path / "meg1"), str(tmp_path / "u1"))
    again = read_universal(str(tmp_path / "u1"))
    assert all(torch.equal(again[n], t) for n, t in ref.items())


# ------------------------------------------- the Megatron optimizer: order, buffers


def test_shared_expert_keys_in_megatron_named_parameters_order(qwen: Path) -> None:
    """The optimizer state Megatron resumes from is indexed in named_parameters order:
    a module's own parameters, then its submodules' in registration order."""
    m = rank_models_ep(qwen / "meg222")[(0, 0, 0)]
    b = "decoder.layers.0.mlp.shared_experts."
    assert [k for k in m if k.startswith(b)] == [
        b + "gate_weight", b + "linear_fc1.weight", b + "linear_fc2.weight"]


def test_expert_bias_buffer_has_no_optimizer_state(tmp_path: Path) -> None:
    """A bf16 model whose routers keep an fp32 ``expert_bias`` buffer (Megatron-core's
    ``_maintain_float32_expert_bias``): the target writes optimizer state for the
    parameters only, and the legacy source reads it back, from the non-distributed
    optimizer and from the distributed one (whose grad buffers hold no buffer)."""
    weights = {k: v if k.endswith(".expert_bias") else v.to(torch.bfloat16)
               for k, v in canonical_moe_biased().items()}  # fmt: skip
    full = dict(weights)
    g = torch.Generator().manual_seed(17)
    for n, t in weights.items():
        if n.endswith(".expert_bias"):
            continue  # a persistent buffer: saved with the model, not optimized
        full[f"optim.state.{n}.exp_avg"] = torch.randn(t.shape, generator=g)
        full[f"optim.state.{n}.exp_avg_sq"] = torch.randn(t.shape, generator=g).abs()
        full[f"optim.state.{n}.step"] = torch.tensor(3.0)
        full[f"optim.state.{n}.fp32"] = torch.randn(t.shape, generator=g)
    (tmp_path / "hf").mkdir()
    save_file(full, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    convert(str(tmp_path / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("ep", 2)),
        variables=(("heads", LHEADS),)))  # fmt: skip
    obj = torch.load(meg / "iter_0000000" / "mp_rank_01_001" / RANK_FILE, weights_only=True)
    bias = "decoder.layers.1.mlp.router.expert_bias"
    assert obj["model"][bias].dtype == torch.float32
    # Megatron's indices: the dense optimizer's params in model order, expert_bias skipped
    dense = [k for k in obj["model"] if ".experts." not in k and not k.endswith("expert_bias")]
    sd = obj["optimizer"][0]["optimizer"]
    assert sum(len(grp["params"]) for grp in sd["param_groups"]) == len(sd["state"]) == len(dense)
    # optimizer state given for the buffer is refused rather than dropped unseen
    (tmp_path / "bad").mkdir()
    save_file({**full, f"optim.state.{bias}.exp_avg": torch.zeros(2)},
              str(tmp_path / "bad" / "model.safetensors"))  # fmt: skip
    with pytest.raises(PlanError, match="a buffer"):
        convert(str(tmp_path / "bad"), str(tmp_path / "meg-bad"), ConvertOptions(
            target_format="megatron", variables=(("heads", LHEADS),)))  # fmt: skip
    for u in ("u", "u-distopt"):
        if u == "u-distopt":
            rewrite_as_distributed(meg, pp=1, dp=2, bucket_size=300, expert_parallel=True)
        convert(str(meg), str(tmp_path / u))
        got = read_universal(str(tmp_path / u))
        assert got.keys() == full.keys(), u
        for n, t in full.items():
            assert got[n].dtype == t.dtype and torch.equal(got[n], t), (u, n)
