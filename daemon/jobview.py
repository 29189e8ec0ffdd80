"""A job's progress across daemons as rows and text (``ckpt status``, ``ckptd status --job``).

Input: one ``JobStatus`` answer (every reachable daemon's ``LocalSnapshots``). Output: one
row per (step, node) with the ranks the node holds and how far the step got there
(staged, protected with its group, n and m, persisted, committed), plus each node's
memory use against its budget. Pure formatting: no calls.
"""

from __future__ import annotations

from typing import Any

from ckptd.rpc.v1 import daemon_pb2 as pb

_STATE = {v: k.removeprefix("STEP_STATE_").lower() for k, v in pb.StepState.items()}


def job_rows(reply: pb.JobStatusResponse) -> dict[str, Any]:
    """JSON-able view of a ``JobStatusResponse``."""
    nodes: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for view in reply.nodes:
        node = {"node": view.node, "reachable": view.reachable}
        if not view.reachable:
            node["error"] = view.error
            nodes.append(node)
            continue
        local = view.local
        node |= {"memory_used_bytes": local.memory_used_bytes,
                 "memory_budget_bytes": local.memory_budget_bytes,
                 "rebuildable_ranks": sorted(s.rank for s in local.snapshots if s.key)}
        nodes.append(node)
        for st in local.steps:
            steps.append({
                "step": st.step, "node": st.node, "state": _STATE.get(st.state, "?"),
                "ranks": list(st.ranks), "bytes": st.bytes, "group": list(st.group),
                "erasure_n": st.erasure_n, "erasure_m": st.erasure_m,
                "staged": st.state != pb.STEP_STATE_UNSPECIFIED, "protected": st.protected,
                "persisted": st.persisted, "committed": st.committed,
                "persist_lag_seconds": round(st.persist_lag_seconds, 3), "error": st.error,
            })
    steps.sort(key=lambda r: (-r["step"], r["node"]))
    return {"job": reply.job, "nodes": nodes, "steps": steps}


def format_job(doc: dict[str, Any]) -> str:
    """Human-readable table of :func:`job_rows`."""
    lines = [f"job {doc['job']}"]
    for n in doc["nodes"]:
        if not n["reachable"]:
            lines.append(f"  node {n['node']:<16} UNREACHABLE  {n.get('error', '')}")
            continue
        extra = (f"  can rebuild ranks {n['rebuildable_ranks']}"
                 if n["rebuildable_ranks"] else "")
        lines.append(f"  node {n['node']:<16} memory {_size(n['memory_used_bytes'])} of "
                     f"{_size(n['memory_budget_bytes'])}{extra}")
    if not doc["steps"]:
        lines.append("  no snapshots of this job in the daemons' memory")
        return "\n".join(lines)
    lines.append(f"  {'step':>8} {'node':<16} {'ranks':<12} {'bytes':>10} {'staged':<7}"
                 f"{'protected':<22} {'persisted':<10} {'committed':<10}")
    for r in doc["steps"]:
        prot = (f"yes {len(r['group'])}n/m={r['erasure_m']}" if r["protected"]
                else f"no (m={r['erasure_m']})")
        ranks = ",".join(str(x) for x in r["ranks"])
        error = f"  ERROR {r['error']}" if r["error"] else ""
        lines.append(f"  {r['step']:>8} {r['node']:<16} {ranks:<12} {_size(r['bytes']):>10} "
                     f"{'yes':<7}{prot:<22} {_yes(r['persisted']):<10} "
                     f"{_yes(r['committed']):<10}{error}")
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
