"""Checkpoint sources of ``ckpt-convert``: detection by markers, and a registry.

A new source format (DeepSpeed, Megatron) is a :class:`Source` subclass registered in
:data:`FORMATS` with its module, class name and marker check (``markers.is_<format>``);
detection asks every marker check, in registry order, without importing any reader;
:data:`SOURCES` imports a format's module the first time its class is looked up, so a
conversion loads only the reader it uses (fsspec's ``known_implementations`` works so).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module

from ckptd.converters.sources import markers
from ckptd.converters.sources.base import (
    FormatDetectionError,
    Source,
    SourceNotFoundError,
    TensorInfo,
)


@dataclass(frozen=True)
class Format:
    """A registered source format: where its class lives, and how to recognize it."""

    module: str
    cls: str
    detect: Callable[[str], bool]

    def load(self) -> type[Source]:
        """The source class (imports its module)."""
        cls: type[Source] = getattr(import_module(self.module), self.cls)
        return cls


_PKG = __name__
FORMATS: dict[str, Format] = {
    "universal": Format(f"{_PKG}.universal", "UniversalSource", markers.is_universal),
    "hf": Format(f"{_PKG}.hf", "HFSource", markers.is_hf),
    "dcp": Format(f"{_PKG}.dcp", "DCPSource", markers.is_dcp),
    "deepspeed": Format(f"{_PKG}.deepspeed", "DeepSpeedSource", markers.is_deepspeed),
    "megatron": Format(f"{_PKG}.megatron", "MegatronSource", markers.is_megatron),
    "megatron_dist": Format(
        f"{_PKG}.megatron_dist", "MegatronDistSource", markers.is_megatron_dist
    ),
}


class _Registry(Mapping[str, type[Source]]):
    """Format name -> source class, imported on first lookup."""

    def __getitem__(self, name: str) -> type[Source]:
        return FORMATS[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(FORMATS)

    def __len__(self) -> int:
        return len(FORMATS)

    def __contains__(self, name: object) -> bool:
        return name in FORMATS  # without importing the class


SOURCES: Mapping[str, type[Source]] = _Registry()
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
    if fmt not in FORMATS:
        raise FormatDetectionError(f"unknown format {name!r}; known: {sorted(FORMATS)}")
    return fmt


def detect_source(path: str) -> str:
    """The format of the checkpoint at ``path``, told from its markers."""
    remote = "://" in path and not path.startswith("file://")
    if not remote and not os.path.exists(path.removeprefix("file://")):
        raise SourceNotFoundError(f"source {path!r} does not exist")
    found = [name for name, fmt in FORMATS.items() if fmt.detect(path)]
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


__all__ = [
    "FORMATS",
    "SOURCES",
    "Format",
    "Source",
    "TensorInfo",
    "canonical_format",
    "detect_source",
    "open_source",
]
