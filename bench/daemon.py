"""The daemon path side by side: save stall, restore from memory vs disk, persistence rate.

    python bench/daemon.py --gib 2 --repeats 3 --out bench/results/daemon_2g.json

One run starts two real ``ckptd`` daemons (``node-0``, ``node-1``: separate processes,
static peers on 127.0.0.1, erasure off, no rate limit, shared memory in a fresh
``/dev/shm`` directory), then runs, each in a fresh subprocess:

1. **save** (the "trainer"): a mixed-precision transformer state (bf16 weights, fp32
   master copy, fp32 Adam ``exp_avg``/``exp_avg_sq``; several hundred tensors). Every
   round (two warm-ups: the first two daemon saves map the two shared-memory buffers
   of the double-buffered slot; then ``--repeats``) measures, one after the other and each to
   completion before the next starts: a plain ``copy_`` into warm, pre-faulted buffers
   of the same size; ``ckpt.save(blocking=False)`` through ``node-0`` (stall =
   ``h.stall_s``; ``h.wait()`` with ``daemon_wait="committed"`` = staged -> committed
   in storage, plus the daemon's own ``persist_lag_seconds``); DCP ``async_save``
   (stall = until it returns), with a new default stager each save and with a reused
   ``DefaultStager``. The trainer then SIGKILLs itself (a crash) after the last round.
2. **load** (the restarted trainer, another process): into a differently-valued state,
   every repeat: ``ckpt.load`` from ``node-0``'s memory (unix socket data channel), from
   ``node-1`` while ``node-0`` holds the snapshot (peer: TCP data channel), from the
   persisted checkpoint on disk (``load_from_memory=False``), and DCP ``load`` of the
   DCP checkpoint of the same state. The page cache is dropped before every load
   (``echo 3 > /proc/sys/vm/drop_caches`` when root; ``POSIX_FADV_DONTNEED`` otherwise,
   see ``cache`` in the output). Every load is verified against per-tensor checksums.
3. **dd**: raw disk bandwidth on the filesystem of the checkpoints, same byte count:
   ``dd bs=8M oflag=direct`` and ``dd bs=8M conv=fsync``.

Every temporary file, shared-memory file and process is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from save_load import (
    GIB,
    du,
    fingerprint,
    fsync_tree,
    gpt_shapes,
    make_cold,
    med,
    mutate,
    state_nbytes,
    tensors,
)

State = dict[str, Any]
TOKEN = "bench-token-0123456789abcdef"
START_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- state
def build_state(size_bytes: int, seed: int = 0) -> State:
    """Mixed-precision GPT-like state of ~``size_bytes``: bf16 model, fp32 master + Adam.

    14 bytes per parameter (2 bf16 + 4 master + 4 exp_avg + 4 exp_avg_sq); the shapes are
    ``bench/save_load.py``'s ``gpt_shapes`` (wte/wpe, 12 tensors per layer, final norm).
    """
    shapes = gpt_shapes(size_bytes * 12 // 14)

    def make(i: int) -> tuple[torch.Tensor, ...]:
        name, shape = shapes[i]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        mean = 1.0 if (".ln" in name or name.startswith("ln_f")) and "weight" in name else 0.0
        master = torch.empty(shape).normal_(mean, 0.02, generator=g)
        m = torch.empty(shape).normal_(0.0, 1e-3, generator=g)
        v = torch.empty(shape).normal_(0.0, 1e-4, generator=g).square_().add_(1e-12)
        return master.to(torch.bfloat16), master, m, v

    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(make, range(len(shapes))))
    names = [n for n, _ in shapes]
    model = {n: w for n, (w, _, _, _) in zip(names, made)}
    optim = {n: {"step": torch.tensor(float(1000 + seed)), "master": p, "exp_avg": m,
                 "exp_avg_sq": v} for n, (_, p, m, v) in zip(names, made)}  # fmt: skip
    return {"model": model, "optim": {"state": optim, "param_groups": [{"lr": 3e-4}]}}


def describe(state: State) -> dict[str, Any]:
    ts = list(tensors(state))
    by = {str(dt): sum(t.numel() * t.element_size() for t in ts if t.dtype == dt)
          for dt in {t.dtype for t in ts}}  # fmt: skip
    return {"tensors": len(ts), "bytes": state_nbytes(state), "bytes_by_dtype": by}


def same(got: list[float], expect: list[float]) -> bool:
    return len(got) == len(expect) and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(got, expect)
    )


# ----------------------------------------------------------------------------- page cache
def drop_caches(path: Path) -> str:
    """Drop the page cache (root) or at least evict ``path``'s files; says which."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError:
        return "fadvise:" + make_cold(path)["cache"]


# ----------------------------------------------------------------------------- daemons
class Daemon:
    """One ``ckptd`` process with its config, socket directory and shared-memory dir."""

    def __init__(self, name: str, base: Path, shm_base: Path, port: int, budget: int) -> None:
        self.name, self.dir, self.port = name, base / name, port
        self.dir.mkdir()
        self.shm_dir = shm_base / name
        self.socket_path = str(self.dir / "sock" / "ckptd.sock")  # dir made by ckptd, 0700
        self.config = {
            "node_name": name, "socket_path": self.socket_path,
            "listen": {"host": "127.0.0.1", "port": port}, "data": {"port": 0},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "erasure": {"n": 2, "m": 0},
            "memory": {"shm_dir": str(self.shm_dir), "budget_bytes": budget},
            "persistence": {"root_url": None, "rate_limit": None},
            "retention": {"keep_last": 1},
            "auth": {"token_file": str(base / "token")},
            "log_level": "info",
        }  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None

    def start(self, peers: list[Daemon]) -> None:
        self.config["peers"] = {"static": [f"{p.name}=127.0.0.1:{p.port}" for p in peers]}
        cfg = self.dir / "ckptd.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        exe = shutil.which("ckptd")
        cmd = [exe] if exe else [sys.executable, "-m", "ckptd.daemon.main"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
        self.log = open(self.dir / "stderr.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*cmd, "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=self.log, env=env
        )

    def wait_ready(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.stderr()}")
            try:
                with grpc.insecure_channel(f"unix:{self.socket_path}") as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not serve in {START_TIMEOUT_S} s")
            time.sleep(0.1)

    def stderr(self) -> str:
        return (self.dir / "stderr.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- save child
def child_save(a: dict[str, Any]) -> dict[str, Any]:
    """Stall of plain copy / ckpt via daemon / DCP async_save (see module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import ckpt
    from ckpt.daemon_client import job_id_for

    state = build_state(a["size"], seed=0)
    info = describe(state)
    root, dcp_dir = a["root"], Path(a["dcp_dir"])
    ckpt.configure(daemon_socket=a["sockets"][0], daemon_token=TOKEN, daemon_wait="committed")
    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU-only options
    bufs: list[torch.Tensor] = []
    rows: dict[str, list[dict[str, float]]] = {}
    first: dict[str, dict[str, float]] = {}
    last_dcp: Path | None = None

    def plain(i: int) -> dict[str, float]:
        if not bufs:  # warm-up round: allocate and touch
            bufs.extend(torch.empty_like(t).fill_(0) for t in tensors(state))
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors(state)):
            b.copy_(t)
        return {"stall_s": time.perf_counter() - t0}

    def daemon(i: int) -> dict[str, float]:
        os.sync()
        wall0 = time.time() - 0.05  # coarse fs timestamps: only this step's files count
        t0 = time.perf_counter()
        h = ckpt.save(state, step=i, root=root, blocking=False)
        t1 = time.perf_counter()
        h.wait()
        t2 = time.perf_counter()
        lag = _persist_lag(ckpt, job_id_for(root), i)
        return {"stall_s": h.stall_s, "call_s": t1 - t0, "staged_to_committed_s": t2 - t1,
                "persist_lag_s": lag, "stored_bytes": du(Path(root), newer_than=wall0)}  # fmt: skip

    def dcp_save(reuse: bool) -> Callable[[int], dict[str, float]]:
        def run(i: int) -> dict[str, float]:
            nonlocal last_dcp
            out = dcp_dir / f"{'r' if reuse else 'd'}{i}"
            os.sync()
            t0 = time.perf_counter()
            writer = dcp.FileSystemWriter(out, thread_count=2)
            kw = {"async_stager": stager} if reuse else {}
            fut = dcp.async_save(state, storage_writer=writer, **kw)
            t1 = time.perf_counter()
            getattr(fut, "upload_completion", fut).result()
            fsync_tree(out)
            t2 = time.perf_counter()
            if last_dcp is not None:
                shutil.rmtree(last_dcp, ignore_errors=True)
            last_dcp = out  # the newest DCP checkpoint stays for the load child
            return {"stall_s": t1 - t0, "total_s": t2 - t0}

        return run

    cases = {
        "plain_copy_warm": plain,
        "ckpt.save via ckptd": daemon,
        "dcp.async_save": dcp_save(False),
        "dcp.async_save:reused_stager": dcp_save(True),
    }
    for i in range(a["warmup"] + a["repeats"]):
        for name, fn in cases.items():  # all cases see the same (mutated) state this round
            r = fn(i)
            if i < a["warmup"]:
                first.setdefault(name, r)
            else:
                rows.setdefault(name, []).append(r)
        if i < a["warmup"] + a["repeats"] - 1:
            mutate(state)
    # The newest daemon step and the newest DCP checkpoint hold this state.
    stager.close()
    assert last_dcp is not None
    return {
        "state": info,
        "rows": rows,
        "first": first,
        "fingerprint": fingerprint(state),
        "step": a["warmup"] + a["repeats"] - 1,
        "dcp_ckpt": str(last_dcp),
    }


def _persist_lag(ckpt: Any, job: str, step: int) -> float | None:
    """The daemon's ``persist_lag_seconds`` (staged -> persisted) of ``step``."""
    from ckpt.daemon_client import DaemonClient

    client = DaemonClient(ckpt.get_config().daemon_socket, TOKEN)
    try:
        status = client.job_status(job)
    finally:
        client.close()
    lags = [s.persist_lag_seconds for v in status.nodes for s in v.local.steps if s.step == step]
    return max(lags) if lags else None


# ----------------------------------------------------------------------------- load child
def child_load(a: dict[str, Any]) -> dict[str, Any]:
    """Restore the same state from memory (local, peer), disk, and DCP (see docstring)."""
    import torch.distributed.checkpoint as dcp

    import ckpt

    state = build_state(a["size"], seed=1)  # touched, other values: a restarted trainer
    expect = a["fingerprint"]
    root, dcp_ckpt = a["root"], Path(a["dcp_ckpt"])
    sock0, sock1 = a["sockets"]

    def via(socket: str | None, from_memory: bool, want: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            ckpt.configure(daemon_socket=socket, daemon_token=TOKEN, load_from_memory=from_memory)
            t0 = time.perf_counter()
            res = ckpt.load(state, root)
            dt = time.perf_counter() - t0
            ok = res.source == want and res.step == a["step"]
            return {"s": dt, "source": res.source, "ok_source": ok}

        return run

    def dcp_load() -> dict[str, Any]:
        t0 = time.perf_counter()
        dcp.load(state, storage_reader=dcp.FileSystemReader(dcp_ckpt))
        return {"s": time.perf_counter() - t0, "ok_source": True}

    cases = {"ckpt.load from ckptd memory (local daemon)": via(sock0, True, "memory"),
             "ckpt.load from ckptd memory (peer daemon, TCP)": via(sock1, True, "memory"),
             "ckpt.load from disk (persisted by ckptd)": via(sock0, False, "storage"),
             "dcp.load from disk": dcp_load}  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {}
    for _ in range(a["repeats"]):
        for name, fn in cases.items():
            mutate(state)  # so that a load that fills nothing cannot verify
            cache = drop_caches(Path(a["workdir"]))
            r = fn()
            r["cache"] = cache
            r["verified"] = same(fingerprint(state), expect)
            rows.setdefault(name, []).append(r)
    ckpt.shutdown()
    return {"rows": rows, "state": describe(state)}


# ----------------------------------------------------------------------------- dd
def dd_rounds(workdir: Path, nbytes: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``dd`` writing ``nbytes`` of zeros, O_DIRECT and buffered + fsync."""
    count = max(1, math.ceil(nbytes / (8 << 20)))
    out: dict[str, list[float]] = {}
    target = workdir / "dd.bin"
    for _ in range(repeats):
        for name, flag in (("dd oflag=direct", "oflag=direct"), ("dd conv=fsync", "conv=fsync")):
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={target}", "bs=8M", f"count={count}", flag],
                check=True,
                capture_output=True,
            )
            out.setdefault(name, []).append(time.perf_counter() - t0)
            target.unlink()
    return out


# ----------------------------------------------------------------------------- driver
def run_child(role: str, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run ``role`` in a fresh interpreter; the save child may end by SIGKILL (its crash)."""
    inp, res = workdir / f"{role}.in.json", workdir / f"{role}.out.json"
    inp.write_text(json.dumps(args))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", role,
                        "--_io", str(inp), str(res)], capture_output=True, text=True,
                       check=False)  # fmt: skip
    if not res.exists():
        raise RuntimeError(f"{role} child exited {p.returncode}:\n{p.stderr[-4000:]}")
    return dict(json.loads(res.read_text()))


def child_main(role: str, inp: str, out: str) -> None:
    a = json.loads(Path(inp).read_text())
    res = child_save(a) if role == "save" else child_load(a)
    Path(out).write_text(json.dumps(res))
    if role == "save":  # the trainer crashes: the daemons keep its snapshot in memory
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _join(xs: Any) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def summarize(
    save: dict[str, Any], load: dict[str, Any], dd: dict[str, list[float]], gb: float
) -> tuple[str, dict[str, Any]]:
    """Markdown tables and the targets, from the three phases' raw rows."""
    s, lines, tg = save["rows"], [], {}
    plain = med([r["stall_s"] for r in s["plain_copy_warm"]])
    dcp_st = med([r["stall_s"] for r in s["dcp.async_save"]])
    lines += [
        "| case | stall med (s) | all (s) | stall / plain copy | DCP stall / this | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in s.items():
        st = med([r["stall_s"] for r in rs])
        note = f"first (warm-up) {save['first'][name]['stall_s']:.3f} s"
        if "total_s" in rs[0]:
            note += f"; done+fsync {med([r['total_s'] for r in rs]):.2f} s"
        lines.append(
            f"| {name} | {st:.3f} | {_join(r['stall_s'] for r in rs)} "
            f"| {st / plain:.2f}x | {dcp_st / st:.1f}x | {note} |"
        )
    d = med([r["stall_s"] for r in s["ckpt.save via ckptd"]])
    tg["stall <= 1.5x plain copy"] = (d / plain, d / plain <= 1.5)
    tg["stall >= 3x lower than DCP async_save"] = (dcp_st / d, dcp_st / d >= 3)

    lines += [
        "",
        "| restore | med (s) | all (s) | GB/s | / disk (ckpt) | verified | cache |",
        "|---|---|---|---|---|---|---|",
    ]
    disk = med([r["s"] for r in load["rows"]["ckpt.load from disk (persisted by ckptd)"]])
    for name, rs in load["rows"].items():
        t = med([r["s"] for r in rs])
        ok = all(r["verified"] and r["ok_source"] for r in rs)
        cache = "/".join(sorted({r["cache"] for r in rs}))
        lines.append(
            f"| {name} | {t:.3f} | {_join(r['s'] for r in rs)} "
            f"| {gb / t:.2f} | {t / disk:.2f}x | {ok} | {cache} |"
        )
    mem = med([r["s"] for r in load["rows"]["ckpt.load from ckptd memory (local daemon)"]])
    peer = med([r["s"] for r in load["rows"]["ckpt.load from ckptd memory (peer daemon, TCP)"]])
    tg["restore from memory faster than disk (local)"] = (disk / mem, mem < disk)
    tg["restore from memory faster than disk (peer)"] = (disk / peer, peer < disk)

    rs = s["ckpt.save via ckptd"]
    stored = med([r["stored_bytes"] for r in rs]) / 1e9
    commit = med([r["staged_to_committed_s"] for r in rs])
    lags = [r["persist_lag_s"] for r in rs if r["persist_lag_s"]]
    lag = med(lags) if lags else float("nan")
    dd_direct, dd_fsync = med(dd["dd oflag=direct"]), med(dd["dd conv=fsync"])
    dd_best = min(dd_direct, dd_fsync)
    lines += [
        "",
        "| persistence | med (s) | all (s) | GB/s (state bytes) | / dd best |",
        "|---|---|---|---|---|",
    ]
    for name, t, xs in (
        ("ckptd persist (daemon persist_lag_seconds: staged -> persisted)", lag, lags),
        (
            "ckptd staged -> committed (client h.wait() after the stall)",
            commit,
            [r["staged_to_committed_s"] for r in rs],
        ),
        ("dd bs=8M oflag=direct", dd_direct, dd["dd oflag=direct"]),
        ("dd bs=8M conv=fsync", dd_fsync, dd["dd conv=fsync"]),
    ):
        lines.append(f"| {name} | {t:.3f} | {_join(xs)} | {gb / t:.2f} | {dd_best / t:.0%} |")
    lines.append(f"\nbytes stored per step: {stored:.3f} GB (state {gb:.3f} GB)")
    tg["persist (staged -> committed) >= 70% of dd"] = (dd_best / commit, dd_best / commit >= 0.7)
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for k, (v, ok) in tg.items():
        lines.append(f"| {k} | {v:.2f}x | {'met' if ok else '**not met**'} |")
    return "\n".join(lines), {k: [round(v, 3), ok] for k, (v, ok) in tg.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="state size in GiB (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (median; >= 3)")
    ap.add_argument(
        "--warmup", type=int, default=2, help="unmeasured save rounds (2: both shm buffers)"
    )
    ap.add_argument("--workdir", help="scratch dir on the disk under test (default $TMPDIR)")
    ap.add_argument("--out", default="bench/results/daemon.json", help="JSON results path")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_io", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child_main(args._child, *args._io)

    size = int(args.gib * GIB)
    base = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=args.workdir))
    shm = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir="/dev/shm"))
    (base / "token").write_text(TOKEN + "\n")
    os.chmod(base / "token", 0o600)
    budget = 2 * size + (512 << 20)  # double-buffered snapshot of one rank
    nodes = [Daemon(f"node-{i}", base, shm, free_port(), budget) for i in range(2)]
    common = {"size": size, "repeats": args.repeats, "warmup": args.warmup,
              "sockets": [n.socket_path for n in nodes], "root": str(base / "ckpt"),
              "dcp_dir": str(base / "dcp"), "workdir": str(base)}  # fmt: skip
    t_start = time.time()
    load_avg: list[tuple[float, ...]] = [os.getloadavg()]
    try:
        for n in nodes:
            n.start(nodes)
        for n in nodes:
            n.wait_ready()
        (base / "dcp").mkdir()
        print(f"daemons up; shm {shm}; work {base}", flush=True)
        save = run_child("save", common, base)
        load_avg.append(os.getloadavg())
        print(f"save phase done: {json.dumps(save['state'])}", flush=True)
        load = run_child(
            "load",
            {
                **common,
                "fingerprint": save["fingerprint"],
                "step": save["step"],
                "dcp_ckpt": save["dcp_ckpt"],
            },
            base,
        )
        load_avg.append(os.getloadavg())
        print("load phase done", flush=True)
        dd = dd_rounds(base, save["state"]["bytes"], args.repeats)
        load_avg.append(os.getloadavg())
        logs = {n.name: n.stderr() for n in nodes}
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    table, targets = summarize(save, load, dd, save["state"]["bytes"] / 1e9)
    print("\n" + table)
    meta = {"gib": args.gib, "repeats": args.repeats, "warmup": args.warmup,
            "state": save["state"], "torch": torch.__version__, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "kernel": platform.release(),
            "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
            "load_avg": load_avg, "drop_caches": sorted(
                {r["cache"] for rs in load["rows"].values() for r in rs})}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "save": save["rows"], "save_first": save["first"],
           "load": load["rows"], "dd": dd, "targets": targets, "table": table,
           "daemon_log_tail": logs}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
