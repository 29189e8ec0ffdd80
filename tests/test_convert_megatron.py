"""Megatron legacy per-rank checkpoints <-> universal through ``ckpt-convert``.

A tiny LLaMA-like model (GQA 4 heads / 2 kv heads, SwiGLU, vocab 100 padded to
128 * tp, 4 layers) in canonical Megatron names goes HF safetensors -> Megatron
TP2xPP2 -> universal -> Megatron TP1xPP4 -> universal, bit-exactly.
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
