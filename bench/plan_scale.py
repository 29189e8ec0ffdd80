"""Planner scale benchmark: a simulated 4,096-rank layout of a 1,000-tensor model.

    python bench/plan_scale.py [--tp 8 --pp 8 --dp 64 --layers 96] [--repeats 3]

No processes, no I/O: builds every rank's RankLayout (Megatron-style TP with column /
row splits and replicated norms, PP stage renumbering, ZeRO-1 distributed optimizer:
fp32 master, exp_avg and exp_avg_sq flat-partitioned over DP inside each TP x PP
group), serializes them as a gather would, and times build_save_plan (validation
included) and one rank's build_load_plan under a different layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from ckptd.fragments import LocalEntry, RankLayout, TensorMeta, layout_from_json, layout_to_json
from ckptd.placements import FlatParam, FlatShard, Placement, Replicated, Split
from ckptd.planner import StoredTensor, build_load_plan, build_save_plan

HIDDEN, FFN = 8192, 28672
PER_LAYER = [  # name, global shape, TP dim (None: replicated)
    ("attn.qkv.weight", (3 * HIDDEN, HIDDEN), 0),
    ("attn.qkv.bias", (3 * HIDDEN,), 0),
    ("attn.proj.weight", (HIDDEN, HIDDEN), 1),
    ("attn.proj.bias", (HIDDEN,), None),
    ("mlp.fc1.weight", (FFN, HIDDEN), 0),
    ("mlp.fc1.bias", (FFN,), 0),
    ("mlp.fc2.weight", (HIDDEN, FFN), 1),
    ("mlp.fc2.bias", (HIDDEN,), None),
    ("ln1.weight", (HIDDEN,), None),
    ("ln2.weight", (HIDDEN,), None),
]


def rank_layouts(tp: int, pp: int, dp: int, layers: int) -> list[RankLayout]:
    """Every rank's layout, rank = ((pp_i * dp) + dp_i) * tp + tp_i."""
    per_stage = layers // pp
    out = []
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                rank = (p * dp + d) * tp + t
                metas: dict[str, TensorMeta] = {}
                entries = []
                flat_params = []
                for i in range(per_stage):
                    g = p * per_stage + i
                    for suffix, shape, dim in PER_LAYER:
                        name = f"model.layers.{g}.{suffix}"
                        local = list(shape)
                        pl: Placement = Replicated()
                        offs = [0] * len(shape)
                        if dim is not None:
                            local[dim] //= tp
                            offs[dim] = t * local[dim]
                            pl = Split(dim, t, tp)
                        ms, ps = pl.resolve(name, tuple(local), "bfloat16")
                        metas.update({m.name: m for m in ms})
                        entries.append(
                            LocalEntry(f"model.layers.{i}.{suffix}", tuple(local), "bfloat16", ps)
                        )
                        flat_params.append((name, tuple(local), tuple(shape), tuple(offs)))
                total = FlatShard.flat_size([(n, s) for n, s, _, _ in flat_params], align=128)
                lo, hi = total * d // dp, total * (d + 1) // dp
                for kind in ("master", "exp_avg", "exp_avg_sq"):
                    fs = FlatShard.pack(
                        [
                            FlatParam(f"optim.{n}.{kind}", s, 0, gs, go)
                            for n, s, gs, go in flat_params
                        ],
                        lo,
                        align=128,
                    )
                    ms, ps = fs.resolve("", (hi - lo,), "float32")
                    metas.update({m.name: m for m in ms})
                    entries.append(LocalEntry(f"optim.{kind}", (hi - lo,), "float32", ps))
                coords = (("dp", d), ("pp", p), ("tp", t))
                out.append(RankLayout(rank, coords, tuple(metas.values()), tuple(entries)))
    return out


def main() -> None:
    """Build the layouts, time the planner, print a summary line per measurement."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=8)
    ap.add_argument("--dp", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    lays = rank_layouts(args.tp, args.pp, args.dp, args.layers)
    build_s = time.perf_counter() - t0
    n_tensors = len({m.name for lay in lays for m in lay.tensors})
    n_pieces = sum(len(e.pieces) for lay in lays for e in lay.entries)
    print(
        f"ranks={len(lays)} logical tensors={n_tensors} pieces={n_pieces} "
        f"(built in {build_s:.1f} s)"
    )
    t0 = time.perf_counter()
    wire = [json.dumps(layout_to_json(lay)) for lay in lays]
    lays = [layout_from_json(json.loads(w)) for w in wire]
    ser_s = time.perf_counter() - t0
    print(
        "serialize + parse all layouts (the one gather): "
        f"{ser_s:.2f} s, {sum(map(len, wire)) / 2**20:.0f} MiB"
    )
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = build_save_plan(lays)
        times.append(time.perf_counter() - t0)
    chunks = sum(len(r.chunks) for r in plan.ranks)
    transfers = sum(len(r.sends) for r in plan.ranks)
    print(
        f"build_save_plan: median {statistics.median(times):.2f} s over {args.repeats} "
        f"(chunks={chunks}, boundary transfers={transfers})"
    )
    stored = {
        n: StoredTensor(tp.meta, tp.grid.chunk_shape, frozenset(tp.grid.indices()))
        for n, tp in plan.tensors.items()
    }
    t0 = time.perf_counter()
    build_load_plan(lays[len(lays) // 2], stored)
    print(f"build_load_plan (one rank): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
