"""Format markers: tell a checkpoint's format from its files, without importing readers.

Each ``is_<format>(path)`` looks only at names, small marker files and directory
listings. Detection asks all of them (an ambiguous path is an error), so they live here,
apart from the source classes: a ``ckpt-convert`` run then imports only the reader of
the format it converts (the Megatron readers pull in the reshard-spec compiler, the
universal reader the chunk codecs). Each source class's ``detect`` is its function here.
"""

from __future__ import annotations

import glob
import json
import os
import re

from ckptd.formats import commit as commit_mod

# DeepSpeed: DIR/latest names the tag; DIR/<tag>/*_model_states.pt
DS_LATEST = "latest"
DS_MODEL_GLOB = "*_model_states.pt"
# DeepSpeed PipelineModule: DIR/<tag>/layer_{idx:02d}[-model_{tp:02d}]-model_states.pt
DS_LAYER_GLOB = "layer_*-model_states.pt"
# Megatron legacy: ROOT/latest_checkpointed_iteration.txt, iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/
# (Megatron-LM's get_checkpoint_name: _PPP with pipeline parallelism, _EEE with experts)
MEGATRON_LATEST = "latest_checkpointed_iteration.txt"
MEGATRON_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
MEGATRON_ITER_DIR = re.compile(r"^iter_(\d{7})$")
# Megatron-core torch_dist: metadata.json with the sharded backend, next to DCP files
MCORE_METADATA = "metadata.json"
MCORE_BACKEND = "torch_dist"
# PyTorch DCP
DCP_METADATA = ".metadata"
# Hugging Face
HF_INDEX_SUFFIX = ".safetensors.index.json"


def _local_dir(path: str) -> str | None:
    """``path`` without ``file://`` if it is a local directory, else None."""
    p = path.removeprefix("file://")
    return p if "://" not in p and os.path.isdir(p) else None


def is_universal(path: str) -> bool:
    """A remote URL, a committed ``step-N`` directory, or a root holding ``step-N`` dirs."""
    if "://" in path and not path.startswith("file://"):
        return True  # only the universal format is read from object stores
    trimmed = path.removeprefix("file://").rstrip("/")
    tail = os.path.basename(trimmed)
    if commit_mod.parse_step_dir(tail) is not None:
        return os.path.isfile(os.path.join(trimmed, commit_mod.MARKER_NAME))
    # A bare `latest` file is not enough: DeepSpeed roots have one too. Only step-N
    # directories (committed or not) mark a universal root.
    try:
        names = os.listdir(path.removeprefix("file://"))
    except OSError:
        return False
    return any(commit_mod.parse_step_dir(n) is not None for n in names)


def is_hf(path: str) -> bool:
    """A ``.safetensors`` file or index, or a directory holding ``*.safetensors``."""
    if os.path.isfile(path):
        return path.endswith((".safetensors", HF_INDEX_SUFFIX))
    return bool(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))


def is_dcp(path: str) -> bool:
    """A directory with DCP's ``.metadata``."""
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def is_deepspeed(path: str) -> bool:
    """A tag directory with ``*_model_states.pt``, or a root whose ``latest`` names one."""
    p = _local_dir(path)
    if p is None:
        return False
    if glob.glob(os.path.join(glob.escape(p), DS_MODEL_GLOB)):
        return True
    latest = os.path.join(p, DS_LATEST)
    if not os.path.isfile(latest):
        return False
    try:
        with open(latest, encoding="utf-8") as f:
            tag = f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return False
    d = os.path.join(p, tag)
    return bool(tag) and bool(glob.glob(os.path.join(glob.escape(d), DS_MODEL_GLOB)))


def has_ds_layer_files(tag_dir: str) -> bool:
    """A DeepSpeed tag directory written by a PipelineModule engine (per-layer files;
    its ``mp_rank_*_model_states.pt`` hold no weights): read as ``deepspeed`` too."""
    return bool(glob.glob(os.path.join(glob.escape(tag_dir), DS_LAYER_GLOB)))


def is_megatron(path: str) -> bool:
    """A Megatron root (``latest_checkpointed_iteration.txt`` or ``iter_*/mp_rank_*``)
    or an iteration directory holding ``mp_rank_*`` directories."""
    p = _local_dir(path)
    if p is None:
        return False
    if os.path.isfile(os.path.join(p, MEGATRON_LATEST)):
        return True
    names = os.listdir(p)
    if any(MEGATRON_RANK_DIR.match(n) for n in names):  # an iter_XXXXXXX directory itself
        return True
    return any(
        (MEGATRON_ITER_DIR.match(n) or n == "release")
        and os.path.isdir(os.path.join(p, n))
        and any(MEGATRON_RANK_DIR.match(m) for m in os.listdir(os.path.join(p, n)))
        for n in names
    )


def is_mcore_dist_dir(d: str) -> bool:
    """``d`` holds a ``metadata.json`` naming the ``torch_dist`` backend."""
    try:
        with open(os.path.join(d, MCORE_METADATA)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("sharded_backend") == MCORE_BACKEND


def is_megatron_dist(path: str) -> bool:
    """A ``torch_dist`` iteration directory, or a root whose latest iteration is one."""
    p = _local_dir(path)
    if p is None:
        return False
    if is_mcore_dist_dir(p):
        return True
    try:
        with open(os.path.join(p, MEGATRON_LATEST)) as f:
            text = f.read().strip()
    except OSError:
        return False
    return text.isdigit() and is_mcore_dist_dir(os.path.join(p, f"iter_{int(text):07d}"))
