"""Megatron legacy per-rank checkpoints as a ``ckpt-convert`` target (``--to megatron``).

Writes ``DST/iter_{step:07d}/mp_rank_TT[_PPP]/model_optim_rng.pt`` (``{"model": {...},
"checkpoint_version": 3.0, "iteration": step}``) for a TP x PP layout, then
``latest_checkpointed_iteration.txt``, the sidecar ``ckptd_megatron.json`` (the model
variables, so converting back needs no options) and ``.ckpt-convert-complete`` last.
Every file goes through a temp name, fsync and rename.

The layout comes from ``TargetOptions.target_layout`` (``--target-layout tp=4,pp=2``) and
the model variables from ``TargetOptions.variables`` (``--var heads=..``), or from the
constructor (``tp``, ``pp``, ``variables``). Variables that the canonical tensors
determine (``vocab``, ``hidden``, ``layers``, ``ffn``, and ``head_dim``/``kv_heads``
once ``heads`` is known) are derived; ``heads`` must be given.

Each canonical tensor is split with the shipped spec compiled for each rank (the inverse
of the source's assembly): a rank's local tensor is allocated with zeros (vocabulary
padding rows stay zero) and its pieces are copied from the global tensor. Memory: one
global tensor plus the local tensors of one pipeline stage (a ``.pt`` file is written
whole), since ranks' files are written stage by stage.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.converters.sources.base import PlanError, SourceState, TensorInfo
from ckptd.converters.sources.megatron import (
    DEFAULT_SPEC,
    LATEST,
    RANK_FILE,
    SIDECAR,
    iter_dir_name,
    rank_dir_name,
)
from ckptd.converters.spec.errors import SpecError
from ckptd.converters.targets.base import (
    COMPLETE_MARKER,
    Existing,
    Fetch,
    OnDone,
    Target,
    TargetLayout,
    TargetOptions,
    WriteOutcome,
    atomic_write,
    fsync_dir,
    local_path,
    remove_outputs,
)
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import LocalEntry
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

LAYOUT_ENV = "CKPTD_MEGATRON_TARGET_LAYOUT"
_LAYER = re.compile(r"(^|\.)layers\.(\d+)(?=\.)")
_LAST_STAGE = ("output_layer.", "decoder.final_layernorm.")


@dataclass(frozen=True)
class _RankPlan:
    tp: int
    pp: int
    output: str  # relative path of the rank file
    entries: tuple[LocalEntry, ...]


class MegatronTarget(Target):
    """Per-rank Megatron files for a target TP x PP layout (see the module docstring)."""

    format = "megatron"

    def __init__(
        self,
        path: str,
        options: TargetOptions,
        *,
        tp: int | None = None,
        pp: int | None = None,
        variables: Mapping[str, int] | None = None,
        spec: str | None = None,
    ) -> None:
        super().__init__(path, options)
        layout = dict(options.target_layout)
        unknown = sorted(set(layout) - {"tp", "pp"})
        if unknown:
            raise PlanError(f"megatron target: unknown --target-layout keys {unknown} (tp, pp)")
        self.tp = tp or layout.get("tp", 1)
        self.pp = pp or layout.get("pp", 1)
        if self.tp < 1 or self.pp < 1:
            raise PlanError(f"megatron target: tp={self.tp}, pp={self.pp} must be positive")
        self.user_vars = dict(variables) if variables else dict(options.variables)
        self.spec_name = spec or options.spec or DEFAULT_SPEC
        self._plan_cache: tuple[tuple[TensorInfo, ...], list[_RankPlan], dict[str, int]] | None
        self._plan_cache = None

    def _dir(self) -> str:
        return local_path(self.path, "megatron")

    def _iter(self) -> str:
        return iter_dir_name(self.options.step)

    # ------------------------------------------------------------------ planning
    def variables_for(self, tensors: Sequence[TensorInfo]) -> dict[str, int]:
        """User variables over those derived from the canonical tensors' shapes."""
        by = {t.name: t for t in tensors}
        v: dict[str, int] = {}
        emb = by.get("embedding.word_embeddings.weight") or by.get("output_layer.weight")
        if emb is not None and len(emb.shape) == 2:
            v["vocab"], v["hidden"] = emb.shape
        idx = [int(m.group(2)) for t in tensors for m in [_LAYER.search(t.name)] if m]
        if idx:
            v["layers"] = max(idx) + 1
        fc1 = by.get("decoder.layers.0.mlp.linear_fc1.weight")
        if fc1 is not None:
            v["ffn"] = fc1.shape[0] // 2
        v.update(self.user_vars)
        qkv = by.get("decoder.layers.0.self_attention.linear_qkv.weight")
        if "heads" in v and "hidden" in v:
            v.setdefault("head_dim", v["hidden"] // v["heads"])
            if qkv is not None and "kv_heads" not in v:
                v["kv_heads"] = (qkv.shape[0] - v["heads"] * v["head_dim"]) // (2 * v["head_dim"])
        return v

    def _compile(self, variables: Mapping[str, int], t: int, p: int) -> Any:
        from ckptd.converters.spec import compile_spec, load_shipped  # see spec/__init__

        try:
            return compile_spec(
                load_shipped(self.spec_name),
                {**variables, "tp": self.tp, "pp": self.pp},
                coords={"tp": t, "pp": p},
            )
        except SpecError as e:
            raise PlanError(f"megatron target (spec {self.spec_name!r}): {e}") from None

    def _stage_of(self, name: str, firsts: list[int]) -> tuple[int, str]:
        """(pipeline stage, local key) of the canonical tensor ``name``."""
        m = _LAYER.search(name)
        if m is None:
            last = name.startswith(_LAST_STAGE)
            return (self.pp - 1 if last else 0), name
        g = int(m.group(2))
        s = max(i for i, f in enumerate(firsts) if f <= g)
        return s, name[: m.start(2)] + str(g - firsts[s]) + name[m.end(2) :]

    def plan_ranks(self, tensors: Sequence[TensorInfo]) -> list[_RankPlan]:
        """Every rank's local entries (pure); checked against the canonical shapes."""
        key = tuple(tensors)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        variables = self.variables_for(tensors)
        probe = "decoder.layers.0.input_layernorm.weight"
        firsts = []
        for p in range(self.pp):
            m = _LAYER.search(self._compile(variables, 0, p).logical_name(probe))
            firsts.append(int(m.group(2)) if m else 0)
        by_stage: dict[int, list[tuple[str, TensorInfo]]] = {}
        for t in tensors:
            s, local = self._stage_of(t.name, firsts)
            by_stage.setdefault(s, []).append((local, t))
        plans: list[_RankPlan] = []
        for p in range(self.pp):
            for t in range(self.tp):
                spec = self._compile(variables, t, p)
                metas = {}
                for local, info in by_stage.get(p, []):
                    shape = _local_shape(spec, local, info)
                    metas[local] = torch.empty(shape, dtype=torch_dtype(info.dtype), device="meta")
                try:
                    layout = spec.layout_for(
                        list(metas), {k: tuple(v.shape) for k, v in metas.items()}
                    )
                    rl = build_rank_layout(FlatState(tensors=metas), layout, len(plans))
                except (SpecError, LayoutError) as e:
                    raise PlanError(f"megatron target tp={t} pp={p}: {e}") from None
                want = {i.name: (i.dtype, tuple(i.shape)) for _, i in by_stage.get(p, [])}
                for tm in rl.tensors:
                    if want.get(tm.name) != (tm.dtype, tuple(tm.shape)):
                        raise PlanError(
                            f"megatron target tp={t} pp={p}: {tm.name!r} laid out as "
                            f"{tm.dtype}{list(tm.shape)}, canonical is {want.get(tm.name)}"
                        )
                out = f"{self._iter()}/{rank_dir_name(t, p, self.pp)}/{RANK_FILE}"
                plans.append(_RankPlan(t, p, out, rl.entries))
        self._plan_cache = (key, plans, variables)
        return plans

    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        plans = self.plan_ranks(tensors)
        holder: dict[str, str] = {}
        for rp in plans:
            for e in rp.entries:
                for pc in e.pieces:
                    holder.setdefault(pc.name, rp.output)
        assignment = tuple((t.name, holder.get(t.name, plans[0].output)) for t in tensors)
        outputs = (*(rp.output for rp in plans), LATEST, SIDECAR, COMPLETE_MARKER)
        return TargetLayout(assignment, outputs)

    # ----------------------------------------------------------------- destination
    def existing(self, fingerprint: str) -> Existing:
        d = self._dir()
        if os.path.exists(d) and not os.path.isdir(d):
            return Existing.OTHER
        if os.path.isfile(os.path.join(d, COMPLETE_MARKER)):
            return Existing.COMPLETE
        if os.path.isfile(os.path.join(d, LATEST)) or os.path.isdir(os.path.join(d, self._iter())):
            return Existing.OTHER
        return Existing.ABSENT

    def clear(self) -> None:
        remove_outputs(self._dir(), names=(COMPLETE_MARKER, LATEST, SIDECAR), dirs=(self._iter(),))

    # ----------------------------------------------------------------------- write
    def write(
        self,
        tensors: Sequence[TensorInfo],
        layout: TargetLayout,
        fetch: Fetch,
        on_done: OnDone,
        *,
        fingerprint: str,
        state: SourceState,
        provenance: dict[str, Any],
    ) -> WriteOutcome:
        plans = self.plan_ranks(tensors)
        variables = self._plan_cache[2] if self._plan_cache else {}
        d = self._dir()
        os.makedirs(os.path.join(d, self._iter()), exist_ok=True)
        written = 0
        for p in range(self.pp):
            stage = [rp for rp in plans if rp.pp == p]
            locals_: list[dict[str, torch.Tensor]] = [
                {e.key: torch.zeros(e.local_shape, dtype=torch_dtype(e.dtype)) for e in rp.entries}
                for rp in stage
            ]
            names = list(
                dict.fromkeys(pc.name for rp in stage for e in rp.entries for pc in e.pieces)
            )
            infos = {t.name: t for t in tensors}
            for name in names:
                g = fetch(name)
                info = infos[name]
                if dtype_name(g.dtype) != info.dtype or tuple(g.shape) != info.shape:
                    raise PlanError(
                        f"fetched {name!r} as {g.dtype}{list(g.shape)}, planned "
                        f"{info.dtype}{list(info.shape)}"
                    )
                for rp, loc in zip(stage, locals_, strict=True):
                    for e in rp.entries:
                        for pc in e.pieces:
                            if pc.name == name:
                                piece_view(loc[e.key], pc).copy_(g[pc.global_box.slices()])
                del g
                on_done(name, info.nbytes, False)
            for rp, loc in zip(stage, locals_, strict=True):
                written += _save_atomic(
                    os.path.join(d, rp.output),
                    {"model": loc, "checkpoint_version": 3.0, "iteration": self.options.step},
                )
            del locals_
        atomic_write(os.path.join(d, LATEST), f"{self.options.step}\n".encode())
        side = {
            "variables": variables,
            "tp": self.tp,
            "pp": self.pp,
            "spec": self.spec_name,
            "fingerprint": fingerprint,
            "provenance": provenance,
        }
        atomic_write(os.path.join(d, SIDECAR), json.dumps(side, indent=1).encode())
        atomic_write(
            os.path.join(d, COMPLETE_MARKER), json.dumps({"fingerprint": fingerprint}).encode()
        )
        return WriteOutcome(bytes_written=written, resumed=())


def _local_shape(spec: Any, key: str, info: TensorInfo) -> tuple[int, ...]:
    """The local shape of canonical tensor ``info`` under the spec rule for ``key``."""
    shape = list(info.shape)
    hits = spec.matching_rules(key)
    if not hits:
        raise PlanError(f"megatron target: no spec rule places {info.name!r}")
    params = spec._params(*hits[0])  # the rule's evaluated arguments
    if params.kind == "replicate":
        return tuple(shape)
    if params.kind not in ("split", "fused"):
        raise PlanError(f"megatron target: {info.name!r} has an unsupported rule {params.kind}")
    d = params.dim % len(shape)
    if params.kind == "fused":
        total = sum(n for _, n in params.parts)
        if total != shape[d] or total % params.count:
            raise PlanError(
                f"megatron target: {info.name!r} dim {d} is {shape[d]}, fused parts "
                f"sum to {total} (tp={params.count})"
            )
        shape[d] = total // params.count
        return tuple(shape)
    size = shape[d]
    if params.multiple:
        size = -(-size // params.multiple) * params.multiple
    if size % params.count:
        raise PlanError(
            f"megatron target: {info.name!r} dim {d} of {size} does not split over "
            f"tp={params.count}"
        )
    shape[d] = size // params.count
    return tuple(shape)


def _save_atomic(path: str, obj: dict[str, Any]) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return size
