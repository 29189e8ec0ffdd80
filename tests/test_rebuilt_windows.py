"""RebuiltWindows: the loader's cache of a lost rank's rebuilt bytes.

The rebuild itself (shards over the data channel, decode, checksums) is covered with
real daemons in test_daemon_erasure.py; here ``_fill`` is replaced by a deterministic
byte pattern so that the window logic can be checked exactly: reads of any size and
alignment from several threads get the right bytes, whole windows go straight into the
destination, a window is decoded once, and recycled window buffers never leak one
window's bytes into another (the pool is exercised hard with a tiny LRU).
"""

from __future__ import annotations

import itertools
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ckpt.rebuilt import RebuiltWindows

W = 4096


def pattern(a: int, b: int) -> np.ndarray:
    """The lost payload's bytes [a, b): a function of the offset only."""
    x = np.arange(a, b, dtype=np.int64)
    return ((x * 2654435761) >> 7).astype(np.uint8)


class PatternWindows(RebuiltWindows):
    WINDOW_BYTES = W
    KEEP_BYTES = 3 * W  # tiny: windows are evicted and their buffers reused constantly
    AHEAD_BYTES = 2 * W

    def __init__(self) -> None:
        super().__init__({})
        self.filled: list[tuple[int, int]] = []
        self.allocated = 0
        self._log = threading.Lock()

    def _fill(self, client, held, w0, w1, out, local_address) -> None:  # type: ignore[override]
        assert len(out) == w1 - w0
        out[:] = pattern(w0, w1)
        with self._log:
            self.filled.append((w0, w1))

    def _local_rebuild(self, client, held, local_address):  # type: ignore[override]
        return None


def held(offset: int, nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(key="lost/job/1/node-0", offset=offset,
                           desc=SimpleNamespace(nbytes=nbytes, rank=0))


def test_reads_of_every_size_are_exact_and_whole_windows_go_direct() -> None:
    h = held(100, 20 * W)  # this rank's part starts mid-window
    win = PatternWindows()
    win.KEEP_BYTES = 8 * W  # room for the read-ahead: nothing evicted before it is used
    # Tensors back to back, in payload order: small, unaligned, several windows long.
    sizes = [10, W - 110, 3 * W, 17, 5 * W + 3, W, 1, 2 * W]
    pos, reads = h.offset, []
    for n in sizes:
        reads.append((pos, n))
        pos += n
    for start, n in reads:
        out = torch.empty(n, dtype=torch.uint8)
        win.read_into(None, h, start, out)  # type: ignore[arg-type]
        assert np.array_equal(out.numpy(), pattern(start, start + n)), (start, n)
    # Nothing decoded twice, and direct runs longer than a window happened.
    spans = sorted(win.filled)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    assert any(b - a > W for a, b in spans)
    win.close()


def test_concurrent_random_reads_with_recycled_buffers() -> None:
    total = 64 * W + 123
    h = held(0, total)
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, total), 300))
    reads = [(a, b - a) for a, b in zip([0, *cuts], [*cuts, total])]
    reads += [(rng.randrange(total - 3 * W), rng.randrange(1, 3 * W)) for _ in range(200)]
    win = PatternWindows()

    def one(r: tuple[int, int]) -> bool:
        start, n = r
        out = torch.empty(n, dtype=torch.uint8)
        win.read_into(None, h, start, out)  # type: ignore[arg-type]
        return bool(np.array_equal(out.numpy(), pattern(start, start + n)))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, reads))
    assert win._kept <= PatternWindows.KEEP_BYTES + W
    win.close()


def test_read_past_the_ranks_part_is_refused() -> None:
    h = held(0, 2 * W)
    with pytest.raises(ValueError, match="beyond rank 0's part"):
        PatternWindows().read_into(
            None, h, W, torch.empty(W + 1, dtype=torch.uint8)  # type: ignore[arg-type]
        )
