"""Compare :func:`ckptd.converters.sources.torchfile.load_meta` against torch's own
meta-device loading of the same file (tests only)."""

from __future__ import annotations

from typing import Any

import torch

from ckptd.converters.sources.deepspeed_files import STANDINS
from ckptd.converters.sources.torchfile import MetaTensor, from_torch_meta


def torch_meta(path: str) -> Any:
    """``torch.load(path, weights_only=True, map_location="meta")`` as MetaTensors."""
    with torch.serialization.safe_globals([(c, q) for q, c in STANDINS.items()]):
        obj = torch.load(path, weights_only=True, map_location="meta")
    return from_torch_meta(obj, path)


def assert_same_meta(got: Any, want: Any, where: str) -> None:
    """Same structure; tensors with equal dtype, shape, stride and file offset. (torch
    gives ``torch.Size``, ``torch.dtype`` and ``torch.device`` objects where the
    torch-free reader gives a tuple and names.)"""
    if isinstance(want, torch.Size):
        want = tuple(want)
    elif isinstance(want, (torch.dtype, torch.device)):
        want = str(want).removeprefix("torch.")
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, MetaTensor):
        assert (got.dtype, got.shape, got.stride(), got.file_offset) == (
            want.dtype, want.shape, want.stride(), want.file_offset), where  # fmt: skip
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same_meta(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_meta(a, b, f"{where}[{i}]")
    elif hasattr(want, "qualname") and hasattr(want, "state"):  # DeepSpeed stand-ins
        assert got.qualname == want.qualname and got.args == want.args, where
        assert_same_meta(got.state, want.state, f"{where}.state")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"
