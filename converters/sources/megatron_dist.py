"""Megatron-core ``torch_dist`` checkpoints (``--ckpt-format torch_dist``) as a source.

Layout on disk (Megatron-core ``dist_checkpointing``)::

    ROOT/latest_checkpointed_iteration.txt     # "100"
    ROOT/iter_0000100/metadata.json            # {"sharded_backend": "torch_dist", ...}
    ROOT/iter_0000100/.metadata                # PyTorch DCP metadata
    ROOT/iter_0000100/__0_0.distcp ...         # PyTorch DCP data, one file per writer
    ROOT/iter_0000100/common.pt                # non-sharded state: args, iteration, ...

The tensors are *global* (Megatron-core ``ShardedTensor`` s): tensor parallelism is
already undone, and a tensor's shape does not depend on the TP/PP/DP sizes of the run
that wrote it. What remains is Megatron-core's own form, which this source turns into
the canonical tensors the legacy :mod:`megatron` source gives (so both convert a model
to the same universal checkpoint):

- *Stacked layers*: a homogeneous ``TransformerBlock`` saves each per-layer tensor once,
  under a key without the layer number (``decoder.layers.mlp.linear_fc2.weight``) and
  with a leading axis of size ``num_layers`` (the global layer index). Such a key is
  unstacked into ``decoder.layers.{i}.mlp.linear_fc2.weight``; keys that already carry
  a layer number (non-homogeneous blocks) are taken as they are.
- *Megatron's fused layouts*: the global ``linear_qkv`` is the TP-rank tensors
  concatenated, i.e. per query group ``[q heads; k head; v head]``; the embedding and
  output layer keep the vocabulary padding. These are laid out by the shipped
  ``megatron_llama`` spec (or ``spec``) compiled for ``tp=1, pp=1``: the torch_dist
  global tensors are what a TP1xPP1 legacy rank file holds, with ``vocab_multiple`` set
  to the padded vocabulary rows found in the checkpoint. SwiGLU ``linear_fc1`` is saved
  by Megatron-core as ``[gate; up]`` over the whole FFN, the canonical order already.
- *Optimizer state* in model space (``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.
  <param key>``, written by the non-distributed optimizer and by the distributed one
  with ``fully_sharded_model_space``) follows its parameter and is given as
  ``optim.state.<canonical name>.{exp_avg,exp_avg_sq,fp32}``. Megatron-core's
  "flattened" form of the distributed optimizer (global shape ``(*fragments,
  chunk_numel)``) is recognised and put back into the parameter's shape. Other
  ``optimizer.*`` tensors (the ``dp_reshardable`` bucket form) cannot be mapped to
  parameters without the live model and are listed as skipped.

Reads go through DCP one box at a time: one layer of a stacked tensor, never the
whole stack, with ``.metadata`` unpickled once (DCP's ``.metadata`` is a pickle that DCP
itself unpickles: convert only checkpoints you trust). ``common.pt`` is read only with
``torch.load(weights_only=True)`` (``argparse.Namespace``, a plain attribute bag,
allowed); when that refuses it, the file is listed as skipped and the model variables
must come from ``--var`` or the shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import warnings
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
)
from ckptd.converters.sources.dcp import METADATA_NAME, _reader_class
from ckptd.converters.sources.megatron import DEFAULT_SPEC, _locate, resolve_variables
from ckptd.converters.spec.errors import SpecError
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import Piece
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

MCORE_METADATA = markers.MCORE_METADATA
COMMON = "common.pt"
BACKEND = markers.MCORE_BACKEND
STACK_PREFIX = "decoder.layers."
OPTIM_PREFIX = "optimizer.state."
# Megatron-core optimizer state key -> the universal suffix (DeepSpeed source's names).
OPTIM_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "fp32_param": "fp32"}
_LAYER_NUM = re.compile(r"^\d+\.")
# common.pt ``args`` attribute -> spec variable (first found wins per variable).
_ARGS_VARS = (
    ("num_attention_heads", "heads"),
    ("num_query_groups", "kv_heads"),
    ("kv_channels", "head_dim"),
    ("hidden_size", "hidden"),
    ("ffn_hidden_size", "ffn"),
    ("num_layers", "layers"),
    ("vocab_size", "vocab"),
)


class MegatronDistFormatError(SourceFormatError):
    """``metadata.json`` is missing, malformed or names another sharded backend."""


def read_mcore_metadata(iter_dir: str) -> dict[str, Any]:
    """The parsed ``metadata.json`` of a dist_checkpointing directory; must be torch_dist."""
    path = os.path.join(iter_dir, MCORE_METADATA)
    if not os.path.isfile(path):
        raise MegatronDistFormatError(
            f"{path}: missing (not a Megatron-core dist_checkpointing directory)"
        )
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise MegatronDistFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "sharded_backend" not in doc:
        raise MegatronDistFormatError(f"{path}: no 'sharded_backend' key")
    if doc["sharded_backend"] != BACKEND:
        raise MegatronDistFormatError(
            f"{path}: sharded_backend {doc['sharded_backend']!r} is not supported "
            f"(only {BACKEND!r}; zarr checkpoints: convert them with Megatron first)"
        )
    return doc


@dataclass(frozen=True)
class _Virtual:
    """A virtual TP1xPP1 rank-file tensor: ``box`` of DCP entry ``fqn`` (leading ``layer``
    axis dropped when stacked), possibly in Megatron's flattened-fragments form."""

    fqn: str
    layer: int | None  # index on the stacked axis, None: whole entry
    shape: tuple[int, ...]  # the virtual tensor's shape
    frags: tuple[int, ...] | None = None  # flattened form: fragments per parameter axis


class MegatronDistSource(InventorySource):
    """A Megatron-core ``torch_dist`` checkpoint, unstacked and laid out canonically."""

    format = "megatron_dist"

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
            raise SourceFormatError(
                f"the megatron_dist source reads local directories only: {path!r}"
            )
        self.root, self.iter_dir, iteration = _locate(path.removeprefix("file://"), step)
        self.mcore_metadata = read_mcore_metadata(self.iter_dir)
        if not os.path.isfile(os.path.join(self.iter_dir, METADATA_NAME)):
            raise SourceNotFoundError(f"{self.iter_dir}: no DCP {METADATA_NAME}")
        self._iteration = iteration
        self.spec_name = spec or DEFAULT_SPEC
        common_vars = self._read_common()
        self._reader = _reader_class()(self.iter_dir)
        self._virtual: dict[str, _Virtual] = {}
        self._holders: dict[str, tuple[str, tuple[Piece, ...]]] = {}
        dcp_md = self._dcp_entries()
        explicit = resolve_variables(variables, self.root)
        derived = _derive_variables(self._virtual, {**common_vars, **explicit})
        self.variables = {**derived, **common_vars, **explicit}
        self._inventory(dcp_md)

    # ------------------------------------------------------------------ metadata
    @classmethod
    def detect(cls, path: str) -> bool:
        return markers.is_megatron_dist(path)

    @property
    def step(self) -> int | None:
        return self._iteration

    def _read_common(self) -> dict[str, int]:
        """Iteration and model variables from ``common.pt`` (weights-only; optional)."""
        path = os.path.join(self.iter_dir, COMMON)
        if not os.path.isfile(path):
            return {}
        import argparse

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
            if not refused:  # a damaged file, not a refused class
                raise SourceFormatError(
                    f"{path}: cannot be read as a weights-only torch file "
                    f"({str(e).splitlines()[0] if str(e) else 'UnpicklingError'})"
                ) from None
            # a class weights_only refuses (never unpickled): take variables elsewhere
            self._skipped.append(f"{COMMON} (not read with weights_only=True: {refused[0]})")
            return {}
        except Exception as e:
            raise SourceFormatError(
                f"{path}: cannot be read as a weights-only torch file "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if not isinstance(obj, dict):
            raise SourceFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
        it = obj.get("iteration")
        if self._iteration is None and isinstance(it, int):
            self._iteration = it
        found: dict[str, int] = {}
        args = obj.get("args")
        if args is not None:
            for attr, var in _ARGS_VARS:
                v = getattr(args, attr, None)
                if isinstance(v, int) and not isinstance(v, bool) and var not in found:
                    found[var] = v
            if not getattr(args, "group_query_attention", True) and "heads" in found:
                found["kv_heads"] = found["heads"]
        self._skipped.extend(f"{COMMON}:{k}" for k in obj if k != "iteration")
        return found

    def _dcp_entries(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Virtual keys from DCP's metadata; returns {fqn: (dtype, shape)} of tensors."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = self._reader.read_metadata()
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        for fqn, item in md.state_dict_metadata.items():
            if isinstance(item, TensorStorageMetadata):
                entries[fqn] = (dtype_name(item.properties.dtype), tuple(int(s) for s in item.size))
            else:
                self._skipped.append(fqn)
        layers = _stack_depth(entries)
        params = {k: v for k, v in entries.items() if not k.startswith("optimizer.")}
        for fqn, (_, shape) in params.items():
            if ".mlp.experts.experts." in fqn or ".mlp.experts.linear_fc" in fqn:
                raise SourceFormatError(
                    f"{self.iter_dir}: {fqn!r}: expert-parallel (MoE) torch_dist checkpoints "
                    "are not read yet"
                )
            for key, v in _unstack(fqn, shape, layers, None):
                self._virtual[key] = v
        for fqn, (_, shape) in entries.items():
            if not fqn.startswith("optimizer."):
                continue
            kind, pkey = _optim_parts(fqn)
            if kind is None or pkey not in params:
                self._skipped.append(fqn)
                continue
            pshape = params[pkey][1]
            frags = None
            if shape != pshape:
                frags = _flattened_frags(shape, pshape)
                if frags is None:
                    raise SourceFormatError(
                        f"{self.iter_dir}: optimizer tensor {fqn!r} has shape {list(shape)}, "
                        f"its parameter {list(pshape)} (neither the same nor Megatron's "
                        "flattened form)"
                    )
            for key, v in _unstack(pkey, pshape, layers, frags, fqn):
                self._virtual[f"optim.state.{key}.{OPTIM_KINDS[kind]}"] = v
        return entries

    def _inventory(self, entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        param_of: dict[str, str] = {}
        for key, v in self._virtual.items():
            dtype = entries[v.fqn][0]
            tensors[key] = torch.empty(v.shape, dtype=torch_dtype(dtype), device="meta")
            if key.startswith("optim.state."):
                param_of[key] = key.removeprefix("optim.state.").rsplit(".", 1)[0]
        param_keys = [k for k in tensors if k not in param_of]
        shapes = {k: tuple(tensors[k].shape) for k in tensors}
        variables = {**self.variables, "tp": 1, "pp": 1}
        from ckptd.converters.spec import compile_spec, load_shipped  # see spec/__init__

        try:
            spec = compile_spec(load_shipped(self.spec_name), variables, coords={"tp": 0, "pp": 0})
            layout = spec.layout_for(param_keys, {k: shapes[k] for k in param_keys})
            rl = build_rank_layout(FlatState(tensors=tensors, param_of=param_of), layout, 0)
        except (SpecError, LayoutError) as e:
            raise SourceFormatError(
                f"{self.iter_dir}: spec {self.spec_name!r} with variables {variables}: {e} "
                "(pass the model variables: --var heads=.. --var vocab=.. ...)"
            ) from None
        metas = rl.meta_by_name()
        for entry in rl.entries:
            names = {p.name for p in entry.pieces}
            for name in names:
                if name in self._holders:
                    raise SourceFormatError(f"{self.iter_dir}: {name!r} comes from two entries")
                pieces = tuple(p for p in entry.pieces if p.name == name)
                self._holders[name] = (entry.key, pieces)
                m = metas[name]
                self._infos[name] = TensorInfo(name, m.dtype, tuple(m.shape))
        for key in layout.dropped:
            self._skipped.append(key)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n in sorted(os.listdir(self.iter_dir)):
            st = os.stat(os.path.join(self.iter_dir, n))
            h.update(f"{n}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(json.dumps([self.spec_name, sorted(self.variables.items())]).encode())
        return "megatron_dist:" + h.hexdigest()

    # ---------------------------------------------------------------------- data
    def _read_virtual(self, key: str) -> torch.Tensor:
        v = self._virtual[key]
        dtype, full = self._dtype_shape(v.fqn)
        if v.layer is None:
            offsets, lengths = (0,) * len(full), full
        else:
            offsets, lengths = (v.layer,) + (0,) * (len(full) - 1), (1, *full[1:])
        out = torch.empty(lengths, dtype=torch_dtype(dtype))
        self._load_box(v.fqn, offsets, out)
        if v.frags is not None:
            pshape = (1, *v.shape) if v.layer is not None else v.shape
            frags = (1, *v.frags[1:]) if v.layer is not None else v.frags
            out = _unflatten(out, frags, pshape)
        return out.reshape(v.shape)

    def _dtype_shape(self, fqn: str) -> tuple[str, tuple[int, ...]]:
        item = self._reader.read_metadata().state_dict_metadata[fqn]
        return dtype_name(item.properties.dtype), tuple(int(s) for s in item.size)

    def _load_box(self, fqn: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        import torch.distributed.checkpoint as dcp

        planner = _box_planner(fqn, offsets, tuple(out.shape))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group" and deprecation notes
            dcp.load({fqn: out}, storage_reader=self._reader, planner=planner, no_dist=True)

    def read(self, name: str) -> torch.Tensor:
        info = self._infos.get(name)
        if info is None:
            raise KeyError(name)
        key, pieces = self._holders[name]
        local = self._read_virtual(key)
        if dtype_name(local.dtype) != info.dtype:
            raise SourceFormatError(f"{self.iter_dir}: {key!r} changed dtype since planning")
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        covered = 0
        for p in pieces:
            out[p.global_box.slices()].copy_(piece_view(local, p))
            covered += p.global_box.numel
        if covered != out.numel():
            raise SourceFormatError(
                f"{self.iter_dir}: tensor {name!r}: {key!r} covers {covered} of {out.numel()}"
            )
        return out


# -------------------------------------------------------------------- helpers


def _stack_depth(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> int | None:
    """``num_layers``: the leading axis every stacked ``decoder.layers.X`` key shares."""
    depths = {
        shape[0]
        for fqn, (_, shape) in entries.items()
        if fqn.startswith(STACK_PREFIX) and not _LAYER_NUM.match(fqn[len(STACK_PREFIX) :]) and shape
    }
    if len(depths) > 1:
        raise SourceFormatError(
            f"stacked decoder.layers.* tensors disagree on num_layers: {depths}"
        )
    return depths.pop() if depths else None


def _unstack(
    pkey: str,
    pshape: tuple[int, ...],
    layers: int | None,
    frags: tuple[int, ...] | None,
    fqn: str | None = None,
) -> list[tuple[str, _Virtual]]:
    """Per-layer virtual tensors of parameter key ``pkey`` (stored as ``fqn``)."""
    fqn = fqn or pkey
    rest = pkey[len(STACK_PREFIX) :] if pkey.startswith(STACK_PREFIX) else None
    if rest is None or _LAYER_NUM.match(rest) or layers is None:
        return [(pkey, _Virtual(fqn, None, pshape, frags))]
    if not frags and len(pshape) < 1:
        raise SourceFormatError(f"{fqn!r}: a stacked tensor without a layer axis")
    if frags is not None and frags[0] != layers:
        raise SourceFormatError(f"{fqn!r}: flattened optimizer state not split per layer")
    return [
        (f"{STACK_PREFIX}{i}.{rest}", _Virtual(fqn, i, pshape[1:], frags)) for i in range(layers)
    ]


def _optim_parts(fqn: str) -> tuple[str | None, str]:
    if not fqn.startswith(OPTIM_PREFIX):
        return None, fqn
    kind, _, pkey = fqn[len(OPTIM_PREFIX) :].partition(".")
    return (kind if kind in OPTIM_KINDS else None), pkey


def _flattened_frags(shape: tuple[int, ...], pshape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Fragments per axis if ``shape`` is Megatron's ``(*fragments, local_numel)`` form."""
    if len(shape) != len(pshape) + 1:
        return None
    frags = shape[:-1]
    if any(f <= 0 or p % f for f, p in zip(frags, pshape, strict=True)):
        return None
    if math.prod(p // f for f, p in zip(frags, pshape, strict=True)) != shape[-1]:
        return None
    return tuple(frags)


def _unflatten(x: torch.Tensor, frags: tuple[int, ...], full: tuple[int, ...]) -> torch.Tensor:
    """``(*frags, n)`` (each fragment's local chunk flattened) back to ``full``."""
    local = [s // f for s, f in zip(full, frags, strict=True)]
    k = len(frags)
    y = x.reshape(*frags, *local)
    perm = [j for i in range(k) for j in (i, k + i)]
    return y.permute(perm).reshape(full)


def _derive_variables(virtual: Mapping[str, _Virtual], known: Mapping[str, int]) -> dict[str, int]:
    """Variables the shapes tell: hidden, layers, ffn, head_dim/kv_heads (given heads),
    and ``vocab_multiple`` = the padded vocabulary rows (the padding is kept as found)."""
    out: dict[str, int] = {}

    def shape(key: str) -> tuple[int, ...] | None:
        v = virtual.get(key)
        return v.shape if v is not None else None

    emb = shape("embedding.word_embeddings.weight") or shape("output_layer.weight")
    if emb is not None and len(emb) == 2:
        out["hidden"] = emb[1]
        out["vocab_multiple"] = emb[0]
    layer_ids = {
        int(k.split(".")[2])
        for k in virtual
        if k.startswith(STACK_PREFIX) and k.split(".")[2].isdigit()
    }
    if layer_ids:
        out["layers"] = max(layer_ids) + 1
    fc1 = shape("decoder.layers.0.mlp.linear_fc1.weight")
    if fc1 is not None and fc1[0] % 2 == 0:
        out["ffn"] = fc1[0] // 2
    proj = shape("decoder.layers.0.self_attention.linear_proj.weight")
    qkv = shape("decoder.layers.0.self_attention.linear_qkv.weight")
    heads = known.get("heads")
    if heads and proj is not None and proj[1] % heads == 0:
        head_dim = known.get("head_dim") or proj[1] // heads
        out["head_dim"] = head_dim
        if qkv is not None and (qkv[0] // head_dim - heads) % 2 == 0:
            out["kv_heads"] = (qkv[0] // head_dim - heads) // 2
    return out


def _box_planner(fqn: str, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> Any:
    """A DCP load planner that reads only box (``offsets``, ``lengths``) of ``fqn``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BoxLoadPlanner(DefaultLoadPlanner):  # type: ignore[misc]
        def create_local_plan(self) -> LoadPlan:
            md = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(lengths))
            return LoadPlan(create_read_items_for_chunk_list(fqn, md, [chunk]))

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return self.state_dict[index.fqn]  # the box itself; read items are box-relative

    return BoxLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
