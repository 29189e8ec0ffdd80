"""Megatron-core ``torch_dist`` checkpoints -> universal through ``ckpt-convert``.

The fixture writes a torch_dist directory the way Megatron-core's ``dist_checkpointing``
does, starting from the legacy TP2xPP2 rank files of the tiny LLaMA (GQA, SwiGLU,
vocab padded to 128 * tp) of ``test_convert_megatron``: every rank's local tensors get
the global offsets Megatron-core's ``sharded_state_dict`` gives them (layers stacked on a
leading ``num_layers`` axis under keys without the layer number, TP shards at
``tp_rank * local`` on their TP axis, SwiGLU ``linear_fc1`` chunked into gate/up
fragments ``r`` and ``tp + r`` of ``2 * tp``), then ``dcp.save`` writes them -- in one
process as global tensors, or on 4 gloo ranks as ``ShardedTensor`` s with one shard per
(layer, rank) like Megatron-core (slow test). The converted universal checkpoint must
equal the one converted from the legacy files, bit for bit.

Optimizer state: the same model-space form for ``exp_avg``/``exp_avg_sq`` and
Megatron-core's flattened ``fully_sharded_model_space`` form for ``fp32_param``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import save_file
from test_convert_megatron import FFN, HEADS, canonical, read_universal

from ckptd.converters.convert import ConvertOptions, convert, plan_conversion
from ckptd.converters.sources import detect_source
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.megatron_dist import MegatronDistFormatError

TP, PP, LAYERS = 2, 2, 4
LOCAL_LAYERS = LAYERS // PP
TP_AXIS = {  # Megatron-core's tensor-parallel axis per parameter (None: replicated)
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")

Shard = tuple[torch.Tensor, tuple[int, ...]]  # local tensor, global offsets


def legacy(tmp_path, name: str, tensors: dict[str, torch.Tensor]):
    """HF safetensors -> legacy Megatron TP2xPP2 through the converter's Megatron target."""
    hf = tmp_path / f"hf-{name}"
    hf.mkdir()
    save_file(tensors, str(hf / "model.safetensors"))
    meg = tmp_path / f"meg-{name}"
    opts = ConvertOptions(
        target_format="megatron",
        target_layout=(("tp", TP), ("pp", PP)),
        variables=(("heads", HEADS),),
    )
    convert(str(hf), str(meg), opts)
    return meg


def mcore_shards(meg, prefix: str = "") -> Iterator[tuple[int, str, tuple[int, ...], Shard]]:
    """(writer rank, key, global shape, shard) as Megatron-core's sharded_state_dict."""
    for pp in range(PP):
        for tp in range(TP):
            rank = pp * TP + tp
            f = meg / "iter_0000000" / f"mp_rank_{tp:02d}_{pp:03d}" / "model_optim_rng.pt"
            model = torch.load(f, weights_only=True)["model"]
            for key, t in model.items():
                m = _LAYER.match(key)
                sub = m.group(2) if m else key
                axis = TP_AXIS.get(sub)
                if axis is None and tp != 0:
                    continue  # replicated: Megatron dedups by replica_id, one writer
                pieces: list[tuple[torch.Tensor, int, int]] = []  # tensor, tp offset, tp size
                if sub == "mlp.linear_fc1.weight":  # swiglu factory: gate/up fragments
                    gate, up = torch.chunk(t, 2, dim=0)
                    n = gate.shape[0]
                    pieces = [(gate, tp * n, 2 * TP * n), (up, (TP + tp) * n, 2 * TP * n)]
                elif axis is not None:
                    n = t.shape[axis]
                    pieces = [(t, tp * n, TP * n)]
                else:
                    pieces = [(t, 0, 0)]
                for local, off, size in pieces:
                    shape, offsets = list(local.shape), [0] * local.dim()
                    if axis is not None:
                        shape[axis], offsets[axis] = size, off
                    if m:  # stacked: prepend the global layer axis
                        layer = int(m.group(1)) + pp * LOCAL_LAYERS
                        gkey = f"{prefix}decoder.layers.{sub}"
                        yield rank, gkey, (LAYERS, *shape), (local[None], (layer, *offsets))
                    else:
                        yield rank, f"{prefix}{key}", tuple(shape), (local, tuple(offsets))


def flattened(shards: list[tuple[str, tuple[int, ...], Shard]], prefix: str):
    """Megatron-core's flattened form: global shape (*fragments, chunk numel)."""
    out = []
    for key, gshape, (local, offsets) in shards:
        frags = tuple(g // n for g, n in zip(gshape, local.shape, strict=True))
        idx = tuple(o // n for o, n in zip(offsets, local.shape, strict=True))
        flat = local.reshape(*([1] * local.dim()), -1)
        out.append((f"{prefix}{key}", (*frags, local.numel()), (flat, (*idx, 0))))
    return out


def assemble(shards) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, gshape, (local, offsets) in shards:
        if key not in state:
            state[key] = torch.full(gshape, float("nan"), dtype=local.dtype)
        box = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape, strict=True))
        state[key][box] = local
    for key, t in state.items():
        assert not t.isnan().any(), key
    return state


def write_aux(root, it: int, args: object | None = None, backend: str = "torch_dist") -> str:
    d = root / f"iter_{it:07d}"
    (d / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": backend,
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    if args is None:
        args = argparse.Namespace(
            num_attention_heads=HEADS, num_query_groups=2, group_query_attention=True,
            num_layers=LAYERS, hidden_size=32, ffn_hidden_size=FFN, vocab_size=100,
            padded_vocab_size=256, tensor_model_parallel_size=TP,
        )  # fmt: skip
    torch.save({"args": args, "iteration": it, "checkpoint_version": 3.0}, d / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(it))
    return str(d)


def optim_tensors() -> dict[str, dict[str, torch.Tensor]]:
    ref = canonical()
    out = {}
    for i, kind in enumerate(("exp_avg", "exp_avg_sq", "fp32_param")):
        g = torch.Generator().manual_seed(100 + i)
        out[kind] = {n: torch.randn(t.shape, generator=g) for n, t in ref.items()}
    return out


@pytest.fixture(scope="module")
def dist_ckpt(tmp_path_factory):
    """(legacy TP2xPP2 dir, torch_dist root, optimizer reference) written in one process."""
    import torch.distributed.checkpoint as dcp

    tmp = tmp_path_factory.mktemp("mdist")
    meg = legacy(tmp, "model", canonical())
    shards = [(k, s, sh) for _, k, s, sh in mcore_shards(meg)]
    opt = optim_tensors()
    for kind in ("exp_avg", "exp_avg_sq"):
        m = legacy(tmp, kind, opt[kind])
        shards += [(k, s, sh) for _, k, s, sh in mcore_shards(m, f"optimizer.state.{kind}.")]
    m = legacy(tmp, "fp32", opt["fp32_param"])
    shards += flattened(
        [(k, s, sh) for _, k, s, sh in mcore_shards(m)], "optimizer.state.fp32_param."
    )
    root = tmp / "torch_dist"
    d = root / "iter_0000100"
    state = assemble(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(d), no_dist=True)
    write_aux(root, 100)
    return meg, root, opt


def test_same_universal_as_the_legacy_checkpoint(dist_ckpt, tmp_path):
    meg, root, opt = dist_ckpt
    assert detect_source(str(root)) == "megatron_dist"
    assert detect_source(str(root / "iter_0000100")) == "megatron_dist"
    convert(str(meg), str(tmp_path / "from-legacy"))
    res = convert(str(root), str(tmp_path / "from-dist"))
    assert res.plan.source_step == 100
    legacy_u = read_universal(str(tmp_path / "from-legacy"))
    dist_u = read_universal(str(tmp_path / "from-dist"))
    weights = {n: t for n, t in dist_u.items() if not n.startswith("optim.")}
    assert weights.keys() == legacy_u.keys() == canonical().keys()
    for name, t in legacy_u.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t), name
    for kind, suffix in (
        ("exp_avg", "exp_avg"),
        ("exp_avg_sq", "exp_avg_sq"),
        ("fp32_param", "fp32"),
    ):
        for name, t in opt[kind].items():
            got = dist_u[f"optim.state.{name}.{suffix}"]
            assert torch.equal(got, t), (kind, name)
    assert len(dist_u) == 4 * len(legacy_u)


def test_weights_only_and_dry_run(dist_ckpt, tmp_path):
    _, root, _ = dist_ckpt
    plan = plan_conversion(str(root), str(tmp_path / "u"), ConvertOptions(weights_only=True))
    doc = plan.to_json()
    assert doc["source"]["format"] == "megatron_dist"
    assert doc["tensors"] == len(canonical())
    assert all(d.startswith("optim.state.") for d in doc["dropped"])
    assert "common.pt:args" in doc["skipped"]
    from click.testing import CliRunner

    from ckptd.converters.cli import main

    res = CliRunner().invoke(main, [str(root), str(tmp_path / "u"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "u").exists()
    out = json.loads(res.output)
    moves = {m[1] for m in out["moves"]}
    assert "decoder.layers.3.self_attention.linear_qkv.weight" in moves
    assert "optim.state.decoder.layers.3.mlp.linear_fc1.weight.fp32" in moves


def test_from_flag_and_iteration_dir(dist_ckpt, tmp_path):
    _, root, _ = dist_ckpt
    opts = ConvertOptions(source_format="megatron_dist", weights_only=True)
    convert(str(root / "iter_0000100"), str(tmp_path / "u"), opts)
    got = read_universal(str(tmp_path / "u"))
    ref = canonical()
    assert all(torch.equal(got[n], t) for n, t in ref.items())


def _mark(path: str) -> None:
    open(path, "w").close()


class Opaque:
    """Not an allowed global; unpickling it would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_mark, (self.path,))


def _copy(root, dst):
    import shutil

    shutil.copytree(root, dst)
    return dst


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing", r"iter_0000100/metadata\.json: missing"),
        ("corrupt", r"iter_0000100/metadata\.json: not valid JSON"),
        ("zarr", r"iter_0000100/metadata\.json: sharded_backend 'zarr' is not supported"),
    ],
)
def test_bad_metadata_json_is_a_typed_error(dist_ckpt, tmp_path, damage, match):
    _, root, _ = dist_ckpt
    bad = _copy(root, tmp_path / "bad")
    md = bad / "iter_0000100" / "metadata.json"
    if damage == "missing":
        md.unlink()
    elif damage == "corrupt":
        md.write_text('{"sharded_backend": "torch_di')
    else:
        md.write_text(json.dumps({"sharded_backend": "zarr"}))
    opts = ConvertOptions(source_format="megatron_dist")
    with pytest.raises(MegatronDistFormatError, match=match) as e:
        convert(str(bad), str(tmp_path / "out"), opts)
    assert isinstance(e.value, SourceFormatError)


def test_common_pt_with_foreign_objects_is_never_unpickled(dist_ckpt, tmp_path):
    """An ``args`` holding a class weights_only refuses: skipped, variables from shapes."""
    _, root, _ = dist_ckpt
    bad = _copy(root, tmp_path / "bad")
    marker = tmp_path / "executed"
    write_aux(bad, 100, args=Opaque(str(marker)))
    opts = ConvertOptions(weights_only=True, variables=(("heads", HEADS), ("vocab", 100)))
    plan = plan_conversion(str(bad), str(tmp_path / "u"), opts)
    assert any(s.startswith("common.pt (not read") for s in plan.skipped)
    assert not marker.exists()
    (bad / "iter_0000100" / "common.pt").write_bytes(b"not a zip")
    with pytest.raises(SourceFormatError, match=r"iter_0000100/common\.pt"):
        plan_conversion(str(bad), str(tmp_path / "u"), opts)


# ----------------------------------------------------------- 4 gloo ranks (slow)


def _save_rank(rank: int, world: int, meg: str, path: str) -> None:
    """One Megatron-core rank: ShardedTensors from its local shards, then dcp.save."""
    import pathlib

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard as TShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    all_shards = list(mcore_shards(pathlib.Path(meg)))
    keys = list(dict.fromkeys((k, s) for _, k, s, _ in all_shards))
    state = {}
    for key, gshape in keys:  # every rank, every key, same order (a collective)
        mine = [
            TShard.from_tensor_and_offsets(t.contiguous(), list(off), rank)
            for r, k, _, (t, off) in all_shards
            if r == rank and k == key
        ]
        state[key] = init_from_local_shards(mine, *gshape, process_group=dist.group.WORLD)
    dcp.save(state, checkpoint_id=path)


def _body(p, meg: str, path: str) -> None:
    p.phase(4, _save_rank, meg, path)


@pytest.mark.slow
def test_four_gloo_ranks_sharded_tensors(dist_ckpt, tmp_path):
    from mp_harness import run

    meg, _, _ = dist_ckpt
    root = tmp_path / "td4"
    d = root / "iter_0000007"
    run(_body, 4, (str(meg), str(d)), timeout=120)
    write_aux(root, 7)
    convert(str(meg), str(tmp_path / "from-legacy"))
    convert(str(root), str(tmp_path / "from-dist"))
    a = read_universal(str(tmp_path / "from-legacy"))
    b = read_universal(str(tmp_path / "from-dist"))
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert b[name].dtype == t.dtype and torch.equal(b[name], t), name
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(d)).read_metadata().state_dict_metadata
    qkv = md["decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == LAYERS * TP  # one shard per (layer, tp rank), as Megatron-core
    assert sum(n.endswith(".distcp") for n in os.listdir(d)) >= 4
