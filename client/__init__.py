"""ckpt: checkpoint and resume distributed PyTorch training under any layout.

import ckpt
h = ckpt.save(state, step=1200, root="s3://bucket/run-7", blocking=False)
h.wait()
ckpt.load(state, root="s3://bucket/run-7")
"""

from __future__ import annotations

import logging

from ckpt.api import configure, get_config, load, save, shutdown, wait
from ckpt.config import Config
from ckpt.loader import LoadResult
from ckpt.saver import SaveHandle, SaveResult
from ckptd.errors import (
    CkptError,
    DistributedError,
    FormatVersionError,
    IntegrityError,
    MissingKeysError,
    NotCommittedError,
    ReshardError,
    StateMergeError,
)
from ckptd.layout import LayerOffset, Layout
from ckptd.placements import Block, FlatParam, FlatShard, Fused, Placement, Replicated, Split
from ckptd.rng import RNGState

logging.getLogger("ckpt").addHandler(logging.NullHandler())

__all__ = [
    "Block",
    "CkptError",
    "Config",
    "DistributedError",
    "FlatParam",
    "FlatShard",
    "FormatVersionError",
    "Fused",
    "IntegrityError",
    "LayerOffset",
    "Layout",
    "LoadResult",
    "MissingKeysError",
    "NotCommittedError",
    "Placement",
    "RNGState",
    "Replicated",
    "ReshardError",
    "SaveHandle",
    "SaveResult",
    "Split",
    "StateMergeError",
    "configure",
    "get_config",
    "load",
    "save",
    "shutdown",
    "wait",
]
