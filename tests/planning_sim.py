"""In-memory simulation of a multi-rank save and load (no I/O, no processes).

Used by the planner property tests: it runs the real planner and the real byte-moving
code of ckptd.execute, with a dict standing in for storage and direct hand-over for
transfers.
"""

from __future__ import annotations

import torch

from ckptd.dtypes import torch_dtype
from ckptd.execute import apply_reads, assemble_chunk, chunk_recipes, piece_view, transfer_payload
from ckptd.fragments import RankLayout
from ckptd.planner import StoredTensor, build_load_plan, build_save_plan


def make_locals(
    lay: RankLayout, globals_: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Local tensors of ``lay`` filled from the global tensors (garbage where uncovered)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in lay.entries:
        t = torch.randint(-1000, 1000, e.local_shape, generator=g).to(torch_dtype(e.dtype))
        for p in e.pieces:
            piece_view(t, p).copy_(globals_[p.name][p.global_box.slices()])
        out[e.key] = t
    return out


def simulate_save(layouts: list[RankLayout], locals_: list[dict[str, torch.Tensor]], **opts):
    """Run the save plan; returns (stored tensors, chunk dict)."""
    from ckptd.planner import PlanOptions

    plan = build_save_plan(layouts, PlanOptions(**opts))
    staged = []
    for rp in plan.ranks:
        staged.append([piece_view(locals_[rp.rank][s.key], s.piece).clone() for s in rp.staged])
    mailbox = {}
    for rp in plan.ranks:
        for t in rp.sends:
            mailbox[t] = transfer_payload(t, rp, staged[rp.rank])
    chunks = {}
    for rp in plan.ranks:
        received = [mailbox[t] for t in rp.recvs]
        for rec in chunk_recipes(rp):
            dtype = plan.tensors[rec.task.name].meta.dtype
            key = (rec.task.name, rec.task.index)
            assert key not in chunks, f"chunk {key} written twice"
            chunks[key] = assemble_chunk(rec, dtype, staged[rp.rank], received).clone()
    stored = {}
    for name, tp in plan.tensors.items():
        keys = frozenset(i for (n, i) in chunks if n == name)
        stored[name] = StoredTensor(tp.meta, tp.grid.chunk_shape, keys)
    return plan, stored, chunks


def simulate_load(lay: RankLayout, stored, chunks, locals_: dict[str, torch.Tensor]) -> None:
    """Fill ``locals_`` from the chunk dict according to the load plan."""
    plan = build_load_plan(lay, stored)
    for r in plan.reads:
        apply_reads(r, chunks[(r.name, r.index)], locals_)
