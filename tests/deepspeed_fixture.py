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

:class:`TinyModel` is the model whose state dict these checkpoints hold (:func:`forward`
gives its logits for forward-equality checks). :func:`write_deepspeed_tp` writes a
Megatron-DeepSpeed checkpoint at TP x DP (one ZeRO-2 checkpoint per mp rank, shards cut
by hand as Megatron lays them out). :func:`write_deepspeed_pipe` writes what a
``PipelineModule`` engine saves at PP x TP x DP (per-layer weight files, per-stage ZeRO
partitions): :data:`TINY_PIPE` (TinyModel as a pipeline, :func:`pipe_forward`) and
:data:`GPT_PIPE` (Megatron-DeepSpeed's GPTModelPipe names, TP shards as Megatron cuts them).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
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


class _Rope(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.zeros(BUFFERS["rope.inv_freq"]))


class TinyModel(torch.nn.Module):
    """The model whose state dict the fixture's checkpoints hold (``GROUPS``, ``BUFFERS``).

    Tied embedding/head, an MLP with a residual, a LayerNorm and a sinusoidal position
    term from the ``rope.inv_freq`` buffer: every tensor of the checkpoint changes the
    output, so a forward pass checks them all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 7)
        self.fc1 = torch.nn.Linear(7, 13)
        self.fc2 = torch.nn.Linear(13, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.rope = _Rope()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        pos = torch.arange(ids.shape[-1], dtype=h.dtype)[:, None] * self.rope.inv_freq[None]
        h = h + torch.nn.functional.pad(torch.sin(pos), (0, h.shape[-1] - pos.shape[-1]))
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.norm(h) @ self.embed.weight.T


def forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of :class:`TinyModel` (float32) with ``weights`` loaded strictly, on a
    fixed batch of token ids: equal weights give bit-identical outputs."""
    model = TinyModel()
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    ids = torch.tensor([[0, 3, 7, 10, 2, 5], [9, 1, 4, 4, 8, 6]])
    with torch.no_grad():
        return model(ids)


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
        groups = [{k: parts[k][gi][r] for k in kinds} for gi in range(len(GROUPS))]
        _save_optim(d, r, zero_optim_state(groups, paddings, dp, stage, step))
    return d


def zero_optim_state(
    groups: list[dict[str, torch.Tensor]], paddings: list[int], dp: int, stage: int, step: int
) -> dict:
    """One rank's ZeRO-1/2 ``optimizer_state_dict`` as DeepSpeed's stage-1/2 optimizer
    saves it: per group this rank's flat ``fp32``, ``exp_avg`` and ``exp_avg_sq``
    partitions (``groups[i]``) and the group's alignment padding on this rank."""
    return {
        "loss_scaler": None,
        "dynamic_loss_scale": False,
        "overflow": False,
        "clip_grad": 1.0,
        "base_optimizer_state": [
            {
                "step": torch.tensor(float(step)),
                "exp_avg": g["exp_avg"],
                "exp_avg_sq": g["exp_avg_sq"],
            }
            for g in groups
        ],
        "single_partition_of_fp32_groups": [g["fp32"] for g in groups],
        "zero_stage": stage,
        "group_paddings": paddings,
        "partition_count": [dp] * len(groups),
        "ds_version": DS_VERSION,
    }


def _save_optim(d: Path, rank: int, osd: dict) -> None:
    torch.save(
        {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": DS_VERSION},
        d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
    )


# ---------------------------------------------------------------------------
# Model-parallel (Megatron-DeepSpeed, TP > 1): one ZeRO checkpoint per mp rank.

MP_VARS = {"heads": 4, "kv_heads": 2, "head_dim": 2, "hidden": 8, "ffn": 16, "vocab": 13,
           "layers": 1, "vocab_multiple": 8}  # fmt: skip
_L = "language_model.encoder.layers.0."
# (canonical name, canonical shape, how Megatron shards it over TP)
MP_PARAMS: list[tuple[str, tuple[int, ...], str]] = [
    ("language_model.embedding.word_embeddings.weight", (13, 8), "vocab"),
    ("language_model.embedding.position_embeddings.weight", (6, 8), "replica"),
    (_L + "input_layernorm.weight", (8,), "replica"),
    (_L + "input_layernorm.bias", (8,), "replica"),
    (_L + "self_attention.query_key_value.weight", (16, 8), "qkv"),
    (_L + "self_attention.query_key_value.bias", (16,), "qkv"),
    (_L + "self_attention.dense.weight", (8, 8), "dim1"),
    (_L + "self_attention.dense.bias", (8,), "replica"),
    (_L + "post_attention_layernorm.weight", (8,), "replica"),
    (_L + "post_attention_layernorm.bias", (8,), "replica"),
    (_L + "mlp.dense_h_to_4h.weight", (16, 8), "dim0"),
    (_L + "mlp.dense_h_to_4h.bias", (16,), "dim0"),
    (_L + "mlp.dense_4h_to_h.weight", (8, 16), "dim1"),
    (_L + "mlp.dense_4h_to_h.bias", (8,), "replica"),
    ("language_model.encoder.final_layernorm.weight", (8,), "replica"),
    ("language_model.encoder.final_layernorm.bias", (8,), "replica"),
]


def mp_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical (unsharded, unpadded) fp32 masters and Adam moments of a 1-layer GPT."""
    g = torch.Generator().manual_seed(seed)
    params = {
        name: {
            "fp32": torch.randn(shape, generator=g),
            "exp_avg": torch.randn(shape, generator=g) * 1e-2,
            "exp_avg_sq": torch.rand(shape, generator=g) * 1e-4,
        }
        for name, shape, _ in MP_PARAMS
    }
    return {"params": params, "buffers": {}}


def megatron_shard(t: torch.Tensor, how: str, r: int, tp: int) -> torch.Tensor:
    """TP rank ``r``'s local shard of canonical ``t``, as Megatron lays it out (written
    by hand here, not with our spec): vocab rows padded with zeros to a multiple of
    ``vocab_multiple`` and split; QKV interleaved per query group ``[q_g; k_g; v_g]``
    with the groups split over TP; column/row-parallel splits; replicas whole."""
    v = MP_VARS
    if how == "replica":
        return t.clone()
    if how == "dim0":
        return t.chunk(tp, 0)[r].clone()
    if how == "dim1":
        return t.chunk(tp, 1)[r].clone()
    if how == "vocab":
        rows = math.ceil(v["vocab"] / v["vocab_multiple"]) * v["vocab_multiple"]
        padded = torch.cat([t, torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)])
        return padded.chunk(tp, 0)[r].clone()
    assert how == "qkv"
    hd, heads, kv = v["head_dim"], v["heads"], v["kv_heads"]
    q, k, val = t[: heads * hd], t[heads * hd : (heads + kv) * hd], t[(heads + kv) * hd :]
    per_group = heads // kv * hd
    groups = range(r * kv // tp, (r + 1) * kv // tp)
    return torch.cat(
        [
            torch.cat(
                [
                    q[g * per_group : (g + 1) * per_group],
                    k[g * hd : (g + 1) * hd],
                    val[g * hd : (g + 1) * hd],
                ]
            )
            for g in groups
        ]
    ).clone()


def write_deepspeed_tp(root: Path, state: dict, *, tp: int, dp: int, step: int = 5) -> Path:
    """``state`` (from :func:`mp_state`) as a Megatron-DeepSpeed ZeRO-2 checkpoint at TP
    ``tp`` x DP ``dp``: per mp rank ``mp_rank_{mp:02d}_model_states.pt`` (bf16 local
    shards, local ``param_shapes``, one param group) and its own DP partitions
    ``bf16_zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` (a bf16 engine's names,
    ``deepspeed/runtime/engine.py`` ``_get_rank_zero_ckpt_name``)."""
    tag = f"global_step{step}"
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text(tag)
    kinds = ("fp32", "exp_avg", "exp_avg_sq")
    for mp in range(tp):
        local = {
            k: {n: megatron_shard(state["params"][n][k], how, mp, tp) for n, _, how in MP_PARAMS}
            for k in kinds
        }
        ms = _model_states({"params": {}, "buffers": {}}, 2, dp, step)
        ms["module"] = OrderedDict((n, t.to(MODEL_DTYPE)) for n, t in local["fp32"].items())
        ms["param_shapes"] = [OrderedDict((n, t.shape) for n, t in local["fp32"].items())]
        ms["mp_world_size"] = tp
        torch.save(ms, d / f"mp_rank_{mp:02d}_model_states.pt")
        parts = {k: zero2_partition(torch.cat([t.reshape(-1) for t in local[k].values()]), dp)
                 for k in kinds}  # fmt: skip
        numel = sum(t.numel() for t in local["fp32"].values())
        pad = math.ceil(numel / (2 * dp)) * 2 * dp - numel
        for r in range(dp):
            osd = zero_optim_state([{k: parts[k][r] for k in kinds}],
                                   [pad if r == dp - 1 else 0], dp, 2, step)
            torch.save(
                {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": DS_VERSION},
                d / f"bf16_zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt",
            )
    return root


# ---------------------------------------------------------------------------
# Pipeline parallel (a DeepSpeed PipelineModule engine): per-layer weight files.


@dataclass(frozen=True)
class PipeLayer:
    """One entry of a ``PipelineModule``'s layer list, at global index ``idx`` on ``stage``.

    ``params``: (local name, how Megatron shards it over TP: see :func:`megatron_shard`);
    ``tied``: the ``TiedLayerSpec`` key (its params are ``tied_modules.{key}.{local}``);
    ``file``: whether ``save_state_dict`` writes a layer file for it (a function, or a
    tied occurrence with ``forward_fn``, has no ``state_dict``).
    """

    idx: int
    stage: int
    params: tuple[tuple[str, str], ...] = ()
    buffers: tuple[str, ...] = ()
    tied: str | None = None
    file: bool = True

    def name(self, local: str) -> str:
        """The ``PipelineModule`` name of the layer's tensor ``local``."""
        return f"tied_modules.{self.tied}.{local}" if self.tied else f"{self.idx}.{local}"


_R = "replica"
# TinyModel as a 2-stage pipeline: tied embedding/head, a rope-buffer layer, fc1, gelu
# (a function), fc2, norm (no residual: a pipeline is a sequence).
TINY_PIPE = (
    PipeLayer(0, 0, (("weight", _R),), tied="embed"),
    PipeLayer(1, 0, buffers=("inv_freq",)),
    PipeLayer(2, 0, (("weight", _R), ("bias", _R))),
    PipeLayer(3, 0, file=False),
    PipeLayer(4, 1, (("weight", _R), ("bias", _R))),
    PipeLayer(5, 1, (("weight", _R), ("bias", _R))),
    PipeLayer(6, 1, (("weight", _R),), tied="embed", file=False),
)
TINY_PIPE_SHAPES = {
    "tied_modules.embed.weight": (11, 7), "1.inv_freq": (4,), "2.weight": (13, 7),
    "2.bias": (13,), "4.weight": (7, 13), "4.bias": (7,), "5.weight": (7,), "5.bias": (7,),
}  # fmt: skip

# Megatron-DeepSpeed's GPTModelPipe (tied embedding, 2 blocks, final norm) over 2 stages.
_MP_SHAPE = {n: s for n, s, _ in MP_PARAMS}
_MP_HOW = {n: h for n, _, h in MP_PARAMS}
_EMB = "language_model.embedding."
_BLOCK = tuple((n.removeprefix(_L), h) for n, _, h in MP_PARAMS if n.startswith(_L))
GPT_PIPE = (
    PipeLayer(0, 0, (("word_embeddings.weight", "vocab"), ("position_embeddings.weight", _R)),
              tied="embed"),
    PipeLayer(1, 0, _BLOCK),
    PipeLayer(2, 1, _BLOCK),
    PipeLayer(3, 1, (("weight", _R), ("bias", _R))),
    PipeLayer(4, 1, (("word_embeddings.weight", "vocab"),
                     ("position_embeddings.weight", _R)), tied="embed", file=False),
)  # fmt: skip
GPT_PIPE_SHAPES = {
    **{f"tied_modules.embed.{n}": _MP_SHAPE[_EMB + n] for n, _ in GPT_PIPE[0].params},
    **{f"{i}.{n}": _MP_SHAPE[_L + n] for i in (1, 2) for n, _ in _BLOCK},
    "3.weight": (8,), "3.bias": (8,),
}  # fmt: skip


def pipe_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Canonical fp32 masters and Adam moments per param of ``shapes``; ``*.inv_freq``
    entries are buffers."""
    g = torch.Generator().manual_seed(seed)
    params, buffers = {}, {}
    for name, shape in shapes.items():
        if name.endswith(".inv_freq"):
            buffers[name] = torch.rand(shape, generator=g)
            continue
        params[name] = {
            "fp32": torch.randn(shape, generator=g),
            "exp_avg": torch.randn(shape, generator=g) * 1e-2,
            "exp_avg_sq": torch.rand(shape, generator=g) * 1e-4,
        }
    return {"params": params, "buffers": buffers}


def pipe_forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the :data:`TINY_PIPE` model (float32) with ``weights`` (PipelineModule
    names), on a fixed batch of token ids."""
    w = {k: v.to(torch.float32) for k, v in weights.items()}
    f = torch.nn.functional
    ids = torch.tensor([[0, 3, 7, 10, 2, 5], [9, 1, 4, 4, 8, 6]])
    emb = w["tied_modules.embed.weight"]
    h = emb[ids]
    pos = torch.arange(ids.shape[-1], dtype=h.dtype)[:, None] * w["1.inv_freq"][None]
    h = h + f.pad(torch.sin(pos), (0, h.shape[-1] - pos.shape[-1]))
    h = f.linear(f.gelu(f.linear(h, w["2.weight"], w["2.bias"])), w["4.weight"], w["4.bias"])
    h = f.layer_norm(h, (h.shape[-1],), w["5.weight"], w["5.bias"])
    return h @ emb.T


def _stage_params(layers: tuple[PipeLayer, ...], stage: int) -> list[tuple[str, str]]:
    """A stage's (param name, TP sharding), in ``named_parameters`` order: tied modules
    first (``PipelineModule`` registers ``tied_modules`` before the layers), then layers."""
    mine = [ly for ly in layers if ly.stage == stage]
    out: dict[str, str] = {}
    for ly in sorted(mine, key=lambda ly: ly.tied is None):
        for local, how in ly.params:
            out.setdefault(ly.name(local), how)
    return list(out.items())


def write_deepspeed_pipe(
    root: Path,
    state: dict,
    layers: tuple[PipeLayer, ...],
    *,
    dp: int,
    zero: int = 1,
    tp: int = 1,
    step: int = 5,
    model_axis: bool = True,
) -> Path:
    """``state`` (from :func:`pipe_state`) as a PipelineModule engine saves it at PP x TP x
    DP (bf16 weights, ZeRO-``zero``): per layer with a ``state_dict`` and TP rank
    ``layer_{idx:02d}[-model_{tp:02d}]-model_states.pt``; per mp rank ``s * tp + t``
    ``mp_rank_{mp:02d}_model_states.pt`` (``module`` None, the stage's ``param_shapes``)
    and ``bf16_zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` (the stage's flat
    partitions: two param groups, fp32 of the last rank without padding, the moments in
    the torch optimizer's padded state dict, as DeepSpeed's non-elastic ``state_dict``)."""
    tag = f"global_step{step}"
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text(tag)
    pp = max(ly.stage for ly in layers) + 1
    kinds = ("fp32", "exp_avg", "exp_avg_sq")
    for s, t in ((s, t) for s in range(pp) for t in range(tp)):
        mp = s * tp + t
        local = {
            n: {k: megatron_shard(state["params"][n][k], how, t, tp) for k in kinds}
            for n, how in _stage_params(layers, s)
        }
        for ly in layers:
            if ly.stage != s or not ly.file:
                continue
            sd = OrderedDict((n, local[ly.name(n)]["fp32"].to(MODEL_DTYPE)) for n, _ in ly.params)
            sd.update((b, state["buffers"][ly.name(b)].clone()) for b in ly.buffers)
            rank = f"-model_{t:02d}" if model_axis else ""
            torch.save(sd, d / f"layer_{ly.idx:02d}{rank}-model_states.pt")
        groups = [[n for n in local if local[n]["fp32"].dim() >= 2],
                  [n for n in local if local[n]["fp32"].dim() < 2]]  # fmt: skip
        groups = [g for g in groups if g]  # DeepSpeed drops param groups without params
        ms = _model_states({"params": {}, "buffers": {}}, zero, dp, step)
        ms.update(
            module=None,
            buffer_names=[ly.name(b) for ly in layers if ly.stage == s for b in ly.buffers],
            param_shapes=[OrderedDict((n, local[n]["fp32"].shape) for n in g) for g in groups],
            mp_world_size=pp * tp,
            checkpoint_parallel_dimensions={"pp_degree": pp, "tp_degree": tp},
        )
        torch.save(ms, d / f"mp_rank_{mp:02d}_model_states.pt")
        flat = {k: [zero2_partition(torch.cat([local[n][k].reshape(-1) for n in g]), dp)
                    for g in groups] for k in kinds}  # fmt: skip
        for r in range(dp):
            paddings = []
            for g in groups:
                numel = sum(local[n]["fp32"].numel() for n in g)
                paddings.append(math.ceil(numel / (2 * dp)) * 2 * dp - numel if r == dp - 1 else 0)
            osd = zero_optim_state(
                [{k: flat[k][gi][r] for k in kinds} for gi in range(len(groups))],
                paddings, dp, zero, step,
            )  # fmt: skip
            key = "single_partition_of_fp32_groups"  # DeepSpeed saves them without padding
            osd[key] = [f[: len(f) - n] for f, n in zip(osd[key], paddings)]
            osd["base_optimizer_state"] = {
                "state": dict(enumerate(osd["base_optimizer_state"])),
                "param_groups": [{"lr": 1e-3, "params": [gi]} for gi in range(len(groups))],
            }
            torch.save(
                {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": DS_VERSION},
                d / f"bf16_zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt",
            )
    return root


# ----------------------------------------------------------------- helpers for the tests


def read_source(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepSpeed checkpoint as our DeepSpeed source reads it."""
    from ckptd.converters.sources.deepspeed import DeepSpeedSource

    with DeepSpeedSource(str(path)) as s:
        return {t.name: s.read(t.name) for t in s.tensors()}


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bit-exact, NaN payloads included)."""
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def load_pt(path: Path) -> dict:
    """A ``.pt`` file, tensors only (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_ranks(script: Path, root: Path, what: str, world: int = 2) -> None:
    """Run ``script root`` as ``world`` gloo ranks on 127.0.0.1 (torchrun's environment);
    fail the test with their output if any exits non-zero (400 s bound, then killed)."""
    import subprocess
    import sys

    import pytest
    from daemon_harness import free_port

    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root)],
                         env=launcher_env(rank, world, port), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]  # fmt: skip
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        pytest.fail(f"{what} failed:\n" + "\n".join(o[-4000:] for o in outs))


def launcher_env(rank: int, world: int, port: str) -> dict[str, str]:
    """The environment a torchrun-style launcher gives rank ``rank`` (on 127.0.0.1)."""
    return os.environ | {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
