"""DCP written by `dcp.save` on 2 gloo ranks -> universal -> DCP loaded on 3 ranks.

Real multi-process torch.distributed on CPU: the 2-rank save and the 3-rank load use
DTensor `Shard(0)` state dicts, so DCP itself writes and reads sharded files; the
conversion in between runs in one process through `ckpt-convert`'s library API.
"""

from __future__ import annotations

import pytest
import torch
from mp_harness import run

SHAPES = {"embed.weight": (10, 6), "layers.0.w": (7, 5), "layers.0.b": (7,), "scalar": ()}


def _global(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(SHAPES[name], generator=g)


def _state(rank: int, world: int, fill: float | None) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, shape in SHAPES.items():
        t = _global(name) if fill is None else torch.full(shape, fill)
        placement = Shard(0) if shape else Replicate()
        out[name] = distribute_tensor(t, mesh, [placement])
    return out


def _dcp_save(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(rank, world, None), checkpoint_id=path)


def _convert(src: str, uni: str, dst: str) -> None:
    from ckptd.converters.convert import ConvertOptions, convert

    convert(src, uni, ConvertOptions())  # format detected: dcp
    convert(uni, dst, ConvertOptions(target_format="dcp"))


def _dcp_load(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    state = _state(rank, world, fill=float("nan"))
    dcp.load(state, checkpoint_id=path)
    for name, t in state.items():
        assert torch.equal(t.full_tensor(), _global(name)), name


def _body(p, root: str) -> None:
    src, uni, dst = f"{root}/dcp2", f"{root}/uni", f"{root}/dcp-out"
    p.phase(2, _dcp_save, src)
    p.solo(_convert, src, uni, dst)
    p.phase(3, _dcp_load, dst)


@pytest.mark.slow
def test_dcp_two_ranks_to_universal_to_dcp_three_ranks(tmp_path):
    run(_body, 3, (str(tmp_path),), timeout=120)
