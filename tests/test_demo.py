"""The README's demo runs end to end: train on 4 ranks, SIGKILL, resume on 2, compare."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_resumes_bit_identical(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd.demo", "--root", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "demo PASSED" in out
    assert "bit-identical" in out
    # Resumed from a checkpoint written by the killed 4-rank job, under 2 ranks.
    assert "loaded step 20" in out
