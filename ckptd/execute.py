"""Moving tensor bytes according to a plan: staging, chunk assembly, load copies.

No I/O and no collectives here: these functions take tensors and plans and return
tensors (views where possible), so that the in-process pipeline, the daemon and the
tests all run the same byte-moving code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ckptd.dtypes import torch_dtype
from ckptd.fragments import Box, Piece, is_contiguous_box
from ckptd.planner import ChunkRead, ChunkTask, CopyOp, RankSavePlan, Transfer


def piece_view(local: torch.Tensor, piece: Piece) -> torch.Tensor:
    """``local[piece.local_box]`` shaped as the piece's global box (a view, never a copy)."""
    v = local[piece.local_box.slices()]
    # Reshaped local regions are contiguous (checked by LocalEntry.validate), so view works.
    return v.view(piece.global_box.lengths) if piece.reshaped else v


@dataclass(frozen=True)
class Source:
    """Part of a chunk: ``region`` of buffer ``index`` (a staged piece or a received
    transfer, per ``kind``) goes to ``chunk_region`` of the chunk."""

    kind: str  # "staged" | "recv"
    index: int
    region: Box
    chunk_region: Box


@dataclass(frozen=True)
class ChunkRecipe:
    """How to build one chunk from this rank's staged pieces and received regions."""

    task: ChunkTask
    sources: tuple[Source, ...]
    zero_copy: bool  # one staged piece holds the chunk as a contiguous region


def chunk_recipes(plan: RankSavePlan) -> tuple[ChunkRecipe, ...]:
    """Precompute, once per plan, where every chunk of this rank comes from."""
    by_name: dict[str, list[tuple[str, int, Box]]] = {}
    for i, s in enumerate(plan.staged):
        by_name.setdefault(s.piece.name, []).append(("staged", i, s.piece.global_box))
    for i, t in enumerate(plan.recvs):
        by_name.setdefault(t.name, []).append(("recv", i, t.box))
    out = []
    for task in plan.chunks:
        srcs = []
        for kind, i, box in by_name.get(task.name, ()):
            inter = box.intersect(task.box)
            if inter is None:
                continue
            srcs.append(
                Source(kind, i, inter.shift(box.offsets, -1), inter.shift(task.box.offsets, -1))
            )
        zero = (
            len(srcs) == 1
            and srcs[0].kind == "staged"
            and is_contiguous_box(
                srcs[0].region, plan.staged[srcs[0].index].piece.global_box.lengths
            )
        )
        out.append(ChunkRecipe(task, tuple(srcs), zero))
    return tuple(out)


def assemble_chunk(
    recipe: ChunkRecipe,
    dtype: str,
    staged: Sequence[torch.Tensor],
    received: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The chunk's data as a contiguous tensor (a view into staging when possible)."""
    if recipe.zero_copy:
        s = recipe.sources[0]
        v = staged[s.index][s.region.slices()]
        return v if v.is_contiguous() else v.contiguous()
    out = torch.empty(recipe.task.box.lengths, dtype=torch_dtype(dtype))
    for s in recipe.sources:
        buf = staged[s.index] if s.kind == "staged" else received[s.index]
        out[s.chunk_region.slices()].copy_(buf[s.region.slices()])
    return out


def transfer_payload(
    t: Transfer, plan: RankSavePlan, staged: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The contiguous region of a staged piece that ``t`` sends."""
    for i, s in enumerate(plan.staged):
        if s.piece.name == t.name:
            inter = s.piece.global_box.intersect(t.box)
            if inter == t.box:
                return staged[i][t.box.shift(s.piece.global_box.offsets, -1).slices()].contiguous()
    raise AssertionError(f"transfer {t} has no staged source on rank {plan.rank}")


def apply_copy(op: CopyOp, chunk: torch.Tensor, locals_: Mapping[str, torch.Tensor]) -> None:
    """Copy ``op.chunk_region`` of a decoded chunk into the destination local tensor."""
    dst = piece_view(locals_[op.key], op.piece)[op.piece_region.slices()]
    dst.copy_(chunk[op.chunk_region.slices()])


def apply_reads(read: ChunkRead, chunk: torch.Tensor, locals_: Mapping[str, torch.Tensor]) -> None:
    """Scatter one decoded chunk into every local tensor that needs part of it."""
    for op in read.copies:
        apply_copy(op, chunk, locals_)


def direct_destination(r: ChunkRead, locals_: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The destination view if one copy fills it with the whole chunk, contiguously in
    CPU memory: the chunk's bytes can then be read straight into the caller's tensor."""
    dests = direct_destinations(r, locals_)
    return dests[0] if dests is not None and len(dests) == 1 else None


def direct_destinations(
    r: ChunkRead, locals_: Mapping[str, torch.Tensor]
) -> list[torch.Tensor] | None:
    """Destination views that the chunk's bytes fill one after the other, or None.

    That is the case when the copies cut the chunk into consecutive row ranges (whole
    trailing dimensions: contiguous byte ranges of a C-order chunk) and every destination
    is contiguous CPU memory, e.g. a resharded load whose new row split cuts a chunk
    that this process needs whole. The chunk can then be read straight into them.
    """
    lengths = r.box.lengths
    if not r.copies or not lengths:
        return None
    ops = sorted(r.copies, key=lambda op: op.chunk_region.offsets[0])
    row = 0
    out = []
    for op in ops:
        reg = op.chunk_region
        if reg.offsets[0] != row or any(reg.offsets[1:]) or reg.lengths[1:] != lengths[1:]:
            return None
        dest = piece_view(locals_[op.key], op.piece)[op.piece_region.slices()]
        if not dest.is_contiguous() or dest.device.type != "cpu":
            return None
        out.append(dest)
        row += reg.lengths[0]
    return out if row == lengths[0] else None


def nbytes_of(box: Box, dtype: str) -> int:
    """Bytes of a box of ``dtype`` elements."""
    return math.prod(box.lengths) * torch_dtype(dtype).itemsize
