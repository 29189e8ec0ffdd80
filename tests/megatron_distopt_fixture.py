"""Writes Megatron-Core's distributed-optimizer files (``distrib_optim.pt``) for tests.

An independent re-implementation of what Megatron-Core v0.16 does, kept close to its
code so that the reader in ``converters/sources/megatron_distopt.py`` is checked
against it rather than against itself:

- :func:`megatron_buffer` is ``_ParamAndGradBuffer.__init__`` with
  ``use_distributed_optimizer=True`` (absolute indexes, reverse parameter order,
  64-element parameter alignment, buckets padded to lcm(dp, 128), a
  ``shared_embedding`` parameter alone in its bucket);
- :func:`dp_zero_state` is ``_build_model_gbuf_range`` (each DP rank owns a contiguous
  1/dp of every bucket) followed by ``get_parameter_state_dp_zero`` (per-rank shards
  filled from the main params and Adam moments, gathered to DP rank 0, each bucket's
  unpadded part copied into one coalesced tensor per buffer);
- :func:`rewrite_as_distributed` turns a Megatron checkpoint written with the
  non-distributed optimizer into the distributed optimizer's form: ``model_optim_rng.pt``
  keeps ``DistributedOptimizer.state_dict()`` (param groups without ``params``, with
  ``step``) and ``distrib_optim.pt`` holds the parameter state. With model chunks
  (``model0``, ``model1``, ...: virtual pipeline parallelism) every chunk is its own
  ``DistributedDataParallel`` with its own buffers, which the optimizer chains in chunk
  order (``DistributedOptimizer.buffers = chain(*per_model_buffers.values())``); Megatron-
  LM's ``get_model`` disables bucketing on every chunk after the first, and the tied
  embedding is on chunk 0 of stage 0 and the output layer on the last chunk of the last
  stage (``LanguageModule.setup_embeddings_and_output_layer``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd.converters.sources.megatron_chunks import flatten_model
from ckptd.converters.sources.megatron_optim import parse_optimizer, split_optim_name

KEYS = ("param", "exp_avg", "exp_avg_sq")
#: Model entries that are buffers, not parameters: DDP builds its buffers from
#: ``module.parameters()`` only, and the router's ``expert_bias`` (core 0.16
#: ``transformer/moe/router.py``) is ``register_buffer``ed; TE's ``_extra_state`` is no
#: tensor of the optimizer either.
NOT_PARAMS = (".router.expert_bias", "_extra_state")


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def megatron_buffer(
    params: Sequence[tuple[str, int]],
    bucket_size: int | None,
    dp: int,
    shared: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """``_ParamAndGradBuffer``'s index maps for ``params`` (``(key, numel)`` in
    ``named_parameters`` order): ``param_index_map`` (key -> (start, end, bucket)),
    ``bucket_indices`` ((start, end) padded) and ``numel_unpadded`` per bucket."""
    param_index_map: dict[str, tuple[int, int, int]] = {}
    bucket_indices: list[tuple[int, int]] = []
    per_bucket_numel_unpadded: list[int] = []
    state = {"bucket_start": 0, "bucket_id": 0, "bucket_params": 0}

    def pad_end_of_bucket(end: int) -> int:
        return _pad(end, math.lcm(dp, 128))

    def update_bucket_metadata(param_end_index: int) -> int:
        per_bucket_numel_unpadded.append(param_end_index - state["bucket_start"])
        bucket_end_index = pad_end_of_bucket(param_end_index)
        bucket_indices.append((state["bucket_start"], bucket_end_index))
        state["bucket_start"] = bucket_end_index
        state["bucket_params"] = 0
        state["bucket_id"] += 1
        return bucket_end_index

    param_start_index = 0
    param_end_index = 0
    for key, numel in list(params)[::-1]:
        param_start_index = _pad(param_start_index, 64)
        if key in shared and state["bucket_params"] > 0:
            param_start_index = update_bucket_metadata(param_start_index)
        param_end_index = param_start_index + numel
        param_index_map[key] = (param_start_index, param_end_index, state["bucket_id"])
        state["bucket_params"] += 1
        if (
            bucket_size is not None and (param_end_index - state["bucket_start"]) >= bucket_size
        ) or key in shared:
            param_start_index = update_bucket_metadata(param_end_index)
        else:
            param_start_index = param_end_index
    if state["bucket_params"] > 0:
        update_bucket_metadata(param_end_index)
    return {
        "param_index_map": param_index_map,
        "bucket_indices": bucket_indices,
        "numel_unpadded": per_bucket_numel_unpadded,
    }


def dp_zero_state(
    buffer: Mapping[str, Any], values: Mapping[str, Mapping[str, torch.Tensor]], dp: int
) -> dict[str, Any]:
    """``world_tensors`` of one buffer as ``get_parameter_state_dp_zero`` builds them.

    ``values``: key -> {"param", "exp_avg", "exp_avg_sq"} (fp32, the parameter's shape)."""
    total = sum(buffer["numel_unpadded"])
    world = {k: torch.zeros(total, dtype=torch.float32) for k in KEYS}
    offset = 0
    for b, (b_start, b_end) in enumerate(buffer["bucket_indices"]):
        gbuf_world_numel = b_end - b_start
        assert gbuf_world_numel % dp == 0
        local_numel = gbuf_world_numel // dp
        recv: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
        for r in range(dp):  # what DP rank r sends: its contiguous shard of the bucket
            w_start = b_start + r * local_numel
            w_end = min(b_end, w_start + local_numel)
            shards = {k: torch.zeros(local_numel, dtype=torch.float32) for k in KEYS}
            for key, (p_start, p_end, _) in buffer["param_index_map"].items():
                local_start = max(0, p_start - w_start)
                local_end = min(w_end - w_start, p_end - w_start)
                if local_end <= local_start:
                    continue
                sub_start = max(0, w_start - p_start)  # the rank's part of the param
                n = local_end - local_start
                for k in KEYS:
                    flat = values[key][k].reshape(-1)
                    shards[k][local_start:local_end] = flat[sub_start : sub_start + n]
            for k in KEYS:
                recv[k].append(shards[k])
        unpadded = buffer["numel_unpadded"][b]
        for k in KEYS:
            world[k][offset : offset + unpadded] = torch.cat(recv[k])[:unpadded]
        offset += unpadded
    return {**world, "numel_unpadded": total}


def rank_state(
    model: Mapping[str, torch.Tensor],
    values: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dp: int,
    bucket_size: int | None,
    shared: frozenset[str] = frozenset(),
    grad_dtype: torch.dtype = torch.float32,
) -> tuple[dict[Any, Any], list[list[int]]]:
    """One optimizer's ``distrib_optim.pt`` content: a buffer per parameter dtype (first
    appearance order), keyed ``{gbuf_idx: {(param_dtype, grad_dtype): world_tensors}}``;
    and each buffer's unpadded bucket sizes."""
    by_dtype: dict[torch.dtype, list[tuple[str, int]]] = {}
    for key, t in model.items():
        by_dtype.setdefault(t.dtype, []).append((key, t.numel()))
    out: dict[Any, Any] = {"buckets_coalesced": True}
    numels = []
    for i, (dtype, params) in enumerate(by_dtype.items()):
        buf = megatron_buffer(params, bucket_size, dp, shared)
        out[i] = {(dtype, grad_dtype): dp_zero_state(buf, values, dp)}
        numels.append(buf["numel_unpadded"])
    return out, numels


def to_legacy(state: Mapping[Any, Any], bucket_numels: Sequence[Sequence[int]]) -> dict:
    """The pre-2024 form Megatron's ``load_parameter_state_from_dp_zero_legacy`` reads:
    ``{i: {torch.float32: {key: [one tensor per bucket]}}}``, no ``buckets_coalesced``."""
    out: dict[Any, Any] = {}
    for i, numels in enumerate(bucket_numels):
        [(_, world)] = state[i].items()
        out[i] = {torch.float32: {k: list(world[k].split(list(numels))) for k in KEYS}}
    return out


def rewrite_as_distributed(
    root: Path,
    *,
    pp: int,
    dp: int = 2,
    bucket_size: int | None = None,
    tied: bool = False,
    expert_parallel: bool = False,
    legacy: bool = False,
) -> None:
    """Every rank directory of ``root`` (written with the non-distributed optimizer:
    the test fixture's AdamW or the Megatron target) rewritten with the distributed
    optimizer's files, as a DP=``dp`` run with ``--ddp-bucket-size bucket_size`` (None:
    no ``--overlap-grad-reduce``) would save it."""
    latest = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = root / f"iter_{int(latest):07d}"
    dirs = sorted(os.listdir(it_dir))
    for d in dirs:
        f = it_dir / d / "model_optim_rng.pt"
        obj = torch.load(f, weights_only=False)
        chunk_keys = [k for k in obj if k == "model" or re.fullmatch(r"model\d+", k)]
        chunk_keys.sort(key=lambda k: int(k[5:] or 0))
        vpp = len(chunk_keys)
        # parse_optimizer takes the chunks concatenated (Megatron's param group order)
        model = flatten_model({k: obj[k] for k in chunk_keys}) if vpp > 1 else flatten_model(
            obj["model"])  # fmt: skip
        params = {k: t for k, t in model.items() if not k.endswith(NOT_PARAMS)}
        prefixes = [f"{k}." if vpp > 1 else "" for k in chunk_keys]
        parsed = parse_optimizer(obj["optimizer"], model, str(f))
        values: dict[str, dict[str, torch.Tensor]] = {}
        step = None
        for name, t in parsed.tensors.items():
            key, kind = split_optim_name(name) or ("", "")
            if kind == "step":
                step = float(t)
                continue
            values.setdefault(key, {})["param" if kind == "fp32" else kind] = t
        for key, t in params.items():  # an fp32 parameter is its own main param
            values[key].setdefault("param", t.float())
        pp_rank = int(d.split("_")[3]) if pp > 1 else 0  # mp_rank_TT_PPP[_EEE]
        subs = obj["optimizer"] if isinstance(obj["optimizer"], list) else [obj["optimizer"]]
        n_opt = 2 if expert_parallel else 1
        assert n_opt == len(subs), (d, n_opt, len(subs))
        merged: list[dict[Any, Any]] = [{} if legacy else {"buckets_coalesced": True}
                                         for _ in subs]  # fmt: skip
        for v, prefix in enumerate(prefixes):
            chunk = {k: t for k, t in params.items() if k.startswith(prefix)}
            first, last = pp_rank == 0 and v == 0, pp_rank == pp - 1 and v == vpp - 1
            shared: frozenset[str] = frozenset()
            if tied and pp * vpp > 1 and first:
                shared = frozenset({prefix + "embedding.word_embeddings.weight"})
            elif tied and pp * vpp > 1 and last:
                shared = frozenset({prefix + "output_layer.weight"})
            # DDP: no bucketing after stage 0; get_model: none on chunks after the first
            size = bucket_size if pp_rank == 0 and v == 0 else None
            parts = [chunk]
            if expert_parallel:
                parts = [{k: t for k, t in chunk.items() if ".experts." not in k},
                         {k: t for k, t in chunk.items() if ".experts." in k}]  # fmt: skip
            for part, out in zip(parts, merged, strict=True):
                if not part:
                    continue
                st, numels = rank_state(part, values, dp=dp, bucket_size=size, shared=shared)
                if legacy:
                    st = to_legacy(st, numels)
                n = sum(1 for k in out if isinstance(k, int))
                for i in sorted(k for k in st if isinstance(k, int)):
                    out[n + i] = st[i]  # the optimizer's buffers, chunk after chunk
        dist_subs = []
        for sub in subs:
            sd = sub.get("optimizer", sub)
            groups = []
            for g in sd["param_groups"]:
                g = {k: v for k, v in g.items() if k != "params"}
                g["step"] = step
                groups.append(g)
            dist_sub: dict[str, Any] = {"optimizer": {"param_groups": groups}}
            if "grad_scaler" in sub:
                dist_sub["grad_scaler"] = sub["grad_scaler"]
            dist_subs.append(dist_sub)
        obj["optimizer"] = dist_subs[0] if len(dist_subs) == 1 else dist_subs
        args = vars(obj.get("args") or argparse.Namespace())
        obj["args"] = argparse.Namespace(
            **{
                **args,
                "use_distributed_optimizer": True,
                "data_parallel_size": dp,
                "overlap_grad_reduce": bucket_size is not None,
                "ddp_bucket_size": bucket_size,
                "untie_embeddings_and_output_weights": not tied,
            }
        )
        torch.save(obj, f)
        torch.save(merged[0] if len(merged) == 1 else merged, it_dir / d / "distrib_optim.pt")
