"""Conversion targets of ``ckpt-convert`` (``--to``), in a registry.

A new target (like Megatron per-rank files for a target TP/PP layout, or DeepSpeed
ZeRO files for a target DP size) is a :class:`Target`
subclass registered in :data:`TARGETS`.
"""

from __future__ import annotations

from ckptd.converters.sources.base import FormatDetectionError
from ckptd.converters.targets.base import Existing, Target, TargetLayout, TargetOptions
from ckptd.converters.targets.dcp import DCPTarget
from ckptd.converters.targets.deepspeed import DeepSpeedTarget
from ckptd.converters.targets.hf import HFTarget
from ckptd.converters.targets.megatron import MegatronTarget
from ckptd.converters.targets.universal import UniversalTarget

TARGETS: dict[str, type[Target]] = {
    "universal": UniversalTarget,
    "hf": HFTarget,
    "dcp": DCPTarget,
    "megatron": MegatronTarget,
    "deepspeed": DeepSpeedTarget,
}
ALIASES = {"safetensors": "hf", "huggingface": "hf", "torch-dcp": "dcp"}


def open_target(path: str, fmt: str, options: TargetOptions) -> Target:
    """The target of format ``fmt`` (or an alias) at ``path``."""
    name = ALIASES.get(fmt, fmt)
    if name not in TARGETS:
        raise FormatDetectionError(f"unknown target format {fmt!r}; known: {sorted(TARGETS)}")
    return TARGETS[name](path, options)


__all__ = ["TARGETS", "Existing", "Target", "TargetLayout", "TargetOptions", "open_target"]
