"""RNG state capture and restore: torch CPU, CUDA (when present), numpy, Python.

Put an :class:`RNGState` anywhere in the state passed to ``ckpt.save``/``ckpt.load``.
States are stored per rank in the manifest (JSON, base64 for byte tensors), keyed by
the rank's coordinates. Restore policy when the layout changed (documented in
docs/format.md): a rank whose coordinates exist in the checkpoint gets that state;
otherwise the state of saved rank ``rank % saved_world_size`` (deterministic), with a
warning, since exact reproduction of the old random streams is impossible then.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptd.errors import IntegrityError


@dataclass
class RNGState:
    """Marker object: the RNG states of this process are saved and restored here."""

    include_cuda: bool = True


def capture_rng(include_cuda: bool = True) -> dict[str, Any]:
    """JSON-able snapshot of every RNG of this process."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: the (kind, keys, pos, ...) tuple
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": _b64(
                torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32)).view(torch.uint8)
            ),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _py_state(random.getstate()),
    }
    if include_cuda and torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Restore every RNG captured by :func:`capture_rng`."""
    try:
        torch.set_rng_state(_unb64(state["torch"]))
        n = state["numpy"]
        keys = _unb64(n["keys"]).view(torch.int32).numpy().view(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            cuda = [_unb64(s) for s in state["cuda"]]
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"stored RNG state is malformed: {e}") from e


def pick_rng_source(
    coords_key: str, rank: int, saved: dict[str, dict[str, Any]], saved_order: list[str]
) -> tuple[str, bool]:
    """Which saved RNG entry a rank restores; returns (key, exact)."""
    if coords_key in saved:
        return coords_key, True
    return saved_order[rank % len(saved_order)], False


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _py_state(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]
