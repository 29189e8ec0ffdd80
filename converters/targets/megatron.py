"""Megatron legacy per-rank checkpoints as a ``ckpt-convert`` target (``--to megatron``).

Writes ``DST/iter_{step:07d}/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (``{"model":
{...}, "optimizer": ..., "checkpoint_version": 3.0, "iteration": step}``) for a TP x PP
x EP layout (x VPP: ``"model0"`` .. ``"model{vpp-1}"`` instead of ``"model"``, see
below), then ``latest_checkpointed_iteration.txt``, the sidecar
``ckptd_megatron.json`` (the model variables and sizes, so converting back needs no
options) and ``.ckpt-convert-complete`` last. Every file goes through a temp name,
fsync and rename.

The layout comes from ``TargetOptions.target_layout`` (``--target-layout
tp=4,pp=2,ep=2[,vpp=2]``) and the model variables from ``TargetOptions.variables`` (``--var
heads=..``), or from the constructor (``tp``, ``pp``, ``ep``, ``variables``). Variables
that the canonical tensors determine (``vocab``, ``hidden``, ``layers``, ``ffn``,
``experts``, ``moe_ffn``, ``shared_ffn``, and ``head_dim``/``kv_heads`` once ``heads`` is
known) are derived; ``heads`` must be given.

Each canonical tensor is split with the shipped spec compiled for each rank (the inverse
of the source's assembly): a rank's local tensor is allocated with zeros (vocabulary
padding rows stay zero) and its pieces are copied from the global tensor. Experts go to
the EP rank whose range holds them (renumbered from 0 there); dense tensors to every EP
rank. The model dict is written in Megatron-Core's ``named_parameters`` order.

Virtual pipeline parallelism (``vpp=N``, N > 1: Megatron's interleaved schedule): each
rank file holds N model chunks, ``model0`` .. ``model{N-1}``, chunk ``v`` of pipeline
rank ``p`` being stage ``v * pp + p`` of a ``pp * N``-stage pipeline (its layers
numbered from 0; the embedding on chunk 0 of rank 0, the output layer and final norm
on the last chunk of the last rank; :mod:`..sources.megatron_chunks`). The layers must
divide over ``pp * N``. The optimizer's groups then run over all chunks in order, as
Megatron-Core builds them. No ``args`` are written (as for any layout): Megatron takes
the schedule from the loading run's own flags, and skips ``check_checkpoint_args``
without them, whereas partial ``args`` would fail that check on fields not known here
(``max_position_embeddings``, the tokenizer); ``vpp`` is in the sidecar.

Optimizer state (``optim.state.<param>.{fp32,exp_avg,exp_avg_sq,step}``) is written as
the non-distributed optimizer's state dict (:mod:`..sources.megatron_optim`), each
tensor laid out like its parameter; param-group hyperparameters and
``opt_param_scheduler`` come from the source's trainer state when it carries them
(a Megatron source, directly or through the universal format), else defaults.

Resumable: after each rank file is durable its CRC32C goes into
``.ckpt-convert-progress.json``; a rerun of the same plan re-reads and checks each
recorded file and skips it when it matches (its tensors are reported as resumed).
Memory: one global tensor plus the local tensors of one pipeline stage (a ``.pt`` file
is written whole), since ranks' files are written stage by stage.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import crc32c as _crc
import torch

from ckptd.converters.sources.base import PlanError, SourceState, TensorInfo
from ckptd.converters.sources.megatron import (
    DEFAULT_SPEC,
    LATEST,
    RANK_FILE,
    SIDECAR,
    iter_dir_name,
    rank_dir_name,
    spec_source,
)
from ckptd.converters.sources.megatron_chunks import chunk_prefix, qualify, virtual_stage
from ckptd.converters.sources.megatron_optim import (
    MASTER,
    build_optimizer,
    check_optim_names,
    named_parameters_order,
    optim_name,
    split_optim_name,
)
from ckptd.converters.sources.megatron_vars import moe_variables
from ckptd.converters.spec.errors import SpecError
from ckptd.converters.targets.base import (
    COMPLETE_MARKER,
    PROGRESS_NAME,
    Existing,
    Fetch,
    OnDone,
    Target,
    TargetLayout,
    TargetOptions,
    WriteOutcome,
    atomic_write,
    fsync_dir,
    load_progress,
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
_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(?=\.)")
_LAST_STAGE = ("output_layer.", "decoder.final_layernorm.")
_KIND_ORDER = ("step", "exp_avg", "exp_avg_sq")  # torch.optim.Adam's state order
_CRC_CHUNK = 16 << 20


@dataclass(frozen=True)
class _RankPlan:
    """One rank file: its entries under chunk-qualified keys (``model{v}.<key>`` with
    VPP, the local keys otherwise; :mod:`..sources.megatron_chunks`)."""

    tp: int
    pp: int
    ep: int
    output: str  # relative path of the rank file
    entries: tuple[LocalEntry, ...]
    model_keys: tuple[str, ...]  # model keys: chunk by chunk, named_parameters order
    optim: tuple[tuple[str, str, str], ...]  # (optim key, param key, kind)
    vpp: int = 1  # model chunks in the file


class MegatronTarget(Target):
    """Per-rank Megatron files for a target TP x PP x EP layout (see the module docstring)."""

    format = "megatron"

    def __init__(
        self,
        path: str,
        options: TargetOptions,
        *,
        tp: int | None = None,
        pp: int | None = None,
        ep: int | None = None,
        vpp: int | None = None,
        variables: Mapping[str, int] | None = None,
        spec: str | None = None,
    ) -> None:
        super().__init__(path, options)
        layout = dict(options.target_layout)
        unknown = sorted(set(layout) - {"tp", "pp", "ep", "vpp"})
        if unknown:
            raise PlanError(
                f"megatron target: unknown --target-layout keys {unknown} (tp, pp, ep, vpp)"
            )
        self.tp = tp or layout.get("tp", 1)
        self.pp = pp or layout.get("pp", 1)
        self.ep = ep or layout.get("ep", 1)
        self.vpp = vpp or layout.get("vpp", 1)
        if min(self.tp, self.pp, self.ep, self.vpp) < 1:
            raise PlanError(f"megatron target: tp={self.tp}, pp={self.pp}, ep={self.ep}, "
                            f"vpp={self.vpp} must be positive")  # fmt: skip
        self.stages = self.pp * self.vpp  # virtual stages: chunk v of rank p is v * pp + p
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
        model = [t for t in tensors if split_optim_name(t.name) is None]
        by = {t.name: t for t in model}
        v: dict[str, int] = {}
        emb = by.get("embedding.word_embeddings.weight") or by.get("output_layer.weight")
        if emb is not None and len(emb.shape) == 2:
            v["vocab"], v["hidden"] = emb.shape
        idx = [int(m.group(2)) for t in model for m in [_LAYER.search(t.name)] if m]
        if idx:
            v["layers"] = max(idx) + 1
        fc1 = by.get("decoder.layers.0.mlp.linear_fc1.weight")
        if fc1 is not None:
            v["ffn"] = fc1.shape[0] // 2
        v.update(moe_variables({t.name: t.shape for t in model}))  # canonical: tp = ep = 1
        v.update(self.user_vars)
        qkv = by.get("decoder.layers.0.self_attention.linear_qkv.weight")
        if "heads" in v and "hidden" in v:
            v.setdefault("head_dim", v["hidden"] // v["heads"])
            if qkv is not None and "kv_heads" not in v:
                v["kv_heads"] = (qkv.shape[0] - v["heads"] * v["head_dim"]) // (2 * v["head_dim"])
        return v

    def _compile(self, variables: Mapping[str, int], t: int, s: int, e: int = 0) -> Any:
        """The spec for tp rank ``t``, (virtual) stage ``s`` of ``stages``, ep rank ``e``."""
        from ckptd.converters.spec import compile_spec  # see spec/__init__

        try:
            return compile_spec(
                spec_source(self.spec_name),
                {**variables, "tp": self.tp, "pp": self.stages, "ep": self.ep},
                coords={"tp": t, "pp": s, "ep": e},
            )
        except SpecError as e:
            raise PlanError(f"megatron target (spec {self.spec_name!r}): {e}") from None

    def _place(self, name: str, firsts: list[int], efirsts: list[int], per: int
               ) -> tuple[int, int | None, str]:
        """((virtual) pipeline stage, EP rank or None for all, local key) of ``name``."""
        pk = split_optim_name(name)
        if pk is not None:
            s, e, local = self._place(pk[0], firsts, efirsts, per)
            return s, e, optim_name(local, pk[1])
        m = _LAYER.search(name)
        if m is None:
            return (self.stages - 1 if name.startswith(_LAST_STAGE) else 0), None, name
        g = int(m.group(2))
        s = max(i for i, f in enumerate(firsts) if f <= g)
        local = name[: m.start(2)] + str(g - firsts[s]) + name[m.end(2) :]
        x = _EXPERT.search(local)
        if x is None:
            return s, None, local
        ge = int(x.group(2))
        e = next((r for r, f in enumerate(efirsts) if f <= ge < f + per), None)
        if e is None:
            raise PlanError(f"megatron target: expert {ge} of {name!r} is on no EP rank "
                            f"(ep={self.ep}, {per} experts per rank)")  # fmt: skip
        return s, e, local[: x.start(2)] + str(ge - efirsts[e]) + local[x.end(2) :]

    def plan_ranks(self, tensors: Sequence[TensorInfo]) -> list[_RankPlan]:
        """Every rank's local entries (pure); checked against the canonical shapes."""
        key = tuple(tensors)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        variables = self.variables_for(tensors)
        params = {t.name: t for t in tensors if split_optim_name(t.name) is None}
        check_optim_names([t.name for t in tensors if t.name not in params],
                          {n: torch_dtype(t.dtype) for n, t in params.items()})  # fmt: skip
        experts = variables.get("experts", self.ep)
        if experts % self.ep:
            raise PlanError(f"megatron target: {experts} experts do not divide over ep={self.ep}")
        per = experts // self.ep
        layers = variables.get("layers")
        if self.vpp > 1 and layers is not None and layers % self.stages:
            raise PlanError(
                f"megatron target: {layers} layers do not divide over pp={self.pp} x "
                f"vpp={self.vpp} = {self.stages} virtual pipeline stages (Megatron's "
                "interleaved schedule gives each model chunk layers / (pp * vpp))"
            )
        probe = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
        firsts, efirsts = [], []
        for s in range(self.stages):
            m = _LAYER.search(self._compile(variables, 0, s).logical_name(probe))
            firsts.append(int(m.group(2)) if m else 0)
        for ep_rank in range(self.ep):
            x = _EXPERT.search(self._compile(variables, 0, 0, ep_rank).logical_name(probe))
            efirsts.append(int(x.group(2)) if x else 0)
        by_stage: dict[int, list[tuple[int | None, str, TensorInfo]]] = {}
        for t in tensors:
            s, e, local = self._place(t.name, firsts, efirsts, per)
            by_stage.setdefault(s, []).append((e, local, t))
        plans: list[_RankPlan] = []
        for p in range(self.pp):
            for ep_rank in range(self.ep):
                chunks = [
                    [(lk, i) for r, lk, i in by_stage.get(virtual_stage(v, p, self.pp), [])
                     if r is None or r == ep_rank]
                    for v in range(self.vpp)
                ]  # fmt: skip
                for tp_rank in range(self.tp):
                    plans.append(self._plan_rank(
                        variables, tp_rank, p, ep_rank, chunks, len(plans)))
        self._plan_cache = (key, plans, variables)
        return plans

    def _plan_rank(self, variables: Mapping[str, int], t: int, p: int, e: int,
                   chunks: list[list[tuple[str, TensorInfo]]], idx: int) -> _RankPlan:
        """Rank (t, p, e): each model chunk laid out by the spec for its stage, the
        entries' keys qualified by chunk (``model{v}.``) when there are several."""
        entries: list[LocalEntry] = []
        model_keys: list[str] = []
        opt: list[tuple[str, str, str]] = []
        for v, mine in enumerate(chunks):
            prefix = chunk_prefix(v, self.vpp)
            stage = virtual_stage(v, p, self.pp)
            rl, order, optim = self._plan_chunk(variables, t, stage, e, mine, idx)
            entries += [LocalEntry(qualify(en.key, prefix), en.local_shape, en.dtype, en.pieces)
                        for en in rl]  # fmt: skip
            model_keys += [prefix + k for k in order]
            opt += [(qualify(lk, prefix), prefix + pk, kind) for lk, pk, kind in optim]
        out = f"{self._iter()}/{rank_dir_name(t, p, self.pp, e, self.ep)}/{RANK_FILE}"
        return _RankPlan(t, p, e, out, tuple(entries), tuple(model_keys), tuple(opt), self.vpp)

    def _plan_chunk(self, variables: Mapping[str, int], t: int, s: int, e: int,
                    mine: list[tuple[str, TensorInfo]], idx: int
                    ) -> tuple[tuple[LocalEntry, ...], list[str], list[tuple[str, str, str]]]:
        """The entries (local keys) of (virtual) stage ``s`` on tp rank ``t``, ep rank
        ``e``; its model keys in Megatron's order; its (optim key, param key, kind)."""
        spec = self._compile(variables, t, s, e)
        where = f"megatron target tp={t} pp={s % self.pp} ep={e}" + (
            f" model{s // self.pp}" if self.vpp > 1 else "")  # fmt: skip
        model: dict[str, TensorInfo] = {}
        optim: list[tuple[str, str, str, TensorInfo]] = []
        for local, info in mine:
            pk = split_optim_name(local)
            if pk is None:
                model[local] = info
            else:
                optim.append((local, pk[0], pk[1], info))
        shapes = {k: _local_shape(spec, k, i) for k, i in model.items()}
        metas = {k: torch.empty(shapes[k], dtype=torch_dtype(i.dtype), device="meta")
                 for k, i in model.items()}  # fmt: skip
        param_of = {}
        for local, pkey, _, info in optim:
            pinfo = model.get(pkey)
            same = pinfo is not None and pinfo.shape == info.shape
            shape = shapes[pkey] if same else info.shape
            metas[local] = torch.empty(shape, dtype=torch_dtype(info.dtype), device="meta")
            param_of[local] = pkey
        try:
            layout = spec.layout_for(list(model), {k: tuple(v) for k, v in shapes.items()})
            rl = build_rank_layout(FlatState(tensors=metas, param_of=param_of), layout, idx)
        except (SpecError, LayoutError) as err:
            raise PlanError(f"{where}: {err}") from None
        want = {i.name: (i.dtype, tuple(i.shape)) for _, i in mine}
        for tm in rl.tensors:
            if want.get(tm.name) != (tm.dtype, tuple(tm.shape)):
                raise PlanError(
                    f"{where}: {tm.name!r} laid out as "
                    f"{tm.dtype}{list(tm.shape)}, canonical is {want.get(tm.name)}"
                )
        order = named_parameters_order(model)
        return rl.entries, order, [(lk, pk, kind) for lk, pk, kind, _ in optim]

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
        progress = load_progress(d, "done")
        if progress is not None:
            same = progress.get("fingerprint") == fingerprint
            return Existing.RESUMABLE if same else Existing.OTHER
        if os.path.isfile(os.path.join(d, LATEST)) or os.path.isdir(os.path.join(d, self._iter())):
            return Existing.OTHER
        return Existing.ABSENT

    def clear(self) -> None:
        remove_outputs(
            self._dir(),
            names=(COMPLETE_MARKER, LATEST, SIDECAR, PROGRESS_NAME),
            dirs=(self._iter(),),
        )

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
        meg = state.state.get("megatron") if isinstance(state.state, dict) else None
        meg = meg if isinstance(meg, dict) else {}
        d = self._dir()
        os.makedirs(os.path.join(d, self._iter()), exist_ok=True)
        progress = load_progress(d, "done")
        if progress is None or progress.get("fingerprint") != fingerprint:
            progress = {"version": 1, "fingerprint": fingerprint, "done": {}}
            atomic_write(os.path.join(d, PROGRESS_NAME), json.dumps(progress).encode())
        done = {rp.output for rp in plans if _verified(d, rp.output, progress["done"])}
        infos = {t.name: t for t in tensors}
        written, resumed = 0, []
        for p in range(self.pp):
            stage = [rp for rp in plans if rp.pp == p]
            todo = [rp for rp in stage if rp.output not in done]
            names = list(
                dict.fromkeys(pc.name for rp in stage for e in rp.entries for pc in e.pieces)
            )
            needed = {pc.name for rp in todo for e in rp.entries for pc in e.pieces}
            locals_ = [
                {e.key: torch.zeros(e.local_shape, dtype=torch_dtype(e.dtype)) for e in rp.entries}
                for rp in todo
            ]
            for name in names:
                if name not in needed:
                    continue
                g = fetch(name)
                info = infos[name]
                if dtype_name(g.dtype) != info.dtype or tuple(g.shape) != info.shape:
                    raise PlanError(
                        f"fetched {name!r} as {g.dtype}{list(g.shape)}, planned "
                        f"{info.dtype}{list(info.shape)}"
                    )
                for rp, loc in zip(todo, locals_, strict=True):
                    for e in rp.entries:
                        for pc in e.pieces:
                            if pc.name == name:
                                piece_view(loc[e.key], pc).copy_(g[pc.global_box.slices()])
                del g
            for rp, loc in zip(todo, locals_, strict=True):
                obj = _rank_object(rp, loc, meg, self.options.step)
                size, crc = _save_atomic(os.path.join(d, rp.output), obj)
                del obj
                written += size
                progress["done"][rp.output] = crc
                atomic_write(os.path.join(d, PROGRESS_NAME), json.dumps(progress).encode())
            del locals_
            for name in names:  # durable now: report (resumed if no file of it was rewritten)
                was = name not in needed
                if was:
                    resumed.append(name)
                on_done(name, infos[name].nbytes, was)
        atomic_write(os.path.join(d, LATEST), f"{self.options.step}\n".encode())
        side = {
            "variables": variables,
            "tp": self.tp,
            "pp": self.pp,
            "ep": self.ep,
            "vpp": self.vpp,
            "spec": self.spec_name,
            "fingerprint": fingerprint,
            "provenance": provenance,
        }
        atomic_write(os.path.join(d, SIDECAR), json.dumps(side, indent=1).encode())
        atomic_write(
            os.path.join(d, COMPLETE_MARKER), json.dumps({"fingerprint": fingerprint}).encode()
        )
        os.unlink(os.path.join(d, PROGRESS_NAME))
        return WriteOutcome(bytes_written=written, resumed=tuple(resumed))


def _rank_object(rp: _RankPlan, loc: Mapping[str, torch.Tensor], meg: Mapping[str, Any],
                 step: int) -> dict[str, Any]:
    """The rank file's content: model (Megatron order; per chunk ``model{v}`` with VPP),
    optimizer (over all chunks in order), trainer state."""
    model = {k: loc[k] for k in rp.model_keys}
    obj: dict[str, Any] = {"model": model} if rp.vpp == 1 else {}
    for v in range(rp.vpp if rp.vpp > 1 else 0):
        prefix = chunk_prefix(v, rp.vpp)
        obj[f"model{v}"] = {k[len(prefix):]: t for k, t in model.items() if k.startswith(prefix)}
    obj.update({"checkpoint_version": 3.0, "iteration": step})
    if rp.optim:
        per: dict[str, dict[str, torch.Tensor]] = {}
        for lk, pk, kind in rp.optim:
            per.setdefault(pk, {})[kind] = loc[lk]
        rank = {k: i for i, k in enumerate(_KIND_ORDER)}
        optim = {
            pk: dict(sorted(kinds.items(), key=lambda kv: (kv[0] == MASTER, rank.get(kv[0], 9))))
            for pk, kinds in per.items()
        }
        opt_state = meg.get("optimizer")
        if not isinstance(opt_state, dict):
            opt_state = {}
        # ``model`` runs chunk by chunk under qualified keys: Megatron's group order
        obj["optimizer"] = build_optimizer(
            model, optim, opt_state.get("param_groups") or (), opt_state.get("grad_scaler")
        )
        if isinstance(meg.get("opt_param_scheduler"), dict):
            obj["opt_param_scheduler"] = meg["opt_param_scheduler"]
    return obj


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


class _CrcWriter:
    """A file object that CRC32Cs what ``torch.save`` writes through it (no re-read)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.crc = 0

    def write(self, data: Any) -> int:
        self.crc = _crc.crc32c(data, self.crc)
        return int(self.f.write(data))

    def flush(self) -> None:
        self.f.flush()


def _save_atomic(path: str, obj: dict[str, Any]) -> tuple[int, int]:
    """``torch.save`` via a temp file, fsync and rename: (bytes, CRC32C of the file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        w = _CrcWriter(f)
        torch.save(obj, cast(IO[bytes], w))  # a file-like object: write() is all it needs
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return size, w.crc


def _verified(d: str, output: str, done: Mapping[str, Any]) -> bool:
    """True if ``output`` was recorded durable and its bytes still have that CRC32C."""
    want = done.get(output)
    if not isinstance(want, int):
        return False
    crc = 0
    try:
        with open(os.path.join(d, output), "rb") as f:
            while chunk := f.read(_CRC_CHUNK):
                crc = _crc.crc32c(chunk, crc)
    except OSError:
        return False
    return crc == want

