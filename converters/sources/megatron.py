"""Megatron legacy per-rank checkpoints as a ``ckpt-convert`` source.

Layout on disk (Megatron-LM ``--ckpt-format torch``)::

    ROOT/latest_checkpointed_iteration.txt          # "1000" (or "release")
    ROOT/iter_0001000/mp_rank_00/model_optim_rng.pt          # pp == 1
    ROOT/iter_0001000/mp_rank_01_003/model_optim_rng.pt      # tp rank 1, pp stage 3
    ROOT/iter_0001000/mp_rank_01_003_001/model_optim_rng.pt  # ... expert-parallel rank 1

Each file holds ``{"model": {local key: local tensor}, "optimizer": ..., "iteration": N,
...}``, or with virtual pipeline parallelism (the interleaved schedule) ``"model0"`` ..
``"model{vpp-1}"`` instead of ``"model"``, one per model chunk, each numbering its layers
from 0 (see :mod:`.megatron_chunks`: chunk ``v`` of pipeline rank ``p`` is laid out as
stage ``v * pp + p`` of a ``pp * vpp``-stage pipeline). ``vpp`` is the number of chunks,
the same in every file; it is reported in :meth:`MegatronSource.source_state`.
Files are read only with ``torch.load(weights_only=True, mmap=True)`` (with
``argparse.Namespace``, Megatron's ``args``, and numpy arrays, its RNG state, allowed:
inert data holders); a file that does not load that way is a :class:`SourceFormatError`
naming it (no fallback).

TP/PP/EP come from the directory names (Megatron-LM's ``get_checkpoint_name``:
``mp_rank_TT``, then ``_PPP`` with pipeline parallelism, then ``_EEE`` with expert
parallelism). ``mp_rank_TT_XXX`` is a pipeline stage unless the sidecar, ``--var
ep=N`` or the files' ``args`` say the run was expert-parallel only.
Every EP rank holds the dense parameters too: those copies are checked equal.

Optimizer state (the non-distributed optimizer's, see :mod:`.megatron_optim`, or the
distributed optimizer's ``distrib_optim.pt`` next to the rank file, see
:mod:`.megatron_distopt`) is given as
``optim.state.<canonical param>.{fp32,exp_avg,exp_avg_sq,step}``, laid out like its
parameter; its param groups' hyperparameters and ``opt_param_scheduler`` are carried
as trainer state (``source_state``) so that a Megatron target can write them back.

Replicas of a ``replicate`` rule follow its policy: ``check_equal`` (default) fails on
a difference, ``take_first`` keeps the first rank's (lowest pp, ep, tp), ``average``
gives their mean, computed per region read (float64 sum, one rounding), so ranged reads
stay bounded. Other copies (dense tensors on every EP rank) are always compared.

The model variables (``heads``, ``kv_heads``,
``head_dim``, ``hidden``, ``ffn``, ``vocab``, ``layers``) that the reshard spec needs come,
first found wins, from the ``variables`` argument (``--var heads=8 --var kv_heads=2``)
and the sidecar
``ckptd_megatron.json`` (``{"variables": {...}}``, written by the Megatron target);
``experts``, ``moe_ffn`` and ``shared_ffn`` are derived from the expert tensors when not
given.
Each rank's local keys are laid out with the shipped spec (``megatron_llama`` unless
``spec`` says otherwise) compiled for the rank's coordinates; a canonical tensor is
assembled from the pieces of only the ranks that hold it, one tensor at a time, with at
most a few rank files mapped.
"""

from __future__ import annotations

import argparse
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
    SourceState,
    TensorInfo,
    read_range_by_boxes,
)
from ckptd.converters.sources.megatron_chunks import (
    ChunkKeys,
    check_chunk_layers,
    chunk_keys,
    chunk_prefix,
    rank_model,
    split_chunks,
    virtual_stage,
)
from ckptd.converters.sources.megatron_distopt import DistOptHints, parse_dist_optimizer
from ckptd.converters.sources.megatron_optim import parse_optimizer
from ckptd.converters.sources.megatron_vars import moe_variables
from ckptd.converters.spec.errors import SpecError
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import Box, Piece, RankLayout
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

LATEST = markers.MEGATRON_LATEST
RANK_FILE = "model_optim_rng.pt"
DIST_OPTIM_FILE = "distrib_optim.pt"
SIDECAR = "ckptd_megatron.json"
DEFAULT_SPEC = "megatron_llama"
_RANK_DIR = markers.MEGATRON_RANK_DIR
_ITER_DIR = markers.MEGATRON_ITER_DIR
MAX_OPEN = 8  # rank files kept mapped at once (one TP group of a stage, up to this)


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """``mp_rank_TT``, then ``_PPP`` if ``pp > 1``, then ``_EEE`` if ``ep > 1``."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def iter_dir_name(iteration: int | str) -> str:
    """``iter_0001000`` (or ``release``)."""
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_sidecar(root: str | None) -> dict[str, Any]:
    """The sidecar the Megatron target wrote (``{}`` if none)."""
    side = os.path.join(root, SIDECAR) if root is not None else ""
    if not side or not os.path.isfile(side):
        return {}
    try:
        with open(side) as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise TypeError("not a JSON object")
        obj["variables"] = {str(k): int(v) for k, v in obj.get("variables", {}).items()}
        return obj
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise SourceFormatError(f"{side}: malformed sidecar: {e}") from None


def resolve_variables(explicit: Mapping[str, int] | None, root: str | None) -> dict[str, int]:
    """Model variables: the sidecar the target wrote, overridden by ``explicit`` (``--var``)."""
    found = {str(k): int(v) for k, v in read_sidecar(root).get("variables", {}).items()}
    return {**found, **dict(explicit or {})}


def _safe_globals() -> list[Any]:
    """What Megatron pickles besides tensors and builtins, all inert data holders: its
    ``args`` (``argparse.Namespace``, an attribute bag) and the numpy RNG state in
    ``rng_state`` (an ``ndarray`` rebuilt from its dtype and bytes; the allowlist torch
    documents for numpy). Anything else (``__reduce__`` payloads) is still refused."""
    import numpy as np

    arr = np.zeros(1, dtype=np.uint32)
    reconstruct = arr.__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
    return [argparse.Namespace, np.ndarray, np.dtype, reconstruct, type(arr.dtype)]


_SAFE_GLOBALS = _safe_globals()


def spec_source(name: str) -> Any:
    """A shipped spec by name, or a ``.ckspec`` file (a path, or a name with a ``/``)."""
    from ckptd.converters.spec import load_shipped

    if name.endswith(".ckspec") and (os.sep in name or os.path.isfile(name)):
        return name
    return load_shipped(name)


def load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True, mmap=True)``; any failure names the file."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # every failure becomes one typed error
        raise SourceFormatError(
            f"{path}: cannot be read as a weights-only torch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_rank_file(path: str) -> dict[str, Any]:
    """A ``model_optim_rng.pt`` through :func:`load_torch_file`; it must hold a ``model``
    or the model chunks ``model0`` .. ``model{N-1}`` (:func:`.megatron_chunks.chunk_keys`)."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise SourceFormatError(f"{path}: no 'model' state dict (not a Megatron rank file)")
    chunk_keys(obj, path)
    return obj


@dataclass(frozen=True)
class _Rank:
    tp: int
    pp: int
    ep: int
    path: str

    @property
    def dist_optim_path(self) -> str:
        """Where the distributed optimizer's ``distrib_optim.pt`` of this rank would be."""
        return os.path.join(os.path.dirname(self.path), DIST_OPTIM_FILE)

    @property
    def has_dist_optim(self) -> bool:
        return os.path.isfile(self.dist_optim_path)


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
        side = read_sidecar(self.root)
        hint = {k: int(v) for k, v in side.items() if k in ("pp", "ep") and isinstance(v, int)}
        hint.update({k: int(v) for k, v in (variables or {}).items() if k in ("pp", "ep")})
        self.ranks = _scan_ranks(self.iter_dir, hint)
        self.tp = max(r.tp for r in self.ranks) + 1
        self.pp = max(r.pp for r in self.ranks) + 1
        self.ep = max(r.ep for r in self.ranks) + 1
        have = {(r.tp, r.pp, r.ep) for r in self.ranks}
        missing = [
            rank_dir_name(t, p, self.pp, e, self.ep)
            for p in range(self.pp) for e in range(self.ep) for t in range(self.tp)
            if (t, p, e) not in have
        ]  # fmt: skip
        if missing or len(self.ranks) != len(have):
            raise SourceFormatError(
                f"{self.iter_dir}: {len(self.ranks)} rank directories for tp={self.tp} x "
                f"pp={self.pp} x ep={self.ep}; missing {missing[:4]}"
            )
        self.vpp = 1  # model chunks per rank file (virtual pipeline), set by the first file
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._max_open = max(1, min(self.tp * self.ep, MAX_OPEN))
        self._policies: list[Mapping[str, str]] = []
        self._holders: dict[str, list[tuple[int, str, tuple[Piece, ...]]]] = {}
        self._stage_of: dict[str, tuple[int, int]] = {}  # layer tensor -> (stage, rank idx)
        self._state: dict[str, Any] = {}
        self._inventory()

    # ------------------------------------------------------------------ metadata
    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_megatron(path)

    @property
    def step(self) -> int | None:
        return self._iteration

    def _spec_for(self, rank: _Rank, chunk: int = 0) -> Any:
        """The spec compiled for ``rank``'s model chunk ``chunk``: with VPP, stage
        ``chunk * pp + rank.pp`` of a ``pp * vpp``-stage pipeline (module docstring)."""
        from ckptd.converters.spec import compile_spec  # see spec/__init__

        stages = self.pp * self.vpp
        variables = {**self.variables, "tp": self.tp, "pp": stages, "ep": self.ep}
        try:
            return compile_spec(
                spec_source(self.spec_name),
                variables,
                coords={"tp": rank.tp, "pp": virtual_stage(chunk, rank.pp, self.pp),
                        "ep": rank.ep},
            )  # fmt: skip
        except SpecError as e:
            raise SourceFormatError(
                f"{self.iter_dir}: spec {self.spec_name!r} with variables {variables}: {e} "
                f"(pass the model variables: --var heads=.. --var kv_heads=.. ...)"
            ) from None

    def _derive(self, flat: Mapping[str, Any]) -> None:
        """``experts``, ``moe_ffn``, ``shared_ffn`` from a rank's TP-sharded tensors
        (:mod:`.megatron_vars`) where not given; every rank is asked before its layout,
        so a first stage without MoE layers does not hide them."""
        shapes = {k: tuple(v.shape) for k, v in flat.items() if isinstance(v, torch.Tensor)}
        for k, v in moe_variables(shapes, tp=self.tp, ep=self.ep).items():
            self.variables.setdefault(k, v)

    def _local_tensors(self, idx: int, obj: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The rank's model entries plus its optimizer tensors (``optim.state.<key>.<kind>``,
        local keys), and the parsed optimizer (None without one)."""
        rank = self.ranks[idx]
        flat = rank_model(obj, rank.path)
        opt = obj.get("optimizer")
        if rank.has_dist_optim:
            # one DistributedDataParallel (its own buffers) per model chunk
            prefixes = [chunk_prefix(v, self.vpp) for v in range(self.vpp)]
            chunks = [{k: t for k, t in flat.items() if k.startswith(p)} for p in prefixes]
            hints = [DistOptHints.from_args(obj.get("args"), rank.pp, self.pp, self.ep,
                                            chunk=v, vpp=self.vpp)
                     for v in range(self.vpp)]  # fmt: skip
            parsed = parse_dist_optimizer(opt, load_torch_file(rank.dist_optim_path), chunks,
                                          path=rank.path, dist_path=rank.dist_optim_path,
                                          hints=hints)  # fmt: skip
            return {**flat, **parsed.tensors}, parsed
        if opt is None:
            return flat, None
        parsed = parse_optimizer(opt, flat, rank.path)
        return {**flat, **parsed.tensors}, parsed

    def _inventory(self) -> None:
        metas: dict[str, Any] = {}
        for idx, rank in enumerate(self.ranks):
            obj = load_rank_file(rank.path)
            self._count_chunks(idx, obj)
            self._derive(rank_model(obj, rank.path))
            if idx == 0:
                self._first_state(obj)
            flat, parsed = self._local_tensors(idx, obj)
            del obj
            if parsed is not None and idx == 0:
                self._skipped += parsed.skipped
                self._state["optimizer"] = {"param_groups": parsed.groups,
                                            "grad_scaler": parsed.grad_scaler}  # fmt: skip
            param_of = dict(parsed.param_of) if parsed is not None else {}
            tensors: dict[str, torch.Tensor] = {}
            for k, v in flat.items():
                if isinstance(v, torch.Tensor):
                    tensors[k] = torch.empty(v.shape, dtype=v.dtype, device="meta")
                elif idx == 0:
                    self._skipped.append(f"{os.path.relpath(rank.path, self.root)}:{k}")
            del flat
            try:
                chunks = split_chunks(tensors, param_of, self.vpp)
            except SourceFormatError as e:
                raise SourceFormatError(f"{rank.path}: {e}") from None
            if self.vpp > 1 and "layers" in self.variables:
                check_chunk_layers(chunks, self.variables["layers"], self.pp, self.vpp, rank.path)
            policies: dict[str, str] = {}
            for c in chunks:
                rl, chunk_policies = self._chunk_layout(idx, c)
                policies.update({c.qualified[k]: v for k, v in chunk_policies.items()})
                for m in rl.tensors:
                    prev = metas.setdefault(m.name, m)
                    if prev != m:
                        raise SourceFormatError(
                            f"{rank.path}: tensor {m.name!r} is {m.dtype}{list(m.shape)} "
                            f"here, {prev.dtype}{list(prev.shape)} on another rank"
                        )
                stage = virtual_stage(c.chunk, rank.pp, self.pp)
                for entry in rl.entries:
                    key = c.qualified[entry.key]  # the key in this rank's file
                    for pc in entry.pieces:
                        self._holders.setdefault(pc.name, []).append((idx, key, (pc,)))
                        self._check_one_stage(pc.name, idx, stage)
            self._policies.append(policies)
        for name, m in metas.items():
            self._infos[name] = TensorInfo(name, m.dtype, tuple(m.shape))

    def _count_chunks(self, idx: int, obj: Mapping[str, Any]) -> None:
        """The first file sets ``vpp`` (its number of model chunks); every other file
        must hold as many (Megatron builds the same chunks on every rank)."""
        rank = self.ranks[idx]
        keys = chunk_keys(obj, rank.path)
        if idx == 0:
            self.vpp = len(keys)
            if self.vpp > 1:
                self._state["vpp"] = self.vpp
        elif len(keys) != self.vpp:
            raise SourceFormatError(
                f"{rank.path}: {len(keys)} model chunk(s) ({', '.join(keys)}), but "
                f"{self.ranks[0].path} holds {self.vpp}; every rank of a virtual-pipeline "
                "run saves the same model0 .. model{N-1}"
            )

    def _chunk_layout(self, idx: int, c: ChunkKeys) -> tuple[RankLayout, dict[str, str]]:
        """Model chunk ``c`` of rank ``idx`` laid out by the spec for its (virtual)
        stage: the layout under local keys, and the replica policies by local key."""
        rank = self.ranks[idx]
        model_keys = [k for k in c.tensors if k not in c.param_of]
        shapes = {k: tuple(c.tensors[k].shape) for k in model_keys}
        spec = self._spec_for(rank, c.chunk)
        where = rank.path + (f" (model{c.chunk})" if self.vpp > 1 else "")
        try:
            layout = spec.layout_for(model_keys, shapes)
            flat = FlatState(tensors=c.tensors, param_of=c.param_of)
            rl = build_rank_layout(flat, layout, idx)
        except (SpecError, LayoutError) as e:
            raise SourceFormatError(f"{where}: {e}") from None
        policies = dict(layout.policies)
        # optimizer state of a replicated parameter follows the parameter's policy
        policies.update({o: policies[p] for o, p in c.param_of.items() if p in policies})
        return rl, policies

    def _check_one_stage(self, name: str, idx: int, stage: int) -> None:
        """A layer lives on one (virtual) pipeline stage; two stages holding it means the
        rank directories were misread (``mp_rank_TT_XXX`` taken as stages)."""
        if ".layers." not in name:
            return  # tied embeddings sit on the first and the last stage
        first, other_idx = self._stage_of.setdefault(name, (stage, idx))
        if first != stage:
            other = self.ranks[other_idx]
            raise SourceFormatError(
                f"{self.ranks[idx].path}: tensor {name!r} is also on pipeline stage "
                f"{first} ({other.path}); if the run was expert-parallel without "
                "pipeline stages (mp_rank_TT_EEE), pass --var ep=N --var pp=1"
            )

    def _first_state(self, obj: Mapping[str, Any]) -> None:
        """Trainer state a Megatron target writes back: iteration, LR schedule."""
        from ckptd.converters.sources.megatron_optim import _jsonable

        for key in ("iteration", "opt_param_scheduler", "checkpoint_version"):
            if key in obj and not isinstance(obj[key], torch.Tensor):
                self._state[key] = _jsonable(obj[key])

    def source_state(self) -> SourceState:
        """``{"megatron": {iteration, opt_param_scheduler, optimizer: {param_groups}}}``,
        plus ``vpp`` (model chunks per rank file) for a virtual-pipeline checkpoint."""
        return SourceState(state={"megatron": dict(self._state)}) if self._state else SourceState()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.ranks:
            for f in (r.path, r.dist_optim_path) if r.has_dist_optim else (r.path,):
                st = os.stat(f)
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(json.dumps([self.spec_name, sorted(self.variables.items())]).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------------- data
    def _rank_model(self, idx: int) -> dict[str, Any]:
        if idx in self._open:
            self._open.move_to_end(idx)
            return self._open[idx]
        while len(self._open) >= self._max_open:
            self._open.popitem(last=False)
        model, _ = self._local_tensors(idx, load_rank_file(self.ranks[idx].path))
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
        """Region ``box`` of the canonical tensor, assembled from the rank pieces over it.

        A region held by several ranks (replicas) follows the replicate policy:
        ``check_equal`` compares, ``take_first`` keeps the first, ``average`` sums the
        copies in float64 and rounds the mean once (memory: the region, never more)."""
        name = info.name
        out = torch.empty(box.lengths, dtype=torch_dtype(info.dtype))
        seen: dict[tuple[Any, ...], str] = {}
        sums: dict[tuple[Any, ...], tuple[torch.Tensor, int, str]] = {}
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
                if region not in seen:
                    seen[region] = path
                    dst.copy_(src)
                    covered += inter.numel
                elif policy == "check_equal":
                    if not torch.equal(dst, src):
                        raise SourceFormatError(
                            f"{path}: replica {key!r} of tensor {name!r} differs from the "
                            f"one in {seen[region]} (replicate policy check_equal)"
                        )
                elif policy == "average":
                    if not (local.is_floating_point() or local.is_complex()):
                        raise SourceFormatError(
                            f"{path}: tensor {name!r} ({info.dtype}) cannot be averaged "
                            "(replicate policy average needs a floating-point dtype)"
                        )
                    acc, n, _ = sums.get(region) or (dst.to(torch.float64), 1, path)
                    sums[region] = (acc.add_(src.to(torch.float64)), n + 1, path)
                # take_first: the first replica stays
        for region, (acc, n, _) in sums.items():
            offsets, lengths = region
            dst = out[Box(offsets, lengths).shift(box.offsets, -1).slices()]
            dst.copy_(acc.div_(n))  # one rounding to the tensor's dtype
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


def _scan_ranks(iter_dir: str, hint: Mapping[str, int]) -> list[_Rank]:
    """Rank directories; ``hint`` (``pp``/``ep`` sizes) tells ``mp_rank_TT_XXX`` apart."""
    found = []
    for n in sorted(os.listdir(iter_dir)):
        m = _RANK_DIR.match(n)
        if not m:
            if n.startswith("mp_rank_"):
                raise SourceFormatError(f"{os.path.join(iter_dir, n)}: unknown rank directory "
                                        "(expected mp_rank_TT[_PPP][_EEE])")  # fmt: skip
            continue
        f = os.path.join(iter_dir, n, RANK_FILE)
        if not os.path.isfile(f):
            raise SourceFormatError(f"{os.path.join(iter_dir, n)}: no {RANK_FILE}")
        found.append((m, f))
    if not found:
        raise SourceNotFoundError(f"{iter_dir}: no mp_rank_* directories")
    two = [m for m, _ in found if m.group(2) is not None and m.group(3) is None]
    # mp_rank_TT_XXX: a pipeline stage, unless the run is known to be expert-parallel only
    # (with both, Megatron writes mp_rank_TT_PPP_EEE)
    expert_only = bool(two) and hint.get("ep", 1) > 1 and hint.get("pp", 1) == 1
    if two and "pp" not in hint and "ep" not in hint:
        expert_only = _args_say_expert_only(found[0][1])
    ranks = []
    for m, f in found:
        t, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            ranks.append(_Rank(t, int(a), int(b), f))
        elif a is not None and expert_only:
            ranks.append(_Rank(t, 0, int(a), f))
        else:
            ranks.append(_Rank(t, int(a or 0), 0, f))
    ranks.sort(key=lambda r: (r.pp, r.ep, r.tp))
    return ranks


def _args_say_expert_only(path: str) -> bool:
    """Megatron's ``args`` in a rank file: pipeline size 1 and expert size > 1."""
    args = load_rank_file(path).get("args")
    pp = getattr(args, "pipeline_model_parallel_size", None)
    ep = getattr(args, "expert_model_parallel_size", None)
    return pp == 1 and isinstance(ep, int) and ep > 1
