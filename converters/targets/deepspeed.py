"""DeepSpeed ZeRO-1/2 checkpoints as a ``ckpt-convert`` target (``--to deepspeed``).

Writes what DeepSpeed's engine saves (``deepspeed/runtime/zero/stage_1_and_2.py``,
read back by ``deepspeed/utils/zero_to_fp32.py`` and our DeepSpeed source) for a chosen
data-parallel size: ``DST/global_stepN/mp_rank_00_model_states.pt`` (``module``,
``param_shapes``, ``buffer_names``, ``dp_world_size``, ``ds_version`` ...), one
``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per DP rank (``bf16_`` as a bf16
engine names them: see :meth:`DeepSpeedTarget._is_bf16`), then ``DST/latest`` (the tag)
and ``.ckpt-convert-complete`` last.
``--target-layout dp=N[,zero=1|2][,groups=1|2][,bf16=0|1]``.

Flat partitions (the inverse of the source's flat-range math): a param group's fp32
masters lie back to back in ``param_shapes`` order, padded with zeros to a multiple of
``2 * dp``; rank ``r`` holds ``[r * P, (r + 1) * P)``. As DeepSpeed's ``state_dict``
does, the last rank's partitions leave out the group's padding (``group_paddings``).
``exp_avg``/``exp_avg_sq`` are cut the same way, in DeepSpeed's *elastic* form (a list
of per-group dicts plus ``base_optimizer_state_step``): it carries no hyperparameters,
so loading it never overrides the user's lr/betas/eps. With ``--weights-only`` only the
model-states file is written (DeepSpeed's ``load_module_only`` / ZeRO-0 shape).

Which tensors are parameters: those with ``optim.state.<fqn>.fp32``, ``.exp_avg`` and
``.exp_avg_sq``; other ``model.<fqn>`` tensors are buffers. Param groups and their order
must be those of the live optimizer (DeepSpeed copies flat partitions without names):
by default one group in the order the source lists ``model.*`` tensors (module order
for DeepSpeed and ``ckpt.save``-made sources; universal checkpoints list names sorted),
``groups=2`` puts params of two or more dims in group 0 and the rest (biases, norms: the
usual no-weight-decay group) in group 1, and ``--spec FILE.json`` with
``{"param_groups": [[fqn, ...], ...]}`` gives groups and order exactly.

Streaming: every file is first written as a skeleton by ``torch.save`` under
``torch.serialization.skip_data`` (fake tensors: the pickle and the zip records, no
data), then each fetched tensor's bytes are ``pwrite``-n into its record(s): memory is
one tensor. Files are ``<name>.partial`` until every byte is fsync'd, then renamed;
``latest`` and the marker follow. Resume: ``.ckpt-convert-progress.json`` records the
CRC32C of every durable tensor; a rerun keeps the skeletons, re-verifies those tensors
against the files and rewrites only the others.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c as _crc
import torch

from ckptd.converters.sources.base import PlanError, SourceState, TensorInfo
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
from ckptd.converters.targets.hf import tensor_bytes
from ckptd.dtypes import itemsize_of, torch_dtype

LATEST = "latest"
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
BF16_PREFIX = "bf16_"  # DeepSpeed's engine names a bf16 run's optim files bf16_zero_pp_rank_...
DS_VERSION = "0.14.4"  # the newest format these files follow (readable by later versions)
KINDS = ("fp32", "exp_avg", "exp_avg_sq")
_SYNC_BYTES = 256 << 20  # fsync + record progress at least this often


@dataclass(frozen=True)
class _Param:
    fqn: str
    shape: tuple[int, ...]
    group: int
    offset: int  # in the group's flat buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Plan:
    """Pure layout of the checkpoint: params in groups, partition sizes, files."""

    module: tuple[TensorInfo, ...]  # model tensors, names without ``model.``
    params: tuple[_Param, ...]
    group_numel: tuple[int, ...]
    part: tuple[int, ...]  # per group: elements of each rank's (padded) partition
    steps: tuple[str | None, ...]  # per group: the step tensor's name, if any
    dp: int

    def param(self, fqn: str) -> _Param:
        index = self.__dict__.get("_index")
        if index is None:
            index = {p.fqn: p for p in self.params}
            object.__setattr__(self, "_index", index)
        return index[fqn]

    def rank_len(self, g: int, r: int) -> int:
        """Elements rank ``r`` stores for group ``g`` (the last rank without padding)."""
        if r < self.dp - 1:
            return self.part[g]
        return max(0, min(self.part[g], self.group_numel[g] - r * self.part[g]))

    def spans(self, p: _Param) -> list[tuple[int, int, int, int]]:
        """``(rank, offset in the rank's partition, lo, hi)`` pieces of ``p``'s flat range."""
        part, out = self.part[p.group], []
        for r in range(p.offset // part, (p.offset + p.numel - 1) // part + 1 if p.numel else 0):
            lo, hi = max(p.offset, r * part), min(p.offset + p.numel, (r + 1) * part)
            out.append((r, lo - r * part, lo - p.offset, hi - p.offset))
        return out


class DeepSpeedTarget(Target):
    """DeepSpeed ZeRO-1/2 files for a target DP size (see the module docstring)."""

    format = "deepspeed"

    def __init__(
        self,
        path: str,
        options: TargetOptions,
        *,
        dp: int | None = None,
        zero: int | None = None,
        param_groups: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(path, options)
        layout = dict(options.target_layout)
        unknown = sorted(set(layout) - {"dp", "zero", "groups", "bf16", "tp", "pp"})
        if unknown:
            raise PlanError(
                f"deepspeed target: unknown --target-layout keys {unknown} (dp, zero, groups, bf16)"
            )
        if layout.get("tp", 1) != 1 or layout.get("pp", 1) != 1:
            raise PlanError("deepspeed target: only tp=1, pp=1 (mp_rank_00) is written")
        self.dp = dp or layout.get("dp", 1)
        self.zero = zero or layout.get("zero", 2)
        self.groups = layout.get("groups", 1)
        if self.dp < 1:
            raise PlanError(f"deepspeed target: dp={self.dp} must be positive")
        if self.zero not in (1, 2):
            raise PlanError(f"deepspeed target: zero={self.zero}; ZeRO-1 and 2 are written")
        if self.groups not in (1, 2):
            raise PlanError(f"deepspeed target: groups={self.groups}; 1 or 2 (or --spec FILE)")
        self.bf16: int | None = layout.get("bf16")
        if self.bf16 not in (None, 0, 1):
            raise PlanError(f"deepspeed target: bf16={self.bf16}; 0 or 1")
        self.param_groups = [list(g) for g in param_groups] if param_groups else None
        if self.param_groups is None and options.spec:
            self.param_groups = _load_groups(options.spec)
        self._plan_cache: tuple[tuple[TensorInfo, ...], _Plan] | None = None

    def _dir(self) -> str:
        return local_path(self.path, "deepspeed")

    @property
    def tag(self) -> str:
        return f"global_step{self.options.step}"

    def _is_bf16(self, plan: _Plan) -> bool:
        """Whether the output is a bf16 run's checkpoint: ``bf16=0|1``, by default
        whether every parameter's model weight is bfloat16 (what a bf16 engine saves).

        Why it matters: DeepSpeed's engine looks for ``bf16_zero_pp_rank_...`` files when
        bf16 is enabled and ``zero_pp_rank_...`` otherwise (``_get_zero_ckpt_prefix``);
        ``load_checkpoint`` finds no other name.
        """
        if self.bf16 is not None:
            return bool(self.bf16)
        params = {p.fqn for p in plan.params}
        weights = [t.dtype for t in plan.module if t.name in params]
        return bool(weights) and all(d == "bfloat16" for d in weights)

    def _files(self, plan: _Plan) -> list[str]:
        files = [f"{self.tag}/{MODEL_FILE}"]
        if plan.params:
            prefix = BF16_PREFIX if self._is_bf16(plan) else ""
            files += [f"{self.tag}/{prefix}{OPTIM_FILE.format(r)}" for r in range(self.dp)]
        return files

    # ------------------------------------------------------------------ planning
    def validate_name(self, name: str) -> None:
        super().validate_name(name)
        if name.startswith(("optim.", "optimizer.")) and _optim_key(name) is None:
            raise PlanError(
                f"deepspeed target: optimizer tensor {name!r} is not "
                "optim.state.<param>.{fp32,exp_avg,exp_avg_sq,step}"
            )

    def plan(self, tensors: Sequence[TensorInfo]) -> _Plan:
        """Groups, offsets and partition sizes (pure); raises :class:`PlanError`."""
        key = tuple(tensors)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        module: list[TensorInfo] = []
        optim: dict[str, dict[str, TensorInfo]] = {}
        for t in tensors:
            ok = _optim_key(t.name)
            if ok is not None:
                optim.setdefault(ok[0], {})[ok[1]] = t
            else:
                module.append(TensorInfo(t.name.removeprefix("model."), t.dtype, t.shape))
        for fqn, kinds in optim.items():
            missing = [k for k in KINDS if k not in kinds]
            if missing:
                raise PlanError(f"deepspeed target: param {fqn!r} has no optim state {missing}")
            shapes = {kinds[k].shape for k in KINDS}
            if len(shapes) != 1 or any(kinds[k].dtype != "float32" for k in KINDS):
                raise PlanError(
                    f"deepspeed target: param {fqn!r}: fp32/exp_avg/exp_avg_sq must be "
                    f"float32 of one shape, got {[(kinds[k].dtype, kinds[k].shape) for k in KINDS]}"
                )
        groups = self._groups(module, optim)
        params: list[_Param] = []
        numels, parts, steps = [], [], []
        for g, names in enumerate(groups):
            off = 0
            for fqn in names:
                p = _Param(fqn, optim[fqn]["fp32"].shape, g, off)
                params.append(p)
                off += p.numel
            align = 2 * self.dp
            numels.append(off)
            parts.append(max(1, math.ceil(off / align)) * align // self.dp)
            steps.append(optim[names[0]]["step"].name if "step" in optim[names[0]] else None)
        plan = _Plan(
            tuple(module), tuple(params), tuple(numels), tuple(parts), tuple(steps), self.dp
        )
        self._plan_cache = (key, plan)
        return plan

    def _groups(
        self, module: list[TensorInfo], optim: dict[str, dict[str, TensorInfo]]
    ) -> list[list[str]]:
        if not optim:
            return []
        if self.param_groups is not None:
            flat = [n for g in self.param_groups for n in g]
            dup = sorted({n for n in flat if flat.count(n) > 1})
            unknown = sorted(set(flat) - set(optim))
            missing = sorted(set(optim) - set(flat))
            if dup or unknown or missing or not all(self.param_groups):
                raise PlanError(
                    "deepspeed target: param_groups must list every param with optimizer "
                    f"state exactly once (duplicated {dup}, unknown {unknown}, missing "
                    f"{missing}, or an empty group)"
                )
            return [list(g) for g in self.param_groups]
        rank = {t.name: i for i, t in enumerate(module)}
        seen = {n: i for i, n in enumerate(optim)}
        order = sorted(optim, key=lambda n: (rank.get(n, len(rank)), seen[n]))
        if self.groups == 1:
            return [order]
        out = [
            [n for n in order if len(optim[n]["fp32"].shape) >= 2],
            [n for n in order if len(optim[n]["fp32"].shape) < 2],
        ]
        if not all(out):
            raise PlanError("deepspeed target: groups=2 needs params of >= 2 dims and of < 2 dims")
        return out

    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        plan = self.plan(tensors)
        files = self._files(plan)
        first = {p.fqn: (plan.spans(p) or [(0, 0, 0, 0)])[0][0] for p in plan.params}
        assignment = []
        for t in tensors:
            ok = _optim_key(t.name)
            out = files[0] if ok is None else files[1 + first.get(ok[0], 0)]
            assignment.append((t.name, out))
        return TargetLayout(tuple(assignment), (*files, LATEST, COMPLETE_MARKER))

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
        if os.path.isfile(os.path.join(d, LATEST)) or os.path.isdir(os.path.join(d, self.tag)):
            return Existing.OTHER
        return Existing.ABSENT

    def clear(self) -> None:
        remove_outputs(
            self._dir(), names=(COMPLETE_MARKER, PROGRESS_NAME, LATEST), dirs=(self.tag,)
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
        plan = self.plan(tensors)
        d = self._dir()
        os.makedirs(os.path.join(d, self.tag), exist_ok=True)
        infos = {t.name: t for t in tensors}
        step_values: list[float | None] = []
        for name in plan.steps:  # tiny; needed in the pickles up front
            step_values.append(None if name is None else float(fetch(name)))
        progress = load_progress(d, "done")
        fresh = progress is None or progress.get("fingerprint") != fingerprint
        files = self._files(plan)
        partial = {f: os.path.join(d, f + ".partial") for f in files}
        if fresh or not all(os.path.isfile(p) for p in partial.values()):
            progress = {"version": 1, "fingerprint": fingerprint, "done": {}, "order": {}}
            for f, obj in self._skeletons(plan, step_values):
                progress["order"][f] = _write_skeleton(partial[f], obj)
            atomic_write(os.path.join(d, PROGRESS_NAME), json.dumps(progress).encode())
        assert progress is not None
        slots = {f: _read_slots(partial[f], progress["order"][f]) for f in files}
        w = _SlotWriter(d, files, slots, progress)
        try:
            resumed = []
            for t in tensors:
                targets = self._places(plan, t.name)
                done = w.progress["done"].get(t.name)
                if done is not None and w.crc(targets, t) == done:
                    resumed.append(t.name)
                    on_done(t.name, t.nbytes, True)
                    continue
                tensor = fetch(t.name)
                if tuple(tensor.shape) != t.shape or tensor.dtype != torch_dtype(t.dtype):
                    raise PlanError(
                        f"fetched {t.name!r} as {tensor.dtype}{list(tensor.shape)}, planned "
                        f"{infos[t.name].dtype}{list(t.shape)}"
                    )
                w.put(targets, t, tensor)
                del tensor
                on_done(t.name, t.nbytes, False)
            w.sync()
        finally:
            w.close()
        for f in files:
            os.replace(os.path.join(d, f + ".partial"), os.path.join(d, f))
        fsync_dir(os.path.join(d, self.tag))
        atomic_write(os.path.join(d, LATEST), self.tag.encode())
        marker = {"fingerprint": fingerprint, "provenance": provenance}
        atomic_write(os.path.join(d, COMPLETE_MARKER), json.dumps(marker).encode() + b"\n")
        os.unlink(os.path.join(d, PROGRESS_NAME))
        return WriteOutcome(w.bytes_written, tuple(resumed))

    def _places(self, plan: _Plan, name: str) -> list[tuple[str, str, int, int, int]]:
        """Where ``name``'s bytes go: ``(file, slot, byte offset in slot, lo, hi)`` with
        ``[lo, hi)`` the elements of the flattened tensor."""
        ok = _optim_key(name)
        if ok is None:
            return [(self._files(plan)[0], f"module/{name.removeprefix('model.')}", 0, 0, -1)]
        fqn, kind = ok
        p = plan.param(fqn)
        if kind == "step":
            return (
                []
                if plan.steps[p.group] != name
                else [
                    (self._files(plan)[1 + r], f"step/{p.group}", 0, 0, -1) for r in range(self.dp)
                ]
            )
        return [
            (self._files(plan)[1 + r], f"{kind}/{p.group}", 4 * off, lo, hi)
            for r, off, lo, hi in plan.spans(p)
        ]

    def _skeletons(
        self, plan: _Plan, steps: list[float | None]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Every file's object, with :class:`_Slot` fakes where tensor bytes go."""
        files = self._files(plan)
        by_group: list[OrderedDict[str, torch.Size]] = [OrderedDict() for _ in plan.part]
        for p in plan.params:
            by_group[p.group][p.fqn] = torch.Size(p.shape)
        pnames = {p.fqn for p in plan.params}
        cfg: dict[str, Any] = {"zero_optimization": {"stage": self.zero if plan.params else 0}}
        if self._is_bf16(plan):
            cfg["bf16"] = {"enabled": True}
        model: dict[str, Any] = {
            "module": OrderedDict(
                (t.name, _Slot(f"module/{t.name}", t.dtype, t.shape)) for t in plan.module
            ),
            "buffer_names": [t.name for t in plan.module if t.name not in pnames],
            "optimizer": None,
            "param_shapes": by_group,
            "frozen_param_shapes": None,
            "shared_params": {},
            "frozen_param_fragments": None,
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": self.options.step,
            "dp_world_size": self.dp,
            "mp_world_size": 1,
            "ds_config": cfg,
            "ds_version": DS_VERSION,
        }
        out: list[tuple[str, dict[str, Any]]] = [(files[0], model)]
        if not plan.params:
            return out
        step_int = next((int(s) for s in steps if s is not None), self.options.step)
        for r in range(self.dp):
            n = [plan.rank_len(g, r) for g in range(len(plan.part))]
            base = []
            for g in range(len(plan.part)):
                st: dict[str, Any] = {}
                if steps[g] is not None:
                    st["step"] = _Slot(f"step/{g}", "float32", ())
                st["exp_avg"] = _Slot(f"exp_avg/{g}", "float32", (n[g],))
                st["exp_avg_sq"] = _Slot(f"exp_avg_sq/{g}", "float32", (n[g],))
                base.append(st)
            osd = {
                "base_optimizer_state": base,
                "base_optimizer_state_step": step_int,
                "single_partition_of_fp32_groups": [
                    _Slot(f"fp32/{g}", "float32", (n[g],)) for g in range(len(plan.part))
                ],
                "zero_stage": self.zero,
                "group_paddings": [plan.part[g] - n[g] for g in range(len(plan.part))],
                "partition_count": [self.dp] * len(plan.part),
                "ds_version": DS_VERSION,
            }
            doc = {"optimizer_state_dict": osd, "ds_config": cfg, "ds_version": DS_VERSION}
            out.append((files[1 + r], doc))
        return out


# ------------------------------------------------------------------ file mechanics


class _Slot:
    """A placeholder for a tensor whose bytes are written later (see ``_write_skeleton``)."""

    def __init__(self, slot: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.slot, self.dtype, self.shape = slot, dtype, shape


def _write_skeleton(path: str, obj: dict[str, Any]) -> list[str]:
    """``torch.save`` ``obj`` without tensor data (fsync'd); returns the slots in the
    order of the file's storage records (``data/0``, ``data/1`` ...)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    order: list[str] = []
    with FakeTensorMode() as mode:
        fakes = {}

        def fake(s: _Slot) -> torch.Tensor:
            t = torch.empty(s.shape, dtype=torch_dtype(s.dtype))
            fakes[id(t)] = s.slot
            return t

        real = _map_slots(obj, fake)
    del mode

    class _Order(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, torch.Tensor):
                order.append(fakes[id(o)])
                return len(order)
            return None

    _Order(_Null(), protocol=2).dump(real)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(real, f)
        f.flush()
        os.fsync(f.fileno())
    return order


def _read_slots(path: str, order: list[str]) -> dict[str, int]:
    """slot -> file offset of its record's bytes in a skeleton."""
    r: Any = torch._C.PyTorchFileReader(path)  # get_record_offset is missing from its stub
    return {slot: r.get_record_offset(f"data/{i}") for i, slot in enumerate(order)}


def _map_slots(obj: Any, fn: Any) -> Any:
    if isinstance(obj, _Slot):
        return fn(obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _map_slots(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _map_slots(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_slots(v, fn) for v in obj]
    return obj


class _Null:
    def write(self, b: bytes) -> int:
        return len(b)


class _SlotWriter:
    """Puts tensor bytes into skeleton records; fsyncs and records progress."""

    def __init__(
        self,
        d: str,
        files: list[str],
        slots: dict[str, dict[str, int]],
        progress: dict[str, Any],
    ) -> None:
        self.d, self.slots, self.progress = d, slots, progress
        self.fds = {f: os.open(os.path.join(d, f + ".partial"), os.O_RDWR) for f in files}
        self.pending: dict[str, int] = {}
        self.unsynced = 0
        self.bytes_written = 0

    def _offset(self, f: str, slot: str, byte_off: int) -> int:
        return self.slots[f][slot] + byte_off

    def put(
        self, places: list[tuple[str, str, int, int, int]], info: TensorInfo, t: torch.Tensor
    ) -> None:
        flat = t.detach().contiguous().reshape(-1)
        isz = itemsize_of(info.dtype)
        for f, slot, boff, lo, hi in places:
            data = tensor_bytes(flat[lo : (flat.numel() if hi < 0 else hi)])
            pos, off = 0, self._offset(f, slot, boff)
            while pos < len(data):
                pos += os.pwrite(self.fds[f], data[pos:], off + pos)
            self.bytes_written += len(data)
        self.pending[info.name] = _crc.crc32c(tensor_bytes(flat)) if places else 0
        self.unsynced += flat.numel() * isz
        if self.unsynced >= _SYNC_BYTES:
            self.sync()

    def crc(self, places: list[tuple[str, str, int, int, int]], info: TensorInfo) -> int:
        """CRC32C of ``info``'s bytes as stored (its pieces in element order)."""
        if not places:
            return 0
        isz, n, crc = itemsize_of(info.dtype), math.prod(info.shape), 0
        for f, slot, boff, lo, hi in places:
            size = ((n if hi < 0 else hi) - lo) * isz
            data = os.pread(self.fds[f], size, self._offset(f, slot, boff))
            if len(data) != size:
                return -1
            crc = _crc.crc32c(data, crc)
        return crc

    def sync(self) -> None:
        for fd in self.fds.values():
            os.fsync(fd)
        self.progress["done"].update(self.pending)
        self.pending.clear()
        self.unsynced = 0
        atomic_write(os.path.join(self.d, PROGRESS_NAME), json.dumps(self.progress).encode())

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _optim_key(name: str) -> tuple[str, str] | None:
    """``optim.state.<fqn>.<kind>`` -> (fqn, kind); None for other names."""
    if not name.startswith("optim.state."):
        return None
    fqn, _, kind = name.removeprefix("optim.state.").rpartition(".")
    return (fqn, kind) if fqn and kind in (*KINDS, "step") else None


def _load_groups(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        groups = doc["param_groups"]
        if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
            raise TypeError("param_groups must be a list of lists of names")
        return [list(g) for g in groups]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(
            f"deepspeed target: --spec {path!r} must be a JSON file "
            f'{{"param_groups": [["fqn", ...], ...]}}: {e}'
        ) from None

