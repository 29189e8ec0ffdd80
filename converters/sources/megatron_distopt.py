"""The distributed optimizer's state of Megatron legacy rank directories (``distrib_optim.pt``).

With ``--use-distributed-optimizer`` and ``--ckpt-format torch``, Megatron-LM writes per
(tp, pp[, ep]) rank directory ``model_optim_rng.pt``, whose ``"optimizer"`` is
``DistributedOptimizer.state_dict()`` (``{"optimizer": {"param_groups": [...]},
"grad_scaler": ...}``: hyperparameters and ``step``, no per-parameter tensors), and
``distrib_optim.pt``, written by ``save_parameter_state`` on DP rank 0 after gathering
the DP shards (Megatron-Core ``optimizer/distrib_optimizer.py``,
``get_parameter_state_dp_zero``)::

    {"buckets_coalesced": True,
     0: {(param_dtype, grad_dtype): {"param": fp32[n], "exp_avg": fp32[n],
                                     "exp_avg_sq": fp32[n], "numel_unpadded": n}},
     1: {...}, ...}                                      # one entry per buffer

With expert parallelism the optimizer is a ``ChainedOptimizer`` and both files hold a
list, dense optimizer first, then the expert-parallel one (an entry may be ``None``
where that optimizer's DP rank 0 was another process: an error here). The older form
(before Feb 2024, what ``load_parameter_state_from_dp_zero_legacy`` reads) has no
``buckets_coalesced``: ``{i: {torch.float32: {"param": [bucket tensors], ...}}}``, whose
concatenation is laid out the same way.

The layout is not stored; it is rebuilt as Megatron-Core builds it
(``distributed/param_and_grad_buffer.py``, ``distributed_data_parallel.py``):

- parameters (the rank's ``model`` dict order, which is ``named_parameters`` order,
  without ``_extra_state`` and buffers such as the router's ``expert_bias``, which DDP
  never sees: ``megatron_optim.is_param_key``) go to the dense buffers, or with EP > 1
  the ``.experts.`` ones to the expert optimizer's; one buffer per parameter dtype, in
  order of first appearance;
- a buffer takes its parameters in *reverse* order, each starting at a multiple of 64
  elements from its bucket's start; a bucket closes once it holds ``bucket_size``
  elements (``--ddp-bucket-size``, default ``max(4e7, 1e6 * dp)``; no bucketing without
  ``--overlap-grad-reduce`` and on pipeline stages after the first), and a tied
  embedding copy (``shared_embedding``: PP > 1 with tied embeddings, on the first and
  last stage) sits alone in its bucket;
- the file keeps each bucket's unpadded part (up to its last parameter's end, or up to
  the next 64-aligned start when a shared embedding forced the split), concatenated.

With virtual pipeline parallelism (model chunks ``model0`` .. ``model{vpp-1}``, see
:mod:`.megatron_chunks`) every chunk has its own ``DistributedDataParallel`` and so its
own buffers; an optimizer's buffer indices run over the chunks in order (Megatron-Core
``DistributedOptimizer.buffers = chain(*per_model_buffers.values())``), chunk 0's
buffers first. Megatron-LM builds every chunk after the first with
``disable_bucketing`` (one bucket per buffer), and the tied embedding's own bucket is on
the chunk that holds it (chunk 0 of the first, the last chunk of the last pipeline
rank). ``--overlap-param-gather-with-optimizer-step``, which splits the dense optimizer
by chunk, is refused with an error.

The DP size changes only the padding that the file drops. Bucket size and tied
embeddings come from Megatron's ``args`` in the rank file when present; otherwise
every plausible choice is tried and one must fit: the buffer's ``numel_unpadded`` and
zeros in every alignment gap (Megatron fills gaps with zeros). A buffer that no
choice fits, or that two choices with different offsets fit, is a
:class:`SourceFormatError` naming the file and the buffer.

Given under the names of :mod:`.megatron_optim`: ``optim.state.<key>.fp32`` (``param``:
the fp32 master; only for 16-bit parameters, as the non-distributed optimizer stores
them, since an fp32 parameter is its own master), ``.exp_avg``, ``.exp_avg_sq``, and
``.step`` (an fp32 scalar from the param groups' ``step``, as torch's Adam keeps it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.megatron_optim import (
    CLASS_ORDER,
    HALF,
    MASTER,
    ParsedOptimizer,
    _jsonable,
    is_param_key,
    optim_name,
    param_class,
)

KEYS = ("param", "exp_avg", "exp_avg_sq")
KIND = {"param": MASTER, "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
PARAM_ALIGN = 64  # Megatron pads each parameter's start to 64 elements (128-byte aligned)
DEFAULT_BUCKET = 40_000_000  # DistributedDataParallel's bucket_size floor
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class DistOptHints:
    """What the buffer layout depends on besides the parameters; each field lists the
    candidates (one when Megatron's ``args`` tell, several when they do not)."""

    bucket_sizes: tuple[int | None, ...]  # None: one bucket per buffer
    tied: tuple[bool, ...]  # embeddings shared with the output layer
    pp_rank: int = 0  # the chunk's stage, ``chunk * pp + pp_rank`` with VPP
    pp: int = 1  # stages, ``pp * vpp`` with VPP
    expert_parallel: bool = False  # EP > 1: ``.experts.`` params in their own optimizer
    #: ``--overlap-param-gather-with-optimizer-step`` with model chunks: Megatron-Core
    #: then gives chunk 0 and the other chunks separate dense optimizers (not read here)
    split_dense: bool = False

    @classmethod
    def from_args(
        cls, args: Any, pp_rank: int, pp: int, ep: int, *, chunk: int = 0, vpp: int = 1
    ) -> DistOptHints:
        """Candidates from Megatron's ``args`` (an ``argparse.Namespace``, or None) for
        model chunk ``chunk`` of pipeline rank ``pp_rank`` (``vpp`` chunks per rank)."""
        sizes: tuple[int | None, ...]
        overlap = getattr(args, "overlap_grad_reduce", None)
        split = getattr(args, "overlap_param_gather_with_optimizer_step", None) is True
        if pp_rank > 0 or chunk > 0 or overlap is False or split:
            # DDP turns bucketing off on later stages and without overlap; Megatron-LM's
            # get_model passes disable_bucketing for every model chunk after the first,
            # and for all with --overlap-param-gather-with-optimizer-step
            sizes = (None,)
        elif isinstance(getattr(args, "ddp_bucket_size", None), int):
            sizes = (int(args.ddp_bucket_size),)
        elif overlap is True and isinstance(getattr(args, "data_parallel_size", None), int):
            sizes = (max(DEFAULT_BUCKET, 1_000_000 * int(args.data_parallel_size)),)
        else:
            sizes = (None, DEFAULT_BUCKET) if overlap is None else (DEFAULT_BUCKET,)
        untie = getattr(args, "untie_embeddings_and_output_weights", None)
        tied = (not untie,) if isinstance(untie, bool) else (False, True)
        # the shared embedding is placed by the chunk's stage of the pp * vpp pipeline
        return cls(sizes, tied, chunk * pp + pp_rank, pp * vpp, ep > 1, split and vpp > 1)


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a buffer's coalesced (file) tensors."""

    key: str
    start: int
    numel: int

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass(frozen=True)
class BufferLayout:
    """A buffer as ``distrib_optim.pt`` keeps it: its parameters' slots, its buckets."""

    param_dtype: torch.dtype
    slots: tuple[Slot, ...]
    bucket_numels: tuple[int, ...]  # per bucket, unpadded

    @property
    def numel(self) -> int:
        return sum(self.bucket_numels)

    def gaps(self) -> list[tuple[int, int]]:
        """Ranges of the coalesced tensors that belong to no parameter (alignment)."""
        out, pos = [], 0
        for s in sorted(self.slots, key=lambda s: s.start):
            if s.start > pos:
                out.append((pos, s.start))
            pos = max(pos, s.end)
        if pos < self.numel:
            out.append((pos, self.numel))
        return out


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def bucketize(
    params: Sequence[tuple[str, int]], bucket_size: int | None, shared: frozenset[str] = frozenset()
) -> tuple[tuple[Slot, ...], tuple[int, ...]]:
    """Slots (in the coalesced tensors) and unpadded bucket sizes of one buffer holding
    ``params`` (``(key, numel)`` in ``named_parameters`` order), as
    ``_ParamAndGradBuffer.__init__`` places them with the distributed optimizer.

    Offsets are kept relative to the bucket: a bucket starts at a multiple of
    lcm(dp, 128), itself a multiple of 64, so the 64-alignment of a parameter is the
    same relative or absolute and the DP size drops out."""
    slots: list[Slot] = []
    buckets: list[int] = []
    rel = 0  # next parameter start, relative to the open bucket
    base = 0  # the open bucket's start in the coalesced tensors
    count = 0  # parameters in the open bucket

    def close(end: int) -> None:
        nonlocal rel, base, count
        buckets.append(end)
        base += end
        rel, count = 0, 0

    for key, numel in reversed(params):  # reverse order: roughly backprop order
        rel = _pad(rel, PARAM_ALIGN)
        if key in shared and count > 0:
            close(rel)  # Megatron ends the previous bucket at the padded start
        slots.append(Slot(key, base + rel, numel))
        count += 1
        end = rel + numel
        if (bucket_size is not None and end >= bucket_size) or key in shared:
            close(end)
        else:
            rel = end
    if count > 0:
        close(rel)
    return tuple(slots), tuple(buckets)


def plan_buffers(
    params: Sequence[tuple[str, torch.dtype, int]],
    bucket_size: int | None,
    shared: frozenset[str] = frozenset(),
) -> list[BufferLayout]:
    """One :class:`BufferLayout` per parameter dtype, in order of first appearance (the
    order of ``DistributedDataParallel``'s ``param_and_grad_dtype_to_params``)."""
    by_dtype: dict[torch.dtype, list[tuple[str, int]]] = {}
    for key, dtype, numel in params:
        by_dtype.setdefault(dtype, []).append((key, numel))
    out = []
    for dtype, members in by_dtype.items():
        slots, buckets = bucketize(members, bucket_size, shared)
        out.append(BufferLayout(dtype, slots, buckets))
    return out


# ------------------------------------------------------------------------------ read


@dataclass(frozen=True)
class _FileBuffer:
    """One buffer of the file: its coalesced tensors and declared unpadded size."""

    dtype_key: Any
    tensors: Mapping[str, torch.Tensor]
    numel_unpadded: int


def parse_dist_optimizer(
    opt: Any,
    state: Any,
    chunks: Sequence[Mapping[str, Any]],
    *,
    path: str,
    dist_path: str,
    hints: Sequence[DistOptHints],
) -> ParsedOptimizer:
    """The optimizer state of one rank: ``opt`` (the ``"optimizer"`` entry of rank file
    ``path``, or None) and ``state`` (``distrib_optim.pt``, loaded from ``dist_path``),
    mapped to the rank's model keys (module docstring).

    ``chunks``: the rank's model chunks in order (one without virtual pipeline
    parallelism), each its flattened model entries; ``hints``: one per chunk. Each
    chunk has its own ``DistributedDataParallel`` and so its own buffers (one per
    dtype); an optimizer's buffers are those of every chunk, chunk by chunk (Megatron-
    Core ``DistributedOptimizer.buffers``: ``itertools.chain(*per_model_buffers.values())``)."""
    if len(chunks) != len(hints):
        raise ValueError(f"{len(chunks)} model chunks, {len(hints)} hints")
    if any(h.split_dense for h in hints):
        raise SourceFormatError(
            f"{dist_path}: saved with --overlap-param-gather-with-optimizer-step and "
            f"{len(chunks)} model chunks (virtual pipeline): Megatron-Core then splits the "
            "dense optimizer by chunk, a layout this reader does not rebuild"
        )
    out = ParsedOptimizer()
    model = {k: v for c in chunks for k, v in c.items()}
    # per optimizer (dense, expert), per chunk: its parameters in named_parameters order
    parts: tuple[list[list[tuple[str, torch.dtype, int]]], ...] = (
        [[] for _ in chunks], [[] for _ in chunks])  # fmt: skip
    for ci, (c, h) in enumerate(zip(chunks, hints, strict=True)):
        for k, v in c.items():
            if isinstance(v, torch.Tensor) and is_param_key(k):
                # expert params have their own optimizer only with EP > 1
                is_expert = h.expert_parallel and param_class(k, 1)[0]
                parts[1 if is_expert else 0][ci].append((k, v.dtype, v.numel()))
    dense, expert = ([p for c in part for p in c] for part in parts)
    states = state if isinstance(state, list) else [state]
    if not 1 <= len(states) <= 2:
        raise SourceFormatError(f"{dist_path}: {len(states)} optimizer states; expected the "
                                "dense one, then at most an expert-parallel one")  # fmt: skip
    if len(states) == 1 and expert:
        raise SourceFormatError(f"{dist_path}: one optimizer state, but {path} has "
                                f"{len(expert)} expert-parallel parameters (EP > 1)")  # fmt: skip
    subs = _sub_optimizers(opt, len(states), path)
    for si, (sub_state, members) in enumerate(zip(states, (dense, expert), strict=False)):
        where = dist_path + (f" [optimizer {si}]" if len(states) > 1 else "")
        if sub_state is None:
            if members:
                raise SourceFormatError(
                    f"{where}: no state (this file was written where another process was "
                    f"DP rank 0 of this optimizer), but {path} has {len(members)} of its "
                    "parameters"
                )
            continue
        buffers = _file_buffers(sub_state, where)
        pairs = _chunk_layouts(parts[si], buffers, hints, where, path)
        sub = subs[si]
        step = _step(sub, path)
        for layout, buf in pairs:
            for slot in layout.slots:
                shape = model[slot.key].shape
                for key in KEYS:
                    if key == "param" and model[slot.key].dtype not in HALF:
                        continue  # an fp32 parameter is its own master (no ``fp32`` entry)
                    name = optim_name(slot.key, KIND[key])
                    out.tensors[name] = buf.tensors[key][slot.start : slot.end].view(shape)
                    out.param_of[name] = slot.key
                if step is not None:
                    name = optim_name(slot.key, "step")
                    out.tensors[name] = torch.tensor(step, dtype=torch.float32)
                    out.param_of[name] = slot.key
        if step is None and members:
            out.skipped.append(f"{path}: optimizer step (no 'step' in the param groups)")
        if sub is not None:
            _groups(out, sub, si, path)
    return out


def _chunk_layouts(
    per_chunk: Sequence[Sequence[tuple[str, torch.dtype, int]]],
    buffers: list[_FileBuffer],
    hints: Sequence[DistOptHints],
    where: str,
    path: str,
) -> list[tuple[BufferLayout, _FileBuffer]]:
    """Each file buffer with its layout: the buffers run chunk by chunk, a chunk taking
    one per parameter dtype of its members (none if it has no member)."""
    counts = [len({dtype for _, dtype, _ in members}) for members in per_chunk]
    if len(per_chunk) == 1:
        counts = [len(buffers)]  # one chunk: _choose_layout explains any mismatch
    elif sum(counts) != len(buffers):
        raise SourceFormatError(
            f"{where}: {len(buffers)} buffers, but the {len(per_chunk)} model chunks of "
            f"{path} make {sum(counts)} (one per parameter dtype per chunk: {counts})"
        )
    out: list[tuple[BufferLayout, _FileBuffer]] = []
    pos = 0
    for ci, (members, n) in enumerate(zip(per_chunk, counts, strict=True)):
        mine = buffers[pos : pos + n]
        here = where + (f" (model chunk {ci}, buffers {pos}..{pos + n - 1})"
                        if len(per_chunk) > 1 else "")  # fmt: skip
        if members:
            out += zip(_choose_layout(members, mine, hints[ci], here, path), mine, strict=True)
        pos += n
    return out


def _sub_optimizers(opt: Any, n: int, path: str) -> list[dict[str, Any] | None]:
    """``DistributedOptimizer.state_dict()`` per optimizer (None without an entry)."""
    if opt is None:
        return [None] * n
    subs = opt if isinstance(opt, list) else [opt]
    if len(subs) != n:
        raise SourceFormatError(f"{path}: optimizer lists {len(subs)} optimizers, "
                                f"its {n} distributed optimizer states")  # fmt: skip
    for i, sub in enumerate(subs):
        inner = sub.get("optimizer") if isinstance(sub, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
            raise SourceFormatError(
                f"{path}: optimizer[{i}] is not a DistributedOptimizer state dict "
                "({'optimizer': {'param_groups': [...]}})"
            )
        if inner.get("state"):
            raise SourceFormatError(
                f"{path}: optimizer[{i}] holds per-parameter state although the directory "
                "has a distrib_optim.pt; which one is current cannot be told"
            )
    return list(subs)


def _file_buffers(sub_state: Any, where: str) -> list[_FileBuffer]:
    """The buffers of one optimizer's state, coalesced or in the legacy per-bucket form."""
    if not isinstance(sub_state, dict):
        raise SourceFormatError(f"{where}: a {type(sub_state).__name__}, not a "
                                "distributed optimizer state dict")  # fmt: skip
    coalesced = bool(sub_state.get("buckets_coalesced"))
    idxs = sorted(k for k in sub_state if isinstance(k, int))
    if idxs != list(range(len(idxs))):
        raise SourceFormatError(f"{where}: buffer indices {idxs} are not 0..n-1")
    out = []
    for i in idxs:
        entry = sub_state[i]
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SourceFormatError(f"{where}: buffer {i} is not one {{dtype: state}} entry")
        [(dkey, body)] = entry.items()
        if not isinstance(body, dict) or any(k not in body for k in KEYS):
            raise SourceFormatError(f"{where}: buffer {i} lacks one of {list(KEYS)}")
        if coalesced:
            tensors = {k: body[k] for k in KEYS}
            n = body.get("numel_unpadded")
            if not isinstance(n, int):
                raise SourceFormatError(f"{where}: buffer {i} has no numel_unpadded")
        else:  # legacy: a tensor per bucket; Megatron concatenates them to the same layout
            if dkey != torch.float32 or not all(isinstance(body[k], list) for k in KEYS):
                raise SourceFormatError(f"{where}: buffer {i}: neither the coalesced form "
                                        "nor the legacy per-bucket lists")  # fmt: skip
            try:
                tensors = {k: torch.cat([t.reshape(-1) for t in body[k]]) for k in KEYS}
            except (TypeError, RuntimeError) as e:
                raise SourceFormatError(f"{where}: buffer {i}: bucket tensors: {e}") from None
            n = tensors["param"].numel()
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
                raise SourceFormatError(f"{where}: buffer {i} {k!r} is not a 1-D float tensor")
            if t.numel() != n:
                raise SourceFormatError(f"{where}: buffer {i} {k!r} holds {t.numel()} "
                                        f"elements, numel_unpadded says {n}")  # fmt: skip
        out.append(_FileBuffer(dkey, tensors, n))
    return out


def _choose_layout(
    members: Sequence[tuple[str, torch.dtype, int]],
    buffers: list[_FileBuffer],
    hints: DistOptHints,
    where: str,
    path: str,
) -> list[BufferLayout]:
    """The one candidate layout (bucket size x tied embeddings) that the file fits."""
    keys = {k for k, _, _ in members}
    fits: dict[tuple[tuple[Slot, ...], ...], list[BufferLayout]] = {}
    tried: list[tuple[str, list[BufferLayout]]] = []
    for size, tied in itertools.product(hints.bucket_sizes, hints.tied):
        shared = _shared(keys, tied, hints)
        layouts = plan_buffers(members, size, shared)
        tried.append((f"bucket size {size}, tied embeddings {tied}", layouts))
        if _fits(layouts, buffers):
            fits.setdefault(tuple(lay.slots for lay in layouts), layouts)
    if len(fits) == 1:
        return next(iter(fits.values()))
    if len(fits) > 1:
        raise SourceFormatError(
            f"{where}: the buffers fit {len(fits)} layouts with different parameter offsets "
            f"for {path}; Megatron's args (overlap_grad_reduce, ddp_bucket_size, "
            "untie_embeddings_and_output_weights) in the rank file would tell them apart"
        )
    what, layouts = tried[0]
    if len(layouts) != len(buffers):
        raise SourceFormatError(
            f"{where}: {len(buffers)} buffers, but the parameters of {path} make "
            f"{len(layouts)} (one per dtype: {[str(b.param_dtype) for b in layouts]})"
        )
    for i, (lay, buf) in enumerate(zip(layouts, buffers, strict=True)):
        dkey = buf.dtype_key
        if isinstance(dkey, tuple) and dkey and dkey[0] != lay.param_dtype:
            raise SourceFormatError(f"{where}: buffer {i} is for {dkey[0]} parameters, "
                                    f"{path} makes a {lay.param_dtype} buffer {i}")  # fmt: skip
        if buf.numel_unpadded != lay.numel:
            raise SourceFormatError(
                f"{where}: buffer {i} ({lay.param_dtype}) holds {buf.numel_unpadded} "
                f"elements; the {len(lay.slots)} parameters of {path} in Megatron's buffer "
                f"order need {lay.numel} ({what}, buckets {list(lay.bucket_numels)}): a "
                "different model, or frozen/custom parameters"
            )
    raise SourceFormatError(
        f"{where}: the alignment gaps of the buffers of {path} are not zero under any "
        f"layout tried ({'; '.join(w for w, _ in tried)}): parameters out of Megatron's order"
    )


def _shared(keys: set[str], tied: bool, hints: DistOptHints) -> frozenset[str]:
    """The parameter Megatron marks ``shared_embedding`` (own bucket) on this stage."""
    if not tied or hints.pp < 2:
        return frozenset()
    if hints.pp_rank == 0 and EMBEDDING in keys and OUTPUT not in keys:
        return frozenset({EMBEDDING})
    if hints.pp_rank == hints.pp - 1 and OUTPUT in keys and EMBEDDING not in keys:
        return frozenset({OUTPUT})
    return frozenset()


def _fits(layouts: list[BufferLayout], buffers: list[_FileBuffer]) -> bool:
    """Same buffers (count, dtype, unpadded size), and zeros in every gap."""
    if len(layouts) != len(buffers):
        return False
    for lay, buf in zip(layouts, buffers, strict=True):
        dkey = buf.dtype_key
        if isinstance(dkey, tuple) and dkey and dkey[0] != lay.param_dtype:
            return False
        if buf.numel_unpadded != lay.numel:
            return False
        for a, b in lay.gaps():
            if any(bool(buf.tensors[k][a:b].any()) for k in KEYS):
                return False
    return True


def _step(sub: Mapping[str, Any] | None, path: str) -> float | None:
    """The optimizer's step: Megatron writes it into every param group (one value)."""
    if sub is None:
        return None
    steps = set()
    for g in sub["optimizer"]["param_groups"]:
        s = g.get("step") if isinstance(g, dict) else None
        if s is not None:
            steps.add(float(s.item() if isinstance(s, torch.Tensor) else s))
    if len(steps) > 1:
        raise SourceFormatError(f"{path}: param groups of one optimizer disagree on the "
                                f"step ({sorted(steps)})")  # fmt: skip
    return steps.pop() if steps else None


def _groups(out: ParsedOptimizer, sub: Mapping[str, Any], si: int, path: str) -> None:
    """Hyperparameters by class (expert-parallel, no weight decay), read from the keys
    Megatron-Core puts into each group (``is_expert_parallel``, ``wd_mult``)."""
    if isinstance(sub.get("grad_scaler"), dict) and out.grad_scaler is None:
        out.grad_scaler = _jsonable(sub["grad_scaler"])
    seen = {tuple(g["class"]) for g in out.groups}
    for gi, g in enumerate(sub["optimizer"]["param_groups"]):
        where = f"{path}: optimizer" + (f"[{si}]" if si else "") + f" param group {gi}"
        if not isinstance(g, dict) or "wd_mult" not in g:
            out.skipped.append(f"{where} hyperparameters (no wd_mult: class unknown)")
            continue
        cls = (bool(g.get("is_expert_parallel", False)), float(g["wd_mult"]) == 0.0)
        if cls not in CLASS_ORDER or cls in seen:
            out.skipped.append(f"{where} hyperparameters (a second group of class {cls})")
            continue
        seen.add(cls)
        hyper = {k: _jsonable(v) for k, v in g.items() if k not in ("params", "step")}
        out.groups.append({"class": list(cls), "optimizer": si, "hyper": hyper})
