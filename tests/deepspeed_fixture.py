"""Writes DeepSpeed-layout checkpoints (ZeRO 1/2 and 3) for a tiny model, without DeepSpeed.

The layout follows DeepSpeed's engine and ``deepspeed/utils/zero_to_fp32.py``:

- ``<dir>/latest`` holds the tag; ``<dir>/<tag>/`` holds the files.
- ZeRO-1/2: ``mp_rank_00_model_states.pt`` (``module`` with the 16-bit weights and the
  buffers, ``param_shapes``: one ``OrderedDict`` name -> ``torch.Size`` per param group,
  ``buffer_names``, ``ds_version`` ...) and per DP rank
  ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` whose ``optimizer_state_dict`` holds
  ``single_partition_of_fp32_groups`` (per group, this rank's slice of the group's flat
  fp32 buffer), ``base_optimizer_state`` (per group: ``exp_avg``, ``exp_avg_sq`` slices
  and ``step``), ``zero_stage``, ``partition_count``. Each group's params are flattened
  back to back and the flat buffer is padded to a multiple of ``2 * dp`` (DeepSpeed's
  ``nccl_start_alignment_factor`` of 2 times the DP size), then cut into ``dp`` equal
  partitions: a partition boundary may fall inside a parameter.
- ZeRO-3: ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` per rank (``module`` holds empty
  placeholders for parameters, the buffers in full) and the optim files with
  ``fp32_flat_groups`` (per group, this rank's flat buffer) and ``optimizer_state_dict``
  (torch optimizer state dict, one flat param per group): every parameter is split on its
  own into ``ceil(numel / dp)`` elements per rank, the last rank's tail zero-padded.

Everything is saved with ``torch.save`` and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

DS_VERSION = "0.14.4"
MODEL_DTYPE = torch.bfloat16

# Two param groups (weights / no-decay), odd sizes so partitions cut inside params.
GROUPS: list[list[tuple[str, tuple[int, ...]]]] = [
    [("embed.weight", (11, 7)), ("fc1.weight", (13, 7)), ("fc2.weight", (7, 13))],
    [("fc1.bias", (13,)), ("fc2.bias", (7,)), ("norm.weight", (7,)), ("norm.bias", (7,))],
]
BUFFERS = {"rope.inv_freq": (4,)}


def tiny_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per param: ``fp32`` master, ``exp_avg``, ``exp_avg_sq``; plus the buffers."""
    g = torch.Generator().manual_seed(seed)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for group in GROUPS:
        for name, shape in group:
            params[name] = {
                "fp32": torch.randn(shape, generator=g),
                "exp_avg": torch.randn(shape, generator=g) * 1e-2,
                "exp_avg_sq": torch.rand(shape, generator=g) * 1e-4,
            }
    buffers = {n: torch.rand(s, generator=g) for n, s in BUFFERS.items()}
    return {"params": params, "buffers": buffers}


def expected_universal(
    state: dict[str, dict[str, torch.Tensor]], stage: int, step: int
) -> dict[str, torch.Tensor]:
    """The tensors a conversion to universal must give, by universal name."""
    out: dict[str, torch.Tensor] = {}
    for name, s in state["params"].items():
        out[f"model.{name}"] = s["fp32"] if stage == 3 else s["fp32"].to(MODEL_DTYPE)
    for name, b in state["buffers"].items():
        out[f"model.{name}"] = b
    for name, s in state["params"].items():
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            out[f"optim.state.{name}.{kind}"] = s[kind]
        out[f"optim.state.{name}.step"] = torch.tensor(float(step))
    return out


def _module(state: dict[str, dict[str, torch.Tensor]], stage: int) -> OrderedDict:
    module: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, s in state["params"].items():
        module[name] = (
            torch.empty(0, dtype=MODEL_DTYPE) if stage == 3 else s["fp32"].to(MODEL_DTYPE)
        )
    for name, b in state["buffers"].items():
        module[name] = b.clone()
    return module


def _model_states(
    state: dict[str, dict[str, torch.Tensor]], stage: int, dp: int, step: int
) -> dict:
    return {
        "module": _module(state, stage),
        "buffer_names": list(state["buffers"]),
        "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in group) for group in GROUPS],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": step * 8,
        "dp_world_size": dp,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}},
        "ds_version": DS_VERSION,
    }


def _flat(state: dict, group: list[tuple[str, tuple[int, ...]]], kind: str) -> torch.Tensor:
    return torch.cat([state["params"][n][kind].reshape(-1) for n, _ in group])


def zero2_partition(flat: torch.Tensor, dp: int) -> list[torch.Tensor]:
    """DeepSpeed ZeRO-1/2: pad to a multiple of ``2 * dp``, then ``dp`` equal slices."""
    align = 2 * dp
    padded = math.ceil(flat.numel() / align) * align
    buf = torch.cat([flat, torch.zeros(padded - flat.numel(), dtype=flat.dtype)])
    part = padded // dp
    return [buf[r * part : (r + 1) * part].clone() for r in range(dp)]


def zero3_partition(
    state: dict, group: list[tuple[str, tuple[int, ...]]], kind: str, dp: int
) -> list[torch.Tensor]:
    """DeepSpeed ZeRO-3: each param split on its own into ``ceil(numel/dp)`` per rank."""
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(dp)]
    for name, _ in group:
        t = state["params"][name][kind].reshape(-1)
        pn = math.ceil(t.numel() / dp)
        buf = torch.cat([t, torch.zeros(pn * dp - t.numel(), dtype=t.dtype)])
        for r in range(dp):
            per_rank[r].append(buf[r * pn : (r + 1) * pn])
    return [torch.cat(p).clone() for p in per_rank]


def write_deepspeed(
    root: Path,
    state: dict,
    *,
    stage: int,
    dp: int,
    step: int = 5,
    tag: str | None = None,
) -> Path:
    """Write ``state`` (from :func:`tiny_state`) as a ZeRO-``stage`` checkpoint at DP ``dp``."""
    tag = tag or f"global_step{step}"
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text(tag)
    model_states = _model_states(state, stage, dp, step)
    kinds = ("fp32", "exp_avg", "exp_avg_sq")
    if stage == 3:
        parts = {k: [zero3_partition(state, g, k, dp) for g in GROUPS] for k in kinds}
        for r in range(dp):
            torch.save(model_states, d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            osd = {
                "zero_stage": 3,
                "loss_scaler": None,
                "dynamic_loss_scale": False,
                "overflow": False,
                "partition_count": dp,
                "optimizer_state_dict": {
                    "state": {
                        gi: {
                            "step": torch.tensor(float(step)),
                            "exp_avg": parts["exp_avg"][gi][r],
                            "exp_avg_sq": parts["exp_avg_sq"][gi][r],
                        }
                        for gi in range(len(GROUPS))
                    },
                    "param_groups": [
                        {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "params": [gi]}
                        for gi in range(len(GROUPS))
                    ],
                },
                "fp32_flat_groups": [parts["fp32"][gi][r] for gi in range(len(GROUPS))],
            }
            _save_optim(d, r, osd)
        return d
    torch.save(model_states, d / "mp_rank_00_model_states.pt")
    if stage == 0:
        return d
    parts = {k: [zero2_partition(_flat(state, g, k), dp) for g in GROUPS] for k in kinds}
    for r in range(dp):
        paddings = []
        for g in GROUPS:
            numel = sum(math.prod(s) for _, s in g)
            pad = math.ceil(numel / (2 * dp)) * 2 * dp - numel
            paddings.append(pad if r == dp - 1 else 0)
        osd = {
            "loss_scaler": None,
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": 1.0,
            "base_optimizer_state": [
                {
                    "step": torch.tensor(float(step)),
                    "exp_avg": parts["exp_avg"][gi][r],
                    "exp_avg_sq": parts["exp_avg_sq"][gi][r],
                }
                for gi in range(len(GROUPS))
            ],
            "single_partition_of_fp32_groups": [parts["fp32"][gi][r] for gi in range(len(GROUPS))],
            "zero_stage": stage,
            "group_paddings": paddings,
            "partition_count": [dp] * len(GROUPS),
            "ds_version": DS_VERSION,
        }
        _save_optim(d, r, osd)
    return d


def _save_optim(d: Path, rank: int, osd: dict) -> None:
    torch.save(
        {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": DS_VERSION},
        d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
    )
