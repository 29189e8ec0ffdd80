"""Node loss: erasure groups of real daemons rebuild lost nodes' snapshots bit-exact.

Four daemons on 127.0.0.1 form one group with n = 4, m = 2; four trainer processes (one
per node) save a ZeRO state through them, wait until the step is protected and
persisted, and are SIGKILLed. Then daemons are SIGKILLed one after another: with 1 and 2
lost, a restarted job of another layout loads the step from memory (the lost nodes'
ranks rebuilt by a survivor from data and parity); with 3 lost it falls back to the
persisted checkpoint and says so.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import TOKEN, Node, daemon_cluster, wait_until
from mp_harness import Proc, run
from test_daemon_snapshots import STEP, _save_with_trainers, load_and_check

from ckpt.daemon_client import DaemonClient, job_id_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def group() -> Iterator[list[Node]]:
    """Four running daemons, one erasure group with n = 4, m = 2."""
    with daemon_cluster(4, prefix="cke-", erasure={"n": 4, "m": 2}) as cluster:
        yield cluster


def _restore(p: Proc, world: int, root: str, sockets: list[str], source: str,
             step: int = STEP, save_next: bool = False) -> None:
    p.phase(world, load_and_check, root, sockets, source, step, save_next)


def _kill(node: Node) -> None:
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGKILL)  # the node is gone: memory and daemon
    node.proc.wait(10)
    node.log_file.close()
    node.proc = None


def test_lose_one_two_then_three_nodes_of_a_group(group: list[Node], tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    _save_with_trainers(group, 4, root, wait="committed")
    client = DaemonClient(group[0].socket_path, TOKEN)
    try:
        status = client.job_status(job_id_for(root))
        steps = [st for v in status.nodes for st in v.local.steps if st.step == STEP]
        assert len(steps) == 4 and all(st.protected and st.parity_held for st in steps), steps
        assert all(list(st.group) == [n.name for n in group] for st in steps)
    finally:
        client.close()

    for lost in (3, 2):  # lose node-3, then node-2 as well: m = 2 rebuilds both
        _kill(group[lost])
        survivors = [n for n in group if n.proc is not None]
        wait_until(lambda s=survivors, gone=group[lost].name: all(
            _sees_down(n, gone) for n in s), 20, f"survivors to see {group[lost].name} down")
        run(_restore, len(survivors), (len(survivors), root,
                                       [n.socket_path for n in survivors], "memory"), timeout=120)

    _kill(group[1])  # three of four lost: more than m, storage is the fallback
    wait_until(lambda: _sees_down(group[0], group[1].name), 20, "node-0 to see node-1 down")
    run(_restore, 1, (1, root, [group[0].socket_path], "storage"), timeout=120)


def test_replacement_node_takes_the_lost_nodes_place(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    # node-4 is the spare: in every peer list, started only once node-3 is lost.
    with daemon_cluster(5, start=4, prefix="ckr-", erasure={"n": 4, "m": 2}) as cluster:
        _save_with_trainers(cluster[:4], 4, root, wait="committed")
        _kill(cluster[3])
        cluster[4].start()  # the replacement joins (it is in every peer list)
        cluster[4].wait_ready()
        job = [cluster[0], cluster[1], cluster[2], cluster[4]]
        wait_until(lambda: all(_sees_down(n, "node-3") for n in job[:3]), 20, "node-3 down")
        # The restarted job runs on the replacement: it loads step 11 (node-3's rank rebuilt
        # from the group) and saves step 12, protected by the new group [0, 1, 2, 4].
        run(_restore, 4, (4, root, [n.socket_path for n in job], "memory", STEP, True),
            timeout=150)
        client = DaemonClient(cluster[0].socket_path, TOKEN)
        try:
            status = client.job_status(job_id_for(root))
        finally:
            client.close()
        steps = [st for v in status.nodes for st in v.local.steps if st.step == STEP + 1]
        assert len(steps) == 4 and all(st.protected for st in steps), steps
        assert {tuple(st.group) for st in steps} == {("node-0", "node-1", "node-2", "node-4")}
        _kill(cluster[1])
        _kill(cluster[4])  # two of the new group lost: still rebuilt from memory
        wait_until(lambda: _sees_down(cluster[0], "node-4") and _sees_down(cluster[2], "node-1"),
                   20, "losses seen")
        run(_restore, 2, (2, root, [cluster[0].socket_path, cluster[2].socket_path], "memory",
                          STEP + 1), timeout=120)


def _sees_down(node: Node, other: str, lost: bool = False) -> bool:
    states = (4,) if lost else (3, 4)  # PEER_STATE_SUSPECT, PEER_STATE_LOST
    return any(p.name == other and p.state in states for p in node.status().peers)


def test_hung_peer_is_treated_as_lost_and_rebuilt(group: list[Node], tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    _save_with_trainers(group, 4, root, wait="protected")
    hung = group[2]
    assert hung.proc is not None
    os.kill(hung.proc.pid, signal.SIGSTOP)  # alive but silent: heartbeats and reads time out
    try:
        live = [n for n in group if n is not hung]
        wait_until(lambda: all(_sees_down(n, hung.name, lost=True) for n in live), 20,
                   "hung peer marked lost")
        run(_restore, 3, (3, root, [n.socket_path for n in live], "memory"), timeout=150)
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
