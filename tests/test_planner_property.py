"""Property tests: save under a random layout A, load under a random layout B.

Pure planning + byte moving in memory (tests/planning_sim.py): identical global tensors
for every combination of replicated, uneven splits (including empty shards), padded
splits, fused QKV-like tensors, ZeRO flat partitions and pipeline renumbering.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_sim import make_locals, simulate_load, simulate_save

from ckptd.errors import ReshardError
from ckptd.fragments import LocalEntry, RankLayout, TensorMeta
from ckptd.layout import LayerOffset
from ckptd.placements import FlatShard, Fused, Replicated, Split

KINDS = ["replicate", "split", "pad", "fused", "zero", "pp"]


def build_layout(model: dict[str, tuple[int, ...]], kind: str, world: int, dim: int, align: int):
    """Rank layouts of ``model`` (name -> global shape) under one layout kind."""
    layouts = []
    names = sorted(model)
    if kind == "zero":
        flat = FlatShard.flat_size([(n, model[n]) for n in names], align)
        bounds = [flat * r // world for r in range(world + 1)]
    for r in range(world):
        metas, entries = {}, []

        def add(key, local_shape, placement, name=None, metas=metas, entries=entries):
            ms, ps = placement.resolve(name or key, tuple(local_shape), "float32")
            for m in ms:
                metas[m.name] = m
            entries.append(LocalEntry(key, tuple(local_shape), "float32", ps))

        if kind == "zero":
            fs = FlatShard.pack([(n, model[n]) for n in names], bounds[r], align)
            add(f"flat.{r}", (bounds[r + 1] - bounds[r],), fs, name="flat")
        for n in names:
            shape = model[n]
            if kind == "zero":
                continue
            d = min(dim, len(shape) - 1) if shape else 0
            if kind == "pp":
                # Layers are spread over stages; each stage renumbers its layers from 0.
                layer = int(n.split(".")[1])
                stages = [i * world // len(names) for i in range(len(names))]
                if stages[layer] != r:
                    continue
                first = stages.index(r)
                local_key = f"layers.{layer - first}.w"
                add(local_key, shape, Replicated(), name=LayerOffset(first)(local_key))
            elif (
                kind == "replicate"
                or not shape
                or (kind in ("split", "fused") and shape[0] % world and kind == "fused")
            ):
                add(n, shape, Replicated())
            elif kind == "split":
                step = -(-shape[d] // world)
                start = min(r * step, shape[d])
                local = list(shape)
                local[d] = min(step, shape[d] - start)
                add(n, local, Split(d, r, world, global_size=shape[d], uneven=True))
            elif kind == "pad":
                per = -(-shape[d] // world)
                local = list(shape)
                local[d] = per
                add(n, local, Split(d, r, world, global_size=shape[d]))
            elif kind == "fused":
                # Two parts on dim 0, each divisible by world when possible.
                p0 = (shape[0] // world // 2) * world
                parts = (p0, shape[0] - p0) if p0 and (shape[0] - p0) % world == 0 else (shape[0],)
                local = list(shape)
                local[0] = shape[0] // world
                add(n, local, Fused(0, parts, r, world))
        layouts.append(RankLayout(r, (("dp", r),), tuple(metas.values()), tuple(entries)))
    return layouts


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@st.composite
def models(draw):
    n = draw(st.integers(1, 4))
    return {f"layers.{i}.w": draw(shapes) for i in range(n)}


def globals_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=g) if math.prod(s) else torch.empty(s) for n, s in model.items()
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=models(),
    kind_a=st.sampled_from(KINDS),
    kind_b=st.sampled_from(KINDS),
    world_a=st.integers(1, 5),
    world_b=st.integers(1, 5),
    dim_a=st.integers(0, 2),
    dim_b=st.integers(0, 2),
    align=st.sampled_from([1, 4]),
    target=st.sampled_from([4, 16, 64, 1 << 20]),
)
def test_save_a_load_b_identical(
    model, kind_a, kind_b, world_a, world_b, dim_a, dim_b, align, target
):
    glob = globals_for(model)
    lay_a = build_layout(model, kind_a, world_a, dim_a, align)
    lay_b = build_layout(model, kind_b, world_b, dim_b, align)
    locals_a = [make_locals(lay, glob, seed=lay.rank) for lay in lay_a]
    _, stored, chunks = simulate_save(
        lay_a, locals_a, target_chunk_bytes=target, min_aligned_chunk_bytes=min(target, 8)
    )
    # Every logical tensor's chunks reassemble to the global tensor (A side).
    for lay in lay_b:
        locs = make_locals(lay, {n: torch.full_like(t, float("nan")) for n, t in glob.items()}, 99)
        simulate_load(lay, stored, chunks, locs)
        expect = make_locals(lay, glob, seed=99)
        for e in lay.entries:
            for p in e.pieces:
                from ckptd.execute import piece_view

                got = piece_view(locs[e.key], p)
                want = piece_view(expect[e.key], p)
                assert torch.equal(got, want), (e.key, p)


def test_six_rows_over_four_ranks_roundtrip():
    model = {"layers.0.w": (6, 3)}
    glob = globals_for(model)
    a = build_layout(model, "split", 4, 0, 1)
    assert [e.local_shape for lay in a for e in lay.entries] == [(2, 3), (2, 3), (2, 3), (0, 3)]
    locs = [make_locals(lay, glob, lay.rank) for lay in a]
    _, stored, chunks = simulate_save(a, locs)
    b = build_layout(model, "replicate", 1, 0, 1)[0]
    out = {"layers.0.w": torch.zeros(6, 3)}
    simulate_load(b, stored, chunks, out)
    assert torch.equal(out["layers.0.w"], glob["layers.0.w"])


def test_a_b_a_identity():
    model = {"layers.0.w": (7, 5), "layers.1.w": (3,), "layers.2.w": (4, 4)}
    glob = globals_for(model)
    a = build_layout(model, "zero", 3, 0, 4)
    b = build_layout(model, "split", 2, 1, 1)
    locs_a = [make_locals(lay, glob, lay.rank) for lay in a]
    _, st_a, ch_a = simulate_save(a, locs_a, target_chunk_bytes=16)
    locs_b = [make_locals(lay, glob, 50 + lay.rank) for lay in b]
    for lay, loc in zip(b, locs_b):
        simulate_load(lay, st_a, ch_a, loc)
    _, st_b, ch_b = simulate_save(b, locs_b, target_chunk_bytes=16)
    for lay in a:
        loc = make_locals(lay, {n: torch.zeros_like(t) for n, t in glob.items()}, 7)
        simulate_load(lay, st_b, ch_b, loc)
        for e in lay.entries:
            ref = make_locals(lay, glob, 7)[e.key]
            for p in e.pieces:
                from ckptd.execute import piece_view

                assert torch.equal(piece_view(loc[e.key], p), piece_view(ref, p))


def test_incomplete_coverage_is_rejected_before_any_byte_moves():
    model = {"layers.0.w": (4, 2)}
    a = build_layout(model, "split", 2, 0, 1)[:1]  # rank 1 missing: half the rows
    a = [RankLayout(0, (), a[0].tensors, a[0].entries)]
    with pytest.raises(ReshardError, match="not fully covered"):
        simulate_save(a, [make_locals(a[0], globals_for(model), 0)])


def test_overlapping_non_identical_pieces_rejected():
    from ckptd.placements import Block

    metas = (TensorMeta("w", "float32", (4,)),)
    r0 = RankLayout(
        0,
        (),
        metas,
        (LocalEntry("w", (3,), "float32", Block((4,), (0,)).resolve("w", (3,), "float32")[1]),),
    )
    r1 = RankLayout(
        1,
        (),
        metas,
        (LocalEntry("w", (3,), "float32", Block((4,), (1,)).resolve("w", (3,), "float32")[1]),),
    )
    with pytest.raises(ReshardError, match="overlap"):
        simulate_save([r0, r1], [{"w": torch.zeros(3)}, {"w": torch.zeros(3)}])
