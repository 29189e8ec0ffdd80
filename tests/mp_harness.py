"""Run a test function on N spawned processes talking gloo over loopback.

    def body(p: Proc, root: str) -> None:
        p.phase(4, save_on_four, root)   # spawn ranks 0..3 form a gloo group of 4
        p.phase(2, load_on_two, root)    # then ranks 0..1 form a fresh group of 2
        p.solo(load_in_one_process, root)  # then rank 0 alone, without torch.distributed

    run(body, nprocs=4, args=(str(tmp_path),), timeout=90)

One spawn (a few seconds per process on a small machine) can host several process
groups of different sizes, so that "save on N_A ranks, load on N_B ranks" needs one
spawn, not two. Rendezvous goes through a TCPStore that the parent (the pytest process)
hosts on 127.0.0.1 with an OS-chosen free port; each phase uses its own key prefix.

Failure handling: the first child to raise makes the parent fail with that child's
traceback in the AssertionError message (the other children are terminated). A child
that hangs (a collective nobody else joins) dumps every thread's stack just before the
deadline; the parent includes those dumps in its message. Every phase ends with
``ckpt.shutdown()`` and ``dist.destroy_process_group()``.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds a single collective may block before gloo gives up (well below run()'s timeout).
COLLECTIVE_TIMEOUT_S = 60.0
START_METHOD = os.environ.get("CKPT_TEST_START_METHOD", "forkserver")


class Proc:
    """Handle given to the function run in every spawned process."""

    def __init__(self, index: int, nprocs: int, port: int, timeout_s: float) -> None:
        self.index = index  # spawn index; the rank in every phase that includes it
        self.nprocs = nprocs
        self._port = port
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._phase = 0
        self._store: dist.Store | None = None

    def _root_store(self) -> dist.Store:
        if self._store is None:
            self._store = dist.TCPStore(
                "127.0.0.1", self._port, is_master=False, timeout=self._timeout
            )
        return self._store

    def phase(self, world: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(rank, world, *args)`` on spawn indices ``0..world-1`` in a new gloo group.

        Every process must call ``phase`` in the same order (processes outside the group
        only count it). Returns ``fn``'s result, or None where this process sat out.
        """
        if not 1 <= world <= self.nprocs:
            raise ValueError(f"phase of {world} ranks in a run of {self.nprocs} processes")
        self._phase += 1
        if self.index >= world:
            return None
        store = dist.PrefixStore(f"phase{self._phase}", self._root_store())
        dist.init_process_group(
            "gloo", store=store, rank=self.index, world_size=world, timeout=self._timeout
        )
        try:
            return fn(self.index, world, *args)
        finally:
            _teardown()

    def solo(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on spawn index 0 only, without torch.distributed."""
        self._phase += 1
        if self.index != 0:
            return None
        try:
            return fn(*args)
        finally:
            _teardown()


def _teardown() -> None:
    import ckpt
    from ckpt.dist import reset_context

    try:
        ckpt.shutdown()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # ckpt caches its gloo groups per (rank, world); a new group of the same size must
        # not reuse the destroyed ones.
        reset_context()


def _child(
    index: int,
    fn: Callable[..., Any],
    nprocs: int,
    port: int,
    logdir: str,
    timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)  # N processes on a couple of cores
    # A hung child dumps its stacks (and exits) before the parent's deadline.
    stacks = open(os.path.join(logdir, f"stacks.{index}"), "w")  # noqa: SIM115 - kept for faulthandler
    faulthandler.dump_traceback_later(max(1.0, timeout_s - 5.0), exit=True, file=stacks)
    import ckpt

    ckpt.configure(collective_timeout_s=min(COLLECTIVE_TIMEOUT_S, timeout_s))
    try:
        fn(Proc(index, nprocs, port, min(COLLECTIVE_TIMEOUT_S, timeout_s)), *args)
    finally:
        faulthandler.cancel_dump_traceback_later()
        _teardown()


def run(
    fn: Callable[..., Any], nprocs: int, args: tuple[Any, ...] = (), timeout: float = 120.0
) -> None:
    """Run ``fn(proc, *args)`` in ``nprocs`` spawned processes; raise AssertionError on failure.

    ``fn`` and ``args`` must be picklable (a module-level function). Fails with the first
    failing child's traceback, or, past ``timeout`` seconds, with every child's stacks.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    logdir = tempfile.mkdtemp(prefix="ckpt-mp-")
    deadline = time.monotonic() + timeout
    if START_METHOD == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "ckpt"])
    with _loopback_gloo():
        ctx = mp.start_processes(
            _child,
            args=(fn, nprocs, store.port, logdir, timeout, args),
            nprocs=nprocs,
            join=False,
            start_method=START_METHOD,
        )
    try:
        while not ctx.join(timeout=max(0.05, deadline - time.monotonic())):
            if time.monotonic() > deadline + 10:  # children dump at deadline - 5 s
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                raise AssertionError(
                    f"{fn.__name__} on {nprocs} processes timed out after {timeout:.0f} s"
                    + _stacks(logdir)
                )
    except mp.ProcessRaisedException as e:
        raise AssertionError(f"{fn.__name__} on {nprocs} processes failed:{e}") from None
    except mp.ProcessExitedException as e:
        raise AssertionError(
            f"{fn.__name__} on {nprocs} processes: {e} (a hang dumps its stacks below)"
            + _stacks(logdir)
        ) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        del store
        shutil.rmtree(logdir, ignore_errors=True)


def _stacks(logdir: str) -> str:
    out = []
    for f in sorted(Path(logdir).glob("stacks.*")):
        text = f.read_text(errors="replace").strip()
        if text:
            out.append(f"\n--- process {f.suffix[1:]} stacks:\n{text}")
    return "".join(out)


@contextlib.contextmanager
def _loopback_gloo() -> Iterator[None]:
    """Make gloo use the loopback interface in the children spawned inside the block."""
    names = {n for _, n in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    lo = next((n for n in ("lo", "lo0") if n in names), None)
    if "GLOO_SOCKET_IFNAME" in os.environ or lo is None:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = lo
    try:
        yield
    finally:
        del os.environ["GLOO_SOCKET_IFNAME"]
