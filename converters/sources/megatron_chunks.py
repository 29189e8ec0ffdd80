"""Model chunks of Megatron legacy rank files: virtual (interleaved) pipeline parallelism.

With ``--num-layers-per-virtual-pipeline-stage`` or ``--num-virtual-stages-per-pipeline-rank``
(the interleaved 1F1B schedule, "VPP"), each pipeline rank builds ``vpp`` model chunks,
and Megatron-LM's ``generate_state_dict`` (``megatron/training/checkpointing.py``) saves
them as ``model0`` .. ``model{vpp-1}`` instead of ``model`` (``state_dict['model%d' % i]``
when ``len(model) > 1``). Chunk ``v`` of pipeline rank ``p`` holds the global layers from
``(v * pp + p) * L / (pp * vpp)`` (Megatron-Core ``get_transformer_layer_offset``:
``vp_stage * L / vpp + pp_rank * L / (pp * vpp)``); the embedding is on chunk 0 of
pipeline rank 0, the output layer and final norm on the last chunk of the last rank.
That is plain pipeline parallelism over ``pp * vpp`` stages, chunk ``v`` of rank ``p``
being stage ``v * pp + p`` (:func:`virtual_stage`), so the reshard spec is compiled per
chunk with ``pp = pp * vpp`` and that stage as the ``pp`` coordinate.

Inside the converters one rank file's tensors are keyed by chunk-qualified keys:
``model{v}.<local key>`` (what :func:`~.megatron.flatten_model` makes of the chunk's
entry) and ``optim.state.model{v}.<local key>.<kind>`` for its optimizer state. With one
chunk (``model``) the keys are the local keys themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptd.converters.sources.base import SourceFormatError
from ckptd.converters.sources.megatron_optim import PREFIX

MODEL = "model"
_CHUNK = re.compile(r"^model(\d+)$")
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def chunk_keys(obj: Mapping[Any, Any], path: str) -> list[str]:
    """The state-dict keys holding a rank file's model: ``["model"]``, or ``["model0",
    ..., "model{N-1}"]`` (N >= 2) for a virtual-pipeline run.

    Raises :class:`SourceFormatError` naming ``path`` for a file with neither, with both,
    with a chunk missing from the sequence, or with a single ``model0`` (Megatron writes
    ``model`` when a rank has one chunk, so a lone ``model0`` means the rest is lost).
    """
    found = sorted(int(m.group(1)) for k in obj if isinstance(k, str) and (m := _CHUNK.match(k)))
    if MODEL in obj:
        if found:
            raise SourceFormatError(
                f"{path}: holds both 'model' and model chunks {[f'model{i}' for i in found]}; "
                "Megatron writes one or the other"
            )
        if not isinstance(obj[MODEL], Mapping):
            raise SourceFormatError(f"{path}: 'model' is a {type(obj[MODEL]).__name__}, "
                                    "not a state dict")  # fmt: skip
        return [MODEL]
    if not found:
        raise SourceFormatError(f"{path}: no 'model' state dict (not a Megatron rank file)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing or len(found) < 2:
        gone = [f"model{i}" for i in missing] or [f"model{max(found) + 1}"]
        raise SourceFormatError(
            f"{path}: model chunks {[f'model{i}' for i in found]} lack {gone}; a virtual-"
            "pipeline rank file holds model0 .. model{N-1} with N >= 2 (one chunk is saved "
            "as 'model'): the file is incomplete"
        )
    keys = [f"model{i}" for i in found]
    for k in keys:
        if not isinstance(obj[k], Mapping):
            raise SourceFormatError(f"{path}: {k!r} is a {type(obj[k]).__name__}, "
                                    "not a state dict")  # fmt: skip
    return keys


def rank_model(obj: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A rank file's model entries, flattened; with model chunks, every chunk's under its
    qualified keys ``model{v}.<local key>`` in chunk order (Megatron's parameter order)."""
    keys = chunk_keys(obj, path)
    if keys == ["model"]:
        return flatten_model(obj["model"])
    return flatten_model({k: obj[k] for k in keys})


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


def chunk_prefix(chunk: int, vpp: int) -> str:
    """The qualifier of chunk ``chunk``'s keys: ``model{chunk}.``, or ``""`` without VPP."""
    return f"{MODEL}{chunk}." if vpp > 1 else ""


def virtual_stage(chunk: int, pp_rank: int, pp: int) -> int:
    """The plain-pipeline stage equivalent to chunk ``chunk`` of pipeline rank ``pp_rank``."""
    return chunk * pp + pp_rank


def qualify(key: str, prefix: str) -> str:
    """A chunk-local model key or ``optim.state.<key>.<kind>`` name, qualified by ``prefix``."""
    if key.startswith(PREFIX):
        return PREFIX + prefix + key[len(PREFIX) :]
    return prefix + key


def unqualify(key: str, prefix: str) -> str | None:
    """The inverse of :func:`qualify`; None for a key of another chunk."""
    if key.startswith(PREFIX + prefix):
        return PREFIX + key[len(PREFIX + prefix) :]
    if key.startswith(prefix) and not key.startswith(PREFIX):
        return key[len(prefix) :]
    return None


@dataclass(frozen=True)
class ChunkKeys:
    """One chunk's share of a rank file's (qualified) tensors, under local keys."""

    chunk: int
    tensors: dict[str, Any]  # local key -> tensor (model and optimizer state)
    param_of: dict[str, str]  # local optimizer key -> local parameter key
    qualified: dict[str, str]  # local key -> the rank file's qualified key


def split_chunks(
    flat: Mapping[str, Any], param_of: Mapping[str, str], vpp: int
) -> list[ChunkKeys]:
    """``flat`` (qualified keys of one rank file) cut into its ``vpp`` chunks.

    An optimizer entry goes with its parameter's chunk (``param_of``); every key lands
    in exactly one chunk (the chunk prefixes ``model{v}.`` are disjoint)."""
    out = []
    for v in range(vpp):
        prefix = chunk_prefix(v, vpp)
        tensors: dict[str, Any] = {}
        local_param_of: dict[str, str] = {}
        qualified: dict[str, str] = {}
        for k, t in flat.items():
            owner = param_of.get(k, k)
            if unqualify(owner, prefix) is None:
                continue
            local = unqualify(k, prefix)
            if local is None:  # an optimizer name not under its parameter's chunk
                raise SourceFormatError(f"optimizer entry {k!r} is not under {prefix!r}")
            tensors[local] = t
            qualified[local] = k
            if k in param_of:
                local_param_of[local] = unqualify(param_of[k], prefix) or param_of[k]
        out.append(ChunkKeys(v, tensors, local_param_of, qualified))
    return out


def check_chunk_layers(
    chunks: list[ChunkKeys], layers: int, pp: int, vpp: int, path: str
) -> None:
    """``layers`` divide over the ``pp * vpp`` virtual stages, and no chunk of rank file
    ``path`` holds a local layer beyond its share (which would land on the next stage's
    layers once renumbered)."""
    stages = pp * vpp
    if layers % stages:
        raise SourceFormatError(
            f"{path}: {layers} layers do not divide over pp={pp} x vpp={vpp} = {stages} "
            "virtual pipeline stages (Megatron's interleaved schedule gives each model "
            "chunk layers / (pp * vpp) layers)"
        )
    per = layers // stages
    for c in chunks:
        local = {int(m.group(1)) for k in c.tensors if (m := _LOCAL_LAYER.match(k))}
        if local and max(local) >= per:
            raise SourceFormatError(
                f"{path}: model chunk {c.chunk} holds local layer {max(local)}, but "
                f"{layers} layers over pp={pp} x vpp={vpp} give {per} per chunk "
                "(pass the right --var layers=N)"
            )
