"""ckpt-convert from DeepSpeed ZeRO checkpoints (written by tests/deepspeed_fixture.py).

Bit-exact: every per-parameter tensor (16-bit model weights, fp32 master, exp_avg,
exp_avg_sq) comes back equal to the fixture's originals; bad files (pickle payloads,
truncation) give typed errors naming the file, and a payload never runs.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import deepspeed_fixture as fx
import pytest
import torch

from ckptd.converters.convert import ConvertOptions, convert
from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.deepspeed import DeepSpeedSource, UnsafePickleError
from ckptd.formats.storage import LocalStorage
from ckptd.formats.universal_reader import UniversalReader

DS = ConvertOptions(source_format="deepspeed")


def _universal(root: Path, step: int) -> dict[str, torch.Tensor]:
    r = UniversalReader.open(LocalStorage(root), step)
    return {n: r.read(n) for n in r.names()}


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_zero2_partition_cuts_params_and_pads() -> None:
    # The fixture really exercises the flat-range math: padding, a cut inside a param.
    numel = sum(math.prod(s) for _, s in fx.GROUPS[0])  # 77 + 91 + 91
    parts = fx.zero2_partition(torch.arange(numel, dtype=torch.float32), 4)
    assert numel % 8 != 0 and sum(p.numel() for p in parts) == 264  # padded to 2 * dp
    assert parts[0].numel() == 66 < 77  # rank 0/1 boundary inside embed.weight


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_to_universal_bit_exact(tmp_path: Path, stage: int) -> None:
    state = fx.tiny_state(stage)
    fx.write_deepspeed(tmp_path / "ds", state, stage=stage, dp=4, step=5)
    assert DeepSpeedSource.detect(str(tmp_path / "ds"))
    assert DeepSpeedSource.detect(str(tmp_path / "ds" / "global_step5"))
    r = convert(str(tmp_path / "ds"), str(tmp_path / "uni"), DS)
    assert r.plan.source_format == "deepspeed" and r.plan.source_step == 5
    _assert_bit_exact(_universal(tmp_path / "uni", 5), fx.expected_universal(state, stage, 5))


def test_zero0_gives_model_weights_only(tmp_path: Path) -> None:
    state = fx.tiny_state(7)
    fx.write_deepspeed(tmp_path / "ds", state, stage=0, dp=2)
    want = {k: v for k, v in fx.expected_universal(state, 2, 5).items() if k.startswith("model.")}
    with DeepSpeedSource(str(tmp_path / "ds")) as src:
        _assert_bit_exact({t.name: src.read(t.name) for t in src.tensors()}, want)


def test_read_touches_only_the_ranks_holding_a_param(tmp_path: Path) -> None:
    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(1), stage=2, dp=4)
    src = DeepSpeedSource(str(tmp_path / "ds"))
    opened: list[str] = []
    real = src._pread
    src._pread = lambda path, *a: (opened.append(os.path.basename(path)), real(path, *a))[1]  # type: ignore[method-assign]
    name = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    src.read("optim.state.embed.weight.exp_avg")  # [0, 77) of group 0, partitions of 66
    assert opened == [name.format(0), name.format(1)]
    opened.clear()
    src.read("optim.state.fc2.bias.fp32")  # [13, 20) of group 1, partitions of 10
    assert opened == [name.format(1)]


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {os.environ['DS_MARKER']}",))


def test_reduce_payload_is_refused_and_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(2), stage=2, dp=2)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DS_MARKER", str(marker))
    bad = tmp_path / "ds" / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload()}, bad)
    with pytest.raises(
        UnsafePickleError, match=re.escape("zero_pp_rank_1_mp_rank_00_optim_states.pt")
    ):
        convert(str(tmp_path / "ds"), str(tmp_path / "uni"), DS)
    assert not marker.exists()


def test_truncated_pt_is_a_typed_error(tmp_path: Path) -> None:
    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(3), stage=3, dp=2)
    f = tmp_path / "ds" / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        SourceFormatError, match=re.escape("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ):
        convert(str(tmp_path / "ds"), str(tmp_path / "uni"), DS)


def test_partition_mismatch_is_a_typed_error(tmp_path: Path) -> None:
    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(4), stage=2, dp=4)
    os.remove(tmp_path / "ds" / "global_step5" / "zero_pp_rank_3_mp_rank_00_optim_states.pt")
    with pytest.raises(SourceFormatError, match="partition_count 4"):
        DeepSpeedSource(str(tmp_path / "ds"))


def test_deepspeed_root_is_detected_without_from(tmp_path: Path) -> None:
    """A DeepSpeed root has a `latest` file, like a universal root: only DeepSpeed
    may claim it, so conversion works without --from."""
    from ckptd.converters.sources import detect_source

    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(2), stage=2, dp=2, step=3)
    assert detect_source(str(tmp_path / "ds")) == "deepspeed"
    r = convert(str(tmp_path / "ds"), str(tmp_path / "uni"), ConvertOptions())
    assert r.plan.source_format == "deepspeed"


class NotAllowed:
    """A class that is not on the DeepSpeed allow-list (module ``deepspeed_fixture``...)."""

    def __init__(self) -> None:
        self.x = 1


def test_unlisted_global_is_refused_and_named(tmp_path: Path) -> None:
    fx.write_deepspeed(tmp_path / "ds", fx.tiny_state(4), stage=2, dp=2)
    bad = tmp_path / "ds" / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    NotAllowed.__module__ = "deepspeed_lookalike"
    sys.modules["deepspeed_lookalike"] = sys.modules[__name__]
    try:
        torch.save({"optimizer_state_dict": {"loss_scaler": NotAllowed()}}, bad)
    finally:
        del sys.modules["deepspeed_lookalike"]
        NotAllowed.__module__ = __name__
    with pytest.raises(UnsafePickleError, match=r"global deepspeed_lookalike\.NotAllowed"):
        DeepSpeedSource(str(tmp_path / "ds"))
