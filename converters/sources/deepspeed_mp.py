"""Model-parallel DeepSpeed checkpoints (Megatron-DeepSpeed, TP > 1): TP shards assembled.

DeepSpeed's engine names a model-parallel rank's files by its ``mp_rank``
(``deepspeed/runtime/engine.py``: ``_get_ckpt_name`` gives
``mp_rank_{mp:02d}_model_states.pt``, or ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt``
under ZeRO-3; ``_get_rank_zero_ckpt_name`` gives
``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``). Each mp rank is a complete
ZeRO checkpoint of its own TP shard: its ``module``, ``param_shapes`` with *local*
shapes, and its own data-parallel flat partitions. So each rank is read by a
:class:`~ckptd.converters.sources.deepspeed.DeepSpeedSource` restricted to it (local
tensors ``model.<key>`` and ``optim.state.<key>.<kind>``), and the TP layout of the local
keys comes from a reshard spec (default the shipped ``deepspeed_megatron``, with model
variables from ``--var``), compiled for each rank's ``tp`` coordinate: exactly as the
Megatron source does for ``mp_rank_XX`` directories. Optimizer tensors follow their
parameter's layout; the scalar ``step`` is a replica.

A canonical tensor (``model.<name>`` / ``optim.state.<name>.<kind>``) is assembled from
the pieces of the ranks that hold it; replicas (norms, biases of row-parallel layers)
are compared (``check_equal``, the default) or the first is kept (``take_first``).
Memory: the local shards of one canonical tensor (a split tensor: its size; a replica:
one copy per TP rank).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ckptd.converters.sources.base import SourceFormatError, TensorInfo, read_range_by_boxes
from ckptd.converters.spec.errors import SpecError
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import Box, Piece
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

DEFAULT_SPEC = "deepspeed_megatron"
OPTIM_PREFIX = "optim.state."


class RankReader(Protocol):
    """One mp rank's local tensors (a DeepSpeedSource restricted to that rank)."""

    dir: str

    def tensors(self) -> list[TensorInfo]: ...

    def read(self, name: str) -> torch.Tensor: ...


def _param_key(name: str) -> str | None:
    """``optim.state.<key>.<kind>`` -> ``<key>``; None for model tensors."""
    if not name.startswith(OPTIM_PREFIX):
        return None
    return name.removeprefix(OPTIM_PREFIX).rpartition(".")[0]


class MPAssembly:
    """Canonical tensors of a TP-sharded DeepSpeed checkpoint (see the module docstring)."""

    def __init__(
        self,
        ranks: Sequence[RankReader],
        spec: str | None,
        variables: Mapping[str, int],
        labels: Sequence[str] | None = None,
    ) -> None:
        """Plan the assembly: ``ranks[i]`` holds TP rank ``i``'s local tensors; ``labels``
        name them in errors (default ``mp_rank_{i:02d}``, the files of TP rank ``i``)."""
        from ckptd.converters.sources.megatron import spec_source
        from ckptd.converters.spec import compile_spec

        self.ranks = list(ranks)
        self.labels = list(labels or (f"mp_rank_{i:02d}" for i in range(len(self.ranks))))
        self.spec_name = spec or DEFAULT_SPEC
        self.variables = {**dict(variables), "tp": len(self.ranks)}
        self.infos: dict[str, TensorInfo] = {}
        # canonical name -> [(rank, local tensor name, pieces)]
        self._holders: dict[str, list[tuple[int, str, tuple[Piece, ...]]]] = {}
        self._policies: list[dict[str, str]] = []
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._cache_for = ""
        for idx, rank in enumerate(self.ranks):
            tensors: dict[str, torch.Tensor] = {}
            param_of: dict[str, str] = {}
            local_name: dict[str, str] = {}  # layout key -> the rank reader's name
            for info in rank.tensors():
                meta = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
                param = _param_key(info.name)
                key = info.name if param is not None else info.name.removeprefix("model.")
                if param is not None:
                    param_of[key] = param
                tensors[key] = meta
                local_name[key] = info.name
            model_keys = [k for k in tensors if k not in param_of]
            shapes = {k: tuple(tensors[k].shape) for k in model_keys}
            try:
                compiled = compile_spec(
                    spec_source(self.spec_name), self.variables, coords={"tp": idx}
                )
                layout = compiled.layout_for(model_keys, shapes)
                rl = build_rank_layout(FlatState(tensors=tensors, param_of=param_of), layout, idx)
            except (SpecError, LayoutError) as e:
                raise SourceFormatError(
                    f"{rank.dir} ({self.labels[idx]}): spec {self.spec_name!r} with variables "
                    f"{self.variables}: {e} (pass the model variables: --var heads=.. ...)"
                ) from None
            policies = dict(layout.policies)
            policies.update({o: policies[p] for o, p in param_of.items() if p in policies})
            self._policies.append({local_name[k]: v for k, v in policies.items()})
            metas = {m.name: m for m in rl.tensors}
            for entry in rl.entries:
                is_model = entry.key not in param_of
                for pc in entry.pieces:
                    out = f"model.{pc.name}" if is_model else pc.name
                    m = metas[pc.name]
                    info = TensorInfo(out, m.dtype, tuple(m.shape))
                    prev = self.infos.setdefault(out, info)
                    if prev != info:
                        raise SourceFormatError(
                            f"{rank.dir} ({self.labels[idx]}): tensor {out!r} is "
                            f"{info.dtype}{list(info.shape)} here, {prev.dtype}"
                            f"{list(prev.shape)} on another TP rank"
                        )
                    self._holders.setdefault(out, []).append((idx, local_name[entry.key], (pc,)))

    def read(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name``."""
        info = self.infos[name]
        return self._read_box(info, Box.whole(info.shape))

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Bytes of ``name`` from the boxes under them (see ``read_range_by_boxes``)."""
        info = self.infos[name]
        read_range_by_boxes(info, lambda box: self._read_box(info, box), start, out)

    def _local(self, name: str, idx: int, key: str) -> torch.Tensor:
        """Rank ``idx``'s local tensor ``key``, kept while ``name`` is being read (a
        windowed read asks for several regions of one tensor in a row)."""
        if self._cache_for != name:
            self._cache.clear()
            self._cache_for = name
        t = self._cache.get((idx, key))
        if t is None:
            t = self._cache[(idx, key)] = self.ranks[idx].read(key)
        return t

    def _read_box(self, info: TensorInfo, box: Box) -> torch.Tensor:
        """Region ``box`` of canonical tensor ``info`` from the rank pieces over it."""
        name = info.name
        out = torch.empty(box.lengths, dtype=torch_dtype(info.dtype))
        seen: dict[tuple[Any, ...], int] = {}
        covered = 0
        for idx, key, pieces in self._holders[name]:
            for p in pieces:
                inter = p.global_box.intersect(box)
                if inter is None:
                    continue
                local = self._local(name, idx, key)
                if dtype_name(local.dtype) != info.dtype:
                    raise SourceFormatError(
                        f"{self.ranks[idx].dir}: {self.labels[idx]} {key!r} is {local.dtype}, "
                        f"planned {info.dtype}"
                    )
                src = piece_view(local, p)[inter.shift(p.global_box.offsets, -1).slices()]
                dst = out[inter.shift(box.offsets, -1).slices()]
                region = (inter.offsets, inter.lengths)
                first = seen.get(region)
                if first is None:
                    seen[region] = idx
                    dst.copy_(src)
                    covered += inter.numel
                    continue
                policy = self._policies[idx].get(key) or "check_equal"
                if policy == "check_equal" and not torch.equal(dst, src):
                    raise SourceFormatError(
                        f"{self.ranks[idx].dir}: tensor {name!r}: the copy in {self.labels[idx]} "
                        f"({key!r}) differs from {self.labels[first]}'s (replicate policy "
                        "check_equal; use take_first in the spec to keep the first)"
                    )
                if policy not in ("check_equal", "take_first"):
                    raise SourceFormatError(
                        f"tensor {name!r}: replicate policy {policy!r} is not supported for "
                        "model-parallel DeepSpeed checkpoints (check_equal, take_first)"
                    )
        if covered != box.numel:
            raise SourceFormatError(
                f"{self.ranks[0].dir}: tensor {name!r}: the TP ranks cover {covered} of "
                f"{box.numel} elements of {box}"
            )
        return out

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """Nothing to advise: the local tensors are read whole, rank by rank."""

    def fingerprint(self) -> str:
        """What the assembly depends on besides the files: spec and variables."""
        doc = f"{self.spec_name}|{sorted(self.variables.items())}"
        return hashlib.sha256(doc.encode()).hexdigest()[:16]
