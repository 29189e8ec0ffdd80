"""The non-distributed optimizer state of Megatron legacy rank files, read and written.

What ``model_optim_rng.pt`` holds under ``"optimizer"`` (Megatron-LM
``megatron/core/optimizer/optimizer.py``; saved by ``generate_state_dict`` in
``megatron/training/checkpointing.py``):

- ``Float16OptimizerWithFloat16Params.state_dict()`` (bf16/fp16 models)::

      {"optimizer": torch_state_dict,            # {"state": {idx: {...}}, "param_groups": [...]}
       "fp32_from_fp16_params": [[t, ...], ...], # per group: fp32 masters of its 16-bit params
       "grad_scaler": {...}}                     # fp16 only

- ``FP32Optimizer.state_dict()`` (fp32 models): the torch state dict itself;
- ``ChainedOptimizer.state_dict()`` (dense and expert-parallel params in separate
  optimizers): a list of the above, one per optimizer.

The torch state dict keys each parameter by its index: indices run over the param
groups in order, and a group lists its parameters in the model's ``named_parameters``
order, which is the order of the rank's ``model`` state dict (minus ``_extra_state``
entries and persistent buffers such as the router's ``expert_bias``: :func:`is_param_key`).
With virtual pipeline parallelism (``model0`` .. ``model{vpp-1}``) the groups run over
all model chunks in order (Megatron-Core ``_get_param_groups(model_chunks)``: chunk 0's
parameters of a group, then chunk 1's, each in ``named_parameters`` order): the caller
passes the chunks' entries concatenated under chunk-qualified keys (``model0.<key>``,
:mod:`.megatron_chunks`), and so does :func:`build_optimizer`'s. Megatron-Core's
default param groups split the parameters into classes: weight decay or not (1-D
tensors and ``*.bias`` have none) and dense or expert-parallel (``.experts.`` in the
name); no names are stored. A group is matched to the class whose parameters it can
hold (same count, every ``exp_avg`` of the parameter's shape), so both Megatron's older
group order (first appearance) and its newer one (sorted) read.
A group that matches no class (custom ``--no-weight-decay`` rules, frozen parameters)
is a :class:`SourceFormatError` naming the file and the group.

The distributed optimizer keeps its state in ``distrib_optim.pt`` as flat DP buffers
and only hyperparameters here; :mod:`.megatron_distopt` reads that form into the same
names (the target writes this module's non-distributed form).

Universal names (those of ``ckpt.save`` and the DeepSpeed source):
``optim.state.<param>.fp32`` (master weights of 16-bit params), ``.exp_avg``,
``.exp_avg_sq``, ``.step`` and any other tensor the optimizer keeps per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptd.converters.sources.base import PlanError, SourceFormatError

PREFIX = "optim.state."
MASTER = "fp32"
REQUIRED = ("exp_avg", "exp_avg_sq", "step")
HALF = (torch.float16, torch.bfloat16)
#: (expert-parallel, no weight decay) in the order Megatron-Core >= 0.8 builds groups:
#: per optimizer (dense, then expert) the default group before the ``wd_mult=0`` one.
CLASS_ORDER: tuple[tuple[bool, bool], ...] = (
    (False, False),
    (False, True),
    (True, False),
    (True, True),
)
#: torch.optim.AdamW defaults plus Megatron's group keys, for groups a source did not
#: describe (``lr`` and ``weight_decay`` are set by Megatron's scheduler every step).
DEFAULT_GROUP: dict[str, Any] = {
    "lr": 0.0,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.01,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "lr_mult": 1.0,
    "is_decoupled_lr": False,
}


def optim_name(param: str, kind: str) -> str:
    """``optim.state.<param>.<kind>``."""
    return f"{PREFIX}{param}.{kind}"


def split_optim_name(name: str) -> tuple[str, str] | None:
    """``optim.state.<param>.<kind>`` -> ``(param, kind)``; None for other names."""
    if not name.startswith(PREFIX):
        return None
    param, _, kind = name[len(PREFIX) :].rpartition(".")
    return (param, kind) if param and kind else None


def param_class(key: str, ndim: int) -> tuple[bool, bool]:
    """(expert-parallel, no weight decay) of a parameter, by Megatron-Core's defaults."""
    return ".experts." in key, ndim == 1 or key.endswith(".bias")


#: Persistent buffers in a Megatron-Core model's state dict: saved with the model, never
#: given to the optimizer (so no optimizer state, no place in a param group or a DDP grad
#: buffer). Megatron-Core 0.16 ``transformer/moe/router.py`` (TopKRouter.__init__)
#: registers ``expert_bias`` (``--moe-router-enable-expert-bias``) as a persistent fp32
#: buffer; its ``local_tokens_per_expert``, ``global_tokens_per_expert`` and ``ga_steps``
#: are buffers with ``persistent=False`` and so never saved, but they are not parameters
#: either should a state dict hold them.
_BUFFER_SUFFIXES = tuple(
    f".router.{b}"
    for b in ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert", "ga_steps")
)


def is_param_key(key: str) -> bool:
    """Model entries that are parameters: not TE's ``_extra_state``, not a buffer
    (:data:`_BUFFER_SUFFIXES`)."""
    return not key.endswith("_extra_state") and not key.endswith(_BUFFER_SUFFIXES)


# Megatron-Core GPTModel's module registration order. named_parameters (and the model
# state dict) walk the module tree in pre-order: a module's own parameters (then its
# buffers and extra state) in registration order, then each child module's subtree in
# registration order. One table serves every level because only siblings are compared
# and it lists each module type's children in their order: GPTModel (embedding, decoder,
# mtp, output_layer), LanguageModelEmbedding, TransformerBlock (layers, final_layernorm),
# TransformerLayer, Attention (core_attention, linear_proj; then SelfAttention's
# linear_qkv, q/k_layernorm or CrossAttention's linear_q, linear_kv), MoELayer (router,
# experts, shared_experts), SequentialMLP (local_experts), MLP (linear_fc1, linear_fc2).
_CHILDREN = {
    name: i
    for i, name in enumerate((
        "embedding", "word_embeddings", "position_embeddings", "tokentype_embeddings",
        "decoder", "layers", "input_layernorm", "self_attention", "core_attention",
        "linear_proj", "linear_qkv", "linear_q", "linear_kv", "q_layernorm", "k_layernorm",
        "pre_cross_attn_layernorm", "cross_attention", "pre_mlp_layernorm", "mlp", "router",
        "experts", "local_experts", "shared_experts", "linear_fc1", "linear_fc2",
        "final_layernorm", "mtp", "output_layer",
    ))
}  # fmt: skip
# A module's own parameters: TE's LayerNormLinear registers its norm before its weight.
# Others (SharedExpertMLP's gate_weight, buffers such as the router's expert_bias, TE's
# _extra_state, which state_dict saves after the parameters) keep their input order.
_LEAF = ("layer_norm_weight", "layer_norm_bias", "weight", "bias")


def named_parameters_order(keys: Iterable[str]) -> list[str]:
    """Megatron-Core GPT local keys sorted into ``named_parameters`` (pre-order) order.

    A module's own entries (a key's last component) come before its child modules (the
    table above; ModuleList indices numerically), e.g. SharedExpertMLP's ``gate_weight``
    before its ``linear_fc1``/``linear_fc2``. A child name the table does not know sorts
    after the known siblings, unknown siblings in order of first appearance in ``keys``,
    with its whole subtree kept together."""
    keys = list(keys)
    first: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            first.setdefault(".".join(parts[:i]), len(first))

    def rank(key: str) -> tuple[tuple[int, ...], ...]:
        parts = key.split(".")
        out: list[tuple[int, ...]] = []
        for i, c in enumerate(parts[:-1]):
            if c.isdigit():
                out.append((1, 0, int(c)))
            elif c in _CHILDREN:
                out.append((1, 1, _CHILDREN[c]))
            else:
                out.append((1, 2, first[".".join(parts[: i + 1])]))
        leaf = parts[-1]
        out.append((0, _LEAF.index(leaf) if leaf in _LEAF else len(_LEAF)))
        return tuple(out)

    return sorted(keys, key=rank)


# ------------------------------------------------------------------------------ read


@dataclass
class ParsedOptimizer:
    """The optimizer of one rank file: tensors under local universal names, groups."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # optim.state.<key>.<kind>
    param_of: dict[str, str] = field(default_factory=dict)  # optim name -> model key
    groups: list[dict[str, Any]] = field(default_factory=list)  # hyperparameters, JSON-safe
    grad_scaler: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)


def parse_optimizer(opt: Any, model: Mapping[str, Any], path: str) -> ParsedOptimizer:
    """Map the optimizer state of rank file ``path`` to its model keys (module docstring)."""
    out = ParsedOptimizer()
    subs = list(opt.values()) if isinstance(opt, dict) and _int_keyed(opt) else opt
    subs = subs if isinstance(subs, list) else [subs]
    params = [k for k, v in model.items() if isinstance(v, torch.Tensor) and is_param_key(k)]
    classes: dict[tuple[bool, bool], list[str]] = {c: [] for c in CLASS_ORDER}
    for k in params:
        classes[param_class(k, model[k].dim())].append(k)
    used: set[tuple[bool, bool]] = set()
    for si, sub in enumerate(subs):
        where = f"{path}: optimizer" + (f"[{si}]" if len(subs) > 1 else "")
        if not isinstance(sub, dict):
            raise SourceFormatError(f"{where} is a {type(sub).__name__}, not a state dict")
        fp32 = sub.get("fp32_from_fp16_params")
        sd = sub["optimizer"] if isinstance(sub.get("optimizer"), dict) else sub
        if not isinstance(sd.get("param_groups"), list):
            raise SourceFormatError(f"{where}: no param_groups (not a torch optimizer state)")
        if not isinstance(sd.get("state"), dict):
            out.skipped.append(f"{where} (no per-parameter state: distributed optimizer?)")
            continue
        if isinstance(sub.get("grad_scaler"), dict) and out.grad_scaler is None:
            out.grad_scaler = _jsonable(sub["grad_scaler"])
        groups = sd["param_groups"]
        if fp32 is not None and (not isinstance(fp32, list) or len(fp32) != len(groups)):
            raise SourceFormatError(f"{where}: fp32_from_fp16_params does not list one "
                                    f"entry per param group ({len(groups)})")  # fmt: skip
        for g, group in enumerate(groups):
            idxs = list(group.get("params", []))
            if not idxs:
                continue
            cls = _match(classes, used, idxs, sd["state"], model, f"{where} param group {g}")
            used.add(cls)
            members = classes[cls]
            for idx, key in zip(idxs, members, strict=True):
                for sname, v in sd["state"].get(idx, {}).items():
                    if not isinstance(v, torch.Tensor):
                        out.skipped.append(f"{where} state[{idx}].{sname} (not a tensor)")
                        continue
                    name = optim_name(key, str(sname))
                    out.tensors[name] = v
                    out.param_of[name] = key
            if fp32 is not None:
                _masters(out, fp32[g], [k for k in members if model[k].dtype in HALF], model,
                         f"{where} fp32_from_fp16_params[{g}]")  # fmt: skip
            hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
            out.groups.append({"class": list(cls), "optimizer": si, "hyper": hyper})
    return out


def _int_keyed(d: dict[Any, Any]) -> bool:
    return bool(d) and all(isinstance(k, int) for k in d)


def _match(classes: Mapping[tuple[bool, bool], list[str]], used: set[tuple[bool, bool]],
           idxs: Sequence[Any], state: Mapping[Any, Any], model: Mapping[str, Any],
           where: str) -> tuple[bool, bool]:
    """The first parameter class (CLASS_ORDER) a group can hold: same count, and every
    per-parameter state tensor that is not a scalar has its parameter's shape."""
    for cls in CLASS_ORDER:
        members = classes[cls]
        if cls in used or len(members) != len(idxs):
            continue
        if all(_fits(state.get(i, {}), model[k]) for i, k in zip(idxs, members, strict=True)):
            return cls
    raise SourceFormatError(
        f"{where}: {len(idxs)} parameters match no class of Megatron-Core's default param "
        "groups (weight decay / none for 1-D and *.bias, dense / .experts.) in the model's "
        "parameter order; custom param groups or frozen parameters are not supported"
    )


def _fits(st: Mapping[str, Any], param: torch.Tensor) -> bool:
    return all(
        not isinstance(v, torch.Tensor) or v.dim() == 0 or tuple(v.shape) == tuple(param.shape)
        for v in st.values()
    )


def _masters(out: ParsedOptimizer, masters: Any, halves: list[str],
             model: Mapping[str, Any], where: str) -> None:
    if not isinstance(masters, list) or len(masters) != len(halves):
        n = len(masters) if isinstance(masters, list) else type(masters).__name__
        raise SourceFormatError(f"{where}: {n} master weights for {len(halves)} 16-bit params")
    for key, m in zip(halves, masters, strict=True):
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(model[key].shape):
            got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise SourceFormatError(f"{where}: master of {key!r} is {got}, the parameter "
                                    f"{list(model[key].shape)}")  # fmt: skip
        name = optim_name(key, MASTER)
        out.tensors[name] = m
        out.param_of[name] = key


def _jsonable(v: Any) -> Any:
    """Hyperparameters as JSON values (tuples -> lists, 0-d tensors -> numbers)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return repr(v)


# ----------------------------------------------------------------------------- write


def build_optimizer(
    model: Mapping[str, torch.Tensor],
    optim: Mapping[str, Mapping[str, torch.Tensor]],
    groups: Sequence[Mapping[str, Any]] = (),
    grad_scaler: Mapping[str, Any] | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """The ``"optimizer"`` entry of a rank file for ``model`` (ordered as Megatron
    builds its parameters) and ``optim`` (model key -> kind -> local tensor).

    One optimizer (a list of two, dense then expert-parallel, if there are experts: the
    ChainedOptimizer form), each with the groups of :data:`CLASS_ORDER` that have
    parameters; hyperparameters from ``groups`` (a source's, by class) or defaults.
    """
    params = [k for k in model if is_param_key(k)]
    by_class: dict[tuple[bool, bool], list[str]] = {c: [] for c in CLASS_ORDER}
    for k in params:
        by_class[param_class(k, model[k].dim())].append(k)
    hyper = {tuple(g["class"]): g["hyper"] for g in groups if "class" in g and "hyper" in g}
    subs = []
    for expert in (False, True):
        cls_list = [c for c in CLASS_ORDER if c[0] == expert and by_class[c]]
        if not cls_list:
            continue
        state: dict[int, dict[str, torch.Tensor]] = {}
        pgroups, masters = [], []
        for cls in cls_list:
            first = len(state)
            for k in by_class[cls]:
                state[len(state)] = {kind: t for kind, t in optim[k].items() if kind != MASTER}
            base = dict(hyper.get(cls) or {**DEFAULT_GROUP, "wd_mult": 0.0 if cls[1] else 1.0,
                                            "is_expert_parallel": cls[0]})  # fmt: skip
            if isinstance(base.get("betas"), list):
                base["betas"] = tuple(base["betas"])
            base["params"] = list(range(first, len(state)))
            pgroups.append(base)
            masters.append([optim[k][MASTER] for k in by_class[cls] if model[k].dtype in HALF])
        sd = {"state": state, "param_groups": pgroups}
        if any(model[k].dtype in HALF for c in cls_list for k in by_class[c]):
            sub: dict[str, Any] = {"optimizer": sd, "fp32_from_fp16_params": masters}
            if grad_scaler:
                sub["grad_scaler"] = {
                    k: torch.tensor(v, dtype=torch.float32) if k == "scale" else v
                    for k, v in grad_scaler.items()
                }
            subs.append(sub)
        else:
            subs.append(sd)  # FP32Optimizer: the torch state dict as it is
    return subs[0] if len(subs) == 1 else subs


def check_optim_names(names: Sequence[str], params: Mapping[str, torch.dtype]) -> None:
    """Every param with optimizer state has the kinds Megatron's optimizer needs.

    ``params``: canonical model tensor name -> dtype; buffers among them (the router's
    ``expert_bias``, :func:`is_param_key`) need no state and may have none. Raises
    :class:`PlanError` naming the parameter otherwise (or an optimizer tensor of no
    parameter)."""
    kinds: dict[str, set[str]] = {}
    for n in names:
        pk = split_optim_name(n)
        if pk is None or pk[0] not in params:
            raise PlanError(f"megatron target: optimizer tensor {n!r} belongs to no parameter")
        if not is_param_key(pk[0]):
            raise PlanError(
                f"megatron target: optimizer tensor {n!r} belongs to {pk[0]!r}, a buffer "
                "(Megatron's optimizer never sees it); drop it or use --weights-only"
            )
        kinds.setdefault(pk[0], set()).add(pk[1])
    if not kinds:
        return
    for p, dtype in params.items():
        if not is_param_key(p):
            continue
        need = set(REQUIRED) | ({MASTER} if dtype in HALF else set())
        missing = sorted(need - kinds.get(p, set()))
        if missing:
            raise PlanError(
                f"megatron target: parameter {p!r} lacks optimizer state {missing} (Megatron's "
                "optimizer keeps step, exp_avg, exp_avg_sq, and fp32 masters of 16-bit "
                "params); convert with --weights-only to drop optimizer state"
            )
