"""Megatron legacy checkpoints saved with the distributed optimizer (``distrib_optim.pt``).

The non-distributed fixture of ``test_convert_megatron`` (TP2xPP2, bf16 weights, fp32
masters and Adam moments around a real AdamW) is rewritten as a DP=2 run with
``--use-distributed-optimizer`` would save it (``megatron_distopt_fixture``: Megatron-
Core's buffer order, bucket boundaries, alignment padding, DP sharding and gather).
Both must convert to the same universal tensors bit for bit; the distributed form
converts to other Megatron layouts (which the target writes in the non-distributed
form); damaged or mismatched ``distrib_optim.pt`` files are typed errors naming them.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from megatron_distopt_fixture import megatron_buffer, rewrite_as_distributed
from safetensors.torch import save_file
from test_convert_megatron import (  # noqa: F401  (megatron_with_optimizer: a fixture)
    EXPLICIT,
    HEADS,
    ITER,
    _expected_universal,
    canonical_moe,
    megatron_with_optimizer,
    read_universal,
)

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.megatron import MegatronSource
from ckptd.converters.sources.megatron_distopt import bucketize

#: (bucket size, tied embeddings): --overlap-grad-reduce with small buckets (several
#: per stage-0 buffer), and no bucketing with tied embeddings (own bucket at PP > 1).
LAYOUTS = {"buckets": {"bucket_size": 1100}, "tied": {"bucket_size": None, "tied": True}}


@pytest.fixture(params=sorted(LAYOUTS))
def distopt(request, tmp_path):
    """(non-distributed root, distributed root, canonical globals)."""
    meg, globals_ = request.getfixturevalue("megatron_with_optimizer")
    dist = tmp_path / "meg_dist"
    shutil.copytree(meg, dist)
    rewrite_as_distributed(dist, pp=2, dp=2, **LAYOUTS[request.param])
    return meg, dist, globals_


@pytest.fixture()
def plain(request):
    """``test_convert_megatron``'s non-distributed TP2xPP2 checkpoint and its globals."""
    return request.getfixturevalue("megatron_with_optimizer")


def _rank_dir(root, d: str):
    return root / f"iter_{ITER:07d}" / d


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


def test_bucketize_matches_megatron_buffer(tmp_path):
    """The reader's bucket-relative placement equals the simulation of Megatron's
    absolute one, coalesced the way get_parameter_state_dp_zero drops bucket padding,
    for random sizes, bucket sizes, DP sizes and shared-embedding positions."""
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(1, 12)
        params = [(f"p{i}", rng.choice([1, 7, 32, 63, 64, 65, 100, 1000, 4096])) for i in range(n)]
        size = rng.choice([None, 1, 64, 200, 1500, 10**6])
        dp = rng.choice([1, 2, 3, 8, 96])
        shared = frozenset(rng.sample([k for k, _ in params], rng.randint(0, 1)))
        buf = megatron_buffer(params, size, dp, shared)
        starts = [s for s, _ in buf["bucket_indices"]]
        bases = [sum(buf["numel_unpadded"][:b]) for b in range(len(starts))]
        want = {k: bases[b] + s - starts[b] for k, (s, _, b) in buf["param_index_map"].items()}
        slots, buckets = bucketize(params, size, shared)
        assert {s.key: s.start for s in slots} == want
        assert list(buckets) == buf["numel_unpadded"]


def test_distributed_optimizer_to_universal_equals_non_distributed(distopt, tmp_path):
    meg, dist, globals_ = distopt
    assert (_rank_dir(dist, "mp_rank_01_001") / "distrib_optim.pt").is_file()
    obj = torch.load(_rank_dir(dist, "mp_rank_00_000") / "model_optim_rng.pt", weights_only=False)
    assert "state" not in obj["optimizer"]["optimizer"]  # only hyperparameters there
    if obj["args"].ddp_bucket_size is not None:  # the case means to cover several buckets
        model = obj["model"]
        buf = megatron_buffer([(k, t.numel()) for k, t in model.items()], 1100, 2)
        assert len(buf["numel_unpadded"]) > 2
        assert any(n % 64 for n in buf["numel_unpadded"][:-1])  # padding the file drops
    convert(str(meg), str(tmp_path / "u_plain"), ConvertOptions(variables=EXPLICIT))
    convert(str(dist), str(tmp_path / "u_dist"), ConvertOptions(variables=EXPLICIT))
    plain, got = read_universal(str(tmp_path / "u_plain")), read_universal(str(tmp_path / "u_dist"))
    _assert_same(got, plain)
    _assert_same(got, _expected_universal(*globals_))
    with MegatronSource(str(dist), None, 1, variables=dict(EXPLICIT)) as src:
        assert not any("distrib_optim" in s for s in src.skipped())
        groups = src.source_state().state["megatron"]["optimizer"]["param_groups"]
    assert [g["class"] for g in groups] == [[False, False], [False, True]]
    assert groups[0]["hyper"]["betas"] == [0.9, 0.95] and "step" not in groups[0]["hyper"]


def test_distributed_optimizer_to_megatron_tp1pp4_and_back(distopt, tmp_path):
    _, dist, globals_ = distopt
    meg14 = tmp_path / "meg14"
    convert(str(dist), str(meg14), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 4)),
        variables=EXPLICIT))  # fmt: skip
    d = _rank_dir(meg14, "mp_rank_00_002")
    assert not (d / "distrib_optim.pt").exists()  # the target writes the non-distributed form
    obj = torch.load(d / "model_optim_rng.pt", weights_only=True)
    assert obj["optimizer"]["optimizer"]["state"] and obj["optimizer"]["fp32_from_fp16_params"]
    wd, no_wd = obj["optimizer"]["optimizer"]["param_groups"]
    assert (wd["wd_mult"], no_wd["wd_mult"], wd["weight_decay"]) == (1.0, 0.0, 0.1)
    convert(str(meg14), str(tmp_path / "back"))
    _assert_same(read_universal(str(tmp_path / "back")), _expected_universal(*globals_))


def test_legacy_per_bucket_form_reads_the_same(plain, tmp_path):
    meg, globals_ = plain
    dist = tmp_path / "legacy"
    shutil.copytree(meg, dist)
    rewrite_as_distributed(dist, pp=2, dp=2, bucket_size=1100, legacy=True)
    st = torch.load(_rank_dir(dist, "mp_rank_00_000") / "distrib_optim.pt", weights_only=True)
    assert "buckets_coalesced" not in st and len(st[0][torch.float32]["param"]) > 2
    convert(str(dist), str(tmp_path / "u"), ConvertOptions(variables=EXPLICIT))
    _assert_same(read_universal(str(tmp_path / "u")), _expected_universal(*globals_))


def test_truncated_distrib_optim_is_a_typed_error_naming_it(plain, tmp_path):
    meg, _ = plain
    rewrite_as_distributed(meg, pp=2, dp=2, bucket_size=1100)
    f = _rank_dir(meg, "mp_rank_01_001") / "distrib_optim.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SourceFormatError, match=r"mp_rank_01_001/distrib_optim\.pt"):
        convert(str(meg), str(tmp_path / "u"), ConvertOptions(variables=EXPLICIT))


def _swap_stages(root):
    """Stage 1's distrib_optim.pt in stage 0's directory: other parameters."""
    src = _rank_dir(root, "mp_rank_00_001") / "distrib_optim.pt"
    shutil.copy(src, _rank_dir(root, "mp_rank_00_000") / "distrib_optim.pt")


def _shorten(root):
    f = _rank_dir(root, "mp_rank_00_000") / "distrib_optim.pt"
    st = torch.load(f, weights_only=True)
    [body] = st[0].values()
    body["exp_avg"] = body["exp_avg"][:-5].clone()
    torch.save(st, f)


def _shift(root):
    """Every tensor moved by one element: sizes still agree, gaps do not hold zeros."""
    f = _rank_dir(root, "mp_rank_00_000") / "distrib_optim.pt"
    st = torch.load(f, weights_only=True)
    [body] = st[0].values()
    for k in ("param", "exp_avg", "exp_avg_sq"):
        body[k] = body[k].roll(1)
    torch.save(st, f)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_swap_stages, r"mp_rank_00_000/distrib_optim\.pt: buffer 0 \(torch.bfloat16\) holds "
                       r"\d+ elements; the \d+ parameters of .*mp_rank_00_000/model_optim_rng"),
        (_shorten, r"mp_rank_00_000/distrib_optim\.pt: buffer 0 'exp_avg' holds"),
        (_shift, r"mp_rank_00_000/distrib_optim\.pt: the alignment gaps"),
    ],
)  # fmt: skip
def test_mismatched_distrib_optim_is_a_typed_error(plain, tmp_path, damage,
                                                   message):  # fmt: skip
    meg, _ = plain
    rewrite_as_distributed(meg, pp=2, dp=2, bucket_size=1100)
    damage(meg)
    with pytest.raises(SourceFormatError, match=message):
        convert(str(meg), str(tmp_path / "u"), ConvertOptions(variables=EXPLICIT))


def test_expert_parallel_chained_distributed_optimizer(tmp_path):
    """MoE at TP1xPP2xEP2: dense and expert-parallel params in two distributed
    optimizers (ChainedOptimizer lists in both files), one of them with mixed dtypes
    (fp32 router: a second buffer, no fp32 master)."""
    g = torch.Generator().manual_seed(11)
    weights = {k: v.to(torch.bfloat16) for k, v in canonical_moe().items()}
    for i in (1, 3):
        weights[f"decoder.layers.{i}.mlp.router.weight"] = weights[
            f"decoder.layers.{i}.mlp.router.weight"].float()  # fmt: skip
    full = dict(weights)
    for n, t in weights.items():
        if t.dtype == torch.bfloat16:
            full[f"optim.state.{n}.fp32"] = torch.randn(t.shape, generator=g)
        full[f"optim.state.{n}.exp_avg"] = torch.randn(t.shape, generator=g)
        full[f"optim.state.{n}.exp_avg_sq"] = torch.randn(t.shape, generator=g).abs()
        full[f"optim.state.{n}.step"] = torch.tensor(5.0)
    (tmp_path / "hf").mkdir()
    save_file(full, str(tmp_path / "hf" / "model.safetensors"))
    meg = tmp_path / "meg"
    convert(str(tmp_path / "hf"), str(meg), ConvertOptions(
        target_format="megatron", target_layout=(("tp", 1), ("pp", 2), ("ep", 2)),
        variables=(("heads", HEADS),)))  # fmt: skip
    rewrite_as_distributed(meg, pp=2, dp=2, bucket_size=700, expert_parallel=True)
    st = torch.load(meg / "iter_0000000" / "mp_rank_00_001_001" / "distrib_optim.pt",
                    weights_only=True)  # fmt: skip
    assert isinstance(st, list) and len(st) == 2
    assert [k for k in st[0] if isinstance(k, int)] == [0, 1]  # bf16 and fp32 dense buffers
    convert(str(meg), str(tmp_path / "u"))
    _assert_same(read_universal(str(tmp_path / "u")), full)
