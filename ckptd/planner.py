"""Save and load planning: pure functions of layouts and checkpoint metadata.

The planner decides *what* moves: which rank stages and writes which unique piece,
how each logical tensor is chunked, which chunk each rank writes, which boundary
regions ranks send each other, and, at load time, which stored chunks each target
piece reads. It never opens a file (style.md: planner/storage split).

Every rank computes the same global save plan from the same gathered layouts (no
scatter needed) and keeps only its own :class:`RankSavePlan`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptd.chunking import (
    DEFAULT_MIN_ALIGNED_CHUNK_BYTES,
    DEFAULT_TARGET_CHUNK_BYTES,
    ChunkGrid,
    choose_chunk_shape,
)
from ckptd.dtypes import itemsize_of
from ckptd.errors import LayoutError, ReshardError
from ckptd.fragments import Box, Piece, RankLayout, Shape, TensorMeta

ChunkIndex = tuple[int, ...]


@dataclass(frozen=True)
class StagedPiece:
    """A unique piece this rank copies out of its local tensor ``key`` and writes."""

    key: str
    piece: Piece


@dataclass(frozen=True)
class Transfer:
    """``src`` sends region ``box`` (global coords) of tensor ``name`` to ``dst``.

    Used only for chunks whose content is spread over several writers (a chunk grid
    that could not be aligned to the pieces, small tensors gathered into one chunk).
    """

    name: str
    box: Box
    src: int
    dst: int


@dataclass(frozen=True)
class ChunkTask:
    """Chunk ``index`` of tensor ``name`` covering ``box``, written by this rank."""

    name: str
    index: ChunkIndex
    box: Box


@dataclass(frozen=True)
class RankSavePlan:
    """What one rank does during a save, in order: stage, send/receive, write chunks."""

    rank: int
    staged: tuple[StagedPiece, ...]
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]
    chunks: tuple[ChunkTask, ...]

    def staged_nbytes(self, metas: Mapping[str, TensorMeta]) -> int:
        """Bytes this rank stages (sum over its unique pieces)."""
        return sum(
            s.piece.global_box.numel * itemsize_of(metas[s.piece.name].dtype) for s in self.staged
        )


@dataclass(frozen=True)
class TensorPlan:
    """How one logical tensor is stored: its metadata and chunk grid."""

    meta: TensorMeta
    grid: ChunkGrid
    aligned: bool


@dataclass(frozen=True)
class SavePlan:
    """The validated global save plan."""

    tensors: Mapping[str, TensorPlan]
    ranks: tuple[RankSavePlan, ...]
    world_size: int

    def for_rank(self, rank: int) -> RankSavePlan:
        """The part of the plan that ``rank`` executes."""
        return self.ranks[rank]

    def chunk_owner(self) -> dict[tuple[str, ChunkIndex], int]:
        """Which rank writes each chunk (for validation and commit bookkeeping)."""
        return {(c.name, c.index): rp.rank for rp in self.ranks for c in rp.chunks}


@dataclass(frozen=True)
class PlanOptions:
    """Tunables of the save planner."""

    target_chunk_bytes: int = DEFAULT_TARGET_CHUNK_BYTES
    min_aligned_chunk_bytes: int = DEFAULT_MIN_ALIGNED_CHUNK_BYTES


def merge_tensor_metas(layouts: Sequence[RankLayout]) -> dict[str, TensorMeta]:
    """Every logical tensor across ranks; ranks must agree on dtype and global shape."""
    metas: dict[str, TensorMeta] = {}
    for lay in layouts:
        for m in lay.tensors:
            prev = metas.setdefault(m.name, m)
            if prev != m:
                raise ReshardError(
                    f"ranks disagree on logical tensor {m.name!r}: {prev.dtype}{list(prev.shape)} "
                    f"vs {m.dtype}{list(m.shape)} on rank {lay.rank}"
                )
    return metas


def build_save_plan(
    layouts: Sequence[RankLayout],
    options: PlanOptions = PlanOptions(),
    validated: bool = False,
) -> SavePlan:
    """Plan a save from every rank's layout: writers, chunk grids, transfers, chunk tasks.

    ``validated=True`` skips re-checking each rank's own layout (every rank validated it
    before the gather); overlaps and coverage across ranks are always checked.

    Raises :class:`LayoutError`/:class:`ReshardError` before any byte moves if a layout is
    inconsistent, pieces overlap without being identical replicas, or a logical tensor
    is not fully covered.
    """
    world = len(layouts)
    if sorted(lay.rank for lay in layouts) != list(range(world)):
        raise LayoutError(f"layouts must be given for ranks 0..{world - 1} exactly once")
    layouts = sorted(layouts, key=lambda lay: lay.rank)
    if not validated:  # each rank validated its own layout before the gather
        for lay in layouts:
            lay.validate()
    metas = merge_tensor_metas(layouts)

    # Unique pieces: identical (name, global box) on several ranks are replicas.
    holders: dict[tuple[str, Box], list[tuple[int, str, Piece]]] = defaultdict(list)
    for lay in layouts:
        for e in lay.entries:
            for p in e.pieces:
                if not p.global_box.is_empty():
                    holders[(p.name, p.global_box)].append((lay.rank, e.key, p))

    # One writer per unique piece, greedily balancing bytes (largest pieces first).
    load = [0] * world
    staged: list[list[StagedPiece]] = [[] for _ in range(world)]
    writer_of: dict[tuple[str, Box], int] = {}
    order = sorted(holders, key=lambda k: (-k[1].numel * itemsize_of(metas[k[0]].dtype), k))
    for k in order:
        cands = holders[k]
        rank, key, piece = min(cands, key=lambda c: (load[c[0]], c[0]))
        nbytes = piece.global_box.numel * itemsize_of(metas[k[0]].dtype)
        load[rank] += nbytes
        writer_of[k] = rank
        staged[rank].append(StagedPiece(key, piece))

    by_tensor: dict[str, list[Box]] = defaultdict(list)
    for name, box in writer_of:
        by_tensor[name].append(box)

    tensors: dict[str, TensorPlan] = {}
    chunks: list[list[ChunkTask]] = [[] for _ in range(world)]
    transfers: list[Transfer] = []
    for name in sorted(metas):
        meta = metas[name]
        boxes = sorted(by_tensor.get(name, []))
        isz = itemsize_of(meta.dtype)
        cshape, aligned = choose_chunk_shape(
            meta.shape, isz, boxes, options.target_chunk_bytes, options.min_aligned_chunk_bytes
        )
        grid = ChunkGrid(meta.shape, cshape)
        tensors[name] = TensorPlan(meta, grid, aligned)
        _plan_chunks(name, meta, grid, boxes, writer_of, chunks, transfers, aligned)

    sends: list[list[Transfer]] = [[] for _ in range(world)]
    recvs: list[list[Transfer]] = [[] for _ in range(world)]
    for t in transfers:
        sends[t.src].append(t)
        recvs[t.dst].append(t)
    ranks = []
    for r in range(world):
        ranks.append(
            RankSavePlan(
                rank=r,
                staged=tuple(sorted(staged[r], key=lambda s: (s.piece.name, s.piece.global_box))),
                sends=tuple(sends[r]),
                recvs=tuple(recvs[r]),
                chunks=tuple(chunks[r]),
            )
        )
    return SavePlan(tensors=tensors, ranks=tuple(ranks), world_size=world)


def _plan_chunks(
    name: str,
    meta: TensorMeta,
    grid: ChunkGrid,
    boxes: list[Box],
    writer_of: Mapping[tuple[str, Box], int],
    chunks: list[list[ChunkTask]],
    transfers: list[Transfer],
    aligned: bool,
) -> None:
    """Assign every chunk of one tensor an owner; check coverage; add transfers."""
    if meta.numel == 0:
        # Nothing to store, but a zarr array still exists: rank 0 writes no chunk.
        return
    if aligned:
        _plan_aligned(name, grid, boxes, writer_of, chunks)
        return
    parts: dict[ChunkIndex, list[tuple[Box, int]]] = defaultdict(list)
    for box in boxes:
        w = writer_of[(name, box)]
        for idx in grid.touching(box):
            inter = grid.chunk_box(idx).intersect(box)
            if inter is not None:
                parts[idx].append((inter, w))
    for idx in grid.indices():
        cbox = grid.chunk_box(idx)
        got = parts.get(idx, [])
        covered = sum(b.numel for b, _ in got)
        _check_disjoint(name, got)
        if covered != cbox.numel:
            raise _not_covered(name, idx, cbox, covered)
        bytes_by_rank: dict[int, int] = defaultdict(int)
        for b, w in got:
            bytes_by_rank[w] += b.numel
        owner = max(bytes_by_rank, key=lambda r: (bytes_by_rank[r], -r))
        chunks[owner].append(ChunkTask(name, idx, cbox))
        for b, w in got:
            if w != owner:
                transfers.append(Transfer(name, b, w, owner))


def _plan_aligned(
    name: str,
    grid: ChunkGrid,
    boxes: list[Box],
    writer_of: Mapping[tuple[str, Box], int],
    chunks: list[list[ChunkTask]],
) -> None:
    """Aligned grid: every chunk lies inside exactly one box, so a chunk claimed twice is
    an overlap and an unclaimed chunk a hole; no box intersections are needed."""
    owner: dict[ChunkIndex, int] = {}
    for box in boxes:
        w = writer_of[(name, box)]
        for idx in grid.touching(box):
            if idx in owner:  # two distinct unique pieces cover the same chunk
                raise ReshardError(
                    f"tensor {name!r}: pieces overlap without being identical replicas "
                    f"(ranks {owner[idx]} and {w} both hold chunk {list(idx)})"
                )
            owner[idx] = w
    for idx in grid.indices():
        holder = owner.get(idx)
        if holder is None:
            raise _not_covered(name, idx, grid.chunk_box(idx), 0)
        chunks[holder].append(ChunkTask(name, idx, grid.chunk_box(idx)))


def _not_covered(name: str, idx: ChunkIndex, cbox: Box, covered: int) -> ReshardError:
    return ReshardError(
        f"tensor {name!r} is not fully covered by the saved pieces: chunk {list(idx)} "
        f"(box {cbox.offsets}+{cbox.lengths}) has {covered} of {cbox.numel} elements; "
        "declare the missing shards or pass a layout that covers the tensor"
    )


def _check_disjoint(name: str, parts: list[tuple[Box, int]]) -> None:
    if len(parts) < 2:
        return
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            inter = parts[i][0].intersect(parts[j][0])
            if inter is not None:
                raise ReshardError(
                    f"tensor {name!r}: pieces overlap without being identical replicas "
                    f"(ranks {parts[i][1]} and {parts[j][1]} both hold {inter.offsets}+"
                    f"{inter.lengths})"
                )


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class StoredTensor:
    """What the load planner needs to know about a stored tensor (from the manifest)."""

    meta: TensorMeta
    chunk_shape: Shape
    chunk_keys: frozenset[ChunkIndex]

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.meta.shape, self.chunk_shape)


@dataclass(frozen=True)
class CopyOp:
    """Copy ``chunk_region`` (chunk-relative) of a chunk into a piece of local tensor ``key``.

    The destination is ``local[piece.local_box]`` viewed as ``piece.global_box.lengths``
    (a no-op unless the piece is reshaped, e.g. a flat shard), then ``piece_region`` of
    that view. Both regions have the same shape.
    """

    key: str
    piece: Piece
    chunk_region: Box
    piece_region: Box


@dataclass(frozen=True)
class ChunkRead:
    """One stored chunk to read and every copy out of it."""

    name: str
    index: ChunkIndex
    box: Box
    copies: tuple[CopyOp, ...]


@dataclass(frozen=True)
class LoadPlan:
    """Everything one rank reads: chunk reads grouped by chunk, and key bookkeeping."""

    reads: tuple[ChunkRead, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def nbytes(self, stored: Mapping[str, StoredTensor]) -> int:
        """Bytes of decoded chunk data this plan touches."""
        return sum(r.box.numel * itemsize_of(stored[r.name].meta.dtype) for r in self.reads)


def build_load_plan(
    layout: RankLayout,
    stored: Mapping[str, StoredTensor],
    allow_partial: bool = False,
) -> LoadPlan:
    """Map every piece of ``layout`` onto the stored chunks that hold it.

    Pieces of tensors absent from the checkpoint are reported in ``missing`` (whole local
    keys); stored tensors nobody asked for are ``unexpected``. Shape or dtype mismatches
    raise :class:`ReshardError` naming the tensor. A needed chunk absent from the
    manifest raises before anything is read (unless ``allow_partial``).
    """
    layout.validate()
    missing_keys: set[str] = set()
    asked: set[str] = set()
    per_chunk: dict[tuple[str, ChunkIndex], list[CopyOp]] = defaultdict(list)
    metas = layout.meta_by_name()
    for e in layout.entries:
        for p in e.pieces:
            st = stored.get(p.name)
            if st is None:
                missing_keys.add(e.key)
                continue
            asked.add(p.name)
            want = metas[p.name]
            if st.meta.dtype != want.dtype or st.meta.shape != want.shape:
                raise ReshardError(
                    f"tensor {p.name!r} (state key {e.key!r}): checkpoint has "
                    f"{st.meta.dtype}{list(st.meta.shape)}, the state expects "
                    f"{want.dtype}{list(want.shape)}"
                )
            grid = st.grid
            for idx in grid.touching(p.global_box):
                cbox = grid.chunk_box(idx)
                inter = cbox.intersect(p.global_box)
                if inter is None:
                    continue
                if idx not in st.chunk_keys and not allow_partial:
                    raise ReshardError(
                        f"tensor {p.name!r}: chunk {list(idx)} needed by {e.key!r} is missing "
                        "from the checkpoint manifest"
                    )
                per_chunk[(p.name, idx)].append(_copy_op(e.key, p, inter, cbox))
    for name, st in stored.items():
        if st.meta.numel == 0 and name in metas:
            asked.add(name)
    for e in layout.entries:  # a key whose every piece is empty still counts as found
        if not e.pieces and e.key in missing_keys:
            missing_keys.discard(e.key)
    reads = []
    for (name, idx), copies in sorted(per_chunk.items()):
        grid = stored[name].grid
        reads.append(ChunkRead(name, idx, grid.chunk_box(idx), tuple(copies)))
    unexpected = sorted(set(stored) - asked - {p.name for e in layout.entries for p in e.pieces})
    return LoadPlan(tuple(reads), tuple(sorted(missing_keys)), tuple(unexpected))


def _copy_op(key: str, p: Piece, inter: Box, cbox: Box) -> CopyOp:
    return CopyOp(key, p, inter.shift(cbox.offsets, -1), inter.shift(p.global_box.offsets, -1))


def build_piece_load_plan(
    layout: RankLayout,
    metas: Mapping[str, TensorMeta],
    stored: Mapping[str, Sequence[tuple[ChunkIndex, Box]]],
) -> LoadPlan:
    """Like :func:`build_load_plan`, but the stored regions are arbitrary boxes.

    For a checkpoint held as pieces (snapshots in daemon memory: each saving rank's
    unique pieces, which together cover every tensor exactly once) instead of a chunk
    grid. ``stored[name]`` lists (source id, global box) pairs; a :class:`ChunkRead`'s
    ``index`` is the source id and its ``box`` the stored piece's box. A region of a
    target piece that no stored piece covers raises :class:`ReshardError`.
    """
    layout.validate()
    missing_keys: set[str] = set()
    asked: set[str] = set()
    per_src: dict[tuple[str, ChunkIndex], list[CopyOp]] = defaultdict(list)
    boxes: dict[tuple[str, ChunkIndex], Box] = {}
    want_metas = layout.meta_by_name()
    for e in layout.entries:
        for p in e.pieces:
            st = metas.get(p.name)
            if st is None or p.name not in stored:
                missing_keys.add(e.key)
                continue
            asked.add(p.name)
            want = want_metas[p.name]
            if st.dtype != want.dtype or st.shape != want.shape:
                raise ReshardError(
                    f"tensor {p.name!r} (state key {e.key!r}): snapshot has "
                    f"{st.dtype}{list(st.shape)}, the state expects {want.dtype}{list(want.shape)}"
                )
            covered = 0
            for src, sbox in stored[p.name]:
                inter = sbox.intersect(p.global_box)
                if inter is None or inter.numel == 0:
                    continue
                covered += inter.numel
                boxes[(p.name, src)] = sbox
                per_src[(p.name, src)].append(_copy_op(e.key, p, inter, sbox))
            if covered != p.global_box.numel:
                raise ReshardError(
                    f"tensor {p.name!r} (state key {e.key!r}): the stored pieces cover "
                    f"{covered} of the {p.global_box.numel} elements of {p.global_box}"
                )
    for name, m in metas.items():
        if m.numel == 0 and name in want_metas:
            asked.add(name)
    for e in layout.entries:
        if not e.pieces and e.key in missing_keys:
            missing_keys.discard(e.key)
    reads = tuple(
        ChunkRead(name, src, boxes[(name, src)], tuple(copies))
        for (name, src), copies in sorted(per_src.items())
    )
    unexpected = sorted(set(metas) - asked - {p.name for e in layout.entries for p in e.pieces})
    return LoadPlan(reads, tuple(sorted(missing_keys)), tuple(unexpected))
