"""Megatron legacy per-rank checkpoints as a ``ckpt-convert`` source.

Layout on disk (Megatron-LM ``--ckpt-format torch``)::

    ROOT/latest_checkpointed_iteration.txt          # "1000" (or "release")
    ROOT/iter_0001000/mp_rank_00/model_optim_rng.pt          # pp == 1
    ROOT/iter_0001000/mp_rank_01_003/model_optim_rng.pt      # tp rank 1, pp stage 3

Each file holds ``{"model": {local key: local tensor}, "iteration": N, ...}``. Files are
read only with ``torch.load(weights_only=True, mmap=True)``; a file that does not load
that way is a :class:`SourceFormatError` naming it (no fallback, nothing unpickled).

TP/PP come from the directory names. The model variables (``heads``, ``kv_heads``,
``head_dim``, ``hidden``, ``ffn``, ``vocab``, ``layers``) that the reshard spec needs come,
first found wins, from the ``variables`` argument (``--var heads=8 --var kv_heads=2``)
and the sidecar
``ckptd_megatron.json`` (``{"variables": {...}}``, written by the Megatron target).
Each rank's local keys are laid out with the shipped spec (``megatron_llama`` unless
``spec`` says otherwise) compiled for the rank's coordinates; a canonical tensor is
assembled from the pieces of only the ranks that hold it, one tensor at a time, with at
most a few rank files mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    InventorySource,
    SourceFormatError,
    SourceNotFoundError,
    TensorInfo,
    read_range_by_boxes,
)
from ckptd.converters.spec.errors import SpecError
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import Box, Piece, RankLayout
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

LATEST = markers.MEGATRON_LATEST
RANK_FILE = "model_optim_rng.pt"
SIDECAR = "ckptd_megatron.json"
DEFAULT_SPEC = "megatron_llama"
_RANK_DIR = markers.MEGATRON_RANK_DIR
_ITER_DIR = markers.MEGATRON_ITER_DIR
MAX_OPEN = 8  # rank files kept mapped at once (one TP group of a stage, up to this)


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """``mp_rank_TT`` (pp == 1) or ``mp_rank_TT_PPP``."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def resolve_variables(explicit: Mapping[str, int] | None, root: str | None) -> dict[str, int]:
    """Model variables: the sidecar the target wrote, overridden by ``explicit`` (``--var``)."""
    found: dict[str, int] = {}
    side = os.path.join(root, SIDECAR) if root is not None else ""
    if side and os.path.isfile(side):
        try:
            with open(side) as f:
                obj = json.load(f)
            found = {str(k): int(v) for k, v in obj.get("variables", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise SourceFormatError(f"{side}: malformed sidecar: {e}") from None
    return {**found, **dict(explicit or {})}


def load_rank_file(path: str) -> dict[str, Any]:
    """``torch.load(weights_only=True, mmap=True)``; any failure names the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # every failure becomes one typed error
        raise SourceFormatError(
            f"{path}: cannot be read as a weights-only torch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise SourceFormatError(f"{path}: no 'model' state dict (not a Megatron rank file)")
    return obj


def flatten_model(model: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts joined with ``.``; leaves kept as they are."""
    out: dict[str, Any] = {}
    for k, v in model.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_model(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class _Rank:
    tp: int
    pp: int
    path: str


class MegatronSource(InventorySource):
    """Megatron legacy ``mp_rank_*`` checkpoints, assembled into canonical tensors."""

    format = "megatron"

    def __init__(
        self,
        path: str,
        step: int | None,
        workers: int,
        *,
        variables: Mapping[str, int] | None = None,
        spec: str | None = None,
    ) -> None:
        super().__init__(path, step, workers)
        if "://" in path and not path.startswith("file://"):
            raise SourceFormatError(f"the megatron source reads local directories only: {path!r}")
        self.root, self.iter_dir, self._iteration = _locate(path.removeprefix("file://"), step)
        self.variables = resolve_variables(variables, self.root)
        self.spec_name = spec or DEFAULT_SPEC
        self.ranks = _scan_ranks(self.iter_dir)
        self.tp = max(r.tp for r in self.ranks) + 1
        self.pp = max(r.pp for r in self.ranks) + 1
        if len(self.ranks) != self.tp * self.pp:
            raise SourceFormatError(
                f"{self.iter_dir}: {len(self.ranks)} rank directories, expected "
                f"tp={self.tp} x pp={self.pp}"
            )
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._max_open = max(1, min(self.tp, MAX_OPEN))
        self._layouts: list[RankLayout] = []
        self._policies: list[Mapping[str, str]] = []
        self._holders: dict[str, list[tuple[int, str, tuple[Piece, ...]]]] = {}
        self._inventory()

    # ------------------------------------------------------------------ metadata
    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_megatron(path)

    @property
    def step(self) -> int | None:
        return self._iteration

    def _spec_for(self, tp_rank: int, pp_rank: int) -> Any:
        from ckptd.converters.spec import compile_spec, load_shipped  # see spec/__init__

        variables = {**self.variables, "tp": self.tp, "pp": self.pp}
        try:
            return compile_spec(
                load_shipped(self.spec_name), variables, coords={"tp": tp_rank, "pp": pp_rank}
            )
        except SpecError as e:
            raise SourceFormatError(
                f"{self.iter_dir}: spec {self.spec_name!r} with variables {variables}: {e} "
                f"(pass the model variables: --var heads=.. --var kv_heads=.. ...)"
            ) from None

    def _inventory(self) -> None:
        metas: dict[str, Any] = {}
        for idx, rank in enumerate(self.ranks):
            obj = load_rank_file(rank.path)
            flat = flatten_model(obj["model"])
            del obj
            tensors = {}
            for k, v in flat.items():
                if isinstance(v, torch.Tensor):
                    tensors[k] = torch.empty(v.shape, dtype=v.dtype, device="meta")
                elif rank.tp == 0:
                    self._skipped.append(f"{os.path.relpath(rank.path, self.root)}:{k}")
            del flat
            shapes = {k: tuple(t.shape) for k, t in tensors.items()}
            spec = self._spec_for(rank.tp, rank.pp)
            try:
                layout = spec.layout_for(list(tensors), shapes)
                rl = build_rank_layout(FlatState(tensors=tensors), layout, idx)
            except (SpecError, LayoutError) as e:
                raise SourceFormatError(f"{rank.path}: {e}") from None
            self._layouts.append(rl)
            self._policies.append(dict(layout.policies))
            for m in rl.tensors:
                prev = metas.setdefault(m.name, m)
                if prev != m:
                    raise SourceFormatError(
                        f"{rank.path}: tensor {m.name!r} is {m.dtype}{list(m.shape)} here, "
                        f"{prev.dtype}{list(prev.shape)} on another rank"
                    )
            for entry in rl.entries:
                for pc in entry.pieces:
                    self._holders.setdefault(pc.name, []).append((idx, entry.key, (pc,)))
        for name, m in metas.items():
            self._infos[name] = TensorInfo(name, m.dtype, tuple(m.shape))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.ranks:
            st = os.stat(r.path)
            h.update(f"{r.path}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(json.dumps([self.spec_name, sorted(self.variables.items())]).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------------- data
    def _rank_model(self, idx: int) -> dict[str, Any]:
        if idx in self._open:
            self._open.move_to_end(idx)
            return self._open[idx]
        while len(self._open) >= self._max_open:
            self._open.popitem(last=False)
        model = flatten_model(load_rank_file(self.ranks[idx].path)["model"])
        self._open[idx] = model
        return model

    def read(self, name: str) -> torch.Tensor:
        info = self._infos.get(name)
        if info is None:
            raise KeyError(name)
        return self._read_box(info, Box.whole(info.shape))

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Only the boxes of the range's flat elements, from the ranks that hold them."""
        info = self._infos[name]
        read_range_by_boxes(info, lambda box: self._read_box(info, box), start, out)

    def _read_box(self, info: TensorInfo, box: Box) -> torch.Tensor:
        """Region ``box`` of the canonical tensor, assembled from the rank pieces over it."""
        name = info.name
        out = torch.empty(box.lengths, dtype=torch_dtype(info.dtype))
        seen: dict[tuple[Any, ...], str] = {}
        covered = 0
        for idx, key, pieces in self._holders[name]:
            path = self.ranks[idx].path
            overlaps: list[tuple[Piece, Box]] = []
            for p in pieces:
                inter = p.global_box.intersect(box)
                if inter is not None:
                    overlaps.append((p, inter))
            if not overlaps:
                continue  # this rank holds no part of the region: its file is not opened
            local = self._rank_model(idx).get(key)
            if not isinstance(local, torch.Tensor):
                raise SourceFormatError(f"{path}: tensor {key!r} missing on re-read")
            if dtype_name(local.dtype) != info.dtype:
                raise SourceFormatError(f"{path}: tensor {key!r} changed dtype since planning")
            policy = self._policies[idx].get(key) or "check_equal"
            for p, inter in overlaps:
                region = (inter.offsets, inter.lengths)
                src = piece_view(local, p)[inter.shift(p.global_box.offsets, -1).slices()]
                dst = out[inter.shift(box.offsets, -1).slices()]
                if region in seen:
                    if policy == "check_equal" and not torch.equal(dst, src):
                        raise SourceFormatError(
                            f"{path}: replica {key!r} of tensor {name!r} differs from the "
                            f"one in {seen[region]} (replicate policy check_equal)"
                        )
                    continue  # take_first (average is not supported: first replica kept)
                seen[region] = path
                dst.copy_(src)
                covered += inter.numel
        if covered != box.numel:
            raise SourceFormatError(
                f"{self.iter_dir}: tensor {name!r}: rank files cover {covered} of "
                f"{box.numel} elements of {box}"
            )
        return out

    def close(self) -> None:
        self._open.clear()


def _locate(path: str, step: int | None) -> tuple[str, str, int | None]:
    """(root, iteration directory, iteration) for a root or an ``iter_*`` directory."""
    if not os.path.isdir(path):
        raise SourceNotFoundError(f"source {path!r} does not exist")
    base = os.path.basename(os.path.normpath(path))
    if _ITER_DIR.match(base) or (base == "release" and step is None):
        it = None if base == "release" else int(base[5:])
        return os.path.dirname(os.path.normpath(path)), path, it
    if step is not None:
        d = os.path.join(path, iter_dir_name(step))
        if not os.path.isdir(d):
            raise SourceNotFoundError(f"{path}: no iteration {step} ({d} missing)")
        return path, d, step
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            text = f.read().strip()
        if text == "release":
            return path, os.path.join(path, "release"), None
        if not text.isdigit():
            raise SourceFormatError(f"{latest}: expected an iteration number, got {text!r}")
        d = os.path.join(path, iter_dir_name(int(text)))
        if not os.path.isdir(d):
            raise SourceNotFoundError(f"{latest} names iteration {text} but {d} is missing")
        return path, d, int(text)
    iters = sorted(n for n in os.listdir(path) if _ITER_DIR.match(n))
    if not iters:
        raise SourceNotFoundError(f"{path}: no {LATEST} and no iter_XXXXXXX directory")
    return path, os.path.join(path, iters[-1]), int(iters[-1][5:])


def _scan_ranks(iter_dir: str) -> list[_Rank]:
    ranks = []
    for n in sorted(os.listdir(iter_dir)):
        m = _RANK_DIR.match(n)
        if not m:
            if n.startswith("mp_rank_"):
                raise SourceFormatError(
                    f"{os.path.join(iter_dir, n)}: unsupported rank directory (expert-parallel "
                    "mp_rank_TT_PPP_EEE layouts are not read yet)"
                )
            continue
        f = os.path.join(iter_dir, n, RANK_FILE)
        if not os.path.isfile(f):
            raise SourceFormatError(f"{os.path.join(iter_dir, n)}: no {RANK_FILE}")
        ranks.append(_Rank(int(m.group(1)), int(m.group(2) or 0), f))
    if not ranks:
        raise SourceNotFoundError(f"{iter_dir}: no mp_rank_* directories")
    ranks.sort(key=lambda r: (r.pp, r.tp))
    return ranks
