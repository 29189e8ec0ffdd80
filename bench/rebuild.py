"""Restore after losing a node: erasure-rebuilt from the surviving daemons vs from disk.

    python bench/rebuild.py --node-gib 1 --repeats 3 --out bench/results/rebuild.json

Three real ``ckptd`` daemons (``node-0..2``, one erasure group, n = 3, m = 1: k = 2 data
blocks per stripe, parity on the third member) and a 3-rank gloo job, one rank per node,
each saving ``--node-gib`` of a mixed-precision state (its own shard: a ZeRO-3-like
layout, every rank's tensors distinct) through its node's daemon, then waiting until the
step is protected and committed to local disk. The trainers exit and ``node-0``'s daemon
is SIGKILLed: the node and its shared memory are lost.

A restarted 3-rank job (ranks on node-1, node-1, node-2: node-0 is gone, the others stay
where they were) then loads the
step, every repeat, from:

* **memory**: rank 0's shard rebuilt on the fly by a survivor (``lost/...``: it pulls
  the k surviving blocks of each stripe and decodes them); ranks 1 and 2 read their own
  node's shared memory;
* **disk**: the persisted checkpoint (``load_from_memory=False``), page cache dropped
  before every load (``echo 3 > /proc/sys/vm/drop_caches`` as root).

The figure is the job's restore time (the slowest rank) and rank 0's own time (the lost
node's shard). Every load is checked against per-tensor checksums. Everything started is
stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from save_load import GIB, fingerprint, med, mutate, state_nbytes

from daemon import TOKEN, Daemon, build_state, drop_caches, free_port

STEP = 100


def _shard(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank-distinct names: every rank's tensors are its own logical tensors."""
    return {f"r{rank}": state}


def _rank(rank: int, world: int, port: int, a: dict[str, Any], out: dict[int, Any]) -> None:
    import torch.distributed as dist

    import ckpt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        sock = a["sockets"][rank]
        ckpt.configure(daemon_socket=sock, daemon_token=TOKEN, daemon_wait="committed",
                       read_workers=4)
        nbytes = int(a["node_gib"] * GIB)
        state = _shard(build_state(nbytes, seed=rank + 1), rank)
        if a["role"] == "save":
            ckpt.save(state, STEP, a["root"], blocking=False).wait()
            out[rank] = {"fingerprint": fingerprint(state), "bytes": state_nbytes(state)}
            return
        expect = a["fingerprints"][rank]
        mutate(state)
        times: dict[str, list[float]] = {"memory": [], "disk": []}
        sources: dict[str, list[str]] = {"memory": [], "disk": []}
        busy: dict[str, list[float]] = {"memory": [], "disk": []}
        # CPU seconds during each load: this rank, then (rank 0 only) each live daemon
        cpu_s: dict[str, list[list[float]]] = {"memory": [], "disk": []}
        for _ in range(a["repeats"]):
            for case in ("memory", "disk"):
                ckpt.configure(load_from_memory=case == "memory")
                dist.barrier()
                if rank == 0:
                    drop_caches(Path(a["root"]))
                dist.barrier()
                prof = spy = None
                if a.get("profile_load") and rank == 0 and case == "memory":
                    import cProfile

                    prof = cProfile.Profile()
                    prof.enable()
                if a.get("spy_load") and rank == a["spy_rank"] and case == "memory":
                    spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "-r",
                                            "250", "-f", "raw", "--threads", "--nonblocking",
                                            "-o", a["spy_load"]], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                    time.sleep(1.0)  # py-spy attaches
                cpu0, own0 = _cpu_ticks(), _proc_cpu_s([os.getpid(), *a.get("daemon_pids", [])])
                t0 = time.perf_counter()
                res = ckpt.load(state, a["root"])
                times[case].append(time.perf_counter() - t0)
                busy[case].append(_busy_cores(cpu0, _cpu_ticks()))
                own1 = _proc_cpu_s([os.getpid(), *a.get("daemon_pids", [])])
                cpu_s[case].append([round(y - x, 2) for x, y in zip(own0, own1)])
                if prof is not None:
                    prof.disable()
                    prof.dump_stats(a["profile_load"])
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                sources[case].append(res.source)
                got = fingerprint(state)
                if got != expect:
                    raise AssertionError(f"rank {rank}: {case} load is not bit-exact")
                mutate(state)
        out[rank] = {"times": times, "sources": sources, "busy_cores": busy, "cpu_s": cpu_s}
    finally:
        ckpt.shutdown()
        dist.destroy_process_group()


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def _proc_cpu_s(pids: list[int]) -> list[float]:
    """User + system CPU seconds so far of each process (all its threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except OSError:
            out.append(0.0)
    return out


def _busy_cores(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Average number of busy cores between two :func:`_cpu_ticks` readings."""
    total = b[1] - a[1]
    return round((b[0] - a[0]) / total * (os.cpu_count() or 1), 2) if total else 0.0


def _job(world: int, a: dict[str, Any]) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, a, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{a['role']} job failed: exit codes {[p.exitcode for p in procs]}")
        return dict(out)


def _serve_probe(survivor: Daemon, root: str, profile: str | None) -> dict[str, Any]:
    """The lost node's whole payload read straight from one survivor's data channel
    (``lost/`` key: that daemon pulls the other shards and decodes), no trainer involved:
    the rebuild path's own throughput, separate from the load's planning and copies."""
    from ckpt.daemon_client import DaemonClient, job_id_for

    client = DaemonClient(survivor.socket_path, TOKEN)
    spy = None
    try:
        status = client.job_status(job_id_for(root))
        lost = [s for v in status.nodes if v.reachable for s in v.local.snapshots if s.key]
        if not lost:
            raise RuntimeError("no survivor lists the lost node's ranks")
        key = lost[0].key
        data = client.data(lost[0].data_address or status.nodes[0].local.data_address)
        size = data.stat(key)
        out = bytearray(size)
        if profile:
            assert survivor.proc is not None
            spy = subprocess.Popen(["py-spy", "record", "-o", profile, "-r", "200", "-f", "raw",
                                    "-p", str(survivor.proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        t0 = time.perf_counter()
        step = 16 << 20
        for a in range(0, size, step):
            data.get_range(key, a, min(size, a + step), memoryview(out)[a : a + step])
        dt = time.perf_counter() - t0
        return {"key": key, "bytes": size, "seconds": round(dt, 3),
                "gb_per_s": round(size / dt / 1e9, 3)}
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        client.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node-gib", type=float, default=1.0, help="state per node (GiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/rebuild.json")
    ap.add_argument("--profile", default=None,
                    help="py-spy the serving daemon during the serve probe (svg path)")
    ap.add_argument("--profile-load", default=None,
                    help="cProfile rank 0's memory load (the rebuilt rank) into this file")
    ap.add_argument("--spy-load", default=None,
                    help="py-spy (all threads, raw folded stacks) a rank's memory loads")
    ap.add_argument("--spy-rank", type=int, default=0, help="the rank --spy-load records")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="ckrb-", dir="/tmp"))
    shm_base = Path(tempfile.mkdtemp(prefix="ckptd-rebuild-", dir="/dev/shm"))
    (base / "token").write_text(TOKEN)
    os.chmod(base / "token", 0o600)
    node_bytes = int(args.node_gib * GIB)
    # Room for one payload and its parity (m/(n-m) = 1/2), not for a second buffer.
    budget = int(node_bytes * 1.6) + (64 << 20)
    daemons = [Daemon(f"node-{i}", base, shm_base, free_port(), budget) for i in range(3)]
    root = str(base / "ckpt")
    try:
        for d in daemons:
            d.config["erasure"] = {"n": 3, "m": 1}
            d.config["peers"] = {}
        for d in daemons:
            d.start(daemons)
        for d in daemons:
            d.wait_ready()
        t0 = time.perf_counter()
        saved = _job(3, {"role": "save", "sockets": [d.socket_path for d in daemons],
                         "root": root, "node_gib": args.node_gib, "repeats": 0})
        save_s = time.perf_counter() - t0
        lost = daemons[0]
        assert lost.proc is not None
        lost.proc.kill()  # node-0 and its memory are gone
        lost.proc.wait(10)
        time.sleep(3.0)  # survivors mark it lost (heartbeats)
        serve = _serve_probe(daemons[1], root, args.profile)
        # Rank 0 (its node is gone) restarts on node-1; ranks 1 and 2 on their own nodes.
        sockets = [daemons[1].socket_path, daemons[1].socket_path, daemons[2].socket_path]
        got = _job(3, {"role": "load", "sockets": sockets, "root": root,
                       "node_gib": args.node_gib, "repeats": args.repeats,
                       "profile_load": args.profile_load, "spy_load": args.spy_load,
                       "spy_rank": args.spy_rank,
                       "daemon_pids": [d.proc.pid for d in daemons[1:] if d.proc is not None],
                       "fingerprints": {r: saved[r]["fingerprint"] for r in saved}})
        job = {c: [max(got[r]["times"][c][i] for r in got) for i in range(args.repeats)]
               for c in ("memory", "disk")}
        lost_rank = {c: got[0]["times"][c] for c in ("memory", "disk")}
        result = {
            "command": "python bench/rebuild.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
            "torch": torch.__version__,
            "node_bytes": saved[0]["bytes"],
            "save_to_committed_s": round(save_s, 2),
            "serve_probe": serve,
            "sources": got[0]["sources"],
            "job_restore_s": job,
            "lost_rank_restore_s": lost_rank,
            "busy_cores_during_load": got[0]["busy_cores"],  # whole machine, rank 0's window
            # CPU seconds per load: rank 0, rank 1, rank 2, then the daemons on node-1, node-2
            "cpu_s_during_load": {c: [[got[r]["cpu_s"][c][i][0] for r in sorted(got)]
                                      + got[0]["cpu_s"][c][i][1:] for i in range(args.repeats)]
                                  for c in ("memory", "disk")},
            "median": {c: {"job": med(job[c]), "lost_rank": med(lost_rank[c])}
                       for c in ("memory", "disk")},
        }
        m, dsk = result["median"]["memory"], result["median"]["disk"]
        print(json.dumps(result, indent=2))
        print(f"\nserve probe: {serve['bytes'] / GIB:.2f} GiB rebuilt by one survivor in "
              f"{serve['seconds']:.2f} s ({serve['gb_per_s']:.2f} GB/s)")
        print(f"\nrestore after losing node-0 ({saved[0]['bytes'] / GIB:.2f} GiB per node):")
        print(f"  job:       memory {m['job']:.2f} s vs disk {dsk['job']:.2f} s "
              f"({dsk['job'] / m['job']:.2f}x)")
        print(f"  lost rank: memory (rebuilt) {m['lost_rank']:.2f} s vs disk "
              f"{dsk['lost_rank']:.2f} s ({dsk['lost_rank'] / m['lost_rank']:.2f}x, "
              f"{saved[0]['bytes'] / GIB / m['lost_rank']:.2f} GiB/s rebuilt)")
        print("  CPU s per load (ranks 0-2, daemons node-1, node-2): " + "; ".join(
            f"{c} {result['cpu_s_during_load'][c][-1]}" for c in ("memory", "disk")))
        print("  busy cores during the loads: " + ", ".join(
            f"{c} {med(got[0]['busy_cores'][c]):.2f}" for c in ("memory", "disk")))
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm_base, ignore_errors=True)


if __name__ == "__main__":
    main()
