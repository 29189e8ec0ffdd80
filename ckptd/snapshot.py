"""The descriptor of one rank's in-memory snapshot: what its bytes are and what to do with them.

When ``ckpt.save`` goes through a daemon, rank r copies the unique pieces its save plan
gives it (``RankSavePlan.staged``) back to back into a shared-memory buffer (the
*payload*, laid out like a staging arena: each piece contiguous, 64-byte aligned) and
commits it with this descriptor. The descriptor is JSON (stored next to the payload in
shared memory, so it survives a trainer crash and a daemon restart, and sent over
sockets: never pickle). It carries everything the daemons need without the trainer:

* **load from memory**: the pieces (tensor name, global box, dtype, payload offset) of
  every rank of the save together cover every logical tensor exactly once (the planner
  validated it), so a restarted job of any layout plans its reads against them;
* **persistence**: this rank's part of the global save plan (chunks it writes, regions
  it sends to or receives from other ranks' snapshots, array records), so the daemon
  writes the universal format exactly as the in-process pipeline would;
* **commit**: RNG states, JSON trainer state and the coordinates of this rank, which the
  coordinator puts into the manifest;
* **placement**: the node (daemon) of every rank of the save, so a daemon knows where the
  other ranks' snapshots live and which daemons form the erasure groups.

Pure data: no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptd.dtypes import itemsize_of
from ckptd.errors import InvalidKeyError
from ckptd.formats.manifest import TensorRecord
from ckptd.formats.manifest_build import layouts_digest, record_json
from ckptd.formats.writer import WriterOptions, is_packed
from ckptd.fragments import Box, Piece, RankLayout, TensorMeta
from ckptd.planner import ChunkTask, RankSavePlan, SavePlan, StagedPiece, Transfer

FORMAT = 1
ALIGN = 64  # same alignment as client staging arenas


def align(n: int) -> int:
    """``n`` rounded up to the payload alignment."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class PayloadPiece:
    """Staged piece ``index`` of a rank: ``global_box`` of tensor ``name`` in ``dtype``,
    stored contiguously (row-major over the box) at ``offset`` of the payload."""

    name: str
    dtype: str
    global_box: Box
    offset: int

    @property
    def nbytes(self) -> int:
        return self.global_box.numel * itemsize_of(self.dtype)


def payload_pieces(
    staged: Sequence[StagedPiece], metas: Mapping[str, TensorMeta]
) -> list[PayloadPiece]:
    """Offsets of ``staged`` pieces back to back in a payload (the staging-arena layout)."""
    out, off = [], 0
    for s in staged:
        dtype = metas[s.piece.name].dtype
        p = PayloadPiece(s.piece.name, dtype, s.piece.global_box, off)
        out.append(p)
        off = align(off + p.nbytes)
    return out


def payload_nbytes(pieces: Sequence[PayloadPiece]) -> int:
    """Bytes of a payload holding ``pieces`` (the end of the last one, aligned)."""
    return align(pieces[-1].offset + pieces[-1].nbytes) if pieces else 0


class SharedParts:
    """Parsed parts that every rank's descriptor of one save repeats, reused by equality
    of their JSON (compared in C: far cheaper than building the objects again)."""

    def __init__(self) -> None:
        self._metas: list[tuple[Any, dict[str, TensorMeta]]] = []

    def metas(self, raw: Any) -> dict[str, TensorMeta]:
        """``{name: TensorMeta}`` of a descriptor's ``metas`` (shared: do not mutate)."""
        for seen, parsed in self._metas:
            if seen == raw:
                return parsed
        parsed = {n: TensorMeta(n, str(d), tuple(int(s) for s in shp))
                  for n, (d, shp) in raw.items()}
        self._metas = [*self._metas[-3:], (raw, parsed)]
        return parsed


@dataclass(frozen=True)
class SnapshotDescriptor:
    """One rank's snapshot of one step (see the module docstring).

    ``nodes[r]`` is the node name of the daemon holding rank r's snapshot; ``root`` the
    persistence URL the trainer asked for (None: the daemon's configured root);
    ``plan`` this rank's part of the save plan (``plan.staged[i]`` is ``pieces[i]``);
    ``records`` array records (chunk grid, codec; no chunks) of every tensor this rank
    writes chunks or array metadata of; ``meta_owned`` the unpacked arrays whose
    ``zarr.json`` this rank writes; ``metas`` every logical tensor of the save (so a
    reader knows shapes without the other descriptors).
    """

    job: str
    step: int
    rank: int
    world: int
    nodes: tuple[str, ...]
    root: str | None
    pieces: tuple[PayloadPiece, ...]
    plan: RankSavePlan
    records: dict[str, TensorRecord]
    meta_owned: tuple[str, ...]
    metas: dict[str, TensorMeta]
    rng: dict[str, Any]
    objects: dict[str, Any]
    coords: str
    layouts_digest: str
    format: int = FORMAT

    @property
    def nbytes(self) -> int:
        return payload_nbytes(self.pieces)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (inverse: :meth:`from_json`)."""
        p = self.plan
        return {
            "format": self.format,
            "job": self.job,
            "step": self.step,
            "rank": self.rank,
            "world": self.world,
            "nodes": list(self.nodes),
            "root": self.root,
            "pieces": [[x.name, x.dtype, x.global_box.to_json(), x.offset] for x in self.pieces],
            "staged": [[s.key, s.piece.local_box.to_json()] for s in p.staged],
            "sends": [[t.name, t.box.to_json(), t.src, t.dst] for t in p.sends],
            "recvs": [[t.name, t.box.to_json(), t.src, t.dst] for t in p.recvs],
            "chunks": [[c.name, list(c.index), c.box.to_json()] for c in p.chunks],
            "records": {n: record_json(r) for n, r in self.records.items()},
            "meta_owned": list(self.meta_owned),
            "metas": {n: [m.dtype, list(m.shape)] for n, m in self.metas.items()},
            "rng": self.rng,
            "objects": self.objects,
            "coords": self.coords,
            "layouts_digest": self.layouts_digest,
        }

    def dumps(self) -> bytes:
        """Compact JSON bytes (encoded once: a daemon answers every status query with them,
        and a large save's descriptor takes tens of milliseconds to encode)."""
        cached = self.__dict__.get("_json_bytes")
        if cached is None:
            cached = json.dumps(self.to_json(), separators=(",", ":")).encode()
            self.__dict__["_json_bytes"] = cached  # immutable: a cache, not state (frozen)
        return cached

    @staticmethod
    def from_json(obj: dict[str, Any], *, shared: SharedParts | None = None,
                  full: bool = True) -> SnapshotDescriptor:
        """Parse and check a descriptor; ``InvalidKeyError`` says what is wrong.

        ``shared``: parts repeated by every rank's descriptor of a save (the metas of
        every logical tensor) are parsed once per ``SharedParts``, not once per rank (a
        loader reads all ranks' descriptors: O(world x tensors) otherwise).
        ``full=False`` parses only what a load needs: ``records`` and the save ``plan``
        (only persisting needs them, and they are most of the parse) are left empty.
        """
        try:
            if int(obj["format"]) != FORMAT:
                raise InvalidKeyError(f"snapshot descriptor format {obj['format']} is not {FORMAT}")
            pieces = tuple(
                PayloadPiece(str(n), str(d), Box.from_json(b), int(o))
                for n, d, b, o in obj["pieces"]
            )
            staged = tuple(
                StagedPiece(str(k), Piece(pp.name, pp.global_box, Box.from_json(lb)))
                for (k, lb), pp in zip(obj["staged"], pieces, strict=True)
            ) if full else ()

            def transfers(key: str) -> tuple[Transfer, ...]:
                return tuple(
                    Transfer(str(n), Box.from_json(b), int(s), int(d)) for n, b, s, d in obj[key]
                ) if full else ()

            rank = int(obj["rank"])
            plan = RankSavePlan(
                rank=rank,
                staged=staged,
                sends=transfers("sends"),
                recvs=transfers("recvs"),
                chunks=tuple(
                    ChunkTask(str(n), tuple(int(i) for i in idx), Box.from_json(b))
                    for n, idx, b in obj["chunks"]
                ) if full else (),
            )
            desc = SnapshotDescriptor(
                job=str(obj["job"]),
                step=int(obj["step"]),
                rank=rank,
                world=int(obj["world"]),
                nodes=tuple(str(n) for n in obj["nodes"]),
                root=None if obj["root"] is None else str(obj["root"]),
                pieces=pieces,
                plan=plan,
                records={
                    n: TensorRecord.from_json(n, {**r, "chunks": []})
                    for n, r in obj["records"].items()
                } if full else {},
                meta_owned=tuple(str(n) for n in obj["meta_owned"]),
                metas=(shared or SharedParts()).metas(obj["metas"]),
                rng=dict(obj["rng"]),
                objects=dict(obj["objects"]),
                coords=str(obj["coords"]),
                layouts_digest=str(obj["layouts_digest"]),
            )
        except InvalidKeyError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidKeyError(f"malformed snapshot descriptor: {type(e).__name__}: {e}") from e
        desc.check()
        return desc

    @staticmethod
    def loads(data: bytes | str, *, shared: SharedParts | None = None,
              full: bool = True) -> SnapshotDescriptor:
        """Parse :meth:`dumps` output (keywords as in :meth:`from_json`)."""
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise InvalidKeyError(f"snapshot descriptor is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InvalidKeyError("snapshot descriptor is not a JSON object")
        return SnapshotDescriptor.from_json(obj, shared=shared, full=full)

    def check(self) -> None:
        """Consistency checks that make the descriptor safe to act on."""
        where = f"snapshot descriptor of job {self.job!r} step {self.step} rank {self.rank}"
        if not 0 <= self.rank < self.world or len(self.nodes) != self.world:
            raise InvalidKeyError(f"{where}: rank/world/nodes disagree")
        if self.step < 0:
            raise InvalidKeyError(f"{where}: negative step")
        end = 0
        for p in self.pieces:
            meta = self.metas.get(p.name)
            if meta is None or meta.dtype != p.dtype or not p.global_box.fits_in(meta.shape):
                raise InvalidKeyError(f"{where}: piece of {p.name!r} {p.global_box} does not fit")
            if p.offset < end or p.offset % ALIGN:
                raise InvalidKeyError(f"{where}: piece of {p.name!r} at bad offset {p.offset}")
            end = p.offset + p.nbytes
        for t in (*self.plan.sends, *self.plan.recvs):
            if not (0 <= t.src < self.world and 0 <= t.dst < self.world):
                raise InvalidKeyError(f"{where}: transfer of {t.name!r} names a rank out of range")


# ------------------------------------------------------------------ building descriptors
# Shared by the client (one rank builds its own descriptor) and the in-process pipeline
# (``ckpt.saver._derive`` computes the same records and metadata owners), so that what a
# daemon persists from a descriptor is byte for byte what the in-process save writes.


def array_records(
    plan: SavePlan, codecs: Mapping[str, str], level: int, options: WriterOptions
) -> dict[str, TensorRecord]:
    """The array record (chunk grid, codec, packing; no chunks) of every tensor of ``plan``.

    ``codecs[name]`` is the codec chosen for the tensor (``CodecPolicy.choose`` over every
    rank's samples); ``level`` the policy's compression level; ``options`` decide packing.
    """
    out = {}
    for name, tp in plan.tensors.items():
        packed = is_packed(tp.meta.shape, tp.meta.dtype, options)
        out[name] = TensorRecord(
            name, tp.meta.dtype, tp.meta.shape, tp.grid.chunk_shape, codecs[name], level, packed, ()
        )
    return out


def chunkless_tensors(plan: SavePlan) -> set[str]:
    """Tensors no rank writes a chunk of (zero-size): rank 0 answers for them."""
    return {n for n, tp in plan.tensors.items() if tp.grid.n_chunks == 0 or tp.meta.numel == 0}


def meta_owned(plan: SavePlan, rank: int, records: Mapping[str, TensorRecord]) -> tuple[str, ...]:
    """The unpacked arrays whose ``zarr.json`` ``rank`` writes: the owner of chunk 0, and
    rank 0 for arrays without any chunk (their metadata is still needed)."""
    rp = plan.for_rank(rank)
    zero = {name: tuple(0 for _ in tp.meta.shape) for name, tp in plan.tensors.items()}
    owned = {c.name for c in rp.chunks if c.index == zero[c.name] and not records[c.name].packed}
    if rank == 0:
        owned |= {n for n in chunkless_tensors(plan) if not records[n].packed}
    return tuple(sorted(owned))


def build_descriptor(
    plan: SavePlan,
    rank: int,
    layouts: Sequence[RankLayout],
    records: Mapping[str, TensorRecord],
    *,
    job: str,
    step: int,
    nodes: Sequence[str],
    root: str | None = None,
    rng: dict[str, Any] | None = None,
    objects: dict[str, Any] | None = None,
    digest: str | None = None,
) -> SnapshotDescriptor:
    """Rank ``rank``'s descriptor of a save planned as ``plan`` from ``layouts``.

    ``records`` are :func:`array_records` of every tensor (the descriptor keeps those this
    rank writes chunks or metadata of; rank 0 also those of chunkless tensors, so that the
    union over every rank's report names every tensor of the save). ``rng``/``objects``
    are this rank's RNG states and JSON trainer state; ``digest`` defaults to
    :func:`~ckptd.formats.manifest_build.layouts_digest` of ``layouts`` (pass it when
    building several descriptors of one save, it hashes every layout). The payload is
    laid out by :func:`payload_pieces` of the plan's staged pieces.
    """
    if len(layouts) != plan.world_size or len(nodes) != plan.world_size:
        raise InvalidKeyError(
            f"{len(layouts)} layouts and {len(nodes)} nodes for a plan of {plan.world_size} ranks"
        )
    rp = plan.for_rank(rank)
    metas = {n: tp.meta for n, tp in plan.tensors.items()}
    owned = meta_owned(plan, rank, records)
    mine = {c.name for c in rp.chunks} | set(owned)
    if rank == 0:
        mine |= chunkless_tensors(plan)
    by_rank = {lay.rank: lay for lay in layouts}
    desc = SnapshotDescriptor(
        job=job,
        step=step,
        rank=rank,
        world=plan.world_size,
        nodes=tuple(nodes),
        root=root,
        pieces=tuple(payload_pieces(rp.staged, metas)),
        plan=rp,
        records={n: records[n] for n in sorted(mine)},
        meta_owned=owned,
        metas=metas,
        rng=dict(rng or {}),
        objects=dict(objects or {}),
        coords=by_rank[rank].coords_key(),
        layouts_digest=(
            digest if digest is not None
            else layouts_digest(sorted(layouts, key=lambda lay: lay.rank))
        ),
    )
    desc.check()
    return desc


def build_descriptors(
    plan: SavePlan,
    layouts: Sequence[RankLayout],
    records: Mapping[str, TensorRecord],
    *,
    job: str,
    step: int,
    nodes: Sequence[str],
    root: str | None = None,
    rng: Sequence[dict[str, Any]] | None = None,
    objects: Sequence[dict[str, Any]] | None = None,
) -> list[SnapshotDescriptor]:
    """:func:`build_descriptor` for every rank (``rng[r]``/``objects[r]`` per rank)."""
    digest = layouts_digest(sorted(layouts, key=lambda lay: lay.rank))
    return [
        build_descriptor(
            plan,
            r,
            layouts,
            records,
            job=job,
            step=step,
            nodes=nodes,
            root=root,
            rng=rng[r] if rng is not None else None,
            objects=objects[r] if objects is not None else None,
            digest=digest,
        )
        for r in range(plan.world_size)
    ]

