"""DeepSpeed checkpoints of a ``PipelineModule`` engine (pipeline parallel, PP >= 1).

Layout (DeepSpeed 0.19: ``deepspeed/runtime/pipe/module.py``, ``runtime/engine.py``,
``runtime/pipe/topology.py``; ``checkpoint/deepspeed_checkpoint.py`` reads the same):

- Module weights live in per-layer files ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``
  (``PipelineModule.save_state_dict``: one file per layer that has a ``state_dict``,
  written by data-parallel rank 0; ``idx`` is the *global* layer index, the
  ``model_{tp:02d}`` part is the topology's rank string without the data and pipe axes,
  absent with ``PipeDataParallelTopology``). Each holds ``layer.state_dict()``: names
  relative to the layer. A ``TiedLayerSpec`` layer holds its tied module's state dict
  (one file per occurrence without ``forward_fn``; the same weights).
- ``mp_rank_{mp:02d}_model_states.pt`` per model-parallel rank: ``module`` is None,
  ``param_shapes`` lists that stage's parameters by their ``PipelineModule`` names.
- ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``: the stage's ZeRO-1/2 flat
  partitions, exactly as without pipelining (ZeRO-3 cannot be combined with PP).
- The model-parallel rank of (stage ``s``, TP rank ``t``) is ``s * tp + t``: DeepSpeed's
  ``PipelineParallelGrid.get_model_parallel_rank`` is the position of the process among
  the ranks of its data-parallel index, in ``pipe, data, model`` axis order (what
  ``ds_to_universal``'s ``meg_2d_parallel_map.simple_init`` assumes too). PP and TP come
  from ``checkpoint_parallel_dimensions`` where DeepSpeed records it, else TP is the
  number of ``model_XX`` indices of the layer files.

Names: a ``PipelineModule``'s own parameter names, which ``param_shapes`` and
``ds_to_universal`` use: ``{idx}.{name}`` for a layer's tensors (the global layer index, so
no stage renumbering) and ``tied_modules.{key}.{name}`` for a tied module's. A layer
file is a tied module's when ``param_shapes`` names no parameter of its layer index and
the file holds every parameter of exactly one tied key (with its shape). A tied module's
tensors appear in several stages (and layer files); the first stage's copy is read,
as ``ds_to_universal`` does (DeepSpeed all-reduces tied gradients: the copies agree).

Each stage's optimizer tensors are read by a
:class:`~ckptd.converters.sources.deepspeed.DeepSpeedSource` of its mp rank; the layer
files by byte ranges (meta-device unpickling gives each tensor's offset). With TP > 1
each TP rank's tensors (all stages) are local shards, assembled by
:class:`~ckptd.converters.sources.deepspeed_mp.MPAssembly` with a reshard spec (default
``deepspeed_megatron``), as for TP without pipelining.

Without ``param_shapes`` (no ZeRO optimizer) only the layer files are read, every tensor
named ``{idx}.{name}`` (tied modules cannot be told apart then).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptd.converters.sources.base import PlanError, SourceFormatError, TensorInfo, raw_bytes
from ckptd.converters.sources.deepspeed import DeepSpeedSource
from ckptd.converters.sources.deepspeed_files import (
    FileReader,
    Loc,
    check_byteorder,
    load_pt,
    locate,
)
from ckptd.converters.sources.torchfile import is_tensor
from ckptd.dtypes import dtype_name, torch_dtype

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

LAYER_RE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
TIED = "tied_modules."
Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerFiles:
    """The layer files of a tag directory: ``(layer idx, tp rank) -> path``."""

    dir: str
    paths: dict[tuple[int, int], str]
    model_axis: bool  # names carry ``-model_{tp:02d}`` (PipeModelDataParallelTopology)

    def name(self, idx: int, tp: int) -> str:
        """The file name DeepSpeed gives layer ``idx`` of TP rank ``tp`` (``ckpt_layer_path``)."""
        return (
            f"layer_{idx:02d}-model_{tp:02d}-model_states.pt"
            if self.model_axis
            else (f"layer_{idx:02d}-model_states.pt")
        )

    def tp_ranks(self) -> list[int]:
        """The TP ranks that have layer files."""
        return sorted({t for _, t in self.paths})


def layer_files(d: str) -> LayerFiles:
    """Index the ``layer_*-model_states.pt`` files of ``d``."""
    paths: dict[tuple[int, int], str] = {}
    axes: set[bool] = set()
    for f in sorted(os.listdir(d)):
        m = LAYER_RE.match(f)
        if m is None:
            if f.startswith("layer_") and f.endswith("-model_states.pt"):
                raise SourceFormatError(
                    f"{os.path.join(d, f)}: a layer file named with topology axes other than "
                    "model (layer_NN[-model_TT]-model_states.pt is read)"
                )
            continue
        axes.add(m.group(2) is not None)
        paths[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(d, f)
    if len(axes) > 1:
        raise SourceFormatError(f"{d}: layer files both with and without a model_XX part")
    return LayerFiles(d, paths, axes == {True})


@dataclass(frozen=True)
class _LayerTensor:
    """A model tensor in a layer file: ``key`` of ``path``; ``loc`` None if strided."""

    path: str
    key: str
    loc: Loc | None


@dataclass(frozen=True)
class _Param:
    """A parameter of ``param_shapes``: its shape and the first stage that lists it."""

    shape: Shape
    stage: int


class PipeTPRank:
    """TP rank ``tp`` of every stage: its model tensors (``model.<name>``, from its layer
    files) and optimizer tensors (``optim.state.<name>.<kind>``, from its stages'
    partitions); local shards when TP > 1 (the :class:`MPAssembly` rank reader)."""

    def __init__(self, files: LayerFiles, tp: int, stages: Sequence[DeepSpeedSource]) -> None:
        """Index (metadata only); ``stages[s]`` reads mp rank ``s * TP + tp``."""
        self.dir, self.tp, self.stages = files.dir, tp, list(stages)
        self.infos: dict[str, TensorInfo] = {}
        self._skipped: list[str] = []
        self._model: dict[str, _LayerTensor] = {}
        self._optim: dict[str, DeepSpeedSource] = {}  # name -> the stage reader holding it
        self._files = FileReader()
        params = self._params()
        by_layer: dict[int, dict[str, Shape]] = {}
        tied: dict[str, dict[str, Shape]] = {}
        for name, p in params.items():
            if name.startswith(TIED):
                key, _, local = name.removeprefix(TIED).partition(".")
                tied.setdefault(key, {})[local] = p.shape
                continue
            head, _, local = name.partition(".")
            if not head.isdigit() or not local:
                raise SourceFormatError(
                    f"{self.stages[p.stage].model_file}: param {name!r} is not a PipelineModule "
                    "name ({layer}.{name} or tied_modules.{key}.{name})"
                )
            by_layer.setdefault(int(head), {})[local] = p.shape
        for (idx, t), path in sorted(files.paths.items()):
            if t == tp:
                self._index_layer(idx, path, idx in by_layer, tied)
        for name, p in params.items():
            self._check_param(name, p, files)
        for st in self.stages:
            for info in st.tensors():
                # a tied param's state is in every stage that holds it: the first's is read
                if info.name.startswith("optim.") and info.name not in self.infos:
                    self.infos[info.name] = info
                    self._optim[info.name] = st

    def _params(self) -> dict[str, _Param]:
        """Every stage's ``param_shapes``; a name in several stages (tied) agrees on shape."""
        out: dict[str, _Param] = {}
        for s, st in enumerate(self.stages):
            for name, shape in st.param_shapes().items():
                prev = out.setdefault(name, _Param(shape, s))
                if prev.shape != shape:
                    raise SourceFormatError(
                        f"{st.model_file}: param {name!r} is {list(shape)} here, "
                        f"{list(prev.shape)} in {self.stages[prev.stage].model_file}"
                    )
        return out

    def _index_layer(
        self, idx: int, path: str, has_params: bool, tied: Mapping[str, Mapping[str, Shape]]
    ) -> None:
        """List the tensors of layer file ``path`` under their PipelineModule names."""
        check_byteorder(path)
        sd = load_pt(path, meta=True)
        if not isinstance(sd, dict):
            raise SourceFormatError(f"{path}: holds {type(sd).__name__}, not a layer state dict")
        prefix = f"{idx}."
        if not has_params:  # a tied module's occurrence, a layer without params, or a buffer layer
            keys = [
                k for k, ps in tied.items()
                if all(is_tensor(sd.get(n)) and tuple(sd[n].shape) == s
                       for n, s in ps.items())
            ]  # fmt: skip
            if len(keys) > 1:
                raise SourceFormatError(
                    f"{path}: layer {idx} matches the tied modules {keys} alike; cannot name it"
                )
            if keys:
                prefix = f"{TIED}{keys[0]}."
        size = os.path.getsize(path)
        for k, v in sd.items():
            name = prefix + str(k)
            if not is_tensor(v):
                self._skipped.append(f"model.{name}")
                continue
            if f"model.{name}" in self.infos:
                continue  # a later occurrence of a tied module: the first file's is read
            loc = locate(path, v, size, f"tensor {k!r}") if v.is_contiguous() else None
            self._model[f"model.{name}"] = _LayerTensor(path, str(k), loc)
            self.infos[f"model.{name}"] = TensorInfo(
                f"model.{name}", dtype_name(v.dtype), tuple(v.shape)
            )

    def _check_param(self, name: str, p: _Param, files: LayerFiles) -> None:
        """Every parameter of ``param_shapes`` has its tensor in a layer file."""
        where = self.stages[p.stage].model_file
        info = self.infos.get(f"model.{name}")
        if info is None and name.startswith(TIED):
            raise SourceFormatError(
                f"{where}: param {name!r}: no layer file of TP rank {self.tp} holds tied module "
                f"{name.removeprefix(TIED).split('.')[0]!r} with all its params"
            )
        if info is None:
            idx, _, local = name.partition(".")
            fname = files.name(int(idx), self.tp)
            if (int(idx), self.tp) not in files.paths:
                raise SourceFormatError(
                    f"{os.path.join(self.dir, fname)}: missing; it holds param {name!r} "
                    f"(listed in {os.path.basename(where)})"
                )
            raise SourceFormatError(
                f"{os.path.join(self.dir, fname)}: no tensor {local!r} (param {name!r}, "
                f"listed in {os.path.basename(where)})"
            )
        if info.shape != p.shape:
            raise SourceFormatError(
                f"{self._model[info.name].path}: param {name!r} is {list(info.shape)}, "
                f"{os.path.basename(where)} lists {list(p.shape)}"
            )

    def skipped(self) -> list[str]:
        """Non-tensor entries of the layer files."""
        return list(self._skipped)

    def tensors(self) -> list[TensorInfo]:
        """Model tensors (layer order), then optimizer tensors (stage order)."""
        return list(self.infos.values())

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (local to this TP rank)."""
        import torch

        st = self._optim.get(name)
        if st is not None:
            return st.read(name)
        lt, info = self._model[name], self.infos[name]
        if lt.loc is None:  # a strided view (rare): read through a mapping
            obj = load_pt(lt.path)
            try:
                return obj[lt.key].clone()
            finally:
                del obj
        t = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        self._files.pread(lt.path, lt.loc.offset, raw_bytes(t))
        return t

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + out.nbytes)`` of ``name``'s raw data into ``out``."""
        st = self._optim.get(name)
        if st is not None:
            st.read_range(name, start, out)
            return
        lt, info = self._model[name], self.infos[name]
        end = start + out.nbytes
        if not 0 <= start <= end <= info.nbytes:
            raise PlanError(f"byte range [{start}, {end}) outside tensor {name!r}")
        if lt.loc is None:
            out[:] = raw_bytes(self.read(name))[start:end]
        else:
            self._files.pread(lt.path, lt.loc.offset + start, out)

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """``posix_fadvise(WILLNEED)`` on the bytes asked for next (a hint)."""
        st = self._optim.get(name)
        if st is not None:
            st.prefetch(name, start, nbytes)
            return
        lt = self._model[name]
        if lt.loc is not None:
            self._files.advise(lt.path, lt.loc.offset + start, nbytes)

    def fingerprint(self) -> str:
        """No layout beyond the files (their sizes and times are the source's fingerprint)."""
        return f"pipe-tp{self.tp}"

    def close(self) -> None:
        """Close the layer files (the stage readers are closed by their owner)."""
        self._files.close()


def _degrees(d: str, stages: Sequence[DeepSpeedSource], files: LayerFiles) -> tuple[int, int]:
    """(PP, TP) of the checkpoint in ``d`` with ``len(stages)`` mp ranks."""
    n = len(stages)
    dims = stages[0].parallel_dims
    if isinstance(dims, dict) and "pp_degree" in dims and "tp_degree" in dims:
        pp, tp = int(dims["pp_degree"]), int(dims["tp_degree"])
    else:  # older DeepSpeed: TP from the layer files (ds_to_universal counts layer_01-*)
        tp = len(files.tp_ranks()) or 1
        pp = n // tp
    if pp * tp != n or pp < 1:
        raise SourceFormatError(
            f"{d}: {n} mp_rank_XX_model_states.pt files for PP={pp} x TP={tp} "
            "(mp rank = stage * TP + tp rank)"
        )
    if files.paths and files.tp_ranks() != list(range(tp)):
        raise SourceFormatError(
            f"{d}: layer files for TP ranks {files.tp_ranks()}, expected 0..{tp - 1}"
        )
    for idx in sorted({i for i, _ in files.paths}):
        for t in range(tp):
            if (idx, t) not in files.paths:
                raise SourceFormatError(
                    f"{os.path.join(d, files.name(idx, t))}: missing (layer {idx} has files "
                    "for other TP ranks)"
                )
    return pp, tp


class PipeAssembly:
    """Canonical tensors of a PipelineModule checkpoint (see the module docstring)."""

    def __init__(
        self,
        d: str,
        stages: Sequence[DeepSpeedSource],
        variables: Mapping[str, int],
        spec: str | None,
    ) -> None:
        """``stages[m]`` reads mp rank ``m`` of tag directory ``d``; ``variables``/``spec``:
        the TP layout when TP > 1 (as for :class:`MPAssembly`)."""
        files = layer_files(d)
        self.pp, self.tp = _degrees(d, stages, files)
        zero: set[tuple[int, int]] = {(s.stage, s.dp) for s in stages if s.optim_files}
        if len(zero) > 1:
            raise SourceFormatError(f"{d}: stages differ in ZeRO stage and DP size: {zero}")
        self.stage, self.dp = zero.pop() if zero else (0, 0)  # no optimizer files: (0, 0)
        if self.stage == 3:
            raise SourceFormatError(f"{d}: ZeRO-3 with pipeline layer files (DeepSpeed has none)")
        self.ranks = [
            PipeTPRank(files, t, [stages[s * self.tp + t] for s in range(self.pp)])
            for t in range(self.tp)
        ]
        self._mp: Any = None
        if self.tp > 1:
            from ckptd.converters.sources.deepspeed_mp import MPAssembly

            labels = [
                f"TP rank {t} ("
                + ", ".join(f"mp_rank_{s * self.tp + t:02d}" for s in range(self.pp))
                + ")"
                for t in range(self.tp)
            ]
            self._mp = MPAssembly(self.ranks, spec, variables, labels)
            self.infos: dict[str, TensorInfo] = dict(self._mp.infos)
        else:
            self.infos = dict(self.ranks[0].infos)

    def skipped(self) -> list[str]:
        """Non-tensor entries of the layer files (first TP rank's)."""
        return self.ranks[0].skipped()

    def read(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name``."""
        return self._mp.read(name) if self._mp is not None else self.ranks[0].read(name)

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Bytes of ``name`` (file ranges at TP=1, the boxes under them at TP > 1)."""
        if self._mp is not None:
            self._mp.read_range(name, start, out)
        else:
            self.ranks[0].read_range(name, start, out)

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        """Read-ahead hint for the bytes asked for next."""
        if self._mp is None:
            self.ranks[0].prefetch(name, start, nbytes)

    def fingerprint(self) -> str:
        """What the assembly depends on besides the files."""
        layout = f"|{self._mp.fingerprint()}" if self._mp is not None else ""
        return f"pipe:pp={self.pp},tp={self.tp}{layout}"

    def close(self) -> None:
        """Close the layer files."""
        for r in self.ranks:
            r.close()
