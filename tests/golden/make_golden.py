"""Write the golden checkpoint corpus that guards the on-disk format (tests/test_golden.py).

    python tests/golden/make_golden.py            # writes tests/golden/v1 (refuses to overwrite)
    python tests/golden/make_golden.py --force    # rewrite it (only for a deliberate change)

``v1/`` is a checkpoint root as ``ckpt.save`` leaves it (``latest``, ``step-000000007/``)
for format version 1.x. Never regenerate an existing version to make a test pass: a new
major format gets a new folder (``v2/``) and ``v1/`` stays, so that old checkpoints keep
loading. Everything except the timestamps (manifest ``created``, marker ``wall_time``)
is the same on every run: the data comes from :func:`golden_state`, and the global RNGs
are seeded with :func:`seed_global_rngs` just before the save, so the stored RNG state
is reproducible too.

The corpus is tiny (tens of KB, most of it the RNG states) yet covers: fp32, bf16 and
int64; unpacked arrays (own ``zarr.json`` and ``c/i/j`` chunk objects, one of them with
two chunks) and packed tensors (byte ranges of ``packs/r00000-00000.pack``); chunks
stored as real zstd frames (compressible int64) and as raw-block frames (random
floats); JSON trainer state; and per-rank RNG state.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 20240917
STEP = 7
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "v1"

# Tensors up to 256 bytes are packed; chunks of at most 256 bytes.
SMALL_TENSOR_BYTES = 256
TARGET_CHUNK_BYTES = 256
MIN_ALIGNED_CHUNK_BYTES = 64


def golden_state() -> dict[str, Any]:
    """The saved state, regenerated bit-identically from :data:`SEED` (no global RNG)."""
    from ckpt import RNGState

    g = torch.Generator().manual_seed(SEED)
    return {
        "model": {
            "embed.weight": torch.randn(16, 8, generator=g),  # fp32, 512 B: unpacked, 2 chunks
            "proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),  # unpacked
            "norm.weight": torch.randn(8, generator=g),  # packed fp32
            "head.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),  # packed bf16
            "position_ids": torch.arange(32, dtype=torch.int64),  # packed, compresses
            "token_ids": torch.randint(-(2**62), 2**62, (6,), generator=g),  # packed int64
        },
        "trainer": {
            "step": STEP,
            "lr": 3e-4,
            "run": "golden",
            "milestones": [100, 200],
            "warmup": True,
            "note": None,
        },
        "rng": RNGState(include_cuda=False),
    }


def seed_global_rngs() -> None:
    """Seed torch, numpy and Python RNGs: the state the checkpoint's RNG entry holds."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


def write(out: Path) -> None:
    """Save :func:`golden_state` as step :data:`STEP` under ``out`` (must not exist)."""
    import ckpt
    from ckptd.formats.writer import WriterOptions
    from ckptd.planner import PlanOptions

    old = ckpt.get_config()
    try:
        ckpt.configure(
            writer=WriterOptions(workers=1, small_tensor_bytes=SMALL_TENSOR_BYTES),
            plan=PlanOptions(TARGET_CHUNK_BYTES, MIN_ALIGNED_CHUNK_BYTES),
            retention=None,
        )
        state = golden_state()
        seed_global_rngs()
        ckpt.save(state, STEP, str(out))
    finally:
        ckpt.shutdown()
        ckpt.configure(old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="replace an existing corpus")
    args = ap.parse_args(argv)
    if args.out.exists():
        if not args.force:
            print(f"{args.out} exists; pass --force to rewrite it", file=sys.stderr)
            return 1
        shutil.rmtree(args.out)
    write(args.out)
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:8d}  {p.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
