"""Hugging Face names <-> Megatron fused tensors through a spec name map.

A tiny LLaMA with real HF names (GQA 4 heads / 2 kv heads, SwiGLU, vocab 100 padded to
128 * tp, 4 layers) goes HF safetensors -> Megatron legacy TP2xPP2 (q/k/v and gate/up
merged into linear_qkv and linear_fc1) -> universal -> Megatron TP1xPP4 -> HF
safetensors (split again), bit-exactly; a pure-torch forward from the HF weights and a
Megatron-style TP forward from the TP2xPP2 rank files give the same logits. GPT-2 names
(Conv1D weights transposed) go the same way. A tiny Mixtral (the same attention, every
MLP a top-k mixture of 2 experts) goes HF -> Megatron TP2xPP2xEP2 -> universal ->
Megatron TP1xPP4 -> HF bit-exactly, with equal logits from HF and from both sets of
rank files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models_tiny import (
    llama_forward,
    megatron_llama_forward,
    megatron_moe_forward,
    mixtral_forward,
)
from safetensors.torch import load_file, save_file

from ckptd.converters.convert import ConvertOptions, build_plan, convert
from ckptd.converters.sources.base import TensorInfo
from ckptd.converters.sources.namemap import Segment, load_name_map
from ckptd.converters.spec import SpecError
from ckptd.converters.spec.mapping import SpecNameMap
from ckptd.converters.targets.universal import UniversalTarget

HEADS, KV, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 64, 96, 100, 4
HD = HIDDEN // HEADS


def _hf_embeddings(r: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding, final norm and LM head of a tiny HF LLaMA-family model."""
    return {
        "model.embed_tokens.weight": r(VOCAB, HIDDEN),
        "model.norm.weight": 1 + r(HIDDEN, scale=0.1),
        "lm_head.weight": r(VOCAB, HIDDEN, scale=1 / 8),
    }


def _hf_attention(w: dict[str, torch.Tensor], p: str, r: Callable[..., torch.Tensor]) -> None:
    """Layer prefix ``p``'s GQA projections, into ``w``."""
    s = 1 / math.sqrt(HIDDEN)
    w[p + "self_attn.q_proj.weight"] = r(HEADS * HD, HIDDEN, scale=s)
    w[p + "self_attn.k_proj.weight"] = r(KV * HD, HIDDEN, scale=s)
    w[p + "self_attn.v_proj.weight"] = r(KV * HD, HIDDEN, scale=s)
    w[p + "self_attn.o_proj.weight"] = r(HIDDEN, HEADS * HD, scale=s)


def seeded_randn(seed: int, dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    """``r(*shape, scale=1.0)``: normal values times ``scale`` from one seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return r


def hf_llama(dtype: torch.dtype = torch.float32, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    r = seeded_randn(3, dtype)

    w = _hf_embeddings(r)
    s = 1 / math.sqrt(HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        _hf_attention(w, p, r)
        w[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN, scale=s)
        w[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN, scale=s)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN, scale=1 / math.sqrt(FFN))
        w[p + "input_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
    return w


def rank_models(root: Path, it: int = 0) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    out = {}
    for d in sorted(os.listdir(root / f"iter_{it:07d}")):
        _, _, t, *p = d.split("_")
        obj = torch.load(root / f"iter_{it:07d}" / d / "model_optim_rng.pt", weights_only=True)
        out[(int(t), int(p[0]) if p else 0)] = obj["model"]
    return out


def to_megatron(hf: Path, dst: Path, tp: int, pp: int, **kw: object) -> None:
    convert(str(hf), str(dst), ConvertOptions(
        target_format="megatron", target_layout=(("tp", tp), ("pp", pp)),
        variables=(("heads", HEADS),), name_map=load_name_map("hf_llama_to_megatron"), **kw))  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def llama_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("llama")
    ref = hf_llama()
    (tmp / "hf").mkdir()
    save_file(ref, str(tmp / "hf" / "model.safetensors"))
    to_megatron(tmp / "hf", tmp / "meg22", 2, 2)
    convert(str(tmp / "meg22"), str(tmp / "uni"))
    convert(str(tmp / "uni"), str(tmp / "meg14"), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 4)),
        variables=(("heads", HEADS),)))  # fmt: skip
    convert(str(tmp / "meg14"), str(tmp / "hf2"), ConvertOptions(
        target_format="hf", name_map=load_name_map("reverse:hf_llama_to_megatron")))  # fmt: skip
    return {"root": tmp}


def test_llama_round_trip_is_bit_exact(llama_chain: dict[str, Path]) -> None:
    root = llama_chain["root"]
    ref = hf_llama()
    got = load_file(str(root / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


def test_megatron_files_hold_fused_gqa_tensors(llama_chain: dict[str, Path]) -> None:
    ranks = rank_models(llama_chain["root"] / "meg22")
    assert sorted(ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ref = hf_llama()
    p = "model.layers.2."
    q, k, v = (ref[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
    # tp rank 1 holds query group 1: [q heads 2, 3; k head 1; v head 1]; layer 2 is
    # local layer 0 of stage 1
    qkv = ranks[(1, 1)]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.cat([q[2 * HD:], k[HD:], v[HD:]]))
    fc1 = ranks[(0, 1)]["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = ref[p + "mlp.gate_proj.weight"], ref[p + "mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[: FFN // 2], up[: FFN // 2]]))
    emb = ranks[(0, 0)]["embedding.word_embeddings.weight"]
    assert emb.shape == (128, HIDDEN) and not emb[VOCAB:].any()


def test_forward_equal_from_hf_and_from_megatron_ranks(llama_chain: dict[str, Path]) -> None:
    ids = torch.tensor([3, 17, 99, 0, 42, 42, 7, 64])
    want = llama_forward(hf_llama(), ids, HEADS, KV)
    got = megatron_llama_forward(rank_models(llama_chain["root"] / "meg22"), ids, HEADS, KV,
                                 VOCAB)
    assert want.shape == got.shape == (len(ids), VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and a wrong GQA order would be caught: swapping the kv heads changes the logits
    swapped = hf_llama()
    for i in range(LAYERS):
        kname = f"model.layers.{i}.self_attn.k_proj.weight"
        swapped[kname] = torch.cat([swapped[kname][HD:], swapped[kname][:HD]])
    assert not torch.allclose(llama_forward(swapped, ids, HEADS, KV), want)


def test_plan_merges_and_splits_with_segments(tmp_path: Path) -> None:
    inv = [TensorInfo(n, "float32", tuple(t.shape)) for n, t in hf_llama().items()]
    target = UniversalTarget(str(tmp_path / "u"), _opts())
    moves, dropped, _ = build_plan(inv, target, load_name_map("hf_llama_to_megatron"), False)
    by = {m.target: m for m in moves}
    qkv = by["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((HEADS + 2 * KV) * HD, HIDDEN) and not dropped
    assert [s.source.split(".")[-2] for s in qkv.segments] == ["q_proj", "k_proj", "v_proj"]
    assert [s.offset for s in qkv.segments] == [0, HEADS * HD, (HEADS + KV) * HD]
    assert len(moves) == 3 + 6 * LAYERS
    # backwards: linear_qkv splits into three parts, sized from the variables
    canon = [TensorInfo(m.target, m.dtype, m.shape) for m in moves]
    rev = load_name_map("reverse:hf_llama_to_megatron")
    with pytest.raises(SpecError, match="needs the model variables"):
        build_plan(canon, target, rev, False)
    variables = {"heads": HEADS, "kv_heads": KV, "head_dim": HD, "ffn": FFN}
    back, _, _ = build_plan(canon, target, rev, False, variables)
    assert {m.target: m.shape for m in back} == {i.name: i.shape for i in inv}
    v = next(m for m in back if m.target == "model.layers.1.self_attn.v_proj.weight")
    assert v.segments == (Segment("decoder.layers.1.self_attention.linear_qkv.weight", 0, 0,
                                  (HEADS + KV) * HD, KV * HD),)


def _opts():  # type: ignore[no-untyped-def]
    from ckptd.converters.targets.base import TargetOptions

    return TargetOptions()


def _plan(names: dict[str, tuple[int, ...]], spec: str, variables=None):  # type: ignore[no-untyped-def]
    inv = [TensorInfo(n, "float32", s) for n, s in names.items()]
    target = UniversalTarget("/nonexistent/u", _opts())
    return build_plan(inv, target, SpecNameMap(spec), False, variables)


MERGE = """vars: heads, kv = heads, hd
rename: a.{i}.q -> b.{i}.qkv[q]
rename: a.{i}.k -> b.{i}.qkv[k]
rename: a.{i}.v -> b.{i}.qkv[v]
b.{i}.qkv : fused(dim=0, parts=[q: heads * hd, k: kv * hd, v: kv * hd], groups=kv) split(dim=0)
"""


def test_bad_merges_are_located_errors() -> None:
    ok = {"a.0.q": (8, 4), "a.0.k": (4, 4), "a.0.v": (4, 4)}
    moves, _, _ = _plan(ok, MERGE)
    assert moves[0].shape == (16, 4)
    with pytest.raises(SpecError, match=r"<string>:5:1: cannot merge 'b.0.qkv': no source "
                       r"tensor for part\(s\) v") as e:
        _plan({"a.0.q": (8, 4), "a.0.k": (4, 4)}, MERGE)
    assert e.value.line == 5 and e.value.column == 1
    with pytest.raises(SpecError, match=r"<string>:3:30: cannot merge 'b.0.qkv': part 'k' "
                       "should be 2 long on dim 0"):
        _plan(ok, MERGE, {"heads": 4, "kv": 1, "hd": 2})
    with pytest.raises(SpecError, match=r"<string>:3:30: cannot merge 'b.0.qkv' on dim 0: "
                       r"part 'k' \(a.0.k\) has shape \[4, 5\]"):
        _plan({**ok, "a.0.k": (4, 5)}, MERGE)
    bad_part = MERGE.replace("qkv[v]", "qkv[w]")
    with pytest.raises(SpecError, match=r"<string>:4:30: the fused rule .* has no part 'w'"):
        _plan(ok, bad_part)
    not_fused = MERGE.replace("fused(dim=0, parts=[q: heads * hd, k: kv * hd, v: kv * hd], "
                              "groups=kv) split(dim=0)", "split(dim=0)")
    with pytest.raises(SpecError, match=r"<string>:2:30: 'b.0.qkv' is renamed to a part, but "
                       "its rule .* is not fused"):
        _plan(ok, not_fused)
    twice = MERGE + "rename: a.{i}.q2 -> b.{i}.qkv[q]\n"
    with pytest.raises(SpecError, match=r"<string>:6:31: source tensors 'a.0.q' and 'a.0.q2' "
                       r"both map to part \[q\]"):
        _plan({**ok, "a.0.q2": (8, 4)}, twice)
    with pytest.raises(SpecError, match="matched by no rule"):
        _plan({**ok, "a.0.z": (1,)}, MERGE)


def test_bad_splits_are_located_errors() -> None:
    with pytest.raises(SpecError, match=r"<string>:4:60: cannot split 'b.0.qkv': no rename "
                       r"produces part \[v\]"):
        SpecNameMap(MERGE.replace("rename: a.{i}.v -> b.{i}.qkv[v]\n", ""), reverse=True
                    ).map_inventory([TensorInfo("b.0.qkv", "float32", (16, 4))],
                                    {"heads": 4, "kv": 2, "hd": 2})
    with pytest.raises(SpecError, match=r"<string>:5:1: cannot split 'b.0.qkv': its dim 0 is "
                       "12 long, the fused parts sum to 16"):
        SpecNameMap(MERGE, reverse=True).map_inventory(
            [TensorInfo("b.0.qkv", "float32", (12, 4))], {"heads": 4, "kv": 2, "hd": 2})
    expr = "rename: a.{i}.w -> b.{i + 1}.w\nb.{i}.w : replicate\n"
    with pytest.raises(SpecError, match=r"<string>:1:23: a rename target with an expression "
                       "cannot be reversed"):
        SpecNameMap(expr, reverse=True).map_inventory([TensorInfo("b.1.w", "float32", (2,))])
    got = SpecNameMap(MERGE, reverse=True).map_inventory(
        [TensorInfo("b.3.qkv", "float32", (16, 4))], {"heads": 4, "kv": 2, "hd": 2})
    assert [(m.target.name, m.target.shape) for m in got.tensors] == [
        ("a.3.q", (8, 4)), ("a.3.k", (4, 4)), ("a.3.v", (4, 4))]


def test_transpose_option_is_checked() -> None:
    with pytest.raises(SpecError, match=r"<string>:1:22: unknown rename option 'flip'"):
        _plan({"a.w": (2, 3)}, "rename: a.w -> b.w : flip\nb.w : replicate\n")
    with pytest.raises(SpecError, match=r"<string>:1:22: 'a.w' has shape \[2\]: transpose "
                       "needs a 2-D tensor"):
        _plan({"a.w": (2,)}, "rename: a.w -> b.w : transpose\nb.w : replicate\n")
    moves, _, _ = _plan({"a.w": (2, 3)}, "rename: a.w -> b.w : transpose\nb.w : replicate\n")
    assert moves[0].shape == (3, 2) and moves[0].segments[0].transpose


# ------------------------------------------------------------------------------ GPT-2


def hf_gpt2(layers: int = 4, hidden: int = 32, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    w = {"transformer.wte.weight": r(vocab, hidden), "transformer.wpe.weight": r(16, hidden),
         "transformer.ln_f.weight": r(hidden), "transformer.ln_f.bias": r(hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        w.update({p + "ln_1.weight": r(hidden), p + "ln_1.bias": r(hidden),
                  p + "attn.c_attn.weight": r(hidden, 3 * hidden), p + "attn.c_attn.bias":
                  r(3 * hidden), p + "attn.c_proj.weight": r(hidden, hidden),
                  p + "attn.c_proj.bias": r(hidden), p + "ln_2.weight": r(hidden),
                  p + "ln_2.bias": r(hidden), p + "mlp.c_fc.weight": r(hidden, 4 * hidden),
                  p + "mlp.c_fc.bias": r(4 * hidden), p + "mlp.c_proj.weight":
                  r(4 * hidden, hidden), p + "mlp.c_proj.bias": r(hidden)})  # fmt: skip
    return w


def test_gpt2_round_trip_transposes_conv1d(tmp_path: Path) -> None:
    ref = hf_gpt2()
    (tmp_path / "hf").mkdir()
    save_file(ref, str(tmp_path / "hf" / "model.safetensors"))
    convert(str(tmp_path / "hf"), str(tmp_path / "meg"), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("pp", 2)), spec="megatron_gpt",
        variables=(("heads", 4),), name_map=load_name_map("hf_gpt2_to_megatron")))  # fmt: skip
    ranks = rank_models(tmp_path / "meg")
    c_fc = ref["transformer.h.3.mlp.c_fc.weight"]  # [in, out]: Megatron holds out rows
    assert torch.equal(ranks[(1, 1)]["decoder.layers.1.mlp.linear_fc1.weight"], c_fc.T[64:])
    c_attn = ref["transformer.h.0.attn.c_attn.weight"].T  # [q; k; v], per-head interleave
    want = torch.cat([c_attn[0:8], c_attn[32:40], c_attn[64:72]])  # [q_h0; k_h0; v_h0]
    assert torch.equal(ranks[(0, 0)]["decoder.layers.0.self_attention.linear_qkv.weight"][:24],
                       want)
    convert(str(tmp_path / "meg"), str(tmp_path / "hf2"), ConvertOptions(
        target_format="hf", spec="megatron_gpt",
        name_map=load_name_map("reverse:hf_gpt2_to_megatron")))  # fmt: skip
    got = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert torch.equal(got[n], t), n


def test_cli_rename_map_spec(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ckptd.converters.cli import main

    (tmp_path / "hf").mkdir()
    save_file(hf_llama(), str(tmp_path / "hf" / "model.safetensors"))
    run = CliRunner().invoke
    res = run(main, [str(tmp_path / "hf"), str(tmp_path / "meg"), "--to", "megatron",
                     "--target-layout", "tp=2,pp=2", "--var", f"heads={HEADS}",
                     "--rename-map", "hf_llama_to_megatron"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = run(main, [str(tmp_path / "meg"), str(tmp_path / "back"), "--to", "hf",
                     "--rename-map", "reverse:hf_llama_to_megatron"])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in hf_llama().items())
    res = run(main, [str(tmp_path / "hf"), str(tmp_path / "u"), "--rename-map",
                     "no_such_spec"])  # fmt: skip
    assert res.exit_code == 1 and "no shipped spec" in res.output


# ----------------------------------------------------------------- Mixtral (2 experts)

EXPERTS, MOE_FFN = 2, 32


def hf_mixtral(
    experts: int = EXPERTS, moe_ffn: int = MOE_FFN, seed: int = 11
) -> dict[str, torch.Tensor]:
    """A tiny MixtralForCausalLM state dict: GQA, padded vocab, ``experts`` SwiGLU
    experts of width ``moe_ffn`` per layer."""
    r = seeded_randn(seed)

    w = _hf_embeddings(r)
    s = 1 / math.sqrt(HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        _hf_attention(w, p, r)
        w[p + "input_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "block_sparse_moe.gate.weight"] = r(experts, HIDDEN)
        for e in range(experts):
            b = f"{p}block_sparse_moe.experts.{e}."
            w[b + "w1.weight"] = r(moe_ffn, HIDDEN, scale=s)
            w[b + "w3.weight"] = r(moe_ffn, HIDDEN, scale=s)
            w[b + "w2.weight"] = r(HIDDEN, moe_ffn, scale=1 / math.sqrt(moe_ffn))
    return w


def rank_models_ep(root: Path, it: int = 0) -> dict[tuple[int, int, int], dict[str, torch.Tensor]]:
    """Rank files keyed (tp, pp, ep), the directory names read as Megatron writes them:
    ``mp_rank_TT_PPP_EEE`` here (pp and ep > 1) or ``mp_rank_TT_PPP`` (ep == 1)."""
    out = {}
    for d in sorted(os.listdir(root / f"iter_{it:07d}")):
        t, *rest = (int(x) for x in d.removeprefix("mp_rank_").split("_"))
        p, e = [*rest, 0, 0][:2]
        obj = torch.load(root / f"iter_{it:07d}" / d / "model_optim_rng.pt", weights_only=True)
        out[(t, p, e)] = obj["model"]
    return out


@pytest.fixture(scope="module")
def mixtral_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mixtral")
    (tmp / "hf").mkdir()
    save_file(hf_mixtral(), str(tmp / "hf" / "model.safetensors"))
    convert(str(tmp / "hf"), str(tmp / "meg222"), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 2), ("pp", 2), ("ep", 2)),
        variables=(("heads", HEADS),),
        name_map=load_name_map("hf_mixtral_to_megatron")))  # fmt: skip
    convert(str(tmp / "meg222"), str(tmp / "uni"))
    convert(str(tmp / "uni"), str(tmp / "meg14"), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 4)),
        variables=(("heads", HEADS),)))  # fmt: skip
    convert(str(tmp / "meg14"), str(tmp / "hf2"), ConvertOptions(
        target_format="hf", name_map=load_name_map("reverse:hf_mixtral_to_megatron")))  # fmt: skip
    return tmp


def test_mixtral_round_trip_through_expert_parallel_ranks_is_bit_exact(
    mixtral_chain: Path,
) -> None:
    ref = hf_mixtral()
    got = load_file(str(mixtral_chain / "hf2" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


def test_mixtral_megatron_files_place_experts_by_ep_rank(mixtral_chain: Path) -> None:
    dirs = sorted(os.listdir(mixtral_chain / "meg222" / "iter_0000000"))
    assert dirs == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                    for e in range(2)]  # fmt: skip
    ranks = rank_models_ep(mixtral_chain / "meg222")
    ref = hf_mixtral()
    # global layer 3 is local layer 1 of stage 1; global expert 1 is local expert 0 of EP
    # rank 1; tp rank 1 holds the second half of its gate and up rows
    m = ranks[(1, 1, 1)]
    assert {k.split(".")[6] for k in m if ".local_experts." in k} == {"0"}
    b = "model.layers.3.block_sparse_moe.experts.1."
    half = MOE_FFN // 2
    want = torch.cat([ref[b + "w1.weight"][half:], ref[b + "w3.weight"][half:]])
    assert torch.equal(m["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"], want)
    assert torch.equal(m["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"],
                       ref[b + "w2.weight"][:, half:])  # fmt: skip
    assert torch.equal(m["decoder.layers.1.mlp.router.weight"],
                       ref["model.layers.3.block_sparse_moe.gate.weight"])  # fmt: skip
    assert torch.equal(m["decoder.layers.1.pre_mlp_layernorm.weight"],
                       ref["model.layers.3.post_attention_layernorm.weight"])  # fmt: skip
    # dense tensors are on both EP ranks, identical
    for k, v in ranks[(0, 0, 0)].items():
        if ".local_experts." not in k:
            assert torch.equal(ranks[(0, 0, 1)][k], v), k
    assert sorted(os.listdir(mixtral_chain / "meg14" / "iter_0000000")) == [
        f"mp_rank_00_{p:03d}" for p in range(4)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_forward_equal_from_hf_and_megatron_ranks(mixtral_chain: Path,
                                                          top_k: int) -> None:
    ids = torch.tensor([3, 17, 99, 0, 42, 42, 7, 64, 5, 88, 23, 51])
    ref = hf_mixtral()
    want = mixtral_forward(ref, ids, HEADS, KV, top_k)
    for d in ("meg222", "meg14"):
        got = megatron_moe_forward(rank_models_ep(mixtral_chain / d), ids, HEADS, KV, VOCAB,
                                   top_k)  # fmt: skip
        assert got.shape == (len(ids), VOCAB)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=d)
    back = load_file(str(mixtral_chain / "hf2" / "model.safetensors"))
    assert torch.equal(mixtral_forward(back, ids, HEADS, KV, top_k), want)
    # the routing is live: every expert gets tokens (silencing one changes the logits),
    # and swapping two experts' weights (not the router) changes the logits
    for e in range(EXPERTS):
        silenced = dict(ref)
        for i in range(LAYERS):
            w2 = f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"
            silenced[w2] = torch.zeros_like(ref[w2])
        assert not torch.allclose(mixtral_forward(silenced, ids, HEADS, KV, top_k), want)
    swapped = dict(ref)
    for n in ("w1", "w2", "w3"):
        a, b = (f"model.layers.1.block_sparse_moe.experts.{e}.{n}.weight" for e in (0, 1))
        swapped[a], swapped[b] = ref[b], ref[a]
    assert not torch.allclose(mixtral_forward(swapped, ids, HEADS, KV, top_k), want)
