"""Saves through real ``ckptd`` daemons and loads from their memory.

Real daemon processes on 127.0.0.1 (two "nodes"), real trainer processes in a gloo
group that are SIGKILLed after saving, restores under another layout from the daemons'
shared memory (``LoadResult.source`` says where every load came from), daemon restarts
with re-adoption, memory-budget errors, persistence with one coordinator commit, a
daemon killed while persisting, status and metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from daemon_harness import TOKEN, Node, clean_env, daemon_cluster, free_port, wait_until
from models_tiny import assert_local
from mp_harness import Proc, run
from test_multiproc_layouts import _lookup, _zero_canonical, _zero_load, _zero_state

import ckpt
from ckptd.errors import StagingBudgetError

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

TRAINER = str(Path(__file__).with_name("daemon_trainer.py"))
STEP = 11


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """Two running daemons that know each other (erasure off: m = 0)."""
    with daemon_cluster(2, prefix="cks-", erasure={"n": 2, "m": 0}) as cluster:
        yield cluster


def _save_with_trainers(cluster: list[Node], world: int, root: str, stage: int = 1,
                        wait: str = "staged") -> None:
    """``world`` trainer processes (rank r on node r * len(cluster) // world) save, then
    are SIGKILLed once the daemons hold their snapshots."""
    port = free_port()
    procs = []
    for rank in range(world):
        node = cluster[rank * len(cluster) // world]
        env = clean_env(CKPTD_SOCKET=node.socket_path, CKPTD_JOB_TOKEN=TOKEN,
                        CKPT_DAEMON_WAIT=wait)
        procs.append(subprocess.Popen(
            [sys.executable, TRAINER, str(rank), str(world), str(port), root, str(STEP),
             str(stage)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env))
    try:
        for p in procs:
            assert p.stdout is not None
            line, seen = b"", []
            for _ in range(200):  # bounded: the trainer prints a handful of lines
                line = p.stdout.readline()
                seen.append(line)
                if not line or line.startswith(b"SAVED"):
                    break
            assert line.startswith(b"SAVED"), (
                f"trainer did not save: {b''.join(seen).decode(errors='replace')[-3000:]}\n"
                + "\n".join(f"--- {n.name}:\n{n.stderr()[-3000:]}" for n in cluster))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # the crash
            p.wait(30)
            if p.stdout is not None:
                p.stdout.close()


def _load_via(rank: int, world: int, root: str, sockets: list[str], stage: int) -> None:
    load_and_check(rank, world, root, sockets, "memory", stage=stage)


def load_and_check(rank: int, world: int, root: str, sockets: list[str], source: str,
                   step: int = STEP, save_next: bool = False, stage: int = 1) -> None:
    """Load the ZeRO state of step ``step`` through rank's daemon; check where it came
    from and every local tensor; optionally save the next step (waits until committed)."""
    ckpt.configure(daemon_socket=sockets[rank % len(sockets)], daemon_token=TOKEN)
    state, layout, expect = _zero_state(stage, rank, world, load=True)
    res = ckpt.load(state, root, strict=True, layout=layout)
    assert res.source == source and res.step == step, res
    for key, (want, pad) in expect.items():
        assert_local(_lookup(state, key), want, pad, f"dp rank {rank}/{world} ({source}): {key}")
    if save_next:  # the restarted job goes on and saves through its (new) group
        ckpt.save(state, step + 1, root, layout=layout)


def _load_storage(rank: int, world: int, root: str, stage: int) -> None:
    ckpt.configure(daemon_socket=None)  # no daemon at all: storage is the only source
    _zero_load(rank, world, root, stage)


def _storage_body(p: Proc, root: str, stage: int) -> None:
    p.phase(3, _load_storage, root, stage)


def _canonical_via(root: str, socket_path: str, stage: int) -> None:
    ckpt.configure(daemon_socket=socket_path, daemon_token=TOKEN)
    _zero_canonical(root, stage)  # one process: its daemon holds only half the ranks


def _restore_body(p: Proc, root: str, sockets: list[str], stage: int) -> None:
    p.phase(2, _load_via, root, sockets, stage)  # DP 4 -> DP 2, one rank per node
    p.solo(_canonical_via, root, sockets[1], stage)  # one process, canonical tensors


def test_trainer_crash_then_restore_other_layout_from_memory(nodes: list[Node]) -> None:
    root = str(Path(nodes[0].root).parent / "ckpt")
    _save_with_trainers(nodes, 4, root)  # then SIGKILLed: the daemons own the snapshots
    sockets = [n.socket_path for n in nodes]
    run(_restore_body, 2, (root, sockets, 1), timeout=120)


def test_daemon_restart_readopts_snapshots(nodes: list[Node]) -> None:
    root = str(Path(nodes[0].root).parent / "ckpt")
    _save_with_trainers(nodes, 4, root, stage=3)
    for n in nodes:  # one clean stop, one SIGKILL: both must keep the snapshots
        if n is nodes[0]:
            n.stop()
        else:
            assert n.proc is not None
            os.kill(n.proc.pid, signal.SIGKILL)
            n.proc.wait(10)
            n.log_file.close()
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()
    assert "adopted snapshots" in nodes[1].stderr()
    run(_restore_body, 2, (root, [n.socket_path for n in nodes], 3), timeout=120)


def _budget(socket_path: str, root: str) -> None:
    ckpt.configure(daemon_socket=socket_path, daemon_token=TOKEN, daemon_wait="staged")
    small = {"w": torch.arange(1000, dtype=torch.float32)}
    ckpt.save(small, 1, root)
    big = {"w": torch.zeros(3 << 20, dtype=torch.float32)}  # 12 MiB > the 8 MiB budget
    with pytest.raises(StagingBudgetError, match="budget"):
        ckpt.save(big, 2, root)
    got = {"w": torch.zeros(1000)}
    res = ckpt.load(got, root)
    assert res.source == "memory" and res.step == 1
    assert torch.equal(got["w"], small["w"])


def test_memory_budget_exceeded_is_a_clear_error_and_keeps_the_last_snapshot(
    tmp_path: Path,
) -> None:
    with daemon_cluster(1, start=0, prefix="ckb-", erasure={"n": 1, "m": 0}) as (node,):
        node.config["memory"]["budget_bytes"] = "8MiB"
        node.start()
        node.wait_ready()
        run(lambda_free_solo, 1, (node.socket_path, str(tmp_path / "ckpt")), timeout=60)


def lambda_free_solo(p: Proc, socket_path: str, root: str) -> None:
    p.solo(_budget, socket_path, root)


def test_status_cli_and_metrics_show_every_stage(nodes: list[Node], tmp_path: Path) -> None:
    import json

    root = str(tmp_path / "ckpt")
    _save_with_trainers(nodes, 4, root, wait="committed")
    from ckpt.daemon_client import DaemonClient, job_id_for

    client = DaemonClient(nodes[0].socket_path, TOKEN)
    try:
        status = client.job_status(job_id_for(root))
    finally:
        client.close()
    held = {s.rank: v.node for v in status.nodes for s in v.local.snapshots}
    assert held == {0: "node-0", 1: "node-0", 2: "node-1", 3: "node-1"}
    env = clean_env(CKPTD_SOCKET=nodes[1].socket_path, CKPTD_JOB_TOKEN=TOKEN)
    out = subprocess.run([sys.executable, "-m", "ckptd.cli", "status", root, "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {(r["node"], r["step"]): r for r in doc["steps"]}
    assert set(rows) == {("node-0", STEP), ("node-1", STEP)}
    for r in rows.values():  # m = 0 here: nothing to code, persisted and committed
        assert r["staged"] and r["persisted"] and r["committed"] and r["bytes"] > 0
        assert r["erasure_m"] == 0 and r["ranks"]
    assert all(n["reachable"] and n["memory_used_bytes"] > 0 for n in doc["nodes"])
    text = subprocess.run([sys.executable, "-m", "ckptd.daemon.main", "status", "--socket",
                           nodes[0].socket_path, "--job", job_id_for(root)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0 and f"{STEP}" in text.stdout and "node-1" in text.stdout
    fams = nodes[0].metrics()
    staged = [s.value for s in fams["ckptd_bytes"].samples
              if s.name == "ckptd_bytes_total" and s.labels["stage"] == "staged"]
    assert staged and staged[0] > 0
    last = {s.labels["stage"]: s.value for s in fams["ckptd_last_step"].samples}
    assert last["staged"] == STEP and last["persisted"] == STEP and last["committed"] == STEP
    stall = [s.value for s in fams["ckptd_save_stall_seconds"].samples
             if s.name == "ckptd_save_stall_seconds_count"]
    assert stall and stall[0] == 2  # one per rank of this node


def test_daemons_persist_across_nodes_and_commit_once(nodes: list[Node], tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    _save_with_trainers(nodes, 4, root, wait="committed")  # chunks span ranks and nodes
    from ckptd.formats import commit as commit_mod
    from ckptd.formats.storage import open_storage

    assert commit_mod.committed_steps(open_storage(root)) == [STEP]
    assert "step verdict" in nodes[0].stderr()  # rank 0's daemon coordinated
    run(_storage_body, 3, (root, 1), timeout=120)  # DP 4 -> DP 3 from storage alone


def test_daemon_killed_while_persisting_leaves_nothing_then_finishes(
    nodes: list[Node], tmp_path: Path
) -> None:
    from ckptd.formats import commit as commit_mod
    from ckptd.formats.storage import open_storage

    root = str(tmp_path / "ckpt")
    victim = nodes[1]
    victim.stop()
    victim.config["persistence"] = {"root_url": None, "rate_limit": 300}  # bytes/s: slow
    victim.start()
    victim.wait_ready()
    _save_with_trainers(nodes, 4, root)
    wait_until(lambda: "step persisted here" in nodes[0].stderr(), 30, "node-0 persisted")
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)  # mid-persistence (its writes are throttled)
    victim.proc.wait(10)
    victim.log_file.close()
    storage = open_storage(root)
    assert commit_mod.committed_steps(storage) == []  # nothing visible, nothing partial read
    victim.config["persistence"] = {"root_url": None}
    victim.start()  # re-adopts its snapshots and persists them again
    victim.wait_ready()
    wait_until(lambda: commit_mod.committed_steps(storage) == [STEP], 90, "the commit")
    run(_storage_body, 3, (root, 1), timeout=120)
