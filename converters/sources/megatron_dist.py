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
- *Experts (MoE)*: ``SequentialMLP``, ``GroupedMLP`` and ``TEGroupedMLP`` all save
  ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` with an expert axis of
  ``num_experts`` after the layer axis (global expert = ``ep_rank * local_experts +
  local index``); ``singleton_local_shards`` saves one key per global expert
  (``...experts.experts.<g>.linear_fc1.weight_w``/``_v``: gate/up, joined here). Each
  expert becomes ``decoder.layers.{i}.mlp.experts.local_experts.{g}.<param>`` (global
  ``g``: the legacy source's names; the spec is compiled with ``ep=1``), the router
  ``mlp.router.weight`` is taken as it is. MoE layers interleaved with dense ones
  (``moe_layer_freq``) come with layer-numbered keys. A key under ``mlp.experts.`` of
  another form or shape, or experts that do not match the router's rows, is a
  :class:`~megatron_dist_keys.MoEKeyError` naming the key. The key forms are decided in
  :mod:`megatron_dist_keys`. Shared experts (``mlp.shared_experts.linear_fc{1,2}.weight``,
  ``gate_weight``) and the router's ``expert_bias`` are dense keys, read as such.
- *Optimizer state* in model space (``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.
  <param key>``, written by the non-distributed optimizer and by the distributed one
  with ``fully_sharded_model_space``) follows its parameter and is given as
  ``optim.state.<canonical name>.{exp_avg,exp_avg_sq,fp32}``. Megatron-core's
  "flattened" form of the distributed optimizer (global shape ``(*fragments,
  chunk_numel)``) is recognised and put back into the parameter's shape. Other
  ``optimizer.*`` tensors (the ``dp_reshardable`` bucket form) cannot be mapped to
  parameters without the live model and are listed as skipped.

Reads go through DCP one box at a time: one layer (and expert) of a stacked tensor,
never the whole stack, with ``.metadata`` unpickled once (DCP's ``.metadata`` is a pickle that DCP
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
from ckptd.converters.sources.megatron_dist_keys import (
    STACK_PREFIX,
    Part,
    Virtual,
    check_experts,
    expand,
    expert_index,
    flattened_frags,
    join_halves,
    stack_depth,
)
from ckptd.converters.spec.errors import SpecError
from ckptd.dtypes import dtype_name, torch_dtype
from ckptd.errors import LayoutError
from ckptd.execute import piece_view
from ckptd.fragments import Piece
from ckptd.layout import build_rank_layout
from ckptd.statedict import FlatState

MCORE_METADATA = markers.MCORE_METADATA
_DENSE_FC1 = re.compile(r"^decoder\.layers\.\d+\.mlp\.linear_fc1\.weight$")
_SHARED_FC1 = re.compile(r"^decoder\.layers\.\d+\.mlp\.shared_experts\.linear_fc1\.weight$")
COMMON = "common.pt"
BACKEND = markers.MCORE_BACKEND
OPTIM_PREFIX = "optimizer.state."
# Megatron-core optimizer state key -> the universal suffix (DeepSpeed source's names).
OPTIM_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "fp32_param": "fp32"}
# common.pt ``args`` attribute -> spec variable (first found wins per variable).
_ARGS_VARS = (
    ("num_attention_heads", "heads"),
    ("num_query_groups", "kv_heads"),
    ("kv_channels", "head_dim"),
    ("hidden_size", "hidden"),
    ("ffn_hidden_size", "ffn"),
    ("num_layers", "layers"),
    ("vocab_size", "vocab"),
    ("num_experts", "experts"),
    ("moe_ffn_hidden_size", "moe_ffn"),
    ("moe_shared_expert_intermediate_size", "shared_ffn"),
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
        self._virtual: dict[str, Virtual] = {}
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
                # a box no chunk covers would read as uninitialized memory: refuse up front
                # (e.g. a stacked key that only some layers wrote)
                written = sum(math.prod(c.sizes) for c in item.chunks)
                if written != math.prod(item.size):
                    raise SourceFormatError(
                        f"{self.iter_dir}: {fqn!r}: its chunks hold {written} of "
                        f"{math.prod(item.size)} elements of shape {list(item.size)} "
                        "(partly written; not read)"
                    )
            else:
                self._skipped.append(fqn)
        layers = stack_depth(entries)
        params = {k: v for k, v in entries.items() if not k.startswith("optimizer.")}
        found: dict[str, list[tuple[str | None, Part]]] = {}
        optim: list[tuple[str, str, str, tuple[int, ...] | None]] = []
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
                frags = flattened_frags(shape, pshape)
                if frags is None:
                    raise SourceFormatError(
                        f"{self.iter_dir}: optimizer tensor {fqn!r} has shape {list(shape)}, "
                        f"its parameter {list(pshape)} (neither the same nor Megatron's "
                        "flattened form)"
                    )
            optim.append((fqn, pkey, kind, frags))
        try:
            for fqn, (_, shape) in params.items():
                for key, half, part in expand(fqn, shape, layers):
                    found.setdefault(key, []).append((half, part))
            for fqn, pkey, kind, frags in optim:
                for key, half, part in expand(pkey, params[pkey][1], layers, frags, fqn):
                    found.setdefault(f"optim.state.{key}.{OPTIM_KINDS[kind]}", []).append(
                        (half, part)
                    )
            self._virtual = join_halves(found)
            check_experts(self._virtual)
        except SourceFormatError as e:
            raise type(e)(f"{self.iter_dir}: {e}") from None
        return entries

    def _inventory(self, entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        param_of: dict[str, str] = {}
        for key, v in self._virtual.items():
            dtype = entries[v.fqn][0]
            if any(entries[p.fqn][0] != dtype for p in v.parts):
                raise SourceFormatError(
                    f"{self.iter_dir}: {key!r}: the dtypes of {[p.fqn for p in v.parts]} differ"
                )
            tensors[key] = torch.empty(v.shape, dtype=torch_dtype(dtype), device="meta")
            if key.startswith("optim.state."):
                param_of[key] = key.removeprefix("optim.state.").rsplit(".", 1)[0]
        param_keys = [k for k in tensors if k not in param_of]
        shapes = {k: tuple(tensors[k].shape) for k in tensors}
        # one virtual rank holding every expert: ep=1, so experts keep their global index
        variables = {**self.variables, "tp": 1, "pp": 1, "ep": 1}
        from ckptd.converters.spec import compile_spec, load_shipped  # see spec/__init__

        try:
            coords = {"tp": 0, "pp": 0, "ep": 0}
            spec = compile_spec(load_shipped(self.spec_name), variables, coords=coords)
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
        """Virtual tensor ``key``: each part's box read from DCP, parts joined on dim 0."""
        v = self._virtual[key]
        out = []
        for part in v.parts:
            offsets, lengths = part.box()
            dtype = self._reader.read_metadata().state_dict_metadata[part.fqn].properties.dtype
            stored = torch.empty(lengths, dtype=dtype)
            self._load_box(part.fqn, offsets, stored)
            out.append(part.finish(stored))
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)

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


def _optim_parts(fqn: str) -> tuple[str | None, str]:
    if not fqn.startswith(OPTIM_PREFIX):
        return None, fqn
    kind, _, pkey = fqn[len(OPTIM_PREFIX) :].partition(".")
    return (kind if kind in OPTIM_KINDS else None), pkey


def _derive_variables(virtual: Mapping[str, Virtual], known: Mapping[str, int]) -> dict[str, int]:
    """Variables the shapes tell: hidden, layers, ffn, head_dim/kv_heads (given heads),
    ``vocab_multiple`` = the padded vocabulary rows (the padding is kept as found), and
    with experts ``experts`` and ``moe_ffn``, with shared experts ``shared_ffn``."""
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
    # the first dense MLP's fc1 (layer 0 may be an MoE layer when they interleave)
    fc1 = next((v.shape for k, v in sorted(virtual.items()) if _DENSE_FC1.match(k)), None)
    if fc1 is not None and fc1[0] % 2 == 0:
        out["ffn"] = fc1[0] // 2
    # shared experts (SharedExpertMLP): a gated fc1 of [gate; up], shared_ffn rows each
    shared = next((v.shape for k, v in sorted(virtual.items()) if _SHARED_FC1.match(k)), None)
    if shared is not None and shared[0] % 2 == 0:
        out["shared_ffn"] = shared[0] // 2
    experts: dict[str, set[int]] = {}
    for k, v in virtual.items():
        ix = expert_index(k)
        if ix is None or k.startswith("optim."):
            continue
        experts.setdefault(ix[0], set()).add(ix[1])
        if k.endswith(".linear_fc1.weight") and v.shape[0] % 2 == 0 and "moe_ffn" not in out:
            out["moe_ffn"] = v.shape[0] // 2
    if experts:
        out["experts"] = max(len(found) for found in experts.values())
        if "ffn" not in out and "ffn" not in known and "moe_ffn" in out:
            # every MLP is an MoE layer: no rule uses ffn, but the spec declares it
            out["ffn"] = out["moe_ffn"]
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
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BoxLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            # set_up_planner gave the metadata; fqn is a tensor entry (see _dcp_entries)
            assert self.metadata is not None
            md = self.metadata.state_dict_metadata[fqn]
            assert isinstance(md, TensorStorageMetadata), fqn
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(lengths))
            return LoadPlan(create_read_items_for_chunk_list(fqn, md, [chunk]))

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return self.state_dict[index.fqn]  # the box itself; read items are box-relative

    return BoxLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
