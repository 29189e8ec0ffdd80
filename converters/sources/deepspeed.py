"""Source: a DeepSpeed checkpoint (ZeRO 0/1/2/3; model-parallel ranks via a spec).

Layout (DeepSpeed's engine; ``deepspeed/utils/zero_to_fp32.py`` reads the same):
``DIR/latest`` names the tag, ``DIR/<tag>/`` holds ``mp_rank_00_model_states.pt``
(ZeRO 0/1/2) or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (ZeRO-3), and one
``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per data-parallel rank. SRC may be
``DIR`` or ``DIR/<tag>``; ``--step N`` picks the tag ``global_stepN``. With several
model-parallel ranks (``mp_rank_01...``: Megatron-DeepSpeed with TP > 1), each rank is
read as below and the TP shards are assembled by :mod:`.deepspeed_mp` with a reshard
spec (``--spec``, default ``deepspeed_megatron``; model variables from ``--var``).

Tensors given (names follow ``ckpt.save``: ``model.<fqn>``, ``optim.state.<fqn>.<k>``):

- ``model.<fqn>``: every tensor of ``module`` (16-bit weights and buffers). Under ZeRO-3
  ``module`` holds empty placeholders for parameters; those are the fp32 master weights
  instead (what ``zero_to_fp32`` gives).
- ``optim.state.<fqn>.fp32``, ``.exp_avg``, ``.exp_avg_sq``: per parameter, cut out of
  the ranks' flat partitions; ``.step``: the param group's step (float32 scalar, as
  ``torch.optim.Adam`` keeps it).

Flat-range math. ZeRO-1/2: a param group's params lie back to back in one flat buffer
(``param_shapes`` order), padded to a multiple of ``2 * dp``; rank ``r`` holds
``[r * P, (r + 1) * P)``. A param ``[o, o + n)`` is read from ranks ``o // P`` to
``(o + n - 1) // P``, only its range of each. ZeRO-3: every param is split on its own
into ``ceil(n / dp)`` elements per rank (the last rank's tail is padding), laid back to
back in each rank's flat group.

Safety: every file is read with ``torch.load(weights_only=True)`` only (no fallback).
Real DeepSpeed files pickle a few DeepSpeed objects besides tensors (the loss scaler,
``ZeroStageEnum``, ``fragment_address`` values of ``param_slice_mappings``); exactly
those globals (:data:`DEEPSPEED_GLOBALS`) are mapped to inert stand-ins
(:class:`DeepSpeedObject`) that only record their constructor arguments and state:
no DeepSpeed code is imported or run. Any other global (``__reduce__`` payloads
included) raises :class:`UnsafePickleError` naming the file and the global; a
truncated or corrupt file raises :class:`SourceFormatError`.

Speed and memory: each file is unpickled once, on the meta device
(``map_location="meta"``: structure, dtypes, shapes and each storage's offset in the
file, no data). A tensor's raw bytes then lie in known file ranges (one per rank that
holds a part of it): a whole-tensor read is one ``preadv`` per range straight into the
output tensor, and :meth:`DeepSpeedSource.read_range` reads just the asked bytes of
those ranges into the caller's (window) buffer; no mapping whose touched pages would
count as resident memory, no second unpickling.
"""

from __future__ import annotations

import glob
import math
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    InventorySource,
    PlanError,
    SourceFormatError,
    SourceNotFoundError,
    TensorInfo,
    advise_willneed,
    check_read,
    raw_bytes,
)
from ckptd.dtypes import dtype_name, torch_dtype

LATEST = markers.DS_LATEST
MODEL_GLOB = markers.DS_MODEL_GLOB
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_KINDS = ("fp32", "exp_avg", "exp_avg_sq")


class UnsafePickleError(SourceFormatError):
    """A ``.pt`` file needs more than ``torch.load(weights_only=True)`` allows (never run)."""


#: The DeepSpeed globals that real ZeRO checkpoints pickle; each is unpickled into an
#: inert :class:`DeepSpeedObject` subclass, never into DeepSpeed's class.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DeepSpeedObject:
    """Inert stand-in for a pickled DeepSpeed object: records ``args`` and ``state``.

    ``args`` are what the pickle passed to the class (an enum's value), ``state`` what
    it passed to ``__setstate__`` (an object's ``__dict__``). No behaviour beyond that.
    """

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any) -> DeepSpeedObject:
        self = object.__new__(cls)
        self.args = args
        self.state: Any = None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # ZeroStageEnum(2) pickles as the call with its value
        if len(self.args) == 1 and isinstance(self.args[0], int):
            return int(self.args[0])
        raise TypeError(f"{self.qualname} stand-in has no integer value")

    def __repr__(self) -> str:
        return f"<{self.qualname} args={self.args!r} state={self.state!r}>"


STANDINS: dict[str, type[DeepSpeedObject]] = {
    q: type(q.rsplit(".", 1)[1], (DeepSpeedObject,), {"qualname": q, "__module__": __name__})
    for q in DEEPSPEED_GLOBALS
}
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_pt(path: str, *, meta: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with the DeepSpeed stand-ins allowed.

    ``meta``: tensors on the meta device, each storage carrying ``_checkpoint_offset``
    (its byte offset in the file); otherwise memory-mapped CPU tensors. Errors are
    typed and name ``path`` (and the refused global).
    """
    where: dict[str, Any] = {"map_location": "meta"} if meta else {"map_location": "cpu"}
    allowed = [(cls, q) for q, cls in STANDINS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, mmap=not meta, **where)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _GLOBAL_RE.search(text)
        what = f"global {m.group(1)}" if m else (text.strip().splitlines() or [type(e).__name__])[0]
        raise UnsafePickleError(
            f"{path}: refused to unpickle {what}: only tensors, containers and the "
            f"DeepSpeed objects {', '.join(DEEPSPEED_GLOBALS)} are allowed (weights_only "
            "load; nothing was executed). Convert only checkpoints written by DeepSpeed."
        ) from e
    except Exception as e:  # truncated zip, bad magic, I/O: no other way to read it
        raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e


@dataclass(frozen=True)
class _Span:
    """Bytes ``[lo, hi)`` of a tensor's raw data lie in ``path`` from byte ``offset``."""

    path: str
    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class _Loc:
    """A tensor's bytes in a ``.pt`` file: ``numel`` elements of ``dtype`` from ``offset``."""

    path: str
    offset: int
    numel: int
    dtype: torch.dtype


def _locate(path: str, t: Any, size: int, what: str) -> _Loc:
    """Where the meta tensor ``t`` (from ``load_pt(path, meta=True)``) lies in ``path``."""
    if not isinstance(t, torch.Tensor):
        raise SourceFormatError(f"{path}: {what} is not a tensor")
    base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if base is None or not t.is_contiguous():
        raise SourceFormatError(f"{path}: {what} is not a contiguous stored tensor")
    off = int(base) + t.storage_offset() * t.element_size()
    n = t.numel()
    if off + n * t.element_size() > size:
        raise SourceFormatError(f"{path}: {what} runs past the end of the file (truncated?)")
    return _Loc(path, off, n, t.dtype)


def _check_byteorder(path: str) -> None:
    """Refuse archives written on a big-endian machine (bytes are read as they are)."""
    try:
        with zipfile.ZipFile(path) as z:
            rec = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
            order = z.read(rec).decode().strip() if rec else "little"
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e
    if order != "little":
        raise SourceFormatError(f"{path}: written {order}-endian; only little-endian is read")


def _tag_dir(path: str, step: int | None) -> str:
    """The directory holding the ``*_states.pt`` files of ``path`` (root or tag dir)."""
    if glob.glob(os.path.join(glob.escape(path), MODEL_GLOB)):
        return path
    if step is not None:
        d = os.path.join(path, f"global_step{step}")
        if not os.path.isdir(d):
            raise SourceNotFoundError(f"{path}: no tag global_step{step}")
        return d
    latest = os.path.join(path, LATEST)
    if not os.path.isfile(latest):
        raise SourceNotFoundError(f"{path}: no DeepSpeed checkpoint ({LATEST} is missing)")
    with open(latest, encoding="utf-8") as f:
        tag = f.read().strip()
    d = os.path.join(path, tag)
    if not tag or os.sep in tag or not os.path.isdir(d):
        raise SourceFormatError(f"{latest}: names tag {tag!r}, which is not a directory")
    return d


@dataclass(frozen=True)
class _Param:
    """Where one parameter lies in the flat partitions."""

    name: str
    shape: tuple[int, ...]
    group: int
    offset: int  # ZeRO-1/2: in the group's flat buffer; ZeRO-3: in each rank's flat group


def _get(obj: Any, *keys: Any, where: str) -> Any:
    for k in keys:
        try:
            obj = obj[k]
        except (KeyError, IndexError, TypeError) as e:
            raise SourceFormatError(f"{where}: missing {'/'.join(map(str, keys))}") from e
    return obj


class DeepSpeedSource(InventorySource):
    """Reads a DeepSpeed ZeRO 0/1/2/3 checkpoint (see the module docstring)."""

    format = "deepspeed"

    def __init__(
        self,
        path: str,
        step: int | None = None,
        workers: int = 4,
        *,
        variables: Mapping[str, int] | None = None,
        spec: str | None = None,
        mp_rank: int | None = None,
    ) -> None:
        """Open the checkpoint (metadata only). ``variables``/``spec``: the TP layout of a
        model-parallel checkpoint; ``mp_rank``: read only that mp rank's files (its
        local shards), as the model-parallel assembly does for each rank."""
        super().__init__(path, step, workers)
        root = path.removeprefix("file://")
        if not os.path.isdir(root):
            raise SourceNotFoundError(f"source {path!r} is not a directory")
        self.dir = _tag_dir(root, step)
        self._mp: Any = None  # a deepspeed_mp.MPAssembly with several mp ranks
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        by_mp: dict[int, list[str]] = {}
        for f in sorted(os.listdir(self.dir)):
            if m := MODEL_RE.match(f):
                by_mp.setdefault(int(m.group(1)), []).append(os.path.join(self.dir, f))
        if not by_mp:
            raise SourceNotFoundError(f"{self.dir}: no *_model_states.pt")
        if sorted(by_mp) != list(range(len(by_mp))):
            raise SourceFormatError(f"{self.dir}: model files for mp ranks {sorted(by_mp)}")
        if mp_rank is None and len(by_mp) > 1:
            # --spec also carries a DeepSpeed target's param-groups JSON: not a layout.
            # At TP=1 --spec and --var are the target's (e.g. --to megatron): not used.
            layout_spec = spec if spec and not spec.endswith(".json") else None
            self._open_model_parallel(path, step, workers, len(by_mp), variables, layout_spec)
            return
        self.mp_rank = mp_rank or 0
        if self.mp_rank not in by_mp:
            raise SourceNotFoundError(f"{self.dir}: no model states of mp rank {self.mp_rank}")
        model_files = by_mp[self.mp_rank]
        mp_name = f"mp_rank_{self.mp_rank:02d}_model_states.pt"
        self.model_file = next(
            (f for f in model_files if os.path.basename(f) == mp_name), model_files[0]
        )
        self.optim_files = self._optim_files()
        self._locs: list[dict[str, list[_Loc]]] = []  # per rank: kind -> per group
        ms = self._load_meta(self.model_file)
        module = _get(ms, "module", where=self.model_file)
        shapes = ms.get("param_shapes") if isinstance(ms, dict) else None
        self._ds_step = ms.get("global_steps") if isinstance(ms, dict) else None
        groups: list[list[tuple[str, tuple[int, ...]]]] = []
        if shapes is not None:
            shapes = shapes if isinstance(shapes, list) else [shapes]
            groups = [[(n, tuple(int(x) for x in s)) for n, s in g.items()] for g in shapes]
        self.stage = 0
        self.dp = len(self.optim_files)
        self._params: dict[str, _Param] = {}
        self._steps: list[Any] = []
        self._parts: list[int] = []  # per group: numel of each rank's partition
        if self.optim_files:
            self._index_optim(groups)
        self._module: dict[str, torch.Tensor] = {}  # meta tensors of ``module``
        for k, v in module.items():
            if not isinstance(v, torch.Tensor):
                self._skipped.append(f"model.{k}")
            elif v.numel() == 0 and k in self._params:  # ZeRO-3 placeholder
                self._add(f"model.{k}", "float32", self._params[k].shape)
            else:
                self._module[k] = v
                self._add(f"model.{k}", dtype_name(v.dtype), tuple(v.shape))
        del module, ms
        for p in self._params.values():
            for kind in OPTIM_KINDS:
                self._add(f"optim.state.{p.name}.{kind}", "float32", p.shape)
            if self._steps[p.group] is not None:
                self._add(f"optim.state.{p.name}.step", "float32", ())

    def _open_model_parallel(
        self,
        path: str,
        step: int | None,
        workers: int,
        tp: int,
        variables: Mapping[str, int] | None,
        spec: str | None,
    ) -> None:
        """Open every mp rank on its own and assemble their TP shards (``.deepspeed_mp``)."""
        from ckptd.converters.sources.deepspeed_mp import MPAssembly

        self._ranks = [DeepSpeedSource(path, step, workers, mp_rank=r) for r in range(tp)]
        first = self._ranks[0]
        self.model_file, self.optim_files = first.model_file, first.optim_files
        self.stage, self.dp, self._ds_step = first.stage, first.dp, first._ds_step
        for r in self._ranks[1:]:
            if (r.stage, r.dp) != (self.stage, self.dp):
                raise SourceFormatError(
                    f"{r.model_file}: ZeRO-{r.stage} at dp={r.dp}, mp rank 0 has "
                    f"ZeRO-{self.stage} at dp={self.dp}"
                )
        self._mp = MPAssembly(self._ranks, spec, dict(variables or {}))
        self._infos = dict(self._mp.infos)
        self._skipped = list(first.skipped())

    def _add(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self._infos[name] = TensorInfo(name, dtype, shape)

    def _optim_files(self) -> list[str]:
        by_rank: dict[int, str] = {}
        for f in sorted(os.listdir(self.dir)):
            m = OPTIM_RE.match(f)
            if m and int(m.group(2)) == self.mp_rank:
                by_rank[int(m.group(1))] = os.path.join(self.dir, f)
        if by_rank and sorted(by_rank) != list(range(len(by_rank))):
            raise SourceFormatError(
                f"{self.dir}: optimizer files for DP ranks {sorted(by_rank)}, expected 0..N-1"
            )
        return [by_rank[r] for r in range(len(by_rank))]

    def _index_optim(self, groups: list[list[tuple[str, tuple[int, ...]]]]) -> None:
        """Read every rank's partition sizes (metadata only) and place every param."""
        if not groups:
            raise SourceFormatError(f"{self.model_file}: no param_shapes to place the params")
        sizes: list[list[int]] = []  # per rank, per group: numel of the fp32 partition
        for r, f in enumerate(self.optim_files):
            osd = _get(self._load_meta(f), "optimizer_state_dict", where=f)
            stage = int(_get(osd, "zero_stage", where=f))
            if r == 0:
                self.stage = stage
            elif stage != self.stage:
                raise SourceFormatError(f"{f}: zero_stage {stage}, rank 0 has {self.stage}")
            pc = osd.get("partition_count", self.dp)
            pc = max(pc) if isinstance(pc, (list, tuple)) else int(pc)
            if pc != self.dp:
                raise SourceFormatError(f"{f}: partition_count {pc}, but {self.dp} optim files")
            flats = self._kind_list(osd, "fp32", f)
            if len(flats) != len(groups):
                raise SourceFormatError(
                    f"{f}: {len(flats)} flat groups, param_shapes has {len(groups)}"
                )
            sizes.append([int(t.numel()) for t in flats])
            size = os.path.getsize(f)
            locs: dict[str, list[_Loc]] = {}
            for kind in OPTIM_KINDS:
                ts = self._kind_list(osd, kind, f)
                got = [int(t.numel()) for t in ts]
                if got != sizes[-1]:
                    raise SourceFormatError(f"{f}: {kind} partitions {got} != fp32 {sizes[-1]}")
                locs[kind] = [
                    _locate(f, t, size, f"{kind} partition of group {g}") for g, t in enumerate(ts)
                ]
            self._locs.append(locs)
            if r == 0:
                self._steps = [self._group_step(osd, g) for g in range(len(groups))]
        for g, group in enumerate(groups):
            # DeepSpeed's state_dict() saves the last rank's partitions without the
            # group's alignment padding (group_paddings): it may be shorter.
            per_rank = {s[g] for s in sizes[:-1]} or {sizes[-1][g]}
            if len(per_rank) != 1 or sizes[-1][g] > min(per_rank):
                raise SourceFormatError(
                    f"{self.dir}: group {g} partitions differ across ranks: {[s[g] for s in sizes]}"
                )
            part, off = per_rank.pop(), 0
            self._parts.append(part)
            for name, shape in group:
                if name in self._params:
                    raise SourceFormatError(f"{self.model_file}: param {name!r} listed twice")
                self._params[name] = _Param(name, shape, g, off)
                n = math.prod(shape)
                off += math.ceil(n / self.dp) if self.stage == 3 else n
            if self.stage == 3:
                ok = off == part
            else:
                align = 2 * self.dp
                ok = part * self.dp == math.ceil(off / align) * align or part * self.dp == off
            if not ok:
                raise SourceFormatError(
                    f"{self.optim_files[0]}: group {g} partitions of {part} elements do not "
                    f"match param_shapes ({off} elements, ZeRO-{self.stage}, dp={self.dp})"
                )

    def _kind_list(self, osd: Any, kind: str, where: str) -> list[torch.Tensor]:
        """Per group, this rank's flat partition of ``kind``."""
        if kind == "fp32":
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            out = _get(osd, key, where=where)
        else:
            states = self._group_states(osd, where)
            out = [_get(s, kind, where=where) for s in states]
        if not all(isinstance(t, torch.Tensor) for t in out):
            raise SourceFormatError(f"{where}: {kind} partitions are not tensors")
        return list(out)

    def _group_states(self, osd: Any, where: str) -> list[Any]:
        if self.stage == 3:
            st = _get(osd, "optimizer_state_dict", "state", where=where)
            return [st[k] for k in sorted(st)]
        base = _get(osd, "base_optimizer_state", where=where)
        if isinstance(base, dict):  # non-elastic: a torch optimizer state dict
            st = _get(base, "state", where=where)
            return [st[k] for k in sorted(st)]
        return list(base)

    def _group_step(self, osd: Any, g: int) -> Any:
        s = self._group_states(osd, self.optim_files[0])[g].get("step")
        if isinstance(s, torch.Tensor):  # a meta tensor: read its one value
            f = self.optim_files[0]
            loc = _locate(f, s, os.path.getsize(f), f"group {g} step")
            if loc.numel != 1:
                raise SourceFormatError(f"{f}: group {g} step has {loc.numel} elements")
            out = torch.empty(1, dtype=loc.dtype)
            self._pread(f, loc.offset, raw_bytes(out))
            s = out
        return None if s is None else float(s)

    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_deepspeed(path)

    @property
    def step(self) -> int | None:
        return int(self._ds_step) if isinstance(self._ds_step, int) else None

    def read(self, name: str) -> torch.Tensor:
        if self._mp is not None:
            return check_read(self._infos[name], self._mp.read(name), self.dir)
        info = self._infos[name]
        where = self.model_file if name.startswith("model.") else self.optim_files[0]
        spans = self._spans(name)
        if spans is not None:
            t = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
            self._read_spans(name, spans, 0, raw_bytes(t))
        elif name.startswith("model."):  # a strided view (rare): read through a mapping
            obj = load_pt(self.model_file)
            try:
                t = obj["module"][name.removeprefix("model.")].clone()
            finally:
                del obj
        else:  # a param group's step
            fqn = name.removeprefix("optim.state.").rsplit(".", 1)[0]
            t = torch.tensor(self._steps[self._params[fqn].group], dtype=torch.float32)
        return check_read(info, t, where)

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """``preadv`` of just the asked bytes from the file ranges that hold them."""
        if self._mp is not None:
            self._mp.read_range(name, start, out)
            return
        spans = self._spans(name)
        if spans is None:
            super().read_range(name, start, out)
        else:
            self._read_spans(name, spans, start, out)

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """``posix_fadvise(WILLNEED)`` on the file ranges under the bytes asked for next."""
        if self._mp is not None:
            return  # the local tensors are read whole, rank by rank
        spans = self._spans(name) if hasattr(os, "posix_fadvise") else None
        for sp in spans or ():
            lo, hi = max(sp.lo, start), min(sp.hi, start + nbytes)
            if lo < hi:
                advise_willneed(self._fd(sp.path), sp.offset + lo - sp.lo, hi - lo)

    def _read_spans(self, name: str, spans: list[_Span], start: int, out: memoryview) -> None:
        end = start + out.nbytes
        if not 0 <= start <= end <= self._infos[name].nbytes:
            raise PlanError(f"byte range [{start}, {end}) outside tensor {name!r}")
        for sp in spans:
            lo, hi = max(sp.lo, start), min(sp.hi, end)
            if lo < hi:
                self._pread(sp.path, sp.offset + lo - sp.lo, out[lo - start : hi - start])

    def _spans(self, name: str) -> list[_Span] | None:
        """Where the raw bytes of ``name`` lie in the files (they tile the tensor), or
        None if they cannot be read as byte ranges (a step value, a strided view)."""
        if name.startswith("model."):
            fqn = name.removeprefix("model.")
            m = self._module.get(fqn)
            if m is None:  # a ZeRO-3 parameter: its fp32 master weights
                return self._flat_spans(self._params[fqn], "fp32")
            if not m.is_contiguous():
                return None
            size = os.path.getsize(self.model_file)
            loc = _locate(self.model_file, m, size, f"module[{fqn!r}]")
            return [_Span(loc.path, loc.offset, 0, loc.numel * m.element_size())]
        fqn, kind = name.removeprefix("optim.state.").rsplit(".", 1)
        return None if kind == "step" else self._flat_spans(self._params[fqn], kind)

    def _flat_spans(self, p: _Param, kind: str) -> list[_Span]:
        """``p``'s ``kind`` in the flat partitions of the ranks that hold a part of it."""
        n = math.prod(p.shape)
        if self.stage == 3:
            pn = math.ceil(n / self.dp)
            ranges = [(r, p.offset, r * pn, min(n, (r + 1) * pn)) for r in range(self.dp)]
        else:
            part = self._parts[p.group]
            ranges = []
            for r in range(p.offset // part, (p.offset + n - 1) // part + 1 if n else 0):
                lo, hi = max(p.offset, r * part), min(p.offset + n, (r + 1) * part)
                ranges.append((r, lo - r * part, lo - p.offset, hi - p.offset))
        spans = []
        for r, src_off, lo, hi in ranges:
            if hi <= lo:
                continue
            loc = self._locs[r][kind][p.group]
            if loc.dtype != torch.float32 or src_off + hi - lo > loc.numel:
                raise SourceFormatError(
                    f"{loc.path}: {kind} partition of group {p.group} is "
                    f"{dtype_name(loc.dtype)}[{loc.numel}], param {p.name!r} needs float32 "
                    f"up to {src_off + hi - lo}"
                )
            spans.append(_Span(loc.path, loc.offset + 4 * src_off, 4 * lo, 4 * hi))
        return spans

    def _load_meta(self, path: str) -> Any:
        _check_byteorder(path)
        return load_pt(path, meta=True)

    def _fd(self, path: str) -> int:
        """A read-only descriptor of ``path``, opened once (closed by :meth:`close`)."""
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return fd

    def _pread(self, path: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``offset``."""
        fd = self._fd(path)
        done = 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise SourceFormatError(f"{path}: ends inside a tensor (truncated?)")
            done += n

    def close(self) -> None:
        for r in getattr(self, "_ranks", ()):
            r.close()
        with self._fd_lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def fingerprint(self) -> str:
        files = [os.path.join(self.dir, f) for f in sorted(os.listdir(self.dir))]
        files = [f for f in files if f.endswith(".pt")]
        layout = f"|{self._mp.fingerprint()}" if self._mp is not None else ""
        return (
            "deepspeed:"
            + "|".join(
                f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}"
                for f in files
            )
            + layout
        )
