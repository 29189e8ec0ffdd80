"""Source: a DeepSpeed checkpoint (ZeRO 0/1/2/3; model-parallel ranks via a spec).

Layout (DeepSpeed's engine; ``deepspeed/utils/zero_to_fp32.py`` reads the same):
``DIR/latest`` names the tag, ``DIR/<tag>/`` holds ``mp_rank_00_model_states.pt``
(ZeRO 0/1/2) or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (ZeRO-3), and one
``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per data-parallel rank. SRC may be
``DIR`` or ``DIR/<tag>``; ``--step N`` picks the tag ``global_stepN``. With several
model-parallel ranks (``mp_rank_01...``: Megatron-DeepSpeed with TP > 1), each rank is
read as below and the TP shards are assembled by :mod:`.deepspeed_mp` with a reshard
spec (``--spec``, default ``deepspeed_megatron``; model variables from ``--var``). A
``PipelineModule`` engine's checkpoint (``layer_*-model_states.pt`` files hold the weights;
mp rank = stage * TP + tp rank) is read by :mod:`.deepspeed_pipe`. BF16_Optimizer files
(bf16 with fp32 gradient accumulation; no ``zero_stage``) are partitioned as ZeRO-1.

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

Safety: every file is read with ``torch.load(weights_only=True)`` only, DeepSpeed's
pickled objects mapped to inert stand-ins (:mod:`.deepspeed_files`).

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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    InventorySource,
    PlanError,
    SourceFormatError,
    SourceNotFoundError,
    TensorInfo,
    check_read,
    raw_bytes,
)
from ckptd.converters.sources.deepspeed_files import (  # noqa: F401 - re-exported
    DEEPSPEED_GLOBALS,
    STANDINS,
    DeepSpeedObject,
    FileReader,
    Loc,
    Span,
    UnsafePickleError,
    check_byteorder,
    load_pt,
    locate,
)
from ckptd.converters.sources.torchfile import MetaTensor, is_tensor
from ckptd.dtypes import dtype_name, numpy_storage_dtype, torch_dtype

if TYPE_CHECKING:  # imported where used: a DeepSpeed -> HF conversion never needs it
    import torch

LATEST = markers.DS_LATEST
MODEL_GLOB = markers.DS_MODEL_GLOB
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_KINDS = ("fp32", "exp_avg", "exp_avg_sq")


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
        self._files = FileReader()
        by_mp: dict[int, list[str]] = {}
        for f in sorted(os.listdir(self.dir)):
            if m := MODEL_RE.match(f):
                by_mp.setdefault(int(m.group(1)), []).append(os.path.join(self.dir, f))
        if not by_mp:
            raise SourceNotFoundError(f"{self.dir}: no *_model_states.pt")
        if sorted(by_mp) != list(range(len(by_mp))):
            raise SourceFormatError(f"{self.dir}: model files for mp ranks {sorted(by_mp)}")
        # --spec also carries a DeepSpeed target's param-groups JSON: not a layout.
        # At TP=1 --spec and --var are the target's (e.g. --to megatron): not used.
        layout_spec = spec if spec and not spec.endswith(".json") else None
        if mp_rank is None and markers.has_ds_layer_files(self.dir):
            self._open_pipeline(path, step, workers, len(by_mp), variables, layout_spec)
            return
        if mp_rank is None and len(by_mp) > 1:
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
        self._locs: list[dict[str, list[Loc]]] = []  # per rank: kind -> per group
        ms = self._load_meta(self.model_file)
        module = _get(ms, "module", where=self.model_file)
        self.has_module = module is not None  # None: a PipelineModule's (layer files)
        if module is None and mp_rank is None:
            raise SourceFormatError(f"{self.model_file}: module is None and no layer_* files")
        meta = ms if isinstance(ms, dict) else {}
        shapes, self._ds_step = meta.get("param_shapes"), meta.get("global_steps")
        # pp_degree and tp_degree, where DeepSpeed records them (pipeline layouts)
        self.parallel_dims = meta.get("checkpoint_parallel_dimensions")
        groups: list[list[tuple[str, tuple[int, ...]]]] = []
        if shapes is not None:
            shapes = shapes if isinstance(shapes, list) else [shapes]
            groups = [[(n, tuple(int(x) for x in s)) for n, s in g.items()] for g in shapes]
        self._shapes = {n: s for g in groups for n, s in g}
        self.stage = 0
        self.dp = len(self.optim_files)
        self._params: dict[str, _Param] = {}
        self._steps: list[Any] = []
        self._parts: list[int] = []  # per group: numel of each rank's partition
        if self.optim_files:
            self._index_optim(groups)
        self._module: dict[str, MetaTensor] = {}  # meta tensors of ``module``
        for k, v in (module or {}).items():
            if not is_tensor(v):
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

        ranks = [DeepSpeedSource(path, step, workers, mp_rank=r) for r in range(tp)]
        self._ranks: list[Any] = list(ranks)  # what close() closes
        first = ranks[0]
        self.model_file, self.optim_files = first.model_file, first.optim_files
        self.stage, self.dp, self._ds_step = first.stage, first.dp, first._ds_step
        for r in ranks:
            if not r.has_module:
                raise SourceFormatError(f"{r.model_file}: module is None and no layer_* files")
            if (r.stage, r.dp) != (self.stage, self.dp):
                raise SourceFormatError(
                    f"{r.model_file}: ZeRO-{r.stage} at dp={r.dp}, mp rank 0 has "
                    f"ZeRO-{self.stage} at dp={self.dp}"
                )
        self._mp = MPAssembly(ranks, spec, dict(variables or {}))
        self._infos = dict(self._mp.infos)
        self._skipped = list(first.skipped())

    def _open_pipeline(
        self,
        path: str,
        step: int | None,
        workers: int,
        n_mp: int,
        variables: Mapping[str, int] | None,
        spec: str | None,
    ) -> None:
        """Open a PipelineModule checkpoint: layer files and per-stage ZeRO partitions,
        assembled over stages (and TP ranks) by :mod:`.deepspeed_pipe`."""
        from ckptd.converters.sources.deepspeed_pipe import PipeAssembly

        stages = [DeepSpeedSource(path, step, workers, mp_rank=r) for r in range(n_mp)]
        pipe = PipeAssembly(self.dir, stages, dict(variables or {}), spec)
        self._ranks, self._mp, first = [*stages, pipe], pipe, stages[0]  # closed by close()
        self.pp, self.tp = pipe.pp, pipe.tp
        self.model_file, self.optim_files = first.model_file, first.optim_files
        self.stage, self.dp, self._ds_step = pipe.stage, pipe.dp, first._ds_step
        self._infos, self._skipped = dict(pipe.infos), pipe.skipped()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``param_shapes`` of the model-states file, flattened over groups, in order."""
        return dict(self._shapes)

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
            # BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO-1, the usual
            # pipeline setup) saves no zero_stage; it partitions exactly as ZeRO-1 does.
            bf16_opt = "zero_stage" not in osd and "single_partition_of_fp32_groups" in osd
            stage = 1 if bf16_opt else int(_get(osd, "zero_stage", where=f))
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
            locs: dict[str, list[Loc]] = {}
            for kind in OPTIM_KINDS:
                ts = self._kind_list(osd, kind, f)
                got = [int(t.numel()) for t in ts]
                # A non-elastic state dict keeps the last rank's moments padded (the torch
                # optimizer's own state), its fp32 partitions without padding: longer is ok.
                if len(got) != len(sizes[-1]) or any(a < b for a, b in zip(got, sizes[-1])):
                    raise SourceFormatError(f"{f}: {kind} partitions {got} < fp32 {sizes[-1]}")
                locs[kind] = [
                    locate(f, t, size, f"{kind} partition of group {g}") for g, t in enumerate(ts)
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

    def _kind_list(self, osd: Any, kind: str, where: str) -> list[MetaTensor]:
        """Per group, this rank's flat partition of ``kind``."""
        if kind == "fp32":
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            out = _get(osd, key, where=where)
        else:
            states = self._group_states(osd, where)
            out = [_get(s, kind, where=where) for s in states]
        if not all(is_tensor(t) for t in out):
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
        if is_tensor(s):  # a meta tensor: read its one value
            f = self.optim_files[0]
            loc = locate(f, s, os.path.getsize(f), f"group {g} step")
            if loc.numel != 1:
                raise SourceFormatError(f"{f}: group {g} step has {loc.numel} elements")
            if loc.dtype not in ("float64", "float32", "float16", "int64", "int32"):
                raise SourceFormatError(f"{f}: group {g} step is {loc.dtype}")
            out = np.empty(1, numpy_storage_dtype(loc.dtype))
            self._pread(f, loc.offset, memoryview(out).cast("B"))
            s = out[0].item()
        return None if s is None else float(s)

    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_deepspeed(path)

    @property
    def step(self) -> int | None:
        return int(self._ds_step) if isinstance(self._ds_step, int) else None

    def read(self, name: str) -> torch.Tensor:
        import torch

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
        if spans is not None:
            self._read_spans(name, spans, start, out)
        elif name.startswith("optim.state."):  # a param group's step: a float32 scalar
            fqn = name.removeprefix("optim.state.").rsplit(".", 1)[0]
            raw = np.float32(self._steps[self._params[fqn].group]).tobytes()
            if not 0 <= start <= start + out.nbytes <= len(raw):
                raise PlanError(f"byte range [{start}, {start + out.nbytes}) outside {name!r}")
            out[:] = raw[start : start + out.nbytes]
        else:
            super().read_range(name, start, out)  # a strided view: read whole

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """``posix_fadvise(WILLNEED)`` on the file ranges under the bytes asked for next."""
        if self._mp is not None:
            self._mp.prefetch(name, start, nbytes)
            return
        spans = self._spans(name) if hasattr(os, "posix_fadvise") else None
        for sp in spans or ():
            lo, hi = max(sp.lo, start), min(sp.hi, start + nbytes)
            if lo < hi:
                self._files.advise(sp.path, sp.offset + lo - sp.lo, hi - lo)

    def _read_spans(self, name: str, spans: list[Span], start: int, out: memoryview) -> None:
        end = start + out.nbytes
        if not 0 <= start <= end <= self._infos[name].nbytes:
            raise PlanError(f"byte range [{start}, {end}) outside tensor {name!r}")
        for sp in spans:
            lo, hi = max(sp.lo, start), min(sp.hi, end)
            if lo < hi:
                self._pread(sp.path, sp.offset + lo - sp.lo, out[lo - start : hi - start])

    def _spans(self, name: str) -> list[Span] | None:
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
            loc = locate(self.model_file, m, size, f"module[{fqn!r}]")
            return [Span(loc.path, loc.offset, 0, loc.numel * m.element_size())]
        fqn, kind = name.removeprefix("optim.state.").rsplit(".", 1)
        return None if kind == "step" else self._flat_spans(self._params[fqn], kind)

    def _flat_spans(self, p: _Param, kind: str) -> list[Span]:
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
            if loc.dtype != "float32" or src_off + hi - lo > loc.numel:
                raise SourceFormatError(
                    f"{loc.path}: {kind} partition of group {p.group} is "
                    f"{loc.dtype}[{loc.numel}], param {p.name!r} needs float32 "
                    f"up to {src_off + hi - lo}"
                )
            spans.append(Span(loc.path, loc.offset + 4 * src_off, 4 * lo, 4 * hi))
        return spans

    def _load_meta(self, path: str) -> Any:
        check_byteorder(path)
        return load_pt(path, meta=True)

    def _pread(self, path: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``offset`` (one place for reads)."""
        self._files.pread(path, offset, view)

    def close(self) -> None:
        for r in getattr(self, "_ranks", ()):
            r.close()
        self._files.close()

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
