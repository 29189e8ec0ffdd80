"""Side-by-side save/load benchmark: ckpt vs ``torch.save``/``torch.load`` vs DCP.

Every case runs in a fresh subprocess (so peak RSS is per case) on the same
deterministic GPT-like state (fp32 params + Adam ``exp_avg``/``exp_avg_sq``).
Cases are plain functions ``fn(state_builder, workdir) -> metrics`` in ``CASES``;
load cases also have a ``PREPARE`` entry that writes the checkpoint to
``workdir / "prepared"`` in its own subprocess beforehand.  See bench/README.md.

    python bench/save_load.py --size-gib 2 --repeats 3 --out bench/results/save_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

State = dict[str, Any]
StateBuilder = Callable[[int], State]  # seed -> freshly built, fully touched state
Metrics = dict[str, Any]
CaseFn = Callable[[StateBuilder, Path], Metrics]
PrepareFn = Callable[[StateBuilder, Path], None]
Waiter = Callable[[], None] | None
SaveFn = Callable[[State, Path, int], Waiter]  # (state, root, step) -> wait-for-durable


@dataclass
class RunConfig:
    """Per-child settings shared by all cases (set from the CLI in the child)."""

    repeats: int = 3
    warmup: int = 1  # untimed-for-median saves before the measured ones


CFG = RunConfig()
CASES: dict[str, CaseFn] = {}
PREPARE: dict[str, PrepareFn] = {}
GIB = 1 << 30


class SkipCase(Exception):
    """Raised by a case that cannot run here (e.g. ``ckpt`` API not importable)."""


def register(name: str, prepare: PrepareFn | None = None) -> Callable[[CaseFn], CaseFn]:
    """Decorator adding a case (and optionally its prepare step) to the registry."""

    def deco(fn: CaseFn) -> CaseFn:
        CASES[name] = fn
        if prepare is not None:
            PREPARE[name] = prepare
        return fn

    return deco


# ----------------------------------------------------------------------------- state
def gpt_shapes(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names/shapes of a GPT-like model holding ~size_bytes/3 of fp32 params."""
    params, vocab, ctx = size_bytes // 12, 50304, 2048
    hidden = 256
    for h in (384, 512, 768, 1024, 1536, 2048, 2560, 4096, 5120, 8192):
        if (vocab + ctx) * h <= params // 3:
            hidden = h
    layers = max(1, round((params - (vocab + ctx) * hidden) / (12 * hidden * hidden)))
    h, f = hidden, 4 * hidden
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, h)), ("wpe", (ctx, h))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "ln1.weight", (h,)), (p + "ln1.bias", (h,)),
            (p + "attn.qkv.weight", (3 * h, h)), (p + "attn.qkv.bias", (3 * h,)),
            (p + "attn.out.weight", (h, h)), (p + "attn.out.bias", (h,)),
            (p + "ln2.weight", (h,)), (p + "ln2.bias", (h,)),
            (p + "mlp.fc1.weight", (f, h)), (p + "mlp.fc1.bias", (f,)),
            (p + "mlp.fc2.weight", (h, f)), (p + "mlp.fc2.bias", (h,)),
        ]  # fmt: skip
    return [*shapes, ("ln_f.weight", (h,)), ("ln_f.bias", (h,))]


def build_state(size_bytes: int, seed: int = 0) -> State:
    """Nested dict ``{"model": {name: t}, "optim": {"state": {name: {...}}}}`` with random data.

    Weights ~N(0, 0.02) (norm weights ~N(1, 0.02)), exp_avg ~N(0, 1e-3), exp_avg_sq =
    N(0, 1e-4)^2 + 1e-12 (small, positive).  Deterministic per (seed, tensor index);
    filled by 2 threads (torch's RNG kernels release the GIL).
    """
    shapes = gpt_shapes(size_bytes)

    def make(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name, shape = shapes[i]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        norm = ".ln" in name or name.startswith("ln_f")
        w = torch.empty(shape).normal_(1.0 if norm and "weight" in name else 0.0, 0.02, generator=g)
        m = torch.empty(shape).normal_(0.0, 1e-3, generator=g)
        v = torch.empty(shape).normal_(0.0, 1e-4, generator=g).square_().add_(1e-12)
        return w, m, v

    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(make, range(len(shapes))))
    model = {name: w for (name, _), (w, _, _) in zip(shapes, made)}
    optim = {name: {"step": torch.tensor(float(1000 + seed)), "exp_avg": m, "exp_avg_sq": v}
             for (name, _), (_, m, v) in zip(shapes, made)}  # fmt: skip
    return {"model": model, "optim": {"state": optim, "param_groups": [{"lr": 3e-4}]}}


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """All tensors of a nested dict/list state, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def state_nbytes(state: State) -> int:
    """Total tensor bytes of a state."""
    return sum(t.numel() * t.element_size() for t in tensors(state))


def fingerprint(state: State) -> list[float]:
    """Cheap per-tensor checksum used to verify loads."""
    return [float(t.sum(dtype=torch.float64)) for t in tensors(state)]


def mutate(state: State) -> None:
    """Simulate a training step between saves so no case can skip unchanged data."""
    for t in tensors(state):
        t.add_(1e-7)


def copy_into(dst: State, src: State) -> None:
    """Copy ``src`` tensors into same-structured ``dst`` tensors (like load_state_dict)."""
    for d, s in zip(tensors(dst), tensors(src), strict=True):
        d.copy_(s)


# ----------------------------------------------------------------------------- fs / memory
def files(path: Path) -> list[Path]:
    """All regular files under ``path`` (or ``[path]`` for a file)."""
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs] if path.exists() else []


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path``: the same durability step for all cases."""
    if not path.exists():
        return
    dirs = [Path(d) for d, _, _ in os.walk(path)] if path.is_dir() else [path.parent]
    for p in files(path) + dirs:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile (e.g. by the library's retention)
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def du(path: Path, newer_than: float = 0.0) -> int:
    """Allocated bytes of files under ``path`` (like ``du``), only those modified after a time."""
    total = 0
    for p in files(path):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        total += st.st_blocks * 512 if st.st_mtime >= newer_than else 0
    return total


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path``'s files in the page cache (util-linux ``fincore``), None if unknown."""
    fs = [str(p) for p in files(path)]
    if not fs or shutil.which("fincore") is None:
        return None
    cmd = ["fincore", "--bytes", "--noheadings", "--output", "RES", *fs]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    return sum(int(x) for x in out.split())


def make_cold(path: Path) -> dict[str, Any]:
    """Evict the checkpoint from the page cache with POSIX_FADV_DONTNEED (no root needed)."""
    for p in files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    res, size = resident_bytes(path), sum(p.stat().st_size for p in files(path))
    cold = None if res is None else res < 0.02 * max(size, 1)
    return {"cache": "cold" if cold else ("warm" if cold is False else "unknown"),
            "resident_bytes_before_load": res}  # fmt: skip


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def med(xs: list[float]) -> float:
    """Median, rounded for the report."""
    return round(statistics.median(xs), 4)


# ----------------------------------------------------------------------------- timing loops
def save_loop(builder: StateBuilder, workdir: Path, save: SaveFn, shared_root: bool) -> Metrics:
    """Run ``CFG.warmup + CFG.repeats`` saves; stall = call, total = call + wait + fsync."""
    state = builder(0)
    base = rss_now()
    stalls, totals, stored = [], [], []
    first: dict[str, float] = {}
    for i in range(CFG.warmup + CFG.repeats):
        root = workdir / ("out" if shared_root else f"out{i}")
        os.sync()
        wall0 = time.time() - 0.05  # coarse fs timestamps
        t0 = time.perf_counter()
        waiter = save(state, root, i)
        t1 = time.perf_counter()
        if waiter is not None:
            waiter()
        fsync_tree(root)
        t2 = time.perf_counter()
        if i < CFG.warmup:
            first = first or {"first_stall_s": round(t1 - t0, 4),
                              "first_total_s": round(t2 - t0, 4)}  # fmt: skip
        else:
            stalls.append(t1 - t0)
            totals.append(t2 - t0)
            stored.append(du(root, newer_than=wall0))
        if not shared_root:
            shutil.rmtree(root, ignore_errors=True)
        mutate(state)
    return {"stall_s": med(stalls), "total_s": med(totals), "bytes_stored": int(med(stored)),
            "stall_all_s": [round(x, 4) for x in stalls], **first,
            "baseline_rss_bytes": base, "peak_rss_bytes": peak_rss(),
            "state_bytes": state_nbytes(state)}  # fmt: skip


def load_loop(builder: StateBuilder, workdir: Path, load: Callable[[State, Path], None]) -> Metrics:
    """Load ``workdir/prepared`` into a differently-valued state; make it cold each repeat."""
    src = workdir / "prepared"
    expect = json.loads((workdir / "fingerprint.json").read_text())
    state = builder(1)  # touched, different values: a real trainer's state
    base = rss_now()
    times, cache = [], []
    for _ in range(CFG.repeats):
        cache.append(make_cold(src))
        t0 = time.perf_counter()
        load(state, src)
        times.append(time.perf_counter() - t0)
    peak = peak_rss()
    ok = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(fingerprint(state), expect))
    return {"stall_s": med(times), "total_s": med(times), "bytes_stored": du(src),
            "stall_all_s": [round(x, 4) for x in times], "cache": cache, "verified": ok,
            "baseline_rss_bytes": base, "peak_rss_bytes": peak,
            "state_bytes": state_nbytes(state)}  # fmt: skip


def prepared_by(
    save: Callable[[State, Path], None], requires: Callable[[], Any] | None = None
) -> PrepareFn:
    """Build a PREPARE step: save seed-0 state to ``workdir/prepared``, fsync, fingerprint.

    ``requires`` runs first (before the state is built) and may raise SkipCase.
    """

    def prep(builder: StateBuilder, workdir: Path) -> None:
        if requires is not None:
            requires()
        state = builder(0)
        save(state, workdir / "prepared")
        fsync_tree(workdir / "prepared")
        (workdir / "fingerprint.json").write_text(json.dumps(fingerprint(state)))

    return prep


# ----------------------------------------------------------------------------- cases
@register("plain_copy_warm")
def case_plain_copy_warm(builder: StateBuilder, workdir: Path) -> Metrics:
    """Copy every tensor into pre-allocated, already-touched buffers: the stall floor."""
    bufs: list[torch.Tensor] = []

    def save(state: State, root: Path, step: int) -> Waiter:
        if not bufs:  # untimed-for-median warm-up: allocate and touch
            bufs.extend(torch.empty_like(t).fill_(0) for t in tensors(state))
        for b, t in zip(bufs, tensors(state)):
            b.copy_(t)
        return None

    return save_loop(builder, workdir, save, shared_root=False)


@register("torch.save")
def case_torch_save(builder: StateBuilder, workdir: Path) -> Metrics:
    """``torch.save`` of the whole state to one file, then fsync."""

    def save(state: State, root: Path, step: int) -> Waiter:
        root.mkdir(parents=True, exist_ok=True)
        torch.save(state, root / "state.pt")
        return None

    return save_loop(builder, workdir, save, shared_root=False)


def _torch_save_prepared(state: State, out: Path) -> None:
    out.mkdir(parents=True)
    torch.save(state, out / "state.pt")


@register("torch.load", prepare=prepared_by(_torch_save_prepared))
def case_torch_load(builder: StateBuilder, workdir: Path) -> Metrics:
    """``torch.load(weights_only=True, mmap=False)`` + copy into the live state."""

    def load(state: State, src: Path) -> None:
        copy_into(state, torch.load(src / "state.pt", weights_only=True, mmap=False))

    return load_loop(builder, workdir, load)


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


def _dcp_result(fut: Any) -> None:
    getattr(fut, "upload_completion", fut).result()  # Future or AsyncSaveResponse


def _dcp_save_case(threads: int) -> CaseFn:
    def case(builder: StateBuilder, workdir: Path) -> Metrics:
        dcp = _dcp()

        def save(state: State, root: Path, step: int) -> Waiter:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(root, thread_count=threads))
            return None

        return save_loop(builder, workdir, save, shared_root=False)

    case.__doc__ = f"``dcp.save`` single process, FileSystemWriter(thread_count={threads})."
    return case


register("dcp.save:t1")(_dcp_save_case(1))
register("dcp.save:t2")(_dcp_save_case(2))


@register("dcp.async_save")
def case_dcp_async(builder: StateBuilder, workdir: Path) -> Metrics:
    """``dcp.async_save``, new FileSystemWriter(thread_count=2) each save (default staging)."""
    dcp = _dcp()

    def save(state: State, root: Path, step: int) -> Waiter:
        fut = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(root, thread_count=2))
        return lambda: _dcp_result(fut)

    return save_loop(builder, workdir, save, shared_root=False)


@register("dcp.async_save:cached_writer")
def case_dcp_async_cached(builder: StateBuilder, workdir: Path) -> Metrics:
    """One reused FileSystemWriter(cache_staged_state_dict=True): staging buffers reused."""
    dcp = _dcp()
    if not torch.cuda.is_available():  # BlockingAsyncStager caches with pin_memory=True
        raise SkipCase("FileSystemWriter(cache_staged_state_dict=True) pins memory: needs CUDA")
    writer = dcp.FileSystemWriter(workdir, thread_count=2, cache_staged_state_dict=True)

    def save(state: State, root: Path, step: int) -> Waiter:
        fut = dcp.async_save(state, storage_writer=writer, checkpoint_id=root)
        return lambda: _dcp_result(fut)

    return save_loop(builder, workdir, save, shared_root=False)


@register("dcp.async_save:reused_stager")
def case_dcp_async_stager(builder: StateBuilder, workdir: Path) -> Metrics:
    """``async_stager=DefaultStager(...)`` reused across saves (cached staging storages)."""
    dcp = _dcp()
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU-only options

    def save(state: State, root: Path, step: int) -> Waiter:
        writer = dcp.FileSystemWriter(root, thread_count=2)
        fut = dcp.async_save(state, storage_writer=writer, async_stager=stager)
        return lambda: _dcp_result(fut)

    try:
        return save_loop(builder, workdir, save, shared_root=False)
    finally:
        stager.close()


def _dcp_save_prepared(state: State, out: Path) -> None:
    _dcp().save(state, storage_writer=_dcp().FileSystemWriter(out, thread_count=2))


@register("dcp.load", prepare=prepared_by(_dcp_save_prepared))
def case_dcp_load(builder: StateBuilder, workdir: Path) -> Metrics:
    """``dcp.load`` in place, single process, FileSystemReader."""
    dcp = _dcp()
    return load_loop(
        builder, workdir, lambda st, src: dcp.load(st, storage_reader=dcp.FileSystemReader(src))
    )


def _ckpt() -> Any:
    """The client package, or SkipCase if its save/load API is not importable yet.

    Every case (ckpt included) writes each repeat into a fresh root that is deleted
    right after it: this VM hands freed guest memory back to the host within seconds,
    and page cache built on such memory costs 2-4x more per byte to write (measured:
    1 GiB write() 0.5-1.1 s right after a delete, 2.3-3.6 s after 8 s idle), so all
    cases must see the same delete-then-write rhythm. Retention keeps only the newest.
    """
    try:
        import ckpt
        from ckptd.formats.retention import RetentionPolicy
    except Exception as e:  # any import-time failure of a half-written package
        raise SkipCase(f"import ckpt failed: {e!r}") from e
    if not (callable(getattr(ckpt, "save", None)) and callable(getattr(ckpt, "load", None))):
        raise SkipCase("ckpt imported but has no save()/load() yet (client/ not written?)")
    ckpt.configure(retention=RetentionPolicy(keep_last=1))
    return ckpt


@register("ckpt.save_blocking")
def case_ckpt_save_blocking(builder: StateBuilder, workdir: Path) -> Metrics:
    """``ckpt.save(blocking=True)`` into one root, increasing steps."""
    ckpt = _ckpt()

    def save(state: State, root: Path, step: int) -> Waiter:
        ckpt.save(state, step=step, root=str(root), blocking=True)
        return None

    return save_loop(builder, workdir, save, shared_root=False)


@register("ckpt.save_async")
def case_ckpt_save_async(builder: StateBuilder, workdir: Path) -> Metrics:
    """``ckpt.save(blocking=False)``: stall = return of the call, total = ``h.wait()`` + fsync."""
    ckpt = _ckpt()

    def save(state: State, root: Path, step: int) -> Waiter:
        return ckpt.save(state, step=step, root=str(root), blocking=False).wait

    return save_loop(builder, workdir, save, shared_root=False)


def _ckpt_save_prepared(state: State, out: Path) -> None:
    _ckpt().save(state, step=0, root=str(out), blocking=True)


@register("ckpt.load", prepare=prepared_by(_ckpt_save_prepared, requires=_ckpt))
def case_ckpt_load(builder: StateBuilder, workdir: Path) -> Metrics:
    """``ckpt.load(state, root, step=0)`` in place."""
    ckpt = _ckpt()
    return load_loop(builder, workdir, lambda st, src: ckpt.load(st, root=str(src), step=0))


def _resharded_view(state: State, parts: int = 3) -> tuple[dict[str, Any], Any]:
    """The same tensors seen as ``parts`` uneven row shards (torch.chunk) in one process.

    Every tensor with rows is replaced by row-slice *views* keyed ``<key>#<i>`` with an
    uneven ``Split`` placement and a rename back to ``<key>``: loading into them fills
    the original tensors through a layout the checkpoint was not written with (chunk
    boundaries do not line up), which is what a resharded restart does per rank.
    """
    ckpt = _ckpt()
    flat: dict[str, Any] = {}
    rules: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] >= parts:
                for i, view in enumerate(torch.chunk(v, parts, dim=0)):
                    flat[f"{key}#{i}"] = view
                    rules[f"{key}#{i}"] = ckpt.Split(
                        0, i, parts, global_size=v.shape[0], uneven=True
                    )
            else:
                flat[key] = v

    walk(state, "")
    layout = ckpt.Layout(rules=rules, rename=lambda k: k.split("#", 1)[0])
    return flat, layout


@register("ckpt.load_resharded", prepare=prepared_by(_ckpt_save_prepared, requires=_ckpt))
def case_ckpt_load_resharded(builder: StateBuilder, workdir: Path) -> Metrics:
    """``ckpt.load`` through a 3-way uneven row split (a layout the save did not use)."""
    ckpt = _ckpt()

    def load(state: State, src: Path) -> None:
        flat, layout = _resharded_view(state)
        ckpt.load(flat, root=str(src), step=0, layout=layout, strict=True)

    return load_loop(builder, workdir, load)


# ----------------------------------------------------------------------------- driver
def kind_of(name: str) -> str:
    """'copy', 'load' or 'save' (used to pick the reference row)."""
    return "copy" if name.startswith("plain_copy") else ("load" if name in PREPARE else "save")


def select(spec: str | None) -> list[str]:
    """Cases named in comma list ``spec``; ``dcp.save`` selects ``dcp.save:t1``..., ``ckpt`` all."""
    if not spec:
        return list(CASES)
    toks = [s.strip() for s in spec.split(",") if s.strip()]

    def hit(n: str, t: str) -> bool:
        return n == t or n.startswith((t + ":", t + "."))

    unknown = [t for t in toks if not any(hit(n, t) for n in CASES)]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return [n for n in CASES if any(hit(n, t) for t in toks)]


def child(args: argparse.Namespace) -> None:
    """Subprocess entry: run one PREPARE or CASE and write its metrics as JSON."""
    CFG.repeats, CFG.warmup = args.repeats, args.warmup
    size = int(args.size_gib * GIB)
    workdir, out = Path(args._workdir), Path(args._result)

    def builder(seed: int = 0) -> State:
        return build_state(size, seed)

    try:
        if args._phase == "prepare":
            PREPARE[args._child](builder, workdir)
            res: Metrics = {"prepared": True}
        else:
            res = CASES[args._child](builder, workdir)
            res["gbps"] = round(res["state_bytes"] / res["total_s"] / 1e9, 3)
            res["extra_peak_rss_bytes"] = res["peak_rss_bytes"] - res["baseline_rss_bytes"]
    except SkipCase as e:
        res = {"skipped": str(e)}
    out.write_text(json.dumps(res))


def run_child(name: str, phase: str, workdir: Path, args: argparse.Namespace) -> Metrics:
    """Run one phase of one case in a fresh interpreter; return its metrics or the error."""
    result = workdir / f"{phase}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--_phase", phase,
           "--_workdir", str(workdir), "--_result", str(result), "--size-gib", str(args.size_gib),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0 or not result.exists():
        return {"error": f"{phase} exited {p.returncode}: " + p.stderr.strip()[-2000:]}
    return json.loads(result.read_text())


def report(results: dict[str, Metrics]) -> str:
    """Markdown table with ratios vs plain copy (stall) and vs DCP (total)."""

    def ref(name: str) -> float | None:
        r = results.get(name, {})
        return r.get("total_s") if "total_s" in r else None

    plain = results.get("plain_copy_warm", {}).get("stall_s")
    dcp_ref = {"save": ref("dcp.save:t2") or ref("dcp.save:t1"), "load": ref("dcp.load")}
    rows = ["| case | stall med (s) | total med (s) | GB/s | stored (GiB) | peak RSS (GiB) "
            "| +RSS over state (GiB) | stall / plain copy | total / DCP | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if "total_s" not in r:
            lines = (r.get("skipped") or r.get("error") or "?").strip().splitlines()
            why = (lines[0] + (" ... " + lines[-1] if len(lines) > 1 else ""))[:200]
            rows.append(f"| {name} |" + " |" * 8 + f" {why} |")
            continue
        vp = f"{r['stall_s'] / plain:.1f}x" if plain and kind_of(name) != "load" else ""
        d = dcp_ref.get(kind_of(name))
        vd = f"{r['total_s'] / d:.2f}x" if d else ""
        note = ", ".join(f"{k}={r[k]}" for k in ("first_stall_s", "verified") if k in r)
        if "cache" in r:
            note += ", cache=" + "/".join(c["cache"] for c in r["cache"])
        rows.append(f"| {name} | {r['stall_s']:.3f} | {r['total_s']:.3f} | {r['gbps']:.2f} "
                    f"| {r['bytes_stored'] / GIB:.2f} | {r['peak_rss_bytes'] / GIB:.2f} "
                    f"| {r['extra_peak_rss_bytes'] / GIB:.2f} | {vp} | {vd} | {note} |"
                    )  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="total state size (params+Adam)")
    ap.add_argument("--repeats", type=int, default=3, help="measured repetitions per case")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured saves before (save cases)")
    ap.add_argument("--cases", help="comma list (default all): " + ", ".join(CASES))
    ap.add_argument("--out", default="bench/results/save_load.json", help="JSON results path")
    ap.add_argument("--workdir", help="scratch directory on the disk under test (default $TMPDIR)")
    for hidden in ("--_child", "--_phase", "--_workdir", "--_result"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child(args)

    names, results = select(args.cases), {}
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    size = int(args.size_gib * GIB)
    n_params = sum(torch.Size(s).numel() for _, s in gpt_shapes(size))
    print(f"state: {n_params / 1e6:.1f}M params, {3 * n_params * 4 / GIB:.2f} GiB; cases: {names}")
    for name in names:
        wd = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            r = run_child(name, "prepare", wd, args) if name in PREPARE else {}
            if not ("error" in r or "skipped" in r):
                r = run_child(name, "run", wd, args)
            results[name] = r
            results[name]["kind"] = kind_of(name)
            print(f"  {name}: {time.perf_counter() - t0:.0f}s {json.dumps(results[name])[:300]}")
        finally:
            shutil.rmtree(wd, ignore_errors=True)
    table = report(results)
    print("\n" + table)
    meta = {"size_gib": args.size_gib, "repeats": args.repeats, "warmup": args.warmup,
            "params": n_params, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "started": started,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": results, "table": table}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"\nstarted {started}, load average {meta['loadavg_start']} -> {meta['loadavg_end']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
