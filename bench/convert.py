"""``ckpt-convert`` vs the peers on a ZeRO-2 DeepSpeed checkpoint, side by side.

    python bench/convert.py --size-gib 2 --dp 4 --repeats 3 --out bench/results/convert.json

Builds a synthetic GPT-like ZeRO-2 checkpoint at DP ``--dp`` in DeepSpeed's file layout
(``latest``, ``global_stepN/mp_rank_00_model_states.pt`` with bf16 weights and
``param_shapes``, ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` with the fp32 flat
partitions padded to ``2 * dp``: the layout of ``tests/deepspeed_fixture.py``), then runs,
each in a fresh process, ``--repeats`` times:

- ``ckpt-convert --to universal`` (every tensor: bf16 weights, fp32 masters, moments);
- ``ckpt-convert --to hf`` with a rename map giving the fp32 masters under their
  parameter names (what ``zero_to_fp32`` gives);
- ``zero_to_fp32`` (DeepSpeed's ``deepspeed.utils.zero_to_fp32``, safetensors output),
  if ``deepspeed`` imports;
- ``ds_to_universal`` (DeepSpeed's ``deepspeed.checkpoint.ds_to_universal``: its universal
  checkpoint, one ``.pt`` per parameter and state), with 1 extract/merge worker process
  and with its own defaults (no worker flags; the row's name gives the defaults read
  from its argparse, 4 extract and 2 merge workers in 0.19.8), plus ``--ds-workers N``
  if given, if ``deepspeed`` imports (the checkpoint then carries
  ``param_slice_mappings``, which it needs);
- ``naive``: what users write: ``torch.load`` of every file, ``torch.cat`` of the flat
  partitions, the per-parameter tensors cut out, one ``torch.save`` of everything.

Wall time is the median; peak RSS is the child's ``ru_maxrss`` (a wrapper process per
run waits for exactly one child) or, where larger, the RSS summed over the child's
process tree sampled every 50 ms (``ds_to_universal``'s workers). All data lives under
``--workdir`` (default ``$TMPDIR``) and is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

DS_VERSION = "0.14.4"
STEP = 100


def gpt_shapes(hidden: int, layers: int, vocab: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Two param groups (decay: matrices; no decay: biases and norms), module order."""
    h = hidden
    mats: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, h))]
    vecs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        p = f"h.{i}."
        mats += [
            (p + "attn.qkv.weight", (3 * h, h)),
            (p + "attn.out.weight", (h, h)),
            (p + "mlp.fc1.weight", (4 * h, h)),
            (p + "mlp.fc2.weight", (h, 4 * h)),
        ]
        vecs += [
            (p + "ln1.weight", (h,)),
            (p + "ln1.bias", (h,)),
            (p + "attn.qkv.bias", (3 * h,)),
            (p + "mlp.fc1.bias", (4 * h,)),
            (p + "ln2.weight", (h,)),
            (p + "ln2.bias", (h,)),
        ]
    vecs += [("ln_f.weight", (h,)), ("ln_f.bias", (h,))]
    return [mats, vecs]


def shapes_for(size_gib: float) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Layers of hidden 1024 until the checkpoint (14 bytes/param) reaches the size."""
    layers = 1
    while True:
        g = gpt_shapes(1024, layers + 1, 32000)
        n = sum(math.prod(s) for grp in g for _, s in grp)
        if n * 14 > size_gib * 2**30:
            return gpt_shapes(1024, layers, 32000)
        layers += 1


def make_zero2(
    root: Path,
    groups: list[list[tuple[str, tuple[int, ...]]]],
    dp: int,
    *,
    slice_mappings: bool = False,
) -> Path:
    """A ZeRO-2 checkpoint at ``root`` (random values, deterministic).

    What DeepSpeed's (non-elastic) ZeRO-2 ``state_dict`` saves: ``base_optimizer_state``
    is the torch optimizer's state dict (``state`` per group, ``param_groups``), and the
    model states carry ``universal_checkpoint_info``. ``slice_mappings``: also each
    rank's ``param_slice_mappings`` (per group, param name -> DeepSpeed's
    ``fragment_address(numel, start)`` in the rank's partition), which DeepSpeed's
    ``ds_to_universal`` needs; it pickles DeepSpeed's class, so it needs ``deepspeed``.
    """
    fragment_address = None
    if slice_mappings:
        from deepspeed.utils.tensor_fragment import fragment_address
    tag = root / f"global_step{STEP}"
    tag.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, list[list[torch.Tensor]]] = {}
    module: OrderedDict[str, torch.Tensor] = OrderedDict()
    for kind, scale in (("fp32", 0.02), ("exp_avg", 1e-3), ("exp_avg_sq", 1e-6)):
        parts[kind] = []
        for grp in groups:
            n = sum(math.prod(s) for _, s in grp)
            padded = math.ceil(n / (2 * dp)) * 2 * dp
            flat = torch.zeros(padded)
            flat[:n].normal_(generator=gen).mul_(scale)
            if kind == "exp_avg_sq":
                flat[:n].abs_()
            if kind == "fp32":
                off = 0
                for name, s in grp:
                    k = math.prod(s)
                    module[name] = flat[off : off + k].view(s).to(torch.bfloat16)
                    off += k
            part = padded // dp
            parts[kind].append([flat[r * part : (r + 1) * part].clone() for r in range(dp)])
            del flat
    torch.save(
        {
            "module": module,
            "buffer_names": [],
            "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in g) for g in groups],
            "frozen_param_shapes": None,
            "shared_params": {},
            "frozen_param_fragments": None,
            "lr_scheduler": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": STEP,
            "dp_world_size": dp,
            "mp_world_size": 1,
            "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
            "ds_version": DS_VERSION,
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
        },
        tag / "mp_rank_00_model_states.pt",
    )
    del module
    for r in range(dp):
        mappings = []
        for g, grp in enumerate(groups):
            part = parts["fp32"][g][r].numel()
            lo, off, m = r * part, 0, OrderedDict()
            for name, s in grp:  # the params whose flat range meets this partition
                n = math.prod(s)
                a, b = max(off, lo), min(off + n, lo + part)
                if a < b and fragment_address is not None:
                    m[name] = fragment_address(numel=b - a, start=a - lo)
                off += n
            mappings.append(m)
        osd = {
            "base_optimizer_state": {
                "state": {
                    g: {
                        "step": torch.tensor(float(STEP)),
                        "exp_avg": parts["exp_avg"][g][r],
                        "exp_avg_sq": parts["exp_avg_sq"][g][r],
                    }
                    for g in range(len(groups))
                },
                "param_groups": [
                    {
                        "lr": 1e-4,
                        "betas": (0.9, 0.95),
                        "eps": 1e-8,
                        "weight_decay": 0.1 if g == 0 else 0.0,
                        "params": [g],
                    }
                    for g in range(len(groups))
                ],
            },
            "single_partition_of_fp32_groups": [parts["fp32"][g][r] for g in range(len(groups))],
            "zero_stage": 2,
            "partition_count": [dp] * len(groups),
            "ds_version": DS_VERSION,
        }
        if fragment_address is not None:
            osd["param_slice_mappings"] = mappings
        torch.save(
            {"optimizer_state_dict": osd, "ds_version": DS_VERSION},
            tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )
    (root / "latest").write_text(tag.name)
    return root


NAIVE = r"""
import glob, math, os, sys, torch
src, dst = sys.argv[1], sys.argv[2]
tag = open(os.path.join(src, "latest")).read().strip()
d = os.path.join(src, tag)
ms = torch.load(os.path.join(d, "mp_rank_00_model_states.pt"), weights_only=False)
files = sorted(glob.glob(os.path.join(d, "*_optim_states.pt")),
               key=lambda f: int(os.path.basename(f).split("_")[3]))
osds = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
out = {"model": dict(ms["module"]), "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
for g, shapes in enumerate(ms["param_shapes"]):
    flats = {
        "fp32": torch.cat([o["single_partition_of_fp32_groups"][g] for o in osds]),
        "exp_avg": torch.cat([o["base_optimizer_state"]["state"][g]["exp_avg"] for o in osds]),
        "exp_avg_sq": torch.cat([o["base_optimizer_state"]["state"][g]["exp_avg_sq"]
                                 for o in osds]),
    }
    off = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        for k, flat in flats.items():
            out[k][name] = flat[off : off + n].view(shape).clone()
        off += n
os.makedirs(dst, exist_ok=True)
torch.save(out, os.path.join(dst, "consolidated.pt"))
"""

WRAP = r"""
import json, os, resource, subprocess, sys, tempfile, time

def tree_rss(root):
    # RSS summed over ``root`` and its descendants (ds_to_universal runs worker
    # processes; ru_maxrss gives only the largest single one)
    kids, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(pid))
            rss[int(pid)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += kids.get(p, [])
    return total

err = tempfile.TemporaryFile()
t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)
tree = 0
while proc.poll() is None:
    tree = max(tree, tree_rss(proc.pid))
    time.sleep(0.05)
wall = time.perf_counter() - t
if proc.returncode:
    err.seek(0)
    sys.stderr.write(err.read().decode()[-3000:])
    sys.exit(proc.returncode)
print(json.dumps({"wall": wall, "tree_rss": tree,
                  "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def ds_to_universal_defaults() -> dict[str, object]:
    """The argparse defaults of the installed ``ds_to_universal`` (``--num_*_workers``),
    read from its source: the module parses ``sys.argv`` in a function, so this reads
    the ``add_argument`` calls rather than running them."""
    import importlib.util

    spec = importlib.util.find_spec("deepspeed.checkpoint.ds_to_universal")
    if spec is None or spec.origin is None:
        return {}
    tree = ast.parse(Path(spec.origin).read_text())
    out: dict[str, object] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
        for kw in node.keywords:
            if kw.arg == "default" and isinstance(kw.value, ast.Constant) and flags:
                out[str(flags[0]).lstrip("-")] = kw.value.value
    return out


def cases(
    src: Path, out: Path, has_ds: bool, names: list[str], ds_workers: int = 0
) -> dict[str, list[str]]:
    py = sys.executable
    cli = [py, "-m", "ckptd.converters.cli"]
    rename = out.parent / "fp32_masters.json"
    rename.write_text(
        json.dumps(
            {
                "rules": [
                    {"pattern": r"optim\.state\.(.*)\.fp32", "replace": r"\1"},
                    {"pattern": ".*", "drop": True},
                ]
            }
        )
    )
    all_cases = {
        "ckpt-convert->universal": [*cli, str(src), str(out), "--to", "universal"],
        "ckpt-convert->hf(fp32)": [
            *cli,
            str(src),
            str(out),
            "--to",
            "hf",
            "--rename-map",
            str(rename),
        ],
        "naive torch.load+cat+save": [py, "-c", NAIVE, str(src), str(out)],
    }
    if has_ds:
        all_cases["deepspeed zero_to_fp32"] = [
            py,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            str(src),
            str(out),
            "--safe_serialization",
            "--max_shard_size",
            "5GB",
        ]
        # DeepSpeed's universal checkpoint: fragments extracted by worker processes into
        # temp files, then merged per parameter (its own --num_*_workers; one process
        # with 1, where ru_maxrss is exact). Also at its defaults, what a user who runs
        # it as documented gets: the peer's own setting, not one picked for us.
        dsu = [
            py,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(src / f"global_step{STEP}"),
            "--output_folder",
            str(out),
        ]
        for w in sorted({1, ds_workers} - {0}):
            all_cases[f"deepspeed ds_to_universal (workers {w})"] = [
                *dsu,
                "--num_extract_workers",
                str(w),
                "--num_merge_workers",
                str(w),
            ]
        d = ds_to_universal_defaults()
        label = (
            f"extract {d.get('num_extract_workers', '?')}, merge {d.get('num_merge_workers', '?')}"
        )
        all_cases[f"deepspeed ds_to_universal (defaults: {label})"] = dsu
    return {k: v for k, v in all_cases.items() if not names or any(k.startswith(n) for n in names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="", help="comma list of case-name prefixes")
    ap.add_argument(
        "--ds-workers",
        type=int,
        default=0,
        help="also run ds_to_universal with N extract/merge workers (0: only 1 and defaults)",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=a.workdir))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    try:
        try:
            import deepspeed.utils.zero_to_fp32  # noqa: F401

            has_ds = True
        except Exception:  # any import failure means "not installed"
            has_ds = False
        groups = shapes_for(a.size_gib)
        t = time.perf_counter()
        src = make_zero2(work / "ds", groups, a.dp, slice_mappings=has_ds)
        size = sum(f.stat().st_size for f in src.rglob("*.pt"))
        params = sum(math.prod(s) for g in groups for _, s in g)
        largest = max(math.prod(s) for g in groups for _, s in g) * 4
        print(
            f"checkpoint: {size / 2**30:.2f} GiB, {params / 1e6:.0f}M params, ZeRO-2 dp={a.dp}, "
            f"largest fp32 tensor {largest / 2**20:.0f} MiB (built in "
            f"{time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        wrap = work / "wrap.py"
        wrap.write_text(WRAP)
        results: dict[str, dict[str, object]] = {}
        names = [c for c in a.cases.split(",") if c]
        todo = cases(src, work / "out", has_ds, names, a.ds_workers)
        for rep in range(a.repeats):  # interleaved: every case sees the same machine state
            for name, cmd in todo.items():
                shutil.rmtree(work / "out", ignore_errors=True)
                subprocess.run(["sync"], check=False)
                r = subprocess.run(
                    [sys.executable, str(wrap), *cmd], capture_output=True, text=True
                )
                if r.returncode:
                    raise SystemExit(f"{name} failed:\n{r.stderr}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                res = results.setdefault(name, {"wall": [], "rss": [], "cmd": cmd})
                res["wall"].append(m["wall"])  # type: ignore[union-attr]
                # peak RSS: the largest process (ru_maxrss) or, for a tool with worker
                # processes, the sampled sum over its process tree, whichever is larger
                res["rss"].append(max(m["rss"], m["tree_rss"]))  # type: ignore[union-attr]
                print(
                    f"  [{rep + 1}/{a.repeats}] {name}: {m['wall']:.1f} s, "
                    f"peak RSS {max(m['rss'], m['tree_rss']) / 2**20:.0f} MiB",
                    flush=True,
                )
        table = _table(results)
        verdict = _verdict(results)
        load_end = os.getloadavg()
        print(table)
        print("\n".join(verdict))
        print(
            f"started {started}; load average (1/5/15 min) at start "
            f"{'/'.join(f'{x:.2f}' for x in load_start)}, at end "
            f"{'/'.join(f'{x:.2f}' for x in load_end)}"
        )
        if a.out:
            doc = {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                },
                "checkpoint": {
                    "bytes": size,
                    "params": params,
                    "dp": a.dp,
                    "largest_tensor_bytes": largest,
                },
                "results": {
                    k: {"wall_s": v["wall"], "peak_rss_bytes": v["rss"]} for k, v in results.items()
                },
                "table": table,
                "verdict": verdict,
                "started_utc": started,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            }
            Path(a.out).write_text(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


PAIRS = (  # (ours, the peer it is measured against)
    ("ckpt-convert->hf(fp32)", "deepspeed zero_to_fp32"),
    ("ckpt-convert->universal", "naive torch.load+cat+save"),
)


def _verdict(results: dict[str, dict[str, object]]) -> list[str]:
    """Ours against its peer: speed-up (median wall) and peak RSS ratio (max), target
    >= 2x faster and <= 1/4 of the memory."""
    lines = []
    pairs = list(PAIRS) + [
        ("ckpt-convert->universal", k) for k in results if k.startswith("deepspeed ds_to_univ")
    ]
    for ours, peer in pairs:
        if ours not in results or peer not in results:
            continue
        wo, wp = (statistics.median(results[k]["wall"]) for k in (ours, peer))  # type: ignore[arg-type]
        mo, mp = (max(results[k]["rss"]) for k in (ours, peer))  # type: ignore[call-overload]
        speed, mem = wp / wo, mo / mp
        met = "met" if speed >= 2 and mem <= 0.25 else "NOT met"
        lines.append(
            f"{ours} vs {peer}: {speed:.2f}x faster, {mem:.2f}x the peak RSS "
            f"(target >= 2x, <= 0.25x: {met})"
        )
    return lines


def _table(results: dict[str, dict[str, object]]) -> str:
    rows = ["| case | wall (median) | runs (s) | peak RSS (max) |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        walls: list[float] = r["wall"]  # type: ignore[assignment]
        rss: list[int] = r["rss"]  # type: ignore[assignment]
        rows.append(
            f"| {name} | {statistics.median(walls):.1f} s | "
            f"{', '.join(f'{w:.1f}' for w in walls)} | {max(rss) / 2**20:.0f} MiB |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
