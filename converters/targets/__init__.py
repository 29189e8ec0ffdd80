"""Conversion targets of ``ckpt-convert`` (``--to``), in a registry.

A new target (like Megatron per-rank files for a target TP/PP layout, or DeepSpeed
ZeRO files for a target DP size) is a :class:`Target` subclass registered in
:data:`TARGET_CLASSES` by module and class name; :data:`TARGETS` imports a target's
module the first time its class is looked up, so a conversion loads only its target.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

from ckptd.converters.sources.base import FormatDetectionError
from ckptd.converters.targets.base import Existing, Target, TargetLayout, TargetOptions

TARGET_CLASSES: dict[str, tuple[str, str]] = {
    "universal": (f"{__name__}.universal", "UniversalTarget"),
    "hf": (f"{__name__}.hf", "HFTarget"),
    "dcp": (f"{__name__}.dcp", "DCPTarget"),
    "megatron": (f"{__name__}.megatron", "MegatronTarget"),
    "deepspeed": (f"{__name__}.deepspeed", "DeepSpeedTarget"),
}


class _Registry(Mapping[str, type[Target]]):
    """Target name -> target class, imported on first lookup."""

    def __getitem__(self, name: str) -> type[Target]:
        module, cls = TARGET_CLASSES[name]
        target: type[Target] = getattr(import_module(module), cls)
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(TARGET_CLASSES)

    def __len__(self) -> int:
        return len(TARGET_CLASSES)

    def __contains__(self, name: object) -> bool:
        return name in TARGET_CLASSES  # without importing the class


TARGETS: Mapping[str, type[Target]] = _Registry()
ALIASES = {"safetensors": "hf", "huggingface": "hf", "torch-dcp": "dcp"}


def open_target(path: str, fmt: str, options: TargetOptions) -> Target:
    """The target of format ``fmt`` (or an alias) at ``path``."""
    name = ALIASES.get(fmt, fmt)
    if name not in TARGET_CLASSES:
        raise FormatDetectionError(
            f"unknown target format {fmt!r}; known: {sorted(TARGET_CLASSES)}"
        )
    return TARGETS[name](path, options)


__all__ = [
    "TARGETS",
    "TARGET_CLASSES",
    "Existing",
    "Target",
    "TargetLayout",
    "TargetOptions",
    "open_target",
]
