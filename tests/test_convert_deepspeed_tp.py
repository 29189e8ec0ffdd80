"""Model-parallel DeepSpeed (Megatron-DeepSpeed, TP=2 x DP=2 ZeRO-2) -> universal.

Each mp rank is its own ZeRO checkpoint (``mp_rank_{mp:02d}_model_states.pt`` and
``bf16_zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``, DeepSpeed's names); the
fixture shards the canonical tensors by hand as Megatron does (padded vocab, QKV
interleaved per query group, column/row splits, replicas). The source assembles them
with the shipped ``deepspeed_megatron`` spec: model weights and every optimizer tensor
come out canonical and bit-exact, whatever the DP size of the ZeRO partitions.
"""

from __future__ import annotations

import re
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.deepspeed import DeepSpeedSource
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_reader import UniversalReader

VARS = tuple(sorted(fx.MP_VARS.items()))


def _universal(root: Path) -> dict[str, torch.Tensor]:
    r = UniversalReader.open(LocalStorage(root), 5)
    return {n: r.read(n) for n in r.names()}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_tp2_dp2_to_universal_bit_exact(tmp_path: Path) -> None:
    state = fx.mp_state(3)
    fx.write_deepspeed_tp(tmp_path / "tp2", state, tp=2, dp=2)
    files = sorted(p.name for p in (tmp_path / "tp2" / "global_step5").iterdir())
    assert files == [f"bf16_zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
                     for d in range(2) for m in range(2)] + [
        f"mp_rank_{m:02d}_model_states.pt" for m in range(2)]  # fmt: skip
    with DeepSpeedSource(str(tmp_path / "tp2"), variables=fx.MP_VARS) as s:
        assert (s.stage, s.dp) == (2, 2)
        # read_range (what the HF target streams) agrees with whole reads
        name = f"optim.state.{fx.MP_PARAMS[4][0]}.exp_avg"  # the fused QKV
        whole = s.read(name)
        buf = bytearray(whole.numel() * 4 - 10)
        s.read_range(name, 6, memoryview(buf))
        assert bytes(buf) == whole.numpy().tobytes()[6:-4]
    r = convert(str(tmp_path / "tp2"), str(tmp_path / "uni"), ConvertOptions(variables=VARS))
    assert r.plan.source_format == "deepspeed" and r.plan.source_step == 5
    want = fx.expected_universal(state, 2, 5)
    _same(_universal(tmp_path / "uni"), want)
    # The same state at TP=2 x DP=3 (other flat partitions per mp rank) gives the same.
    fx.write_deepspeed_tp(tmp_path / "dp3", state, tp=2, dp=3)
    convert(str(tmp_path / "dp3"), str(tmp_path / "uni3"), ConvertOptions(variables=VARS))
    _same(_universal(tmp_path / "uni3"), want)


def test_tp_needs_the_model_variables(tmp_path: Path) -> None:
    fx.write_deepspeed_tp(tmp_path / "tp2", fx.mp_state(4), tp=2, dp=2)
    need = r"(?s)mp_rank_00.*variable .vocab. has no value.*--var heads"
    with pytest.raises(SourceFormatError, match=need):
        DeepSpeedSource(str(tmp_path / "tp2"))


def test_differing_replicas_are_a_typed_error(tmp_path: Path) -> None:
    state = fx.mp_state(5)
    fx.write_deepspeed_tp(tmp_path / "tp2", state, tp=2, dp=2)
    f = tmp_path / "tp2" / "global_step5" / "mp_rank_01_model_states.pt"
    ms = torch.load(f, weights_only=True)
    ms["module"]["language_model.encoder.final_layernorm.bias"] += 1
    torch.save(ms, f)
    with DeepSpeedSource(str(tmp_path / "tp2"), variables=fx.MP_VARS) as s:
        with pytest.raises(SourceFormatError, match=re.escape("mp_rank_01")):
            s.read("model.language_model.encoder.final_layernorm.bias")
        s.read("model.language_model.encoder.final_layernorm.weight")  # others still read
