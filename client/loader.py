"""The load pipeline of one rank: open, plan, check, read in parallel, restore.

Loading needs no cooperation between ranks except an optional strict-mode reduction
(so that a tensor another pipeline stage loads is not reported as unexpected here).
Tensors are filled in place; chunks are read by a bounded thread pool and scattered
straight into the destination views, so memory beyond the state is a few chunks.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.config import Config
from ckpt.daemon_client import DaemonClient, job_id_for
from ckpt.dist import DistContext
from ckpt.memory_load import (
    MemoryStep,
    execute_read,
    find_memory_steps,
    held_steps,
    plan_memory_load,
)
from ckptd.errors import CkptError, MissingKeysError, StateMergeError
from ckptd.execute import apply_reads, direct_destinations
from ckptd.formats import commit as commit_mod
from ckptd.formats.manifest import Manifest
from ckptd.formats.reader import CheckpointReader, ScratchBuffer
from ckptd.formats.storage import Storage
from ckptd.layout import Layout, build_rank_layout, local_tensor
from ckptd.planner import ChunkRead, build_load_plan
from ckptd.rng import pick_rng_source, restore_rng
from ckptd.statedict import FlatState, flatten_state

log = logging.getLogger("ckpt.load")

MergeRule = str | Callable[[list[Any]], Any]
_MERGES: dict[str, Callable[[list[Any]], Any]] = {
    "first": lambda vs: vs[0],
    "sum": sum,
    "max": max,
    "min": min,
    "list": list,
}


@dataclass(frozen=True)
class LoadResult:
    """Outcome of a load: the step, keys not found / not used, bytes read, time."""

    step: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    bytes_read: int
    seconds: float
    source: str = "storage"  # "memory" when read from the daemons' snapshots


def load_state(
    state: dict[str, Any],
    storage: Storage,
    step: int | None,
    layout: Layout | None,
    strict: bool,
    merge: Mapping[str, MergeRule] | None,
    config: Config,
    ctx: DistContext,
    daemon: DaemonClient | None = None,
    root: str | None = None,
) -> LoadResult:
    """Fill ``state`` in place from a committed checkpoint or from the daemons' memory
    (see module docstring)."""
    t0 = time.perf_counter()
    flat = flatten_state(state)
    lay = build_rank_layout(flat, layout, ctx.rank)
    mem = None
    if daemon is not None and config.load_from_memory and root is not None:
        mem = _choose_memory_step(daemon, job_id_for(root, config.job_id), storage, step, ctx)
    if mem is not None:
        plan = plan_memory_load(lay, mem)
        man = mem.manifest()
        reader = None
        source = f"memory of the daemons ({len({h.node for h in mem.held.values()})} nodes)"
    else:
        reader = CheckpointReader.open(storage, step)
        plan = build_load_plan(lay, reader.stored_tensors())
        man = reader.manifest
        source = storage.url
    missing = set(plan.missing) | {
        k for k in flat.objects if k not in man.state and k not in man.per_rank_state
    }
    unexpected = _global_unexpected(man, lay, flat, ctx)
    if strict and (missing or unexpected):
        raise MissingKeysError(sorted(missing), sorted(unexpected))
    if missing or unexpected:
        log.warning(
            "load of step %d: %d missing key(s), %d unexpected",
            man.step,
            len(missing),
            len(unexpected),
        )
    objects = _resolve_objects(flat, man, lay.coords_key(), ctx, merge or {})
    if reader is not None:  # a missing object fails here, before any tensor is touched
        reader.check_objects(plan.reads)

    locals_ = {e.key: local_tensor(flat.tensors[e.key]) for e in lay.entries}
    nbytes = 0
    local_data = f"unix:{daemon.socket_path}.data" if daemon is not None else None
    with (
        torch.no_grad(),
        ThreadPoolExecutor(config.read_workers, thread_name_prefix="ckpt-read") as pool,
    ):

        scratch = threading.local()  # one reused read buffer per pool thread

        def work(r: ChunkRead) -> int:
            if mem is not None:
                assert daemon is not None
                return execute_read(daemon, mem, r, locals_, local_data)
            assert reader is not None
            dests = direct_destinations(r, locals_)
            if dests is not None and reader.read_chunk_into(r.name, r.index, dests):
                # No copy: the chunk's bytes were read straight into the tensors.
                return sum(d.numel() * d.element_size() for d in dests)
            if not hasattr(scratch, "buf"):
                scratch.buf = ScratchBuffer()
            chunk = reader.read_chunk(r.name, r.index, r.box, scratch.buf)
            apply_reads(r, chunk, locals_)
            return chunk.numel() * chunk.element_size()

        read_error: str | None = None
        try:
            # From memory, in payload order: a rebuilt rank is then read in streaming
            # windows (see RebuiltWindows), each decoded once.
            reads = sorted(plan.reads, key=lambda r: r.index) if mem is not None else plan.reads
            for n in pool.map(work, reads):
                nbytes += n
        except (CkptError, OSError) as e:
            if mem is None:
                raise
            read_error = f"rank {ctx.rank}: {type(e).__name__}: {e}"
        finally:
            if mem is not None:
                mem.windows.close()  # rebuilt windows are not needed past the reads
    if mem is not None:
        # Every rank learns whether every rank could read from memory; if one could not
        # (a peer died during the load, more shards lost than parity covers), all load the
        # newest committed step from storage instead: it overwrites every tensor.
        errors = [e for e in ctx.all_gather(read_error) if e]
        if errors:
            log.warning(
                "loading step %d from memory failed (%s); falling back to storage %s",
                man.step, "; ".join(errors[:4]), storage.url,
            )
            return load_state(state, storage, step, layout, strict, merge, config, ctx)
    for k, v in objects.items():
        flat.set_object(k, v)
    _restore_rng(flat, man, lay.coords_key(), ctx)
    flat.finalize()
    log.info("loaded step %d from %s (%d bytes)", man.step, source, nbytes)
    return LoadResult(
        man.step,
        tuple(sorted(missing)),
        tuple(sorted(unexpected)),
        nbytes,
        time.perf_counter() - t0,
        "memory" if mem is not None else "storage",
    )


def _choose_memory_step(
    daemon: DaemonClient, job: str, storage: Storage, step: int | None, ctx: DistContext
) -> MemoryStep | None:
    """The step to load from memory, decided by rank 0 for every rank, or None (storage).

    Memory wins when it holds the asked step, or (no step asked) a step at least as new as
    the newest committed one in storage. Rank 0 sends every rank where each saved rank's
    snapshot is held (parsing every rank's descriptor on every rank would cost each of
    them O(world) parses); a rank that then cannot read from memory makes every rank fall
    back to storage (see ``load_state``).
    """
    found: tuple[int, int, dict[int, Any], dict[str, str]] | None = None
    if ctx.rank == 0:
        try:
            status = daemon.job_status(job)
            if step is not None:
                candidates = [step]
            else:
                latest = commit_mod.latest_step(storage)
                candidates = [s for s in held_steps(status) if latest is None or s >= latest]
            for c in candidates:  # newest first; usually the first is complete
                steps = find_memory_steps(status, only=(c,))
                if c in steps:
                    mem = steps[c]
                    found = (c, mem.world, mem.held, mem.addresses)
                    break
        except CkptError as e:  # no daemon answer: storage is the fallback, said loudly
            log.warning("memory tier unavailable, loading from storage: %s", e)
    found = ctx.broadcast(found, background=False)
    if found is None:
        return None
    choice, world, held, addresses = found
    return MemoryStep(job, choice, world, held, addresses)


def _global_unexpected(man: Manifest, lay: Any, flat: FlatState, ctx: DistContext) -> set[str]:
    """Stored tensors / JSON keys that no rank of the job asked for."""
    names = sorted(man.tensors) + sorted(set(man.state) | set(man.per_rank_state))
    asked = {p.name for e in lay.entries for p in e.pieces} | set(flat.objects)
    mask = torch.tensor([1 if n in asked else 0 for n in names], dtype=torch.uint8)
    ctx.all_reduce_max(mask)
    return {n for n, m in zip(names, mask.tolist()) if not m}


def _same_layout(man: Manifest, coords_key: str, ctx: DistContext) -> bool:
    saved = man.layout.get("coords", [])
    return int(man.layout.get("world_size", -1)) == ctx.world and coords_key in saved


def _resolve_objects(
    flat: FlatState,
    man: Manifest,
    coords_key: str,
    ctx: DistContext,
    merge: Mapping[str, MergeRule],
) -> dict[str, Any]:
    out = {}
    same = _same_layout(man, coords_key, ctx)
    for k in flat.objects:
        if k in man.state:
            out[k] = man.state[k]
        elif k in man.per_rank_state:
            per = man.per_rank_state[k]
            if same and coords_key in per:
                out[k] = per[coords_key]
                continue
            rule = _rule_for(k, merge)
            if rule is None:
                raise StateMergeError(
                    f"state key {k!r} differs per rank ({len(per)} saved values) and the layout "
                    "changed; pass merge={" + repr(k) + ": 'sum' | 'max' | 'min' | 'first' | "
                    "'list' | callable} to ckpt.load"
                )
            order = [c for c in man.layout.get("coords", []) if c in per]
            out[k] = rule([per[c] for c in order])
    return out


def _rule_for(key: str, merge: Mapping[str, MergeRule]) -> Callable[[list[Any]], Any] | None:
    rule = merge.get(key)
    if rule is None:
        for pat, r in merge.items():
            if fnmatch.fnmatchcase(key, pat):
                rule = r
                break
    if rule is None:
        return None
    if isinstance(rule, str):
        if rule not in _MERGES:
            raise StateMergeError(
                f"unknown merge rule {rule!r} for {key!r}; use one of {sorted(_MERGES)}"
            )
        return _MERGES[rule]
    return rule


def _restore_rng(flat: FlatState, man: Manifest, coords_key: str, ctx: DistContext) -> None:
    if not flat.rng_keys or not man.rng:
        return
    order = [c for c in man.layout.get("coords", []) if c in man.rng] or sorted(man.rng)
    source, exact = pick_rng_source(coords_key, ctx.rank, man.rng, order)
    if not (exact and _same_layout(man, coords_key, ctx)):
        rule = "same coordinates" if exact else "saved rank = rank % saved world size"
        warnings.warn(
            f"layout changed: rank {ctx.rank} ({coords_key}) restores the RNG state saved by "
            f"{source} (rule: {rule}); random streams will not match an uninterrupted run",
            stacklevel=3,
        )
    for k in flat.rng_keys:
        states = man.rng[source]
        if k in states:
            restore_rng(states[k])
