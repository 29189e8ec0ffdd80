"""Source: a DeepSpeed checkpoint (ZeRO 0/1/2/3, one model-parallel rank).

Layout (DeepSpeed's engine; ``deepspeed/utils/zero_to_fp32.py`` reads the same):
``DIR/latest`` names the tag, ``DIR/<tag>/`` holds ``mp_rank_00_model_states.pt``
(ZeRO 0/1/2) or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (ZeRO-3), and one
``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per data-parallel rank. SRC may be
``DIR`` or ``DIR/<tag>``; ``--step N`` picks the tag ``global_stepN``.

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

Safety and memory: every file is read with ``torch.load(weights_only=True, mmap=True)``
only (no fallback): a pickle that needs anything else (``__reduce__`` payloads) raises
:class:`UnsafePickleError`, a truncated or corrupt file :class:`SourceFormatError`, both
naming the file. Files are mapped, not read: a tensor read touches only its ranges, and
the mapping is dropped after each tensor, so memory stays about one tensor.
"""

from __future__ import annotations

import glob
import math
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.converters.sources.base import (
    InventorySource,
    SourceFormatError,
    SourceNotFoundError,
    TensorInfo,
    check_read,
)
from ckptd.dtypes import dtype_name

LATEST = "latest"
MODEL_GLOB = "*_model_states.pt"
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
OPTIM_KINDS = ("fp32", "exp_avg", "exp_avg_sq")


class UnsafePickleError(SourceFormatError):
    """A ``.pt`` file needs more than ``torch.load(weights_only=True)`` allows (never run)."""


def load_pt(path: str) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)``, errors typed and naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafePickleError(
            f"{path}: refused to unpickle (only weights_only=True loads are allowed; the file "
            f"holds objects other than tensors and containers): {first}"
        ) from e
    except Exception as e:  # truncated zip, bad magic, I/O: no other way to read it
        raise SourceFormatError(f"{path}: cannot read the torch file: {e}") from e


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

    def __init__(self, path: str, step: int | None = None, workers: int = 4) -> None:
        super().__init__(path, step, workers)
        root = path.removeprefix("file://")
        if not os.path.isdir(root):
            raise SourceNotFoundError(f"source {path!r} is not a directory")
        self.dir = _tag_dir(root, step)
        model_files = sorted(glob.glob(os.path.join(glob.escape(self.dir), MODEL_GLOB)))
        if not model_files:
            raise SourceNotFoundError(f"{self.dir}: no *_model_states.pt")
        if any(re.search(r"mp_rank_(?!00_)\d+", os.path.basename(f)) for f in model_files):
            raise SourceFormatError(
                f"{self.dir}: model-parallel DeepSpeed checkpoints (mp_rank_01...) are not "
                "supported by this source; convert through the Megatron-DeepSpeed spec"
            )
        self.model_file = next(
            (f for f in model_files if os.path.basename(f) == "mp_rank_00_model_states.pt"),
            model_files[0],
        )
        self.optim_files = self._optim_files()
        ms = load_pt(self.model_file)
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
        for k, v in module.items():
            if not isinstance(v, torch.Tensor):
                self._skipped.append(f"model.{k}")
            elif v.numel() == 0 and k in self._params:  # ZeRO-3 placeholder
                self._add(f"model.{k}", "float32", self._params[k].shape)
            else:
                self._add(f"model.{k}", dtype_name(v.dtype), tuple(v.shape))
        del module, ms
        for p in self._params.values():
            for kind in OPTIM_KINDS:
                self._add(f"optim.state.{p.name}.{kind}", "float32", p.shape)
            if self._steps[p.group] is not None:
                self._add(f"optim.state.{p.name}.step", "float32", ())

    def _add(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self._infos[name] = TensorInfo(name, dtype, shape)

    def _optim_files(self) -> list[str]:
        by_rank: dict[int, str] = {}
        for f in sorted(os.listdir(self.dir)):
            m = OPTIM_RE.match(f)
            if m and m.group(2) == "00":
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
            osd = _get(load_pt(f), "optimizer_state_dict", where=f)
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
            for kind in OPTIM_KINDS[1:]:
                got = [int(t.numel()) for t in self._kind_list(osd, kind, f)]
                if got != sizes[-1]:
                    raise SourceFormatError(f"{f}: {kind} partitions {got} != fp32 {sizes[-1]}")
            if r == 0:
                self._steps = [self._group_step(osd, g) for g in range(len(groups))]
        for g, group in enumerate(groups):
            # DeepSpeed's state_dict() saves the last rank's partitions without the
            # group's alignment padding (group_paddings): it may be shorter.
            per_rank = {s[g] for s in sizes[:-1]} or {sizes[-1][g]}
            if len(per_rank) != 1 or sizes[-1][g] > min(per_rank):
                raise SourceFormatError(
                    f"{self.dir}: group {g} partitions differ across ranks: "
                    f"{[s[g] for s in sizes]}"
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
        return None if s is None else float(s)

    @classmethod
    def detect(cls, path: str) -> bool:
        p = path.removeprefix("file://")
        if "://" in p or not os.path.isdir(p):
            return False
        if glob.glob(os.path.join(glob.escape(p), MODEL_GLOB)):
            return True
        latest = os.path.join(p, LATEST)
        if not os.path.isfile(latest):
            return False
        try:
            with open(latest, encoding="utf-8") as f:
                tag = f.read(4096).strip()
        except (OSError, UnicodeDecodeError):
            return False
        d = os.path.join(p, tag)
        return bool(tag) and bool(glob.glob(os.path.join(glob.escape(d), MODEL_GLOB)))

    @property
    def step(self) -> int | None:
        return int(self._ds_step) if isinstance(self._ds_step, int) else None

    def read(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if name.startswith("model."):
            fqn = name.removeprefix("model.")
            with self._mapped(self.model_file) as ms:
                t = ms["module"][fqn]
                t = None if t.numel() == 0 and fqn in self._params else t.clone()
            if t is None:
                t = self._read_flat(self._params[fqn], "fp32")
            return check_read(info, t, self.model_file)
        fqn, kind = name.removeprefix("optim.state.").rsplit(".", 1)
        p = self._params[fqn]
        if kind == "step":
            t = torch.tensor(self._steps[p.group], dtype=torch.float32)
        else:
            t = self._read_flat(p, kind)
        return check_read(info, t, self.optim_files[0])

    @contextmanager
    def _mapped(self, path: str) -> Iterator[Any]:
        obj = load_pt(path)
        try:
            yield obj
        finally:
            del obj

    def _read_flat(self, p: _Param, kind: str) -> torch.Tensor:
        """Assemble ``p``'s ``kind`` from the ranks that hold a part of it (only those)."""
        n = math.prod(p.shape)
        out = torch.empty(n, dtype=torch.float32)
        if self.stage == 3:
            pn = math.ceil(n / self.dp)
            spans = [(r, p.offset, r * pn, min(n, (r + 1) * pn)) for r in range(self.dp)]
        else:
            part = self._parts[p.group]
            spans = []
            for r in range(p.offset // part, (p.offset + n - 1) // part + 1 if n else 0):
                lo, hi = max(p.offset, r * part), min(p.offset + n, (r + 1) * part)
                spans.append((r, lo - r * part, lo - p.offset, hi - p.offset))
        for r, src_off, lo, hi in spans:
            if hi <= lo:
                continue
            f = self.optim_files[r]
            with self._mapped(f) as obj:
                osd = _get(obj, "optimizer_state_dict", where=f)
                flat = self._kind_list(osd, kind, f)[p.group]
                if flat.dtype != torch.float32 or src_off + hi - lo > flat.numel():
                    raise SourceFormatError(
                        f"{f}: {kind} partition of group {p.group} is {dtype_name(flat.dtype)}"
                        f"[{flat.numel()}], param {p.name!r} needs float32 up to "
                        f"{src_off + hi - lo}"
                    )
                out[lo:hi].copy_(flat[src_off : src_off + hi - lo])
                del flat, osd
        return out.view(p.shape)

    def fingerprint(self) -> str:
        files = [os.path.join(self.dir, f) for f in sorted(os.listdir(self.dir))]
        files = [f for f in files if f.endswith(".pt")]
        return "deepspeed:" + "|".join(
            f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in files
        )
