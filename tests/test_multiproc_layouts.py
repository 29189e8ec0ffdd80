"""Multi-process save/load under changing layouts (gloo on loopback, CPU), bit-exact.

Each scenario saves under layout A on N_A ranks and loads under layout B on N_B ranks,
within one run of spawned processes (tests/mp_harness.py: one process group per phase).
Every process builds the *global* tensors from a seed and derives its local tensors
with the reference slicing of tests/models_tiny.py; after a load each rank compares its
local tensors (model and Adam exp_avg / exp_avg_sq / step) with what they must be.
Load targets start as SENTINEL, so an element that a load forgot is caught, and
padding (vocabulary, ZeRO alignment) must stay untouched or be zero-filled.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from models_tiny import (
    ADAM_KEYS,
    SENTINEL,
    TSpec,
    adam_globals,
    adam_with_state,
    assert_bits,
    assert_local,
    chunk_bounds,
    flat_buffer,
    flat_offsets,
    gen,
    gpt_specs,
    module_from,
    tp_local,
    tp_padding_mask,
    tp_placement,
)
from mp_harness import Proc, run

import ckpt

pytestmark = pytest.mark.slow

SAVE_FILL = 777.0  # padding content at save time: must never reach the checkpoint


# =============================================================== 1. DP=2 replicated

DP_SHAPES = {"fc1.weight": (16, 8), "fc1.bias": (16,), "norm.weight": (16,), "fc2.weight": (4, 16)}


def _dp_globals() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: gen(n, s, seed=1) for n, s in DP_SHAPES.items()}
    return params, adam_globals(params, seed=2)


def _dp_save(rank: int, world: int, root: str) -> None:
    params, moments = _dp_globals()
    model = module_from(params)
    opt = adam_with_state(model, moments, step=7)
    state = {"model": model, "optim": opt, "step": 7}
    h = ckpt.save(state, 7, root, blocking=False, layout=ckpt.Layout(coords={"dp": rank}))
    # An async save returns once the tensors are staged: changing them now (the next
    # optimizer step) must not change the checkpoint.
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(1.0)
            opt.state[prm]["exp_avg"].add_(1.0)
    h.wait()


def _dp_load(rank: int, world: int, root: str) -> None:
    params, moments = _dp_globals()
    model = module_from({n: torch.full_like(t, SENTINEL) for n, t in params.items()})
    opt = adam_with_state(model, None, step=0)
    state = {"model": model, "optim": opt, "step": 0}
    layout = ckpt.Layout(coords={"dp": rank}) if world > 1 else None
    res = ckpt.load(state, root, strict=True, layout=layout)
    assert res.step == 7 and state["step"] == 7, (res, state["step"])
    _check_module_and_adam(model, opt, params, moments, step=7, what=f"dp rank {rank}/{world}")


def _check_module_and_adam(model, opt, params, moments, step, what, local=None, pad=None):
    """Compare params and Adam state; ``local(name, global)`` maps globals to this rank."""
    local = local or (lambda n, g: g)
    for fqn, p in model.named_parameters():
        m = pad(fqn) if pad else None
        assert_local(p.detach(), local(fqn, params[fqn]), m, f"{what}: param {fqn}")
        st = opt.state[p]
        for k in ADAM_KEYS:
            assert_local(st[k], local(fqn, moments[f"{fqn}.{k}"]), m, f"{what}: {fqn}.{k}")
        assert float(st["step"]) == step, f"{what}: {fqn}.step = {st['step']}"


def _dp_body(p: Proc, root: str) -> None:
    p.phase(2, _dp_save, root)
    p.phase(2, _dp_load, root)  # same layout
    p.solo(_dp_load, 0, 1, root)  # one process, no torch.distributed


def test_dp2_replicated_module_and_adam_to_dp2_and_one_process(tmp_path):
    run(_dp_body, 2, (str(tmp_path / "ckpt"),), timeout=90)


# ============================================== 2. DTensor Shard(0): 4 -> 2 -> 1 process

DT_SHAPES = {"model.w": (8, 3), "model.u": (6, 5), "model.b": (6,)}  # 6 rows / 4 ranks: 2,2,2,0
DT_REPL = {"model.scale": (3,)}
# Saved on a 2-D (dp, tp) mesh of the 4 ranks: FSDP x TP, and TP-sharded / DP-replicated.
DT_2D = {"model.m2": ((6, 4), ("S0", "S1")), "model.m2r": ((8, 3), ("R", "S0"))}


def _dt_globals() -> dict[str, torch.Tensor]:
    shapes = {**DT_SHAPES, **DT_REPL, **{n: s for n, (s, _) in DT_2D.items()}}
    out = {n: gen(n, s, seed=3) for n, s in shapes.items()}
    for n, s in DT_SHAPES.items():
        for k in ADAM_KEYS:
            key = f"optim.{n}.{k}"
            out[key] = gen(key, s, seed=4)
    return out


def _dt_state(world: int, fill: float | None) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = _dt_globals()
    mesh = init_device_mesh("cpu", (world,))
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
    named = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    state: dict[str, torch.Tensor] = {}
    for n, t in g.items():
        src = t if fill is None else torch.full_like(t, fill)
        if n in DT_2D and mesh2d is not None:
            state[n] = distribute_tensor(src, mesh2d, [named[x] for x in DT_2D[n][1]])
            continue
        placement = Replicate() if n in DT_REPL else Shard(0)
        state[n] = distribute_tensor(src, mesh, [placement])
    state["optim.step"] = torch.tensor(5.0 if fill is None else fill)
    return state


def _dt_save(rank: int, world: int, root: str) -> None:
    state = _dt_state(world, None)
    assert state["model.u"].to_local().shape[0] == (0 if rank == 3 else 2)  # the empty shard
    assert tuple(state["model.m2"].to_local().shape) == (3, 2)
    ckpt.save(state, 5, root, blocking=False).wait()


def _dt_load(rank: int, world: int, root: str) -> None:
    from torch.distributed.tensor import DTensor

    state = _dt_state(world, SENTINEL)
    ckpt.load(state, root, strict=True)
    for n, g in _dt_globals().items():
        t = state[n]
        assert isinstance(t, DTensor)
        want = g if n in DT_REPL else g[slice(*chunk_bounds(g.shape[0], rank, world))]
        assert_bits(t.to_local(), want, f"DTensor rank {rank}/{world}: {n}")
    assert float(state["optim.step"]) == 5.0
    # The DTensors are intact: gathering them gives the globals.
    assert_bits(state["model.u"].full_tensor(), _dt_globals()["model.u"], "full_tensor(model.u)")


def _dt_load_plain(root: str) -> None:
    g = _dt_globals()
    state = {n: torch.full_like(t, SENTINEL) for n, t in g.items()}
    state["optim.step"] = torch.tensor(0.0)
    ckpt.load(state, root, strict=True)
    for n, t in g.items():
        assert_bits(state[n], t, f"one process: {n}")
    assert float(state["optim.step"]) == 5.0


def _dt_body(p: Proc, root: str) -> None:
    p.phase(4, _dt_save, root)
    p.phase(2, _dt_load, root)
    p.solo(_dt_load_plain, root)


def test_dtensor_shard0_and_2d_mesh_4_ranks_to_2_ranks_and_one_process(tmp_path):
    run(_dt_body, 4, (str(tmp_path / "ckpt"),), timeout=90)


# ================================================ 3. Megatron TP=2 -> TP=4 (module + Adam)

TP_SPECS = gpt_specs(layers=1)


def _gpt_globals(
    specs: list[TSpec], seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {s.name: gen(s.name, s.shape, seed, s.dtype) for s in specs}
    return params, adam_globals(params, seed + 1)


def _tp_module(rank: int, tp: int, load: bool):
    params, moments = _gpt_globals(TP_SPECS, seed=10)
    by = {s.name: s for s in TP_SPECS}
    fill = SENTINEL if load else SAVE_FILL

    def local(name: str, g: torch.Tensor) -> torch.Tensor:
        return tp_local(by[name], g, rank, tp, fill)

    lp = {n: local(n, g) for n, g in params.items()}
    if load:
        lp = {n: torch.full_like(t, SENTINEL) for n, t in lp.items()}
    model = module_from(lp)
    lm = None if load else {k: local(k.rsplit(".", 1)[0], g) for k, g in moments.items()}
    opt = adam_with_state(model, lm, step=0 if load else 3)
    layout = ckpt.Layout(
        rules={f"model.{s.name}": tp_placement(s, rank, tp) for s in TP_SPECS}, coords={"tp": rank}
    )
    return model, opt, layout, params, moments, local, (lambda n: tp_padding_mask(by[n], rank, tp))


def _tp_save(rank: int, world: int, root: str) -> None:
    model, opt, layout, *_ = _tp_module(rank, world, load=False)
    ckpt.save({"model": model, "optim": opt}, 3, root, blocking=False, layout=layout).wait()


def _tp_load(rank: int, world: int, root: str) -> None:
    model, opt, layout, params, moments, local, pad = _tp_module(rank, world, load=True)
    ckpt.load({"model": model, "optim": opt}, root, strict=True, layout=layout)
    _check_module_and_adam(model, opt, params, moments, 3, f"tp rank {rank}/{world}", local, pad)


def _canonical_load(root: str, specs: list[TSpec], seed: int, step: float) -> None:
    """One process, no layout: the checkpoint holds canonical (unfused, unpadded) tensors."""
    params, moments = _gpt_globals(specs, seed)
    model = module_from({n: torch.full_like(t, SENTINEL) for n, t in params.items()})
    opt = adam_with_state(model, None, step=0)
    ckpt.load({"model": model, "optim": opt}, root, strict=True)
    _check_module_and_adam(model, opt, params, moments, step, "one process (canonical)")


def _tp_body(p: Proc, root: str) -> None:
    p.phase(2, _tp_save, root)
    p.phase(4, _tp_load, root)
    p.phase(2, _tp_load, root)
    p.solo(_canonical_load, root, TP_SPECS, 10, 3.0)


def test_megatron_tp2_to_tp4_fused_gqa_padded_vocab_with_adam(tmp_path):
    run(_tp_body, 4, (str(tmp_path / "ckpt"),), timeout=90)


# ===================================== 4/5. ZeRO-1/2 (DP=4 -> 2) and ZeRO-3 (DP=4 -> 3)

Z_SHAPES = {"layers.0.w": (5, 7), "layers.0.b": (5,), "layers.1.w": (3, 7), "head.w": (3, 3)}
ALIGN = 4  # offsets 0, 36, 44, 68; 77 elements; DP=4 boundaries 20, 40, 60 cut rows


def _z_globals() -> dict[str, torch.Tensor]:
    params = {n: gen(n, s, seed=20) for n, s in Z_SHAPES.items()}
    out = {f"model.{n}": t for n, t in params.items()}
    out |= {f"master.{n}": t for n, t in params.items()}  # fp32 master weights
    out |= {f"optim.{k}": t for k, t in adam_globals(params, seed=21).items()}
    return out


def _partition(world: int) -> tuple[int, int]:
    """(padded flat size, part per rank): padded to a multiple of world * ALIGN."""
    _, total = flat_offsets(Z_SHAPES, ALIGN)
    m = world * ALIGN
    padded = -(-total // m) * m
    return padded, padded // world


def _flat(
    kind: str, rank: int, world: int, fill: float
) -> tuple[torch.Tensor, ckpt.Placement, torch.Tensor]:
    """Rank's local slice of flat buffer ``kind``, its FlatShard, and its padding mask.

    ``kind`` is the logical-name template: ``model.{}``, ``master.{}``, ``optim.{}.exp_avg``.
    """
    padded, part = _partition(world)
    names = {n: kind.format(n) for n in Z_SHAPES}
    g = _z_globals()
    sl = slice(rank * part, (rank + 1) * part)
    buf = flat_buffer(g, names, ALIGN, padded, fill)[sl].clone()
    zeros = {k: torch.zeros_like(v) for k, v in g.items()}
    pad = flat_buffer(zeros, names, ALIGN, padded, 1.0)[sl].bool()
    shard = ckpt.FlatShard.pack([(names[n], s) for n, s in Z_SHAPES.items()], rank * part, ALIGN)
    return buf, shard, pad


def _zero_state(stage: int, rank: int, world: int, load: bool):
    """ZeRO-1/2 (stage 1): params replicated, master/moments flat-partitioned.
    ZeRO-3 (stage 3): params flat-partitioned as well."""
    g = _z_globals()
    fill = SENTINEL if load else SAVE_FILL
    flats = {"optim.master": "master.{}"} | {f"optim.{k}": "optim.{}." + k for k in ADAM_KEYS}
    if stage == 3:
        flats["model.flat_param"] = "model.{}"
    state: dict = {"model": {}, "optim": {"step": torch.tensor(SENTINEL if load else 11.0)}}
    rules, expect = {}, {}
    for key, kind in flats.items():
        buf, shard, pad = _flat(kind, rank, world, SAVE_FILL)
        expect[key] = (buf, pad)
        rules[key] = shard
        top, sub = key.split(".", 1)
        state[top][sub] = torch.full_like(buf, fill) if load else buf
    if stage != 3:
        for n in Z_SHAPES:
            t = g[f"model.{n}"].to(torch.bfloat16)  # bf16 params, fp32 master
            state["model"][n] = torch.full_like(t, SENTINEL) if load else t
            expect[f"model.{n}"] = (t, None)
    return state, ckpt.Layout(rules=rules, coords={"dp": rank}), expect


def _lookup(state: dict, key: str) -> torch.Tensor:
    top, sub = key.split(".", 1)
    return state[top][sub]


def _zero_save(rank: int, world: int, root: str, stage: int) -> None:
    state, layout, _ = _zero_state(stage, rank, world, load=False)
    ckpt.save(state, 11, root, blocking=False, layout=layout).wait()


def _zero_load(rank: int, world: int, root: str, stage: int) -> None:
    state, layout, expect = _zero_state(stage, rank, world, load=True)
    ckpt.load(state, root, strict=True, layout=layout)
    for key, (want, pad) in expect.items():
        assert_local(_lookup(state, key), want, pad, f"ZeRO-{stage} dp rank {rank}/{world}: {key}")
    assert float(state["optim"]["step"]) == 11.0


def _zero_canonical(root: str, stage: int) -> None:
    g = _z_globals()
    state: dict = {"model": {}, "master": {}, "optim": {"step": torch.tensor(0.0)}}
    for key, t in g.items():
        top, sub = key.split(".", 1)
        dtype = torch.bfloat16 if top == "model" and stage != 3 else t.dtype
        state[top][sub] = torch.full_like(t, SENTINEL, dtype=dtype)
    ckpt.load(state, root, strict=True)
    for key, t in g.items():
        top, sub = key.split(".", 1)
        want = t.to(torch.bfloat16) if top == "model" and stage != 3 else t
        assert_bits(state[top][sub], want, f"one process (canonical): {key}")


def _zero_body(p: Proc, root: str, stage: int, world_b: int) -> None:
    p.phase(4, _zero_save, root, stage)
    p.phase(world_b, _zero_load, root, stage)
    p.solo(_zero_canonical, root, stage)


def test_zero12_flat_optimizer_dp4_to_dp2(tmp_path):
    run(_zero_body, 4, (str(tmp_path / "ckpt"), 1, 2), timeout=90)


def test_zero3_flat_params_dp4_to_dp3(tmp_path):
    run(_zero_body, 4, (str(tmp_path / "ckpt"), 3, 3), timeout=90)


# =============================== 6/7. Pipeline stages, TP x PP x DP (flat dict with Adam)


def _stage_of(name: str, layers: int, pp: int) -> int:
    """The pipeline stage holding a logical tensor: embedding first, head last."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) // (layers // pp)
    return 0 if name.startswith("embed.") else pp - 1


def _local_key(name: str, first: int) -> str:
    if not name.startswith("layers."):
        return name
    _, i, rest = name.split(".", 2)
    return f"layers.{int(i) - first}.{rest}"


def _mega_state(specs, seed, tp, pp, coords, load, layers):
    """Flat dict ``model.<local>``, ``optim.<local>.exp_avg``... of one (tp, pp) rank."""
    params, moments = _gpt_globals(specs, seed)
    t_rank, p_rank = coords.get("tp", 0), coords.get("pp", 0)
    fill = SENTINEL if load else SAVE_FILL
    state: dict[str, torch.Tensor] = {"optim.step": torch.tensor(SENTINEL if load else 9.0)}
    rules, expect = {}, {}
    first = p_rank * (layers // pp)
    for s in specs:
        if _stage_of(s.name, layers, pp) != p_rank:
            continue
        lk = _local_key(s.name, first)
        pl = tp_placement(s, t_rank, tp)
        pad = tp_padding_mask(s, t_rank, tp)
        for key, g in [(f"model.{lk}", params[s.name])] + [
            (f"optim.{lk}.{k}", moments[f"{s.name}.{k}"]) for k in ADAM_KEYS
        ]:
            want = tp_local(s, g, t_rank, tp, SENTINEL)
            state[key] = (
                torch.full_like(want, SENTINEL) if load else tp_local(s, g, t_rank, tp, fill)
            )
            rules[key] = pl
            expect[key] = (want, pad)
    rename = ckpt.LayerOffset(first) if first else None
    return state, ckpt.Layout(rules=rules, rename=rename, coords=coords), expect


def _mega_check(state, expect, what) -> None:
    for key, (want, pad) in expect.items():
        assert_local(state[key], want, pad, f"{what}: {key}")
    assert float(state["optim.step"]) == 9.0, f"{what}: step {state['optim.step']}"


PP_SPECS = gpt_specs(layers=4)


def _pp_save(rank: int, world: int, root: str) -> None:
    state, layout, _ = _mega_state(PP_SPECS, 30, 1, world, {"pp": rank}, False, 4)
    ckpt.save(state, 9, root, blocking=False, layout=layout).wait()


def _pp_load(rank: int, world: int, root: str) -> None:
    state, layout, expect = _mega_state(PP_SPECS, 30, 1, world, {"pp": rank}, True, 4)
    # strict: the other stage's tensors are in the checkpoint but not "unexpected" here
    res = ckpt.load(state, root, strict=True, layout=layout)
    assert res.unexpected == () and res.missing == (), res
    _mega_check(state, expect, f"pp stage {rank}/{world}")


def _pp_body(p: Proc, root: str) -> None:
    p.phase(2, _pp_save, root)
    p.phase(2, _pp_load, root)  # each stage strict
    p.phase(1, _pp_load, root)  # PP=1, one rank, through torch.distributed
    p.solo(_pp_load, 0, 1, root)  # PP=1 without torch.distributed


def test_pp2_to_pp1_layer_offset_strict(tmp_path):
    run(_pp_body, 2, (str(tmp_path / "ckpt"),), timeout=90)


def test_strict_load_of_one_stage_alone_reports_other_stages(tmp_path):
    """Loading only stage 1 on one process: stage 0's tensors are unexpected (control)."""
    run(_pp_partial_body, 2, (str(tmp_path / "ckpt"),), timeout=90)


def _pp_partial_body(p: Proc, root: str) -> None:
    p.phase(2, _pp_save, root)
    p.solo(_pp_stage1_alone, root)


def _pp_stage1_alone(root: str) -> None:
    state, layout, expect = _mega_state(PP_SPECS, 30, 1, 2, {"pp": 1}, True, 4)
    with pytest.raises(ckpt.MissingKeysError) as ei:
        ckpt.load(state, root, strict=True, layout=layout)
    assert "model.embed.weight" in ei.value.unexpected and not ei.value.missing, ei.value
    res = ckpt.load(state, root, strict=False, layout=layout)
    assert "model.layers.0.attn.qkv.weight" in res.unexpected
    _mega_check(state, expect, "stage 1 alone")


# Real nn.Module + torch.optim.Adam per stage (Megatron TP=1 layout: fused QKV, padded vocab).


def _pp_module(rank: int, pp: int, load: bool):
    params, moments = _gpt_globals(PP_SPECS, seed=50)
    by = {s.name: s for s in PP_SPECS}
    first = rank * (4 // pp)
    names = [s.name for s in PP_SPECS if _stage_of(s.name, 4, pp) == rank]
    fill = SENTINEL if load else SAVE_FILL
    lp = {_local_key(n, first): tp_local(by[n], params[n], 0, 1, fill) for n in names}
    lm = {
        f"{_local_key(n, first)}.{k}": tp_local(by[n], moments[f"{n}.{k}"], 0, 1, fill)
        for n in names
        for k in ADAM_KEYS
    }
    if load:
        lp = {n: torch.full_like(t, SENTINEL) for n, t in lp.items()}
    model = module_from(lp)
    opt = adam_with_state(model, None if load else lm, step=0 if load else 6)
    layout = ckpt.Layout(
        rules={f"model.{_local_key(n, first)}": tp_placement(by[n], 0, 1) for n in names},
        rename=ckpt.LayerOffset(first) if first else None,
        coords={"pp": rank},
    )
    return model, opt, layout, params, moments, by


def _pp_adam_save(rank: int, world: int, root: str) -> None:
    model, opt, layout, *_ = _pp_module(rank, world, load=False)
    ckpt.save({"model": model, "optim": opt}, 6, root, blocking=False, layout=layout).wait()


def _pp_adam_load_one(root: str, merge: dict | None) -> None:
    model, opt, layout, params, moments, by = _pp_module(0, 1, load=True)
    ckpt.load({"model": model, "optim": opt}, root, strict=True, layout=layout, merge=merge)
    _check_module_and_adam(
        model,
        opt,
        params,
        moments,
        6,
        "PP=1 (real Adam)",
        lambda n, g: tp_local(by[n], g, 0, 1),
        lambda n: tp_padding_mask(by[n], 0, 1),
    )


def _pp_adam_body(p: Proc, root: str, merge: dict | None) -> None:
    p.phase(2, _pp_adam_save, root)
    p.solo(_pp_adam_load_one, root, merge)


def test_pp2_real_adam_to_pp1_with_param_groups_merge_rule(tmp_path):
    run(_pp_adam_body, 2, (str(tmp_path / "ckpt"), {"optim.param_groups": "first"}), timeout=90)


def test_pp2_real_adam_to_pp1_needs_no_merge_rule(tmp_path):
    """param_groups keep the loading optimizer's own "params" lists; only hyperparameters
    are stored, so a PP change needs no merge rule."""
    run(_pp_adam_body, 2, (str(tmp_path / "ckpt"), None), timeout=90)


MEGA_SPECS = gpt_specs(layers=2)


def _tpppdp_coords(rank: int, world: int) -> dict[str, int]:
    assert world == 8
    return {"tp": rank % 2, "pp": rank // 2 % 2, "dp": rank // 4}


def _tp4dp2_coords(rank: int, world: int) -> dict[str, int]:
    return {"tp": rank % 4, "dp": rank // 4}


def _mega_save(rank: int, world: int, root: str) -> None:
    c = _tpppdp_coords(rank, world)
    state, layout, _ = _mega_state(MEGA_SPECS, 40, 2, 2, c, False, 2)
    ckpt.save(state, 9, root, blocking=False, layout=layout).wait()


def _mega_load(rank: int, world: int, root: str) -> None:
    c = _tp4dp2_coords(rank, world)
    state, layout, expect = _mega_state(MEGA_SPECS, 40, 4, 1, c, True, 2)
    ckpt.load(state, root, strict=True, layout=layout)
    _mega_check(state, expect, f"tp4xdp2 rank {rank} {c}")


def _mega_canonical(root: str) -> None:
    params, moments = _gpt_globals(MEGA_SPECS, 40)
    want = {f"model.{n}": t for n, t in params.items()}
    want |= {f"optim.{k}": t for k, t in moments.items()}
    state = {k: torch.full_like(t, SENTINEL) for k, t in want.items()}
    state["optim.step"] = torch.tensor(0.0)
    ckpt.load(state, root, strict=True)
    for k, t in want.items():
        assert_bits(state[k], t, f"one process (canonical): {k}")
    assert float(state["optim.step"]) == 9.0


def _mega_body(p: Proc, root: str) -> None:
    p.phase(8, _mega_save, root)
    p.phase(8, _mega_load, root)
    p.solo(_mega_canonical, root)


def test_tp2_pp2_dp2_to_tp4_dp2_and_one_process(tmp_path):
    run(_mega_body, 8, (str(tmp_path / "ckpt"),), timeout=150)


# ======================================== per-rank JSON state, merge rules, RNG state


def _seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _draws() -> tuple[torch.Tensor, list[float], float]:
    return torch.rand(4), np.random.rand(3).tolist(), random.random()


def _json_rng_save(rank: int, world: int, root: str):
    _seed_all(100 + rank)
    torch.rand(3)  # move away from the seed
    state = {
        "rng": ckpt.RNGState(),
        "data": {"consumed": rank * 10, "epoch": 2},
        "w": torch.ones(3),
    }
    ckpt.save(state, 1, root, blocking=False, layout=ckpt.Layout(coords={"dp": rank})).wait()
    return _draws()


def _json_rng_load(rank: int, world: int, root: str, after_save) -> None:
    _seed_all(999)
    state = {"rng": ckpt.RNGState(), "data": {"consumed": -1, "epoch": -1}, "w": torch.zeros(3)}
    ckpt.load(state, root, strict=True, layout=ckpt.Layout(coords={"dp": rank}))
    assert state["data"] == {"consumed": rank * 10, "epoch": 2}, state["data"]
    t, n, py = _draws()
    assert_bits(t, after_save[0], f"rank {rank}: torch.rand after load")
    assert n == after_save[1] and py == after_save[2], (n, py, after_save)


def _json_merge_one_process(root: str) -> None:
    state = {"data": {"consumed": -1, "epoch": -1}, "w": torch.zeros(3)}
    with pytest.raises(ckpt.StateMergeError, match=r"data\.consumed"):
        ckpt.load(state, root, strict=True)
    ckpt.load(state, root, strict=True, merge={"data.consumed": "sum"})
    assert state["data"] == {"consumed": 10, "epoch": 2}, state["data"]


def _json_rng_body(p: Proc, root: str) -> None:
    after = p.phase(2, _json_rng_save, root)
    p.phase(2, _json_rng_load, root, after)
    p.solo(_json_merge_one_process, root)


def test_per_rank_json_merge_rules_and_rng_roundtrip(tmp_path):
    run(_json_rng_body, 2, (str(tmp_path / "ckpt"),), timeout=90)


# ========================================================= the harness reports failures


def _boom(rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits here until the parent terminates it


def _boom_body(p: Proc) -> None:
    p.phase(2, _boom)


def test_harness_propagates_child_traceback():
    with pytest.raises(
        AssertionError, match=r"(?s)first failure: process 1.*Traceback.*ValueError: boom on rank 1"
    ):
        run(_boom_body, 2, timeout=60)


def _hang(rank: int, world: int) -> None:
    import time

    import torch.distributed as dist

    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(60)


def _hang_body(p: Proc) -> None:
    p.phase(2, _hang)


def test_harness_reports_a_hang_with_stacks():
    with pytest.raises(AssertionError, match=r"(?s)process \d stacks.*_hang"):
        run(_hang_body, 2, timeout=7)
