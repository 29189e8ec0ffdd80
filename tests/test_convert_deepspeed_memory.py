"""The issue's memory bound at the issue's size: a ~2 GiB ZeRO-2 DP=4 checkpoint.

``converting a 2 GiB checkpoint stays under the RSS limit (peak RSS <= 2x the largest
tensor + 512 MiB), measured in the test with the process's peak RSS``. The checkpoint is
``bench/convert.py``'s synthetic GPT-like model (hidden 1024, vocab 32000, 146M params:
bf16 ``module``, fp32 masters and Adam moments in flat partitions padded to ``2 * dp``),
built once for the module on the temporary disk. Each conversion (to universal and to
Hugging Face safetensors, every tensor) runs in a fresh process whose own peak RSS
(``ru_maxrss``: interpreter, torch and the conversion) must stay under the bound; no
baseline is subtracted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

MIB = 1 << 20
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from ckptd.converters.convert import ConvertOptions, convert

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    base = maxrss()
    res = convert(sys.argv[1], sys.argv[2], ConvertOptions(target_format=sys.argv[3]))
    print(json.dumps({"base": base, "peak": maxrss(), "largest": res.plan.largest_bytes,
                      "bytes": res.bytes, "tensors": res.tensors}))
    """
)


@pytest.fixture(scope="module")
def zero2_2gib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ~2 GiB ZeRO-2 DP=4 checkpoint (bench/convert.py's), removed after the module."""
    root = tmp_path_factory.mktemp("ds-2gib")
    if shutil.disk_usage(root).free < 8 << 30:  # source + one output at a time, and slack
        pytest.skip(f"{root}: less than 8 GiB free for a 2 GiB checkpoint and its outputs")
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import convert as bench  # bench/convert.py
    finally:
        sys.path.pop(0)
    src = bench.make_zero2(root / "src", bench.shapes_for(2.0), 4)
    try:
        yield src
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["universal", "hf"])
def test_peak_rss_bounded_at_2gib(zero2_2gib: Path, tmp_path: Path, to: str) -> None:
    size = sum(f.stat().st_size for f in zero2_2gib.rglob("*.pt"))
    assert size > 1.8 * (1 << 30), size
    script = tmp_path / "measure.py"
    script.write_text(SCRIPT)
    dst = tmp_path / "out"
    # A grandchild (forked by sh): a direct child of this pytest process would start
    # with pytest's ru_maxrss (inherited through fork + exec).
    cmd = [sys.executable, str(script), str(zero2_2gib), str(dst), to]
    out = subprocess.run(
        ["/bin/sh", "-c", '"$0" "$@"; exit $?', *cmd],
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(dst, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 2 * m["largest"] + 512 * MIB
    print(
        f"\n{to}: {m['bytes'] / MIB:.0f} MiB in {m['tensors']} tensors, largest "
        f"{m['largest'] / MIB:.0f} MiB; peak RSS {m['peak'] / MIB:.0f} MiB (after imports "
        f"{m['base'] / MIB:.0f} MiB), bound {bound / MIB:.0f} MiB"
    )
    assert m["bytes"] > 1.8 * (1 << 30) and m["largest"] == 125 * MIB, m
    assert m["peak"] <= bound, m
