"""DCP written by `dcp.save` on 2 gloo ranks -> universal -> DCP loaded on 3 ranks.

Real multi-process torch.distributed on CPU: the 2-rank save and the 3-rank load use
DTensor `Shard(0)` state dicts, so DCP itself writes and reads sharded files; the
conversion in between runs in one process through `ckpt-convert`'s library API. The
state dict is a tiny model's (:class:`Tiny`): every loading rank checks each tensor bit
for bit and that the model's forward pass on the loaded weights gives the logits the
original weights give.
"""

from __future__ import annotations

import pytest
import torch
from mp_harness import run

SHAPES = {"embed.weight": (10, 6), "layers.0.w": (7, 6), "layers.0.b": (7,), "scalar": ()}


class Tiny(torch.nn.Module):
    """The model whose state dict the checkpoint holds (``SHAPES``): an embedding, one
    linear layer, a tied head and a 0-dim output scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].w = torch.nn.Parameter(torch.empty(7, 6))
        self.layers[0].b = torch.nn.Parameter(torch.empty(7))
        self.scalar = torch.nn.Parameter(torch.empty(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(
            torch.nn.functional.linear(self.embed(ids), self.layers[0].w, self.layers[0].b)
        )
        return self.scalar * (h[..., :6] @ self.embed.weight.T)


def _forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of :class:`Tiny` with ``weights`` loaded strictly, on fixed token ids."""
    model = Tiny()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model(torch.tensor([[0, 4, 9, 2], [7, 7, 1, 5]]))


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
    loaded = {name: t.full_tensor() for name, t in state.items()}
    for name, t in loaded.items():
        assert torch.equal(t, _global(name)), name
    before = _forward({name: _global(name) for name in SHAPES})
    assert torch.equal(_forward(loaded), before) and not before.isnan().any()


def _body(p, root: str) -> None:
    src, uni, dst = f"{root}/dcp2", f"{root}/uni", f"{root}/dcp-out"
    p.phase(2, _dcp_save, src)
    p.solo(_convert, src, uni, dst)
    p.phase(3, _dcp_load, dst)


@pytest.mark.slow
def test_dcp_two_ranks_to_universal_to_dcp_three_ranks(tmp_path):
    run(_body, 3, (str(tmp_path),), timeout=120)
