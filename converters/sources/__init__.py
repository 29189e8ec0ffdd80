"""Checkpoint sources of ``ckpt-convert``: detection by markers, and a registry.

A new source format (DeepSpeed, Megatron) is a :class:`Source` subclass registered in
:data:`SOURCES`; detection asks each class's ``detect`` in registry order.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

from ckptd.converters.sources.base import (
    FormatDetectionError,
    Source,
    SourceNotFoundError,
    TensorInfo,
)
from ckptd.converters.sources.dcp import DCPSource
from ckptd.converters.sources.deepspeed import DeepSpeedSource
from ckptd.converters.sources.hf import HFSource
from ckptd.converters.sources.megatron import MegatronSource
from ckptd.converters.sources.megatron_dist import MegatronDistSource
from ckptd.converters.sources.universal import UniversalSource

SOURCES: dict[str, type[Source]] = {
    "universal": UniversalSource,
    "hf": HFSource,
    "dcp": DCPSource,
    "deepspeed": DeepSpeedSource,
    "megatron": MegatronSource,
    "megatron_dist": MegatronDistSource,
}
# A format whose markers include another's: when both detect, the refinement wins
# (a torch_dist directory is a DCP directory, under a Megatron root).
REFINES = {"megatron_dist": ("dcp", "megatron")}
ALIASES = {
    "safetensors": "hf",
    "huggingface": "hf",
    "torch-dcp": "dcp",
    "torch_dist": "megatron_dist",
}


def canonical_format(name: str) -> str:
    """``safetensors`` -> ``hf``; raises ``FormatDetectionError`` on an unknown name."""
    fmt = ALIASES.get(name, name)
    if fmt not in SOURCES:
        raise FormatDetectionError(f"unknown format {name!r}; known: {sorted(SOURCES)}")
    return fmt


def detect_source(path: str) -> str:
    """The format of the checkpoint at ``path``, told from its markers."""
    remote = "://" in path and not path.startswith("file://")
    if not remote and not os.path.exists(path.removeprefix("file://")):
        raise SourceNotFoundError(f"source {path!r} does not exist")
    found = [name for name, cls in SOURCES.items() if cls.detect(path)]
    found = [f for f in found if not any(f in REFINES.get(o, ()) for o in found)]
    if not found:
        raise FormatDetectionError(
            f"cannot tell the format of {path!r} (no .metadata, *.safetensors, or committed "
            "step found); pass --from"
        )
    if len(found) > 1:
        raise FormatDetectionError(f"{path!r} looks like several formats {found}; pass --from")
    return found[0]


def open_source(
    path: str,
    fmt: str | None = None,
    step: int | None = None,
    workers: int = 4,
    variables: Sequence[tuple[str, int]] = (),
    spec: str | None = None,
) -> Source:
    """Open ``path`` as format ``fmt`` (detected when ``None``).

    ``variables``/``spec`` go to spec-driven source formats (Megatron); for other
    sources they are meant for the target and not passed.
    """
    fmt = detect_source(path) if fmt is None else canonical_format(fmt)
    remote = "://" in path and not path.startswith("file://")
    if not remote and not os.path.exists(path.removeprefix("file://")):
        raise SourceNotFoundError(f"source {path!r} does not exist")
    cls = SOURCES[fmt]
    extra: dict[str, object] = {}
    if variables:
        extra["variables"] = dict(variables)
    if spec:
        extra["spec"] = spec
    accepted = inspect.signature(cls.__init__).parameters
    return cls(path, step, workers, **{k: v for k, v in extra.items() if k in accepted})


__all__ = ["SOURCES", "Source", "TensorInfo", "canonical_format", "detect_source", "open_source"]
