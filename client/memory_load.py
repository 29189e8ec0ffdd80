"""Loading from the memory tier: the daemons' snapshots instead of storage.

A step is loadable from memory when, for every rank of the save, some reachable daemon
holds that rank's committed snapshot of the step (or, once erasure protection holds it,
can rebuild it). The planner maps this rank's pieces onto the saved pieces (whatever
the new layout: :func:`ckptd.planner.build_piece_load_plan`), and the bytes come over
the data channel from the daemon holding each piece: the local one through its unix
socket, peers over TCP. Only the rows of a saved piece that a target region touches
are fetched, in slices of at most ``FETCH_BYTES``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckpt.daemon_client import DaemonClient
from ckpt.rebuilt import RebuiltWindows, survivor_address
from ckptd.dtypes import torch_dtype
from ckptd.execute import apply_copy, direct_destination
from ckptd.formats.manifest import Manifest, TensorRecord
from ckptd.formats.manifest_build import split_objects
from ckptd.fragments import Box, TensorMeta, _box
from ckptd.planner import ChunkRead, CopyOp, LoadPlan, build_piece_load_plan
from ckptd.rpc.v1 import daemon_pb2 as pb
from ckptd.snapshot import PayloadPiece, SharedParts, SnapshotDescriptor

log = logging.getLogger("ckpt.load")
FETCH_BYTES = 64 << 20


@dataclass(frozen=True)
class HeldSnapshot:
    """Where one rank's snapshot of a step is held and how to fetch it."""

    desc: SnapshotDescriptor
    node: str
    generation: int
    data_address: str
    rebuilt_key: str = ""  # lost/{job}/{step}/{node}: served rebuilt by a survivor
    offset: int = 0  # of this rank's payload inside ``rebuilt_key``
    segment_path: str = ""  # the shared-memory file, for a loader on the same node
    # Every survivor can rebuild a lost rank: reads are spread over all of them.
    rebuild_addresses: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.rebuilt_key or f"snap/{self.desc.job}/{self.desc.rank}/{self.generation}"


@dataclass(frozen=True)
class MemoryStep:
    """Every rank's snapshot of one step, as found in the daemons."""

    job: str
    step: int
    world: int
    held: dict[int, HeldSnapshot]
    addresses: dict[str, str] = field(default_factory=dict)  # data channel of each node
    windows: RebuiltWindows = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", RebuiltWindows(self.addresses))

    def manifest(self) -> Manifest:
        """A manifest-shaped view (metas, rng, trainer state) for the shared load code."""
        descs = [self.held[r].desc for r in range(self.world)]
        metas = descs[0].metas
        tensors = {
            n: TensorRecord(n, m.dtype, m.shape, m.shape, "raw", 0, False, ())
            for n, m in metas.items()
        }
        gathered = [{"objects": d.objects, "coords": d.coords, "rng": d.rng} for d in descs]
        state, per_rank = split_objects(gathered)
        layout = {"world_size": self.world, "coords": [d.coords for d in descs],
                  "digest": descs[0].layouts_digest}
        rng = {d.coords: d.rng for d in descs if d.rng}
        return Manifest(step=self.step, tensors=tensors, layout=layout, rng=rng, state=state,
                        per_rank_state=per_rank)

    def metas(self) -> dict[str, TensorMeta]:
        return dict(self.held[0].desc.metas)


def held_steps(status: pb.JobStatusResponse) -> list[int]:
    """Steps of which a reachable daemon holds (or can rebuild) some rank, newest first
    (from the status fields alone: no descriptor is parsed)."""
    return sorted({s.step for v in status.nodes if v.reachable for s in v.local.snapshots},
                  reverse=True)


def find_memory_steps(status: pb.JobStatusResponse,
                      only: Collection[int] | None = None) -> dict[int, MemoryStep]:
    """Steps whose every rank is held by a reachable daemon, directly or rebuildable from
    its erasure group (a direct copy always wins over a rebuild). ``only``: look at these
    steps alone (descriptors of other steps are not parsed: parsing is most of the cost)."""
    found: dict[int, dict[int, HeldSnapshot]] = {}
    worlds: dict[int, int] = {}
    shared = SharedParts()
    addresses = {v.local.node or v.node: v.local.data_address for v in status.nodes
                 if v.reachable and v.local.data_address}
    for view in status.nodes:
        if not view.reachable:
            continue
        for s in view.local.snapshots:
            if only is not None and s.step not in only:
                continue
            have = found.get(s.step, {}).get(s.rank)
            if have is not None and have.desc.step == s.step and s.key:
                # Another survivor of a rank already found: only its address is new (the
                # descriptor is the same; parsing it again costs more than the rest).
                address = s.data_address or view.local.data_address
                if have.rebuilt_key and address not in have.rebuild_addresses:
                    found[s.step][s.rank] = replace(
                        have, rebuild_addresses=(*have.rebuild_addresses, address))
                continue
            try:
                desc = SnapshotDescriptor.loads(s.descriptor_json, shared=shared, full=False)
            except Exception as e:  # a bad descriptor is not loadable; never guessed at
                log.warning("ignoring snapshot of rank %d on %s: %s", s.rank, s.node, e)
                continue
            address = s.data_address or view.local.data_address
            held = HeldSnapshot(desc, s.node, s.generation, address, s.key, s.offset,
                                s.segment_path, (address,) if s.key else ())
            have = found.setdefault(desc.step, {}).get(desc.rank)
            if have is None or (have.rebuilt_key and not held.rebuilt_key):
                found[desc.step][desc.rank] = held
            elif have.rebuilt_key and held.rebuilt_key and address not in have.rebuild_addresses:
                found[desc.step][desc.rank] = replace(
                    have, rebuild_addresses=(*have.rebuild_addresses, address))
            worlds.setdefault(desc.step, desc.world)
    out = {}
    for step, held_by_rank in found.items():
        world = worlds[step]
        missing = [r for r in range(world) if r not in held_by_rank]
        if not missing:
            out[step] = MemoryStep(held_by_rank[0].desc.job, step, world, held_by_rank,
                                   addresses)
        else:
            log.warning(
                "step %d is not loadable from memory: ranks %s are neither held by a reachable "
                "daemon nor rebuildable from their erasure group", step, missing[:16])
    return out


def plan_memory_load(layout: Any, mem: MemoryStep) -> LoadPlan:
    """This rank's reads from the saved pieces (pure)."""
    stored: dict[str, list[tuple[tuple[int, ...], Box]]] = {}
    for r in range(mem.world):
        for i, p in enumerate(mem.held[r].desc.pieces):
            stored.setdefault(p.name, []).append(((r, i), p.global_box))
    return build_piece_load_plan(layout, mem.metas(), stored)


def read_piece_rows(
    client: DaemonClient, held: HeldSnapshot, piece: PayloadPiece, rows: tuple[int, int],
    local_address: str | None, windows: RebuiltWindows | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``[a, b)`` (dim 0) of a saved piece as a tensor of the piece's dtype; into
    ``out`` (contiguous, of exactly those bytes) when given."""
    dt = torch_dtype(piece.dtype)
    lengths = piece.global_box.lengths
    row_elems = math.prod(lengths[1:]) if lengths else 1
    a, b = rows if lengths else (0, 1)
    start = held.offset + piece.offset + a * row_elems * dt.itemsize
    nbytes = (b - a) * row_elems * dt.itemsize
    buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
    if buf.numel() != nbytes:
        raise ValueError(f"{piece.name}: destination of {buf.numel()} bytes for {nbytes}")
    if nbytes:
        dest = memoryview(buf.numpy())
        local = held.node == client.node
        if local and held.segment_path and not held.rebuilt_key:
            # Same node: straight from the daemon's shared memory (one copy, no socket).
            client.reader.read_into(held.segment_path, held.generation, start, dest)
        elif held.rebuilt_key and windows is not None:
            windows.read_into(client, held, start, buf, local_address)
        else:
            client.data(_address(held, local, local_address, start)).get_range(
                held.key, start, start + nbytes, out=dest)
    shape = (b - a, *lengths[1:]) if lengths else ()
    return buf.view(dt).view(shape)


def _address(held: HeldSnapshot, local: bool, local_address: str | None, start: int) -> str:
    """Which daemon serves a read: any survivor for a rebuilt rank, else the holder."""
    if held.rebuilt_key and held.rebuild_addresses:
        return survivor_address(held, start)
    return local_address if (local_address and local) else held.data_address


def execute_read(
    client: DaemonClient, mem: MemoryStep, read: ChunkRead, locals_: Mapping[str, torch.Tensor],
    local_address: str | None,
) -> int:
    """Fetch the rows of one saved piece the copies need and scatter them; bytes fetched."""
    rank, idx = read.index
    held = mem.held[rank]
    piece = held.desc.pieces[idx]
    lengths = piece.global_box.lengths
    if not lengths:  # a scalar: one element, no rows
        t = read_piece_rows(client, held, piece, (0, 1), local_address, mem.windows)
        for op in read.copies:
            apply_copy(op, t, locals_)
        return t.numel() * t.element_size()
    dest = direct_destination(read, locals_)
    if dest is not None and dest.dtype == torch_dtype(piece.dtype):
        # One copy straight into the caller's tensor: no staging buffer to fault in.
        read_piece_rows(client, held, piece, (0, lengths[0]), local_address, mem.windows, dest)
        return dest.numel() * dest.element_size()
    row_bytes = math.prod(lengths[1:]) * torch_dtype(piece.dtype).itemsize
    step_rows = max(1, FETCH_BYTES // max(1, row_bytes))
    lo = min(op.chunk_region.offsets[0] for op in read.copies)
    hi = max(op.chunk_region.offsets[0] + op.chunk_region.lengths[0] for op in read.copies)
    total = 0
    for a in range(lo, hi, step_rows):
        b = min(hi, a + step_rows)
        rows = read_piece_rows(client, held, piece, (a, b), local_address, mem.windows)
        total += rows.numel() * rows.element_size()
        for op in read.copies:
            part = _rows_part(op, a, b)
            if part is not None:
                apply_copy(part, rows, locals_)
    return total


def _rows_part(op: CopyOp, a: int, b: int) -> CopyOp | None:
    """The part of ``op`` inside rows ``[a, b)`` of the piece, relative to row ``a``."""
    c0, n0 = op.chunk_region.offsets[0], op.chunk_region.lengths[0]
    lo, hi = max(a, c0), min(b, c0 + n0)
    if lo >= hi:
        return None
    chunk_region = _box((lo - a, *op.chunk_region.offsets[1:]),
                        (hi - lo, *op.chunk_region.lengths[1:]))
    p0 = op.piece_region.offsets[0] + (lo - c0)
    piece_region = _box((p0, *op.piece_region.offsets[1:]), (hi - lo, *op.piece_region.lengths[1:]))
    return CopyOp(op.key, op.piece, chunk_region, piece_region)
