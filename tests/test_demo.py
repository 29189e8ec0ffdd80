"""The README's demo runs end to end: train on 4 ranks, SIGKILL, resume on 2, compare."""

from __future__ import annotations

import re
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
    # Resumed under 2 ranks from a checkpoint that the killed 4-rank job committed.
    m = re.search(r"loaded step (\d+)", out)
    assert m and int(m.group(1)) >= 5 and int(m.group(1)) % 5 == 0, out
