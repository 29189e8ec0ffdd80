"""Run a test function on N fresh processes talking gloo over loopback.

    def body(p: Proc, root: str) -> None:
        p.phase(4, save_on_four, root)     # processes 0..3 form a gloo group of 4
        p.phase(2, load_on_two, root)      # then processes 0..1 form a fresh group of 2
        p.solo(load_in_one_process, root)  # then process 0 alone, without torch.distributed

    run(body, nprocs=4, args=(str(tmp_path),), timeout=90)

``body`` and everything in ``args`` must be picklable (module-level functions).

One run can host several process groups of different sizes, so "save on N_A ranks, load
on N_B ranks" needs one set of processes, not two. Rendezvous goes through a TCPStore
that the parent (the pytest process) hosts on 127.0.0.1 on a free port chosen by the OS
(no port race); each phase uses its own key prefix of that store.

Start method: ``forkserver`` by default, with torch, torch.distributed (checkpoint,
tensor) and ckpt preloaded in the server: children are still fresh processes (forked
from a clean server interpreter, never from pytest) but start in well under a second
instead of the 3-10 s a ``spawn`` child needs to import torch on a small, busy machine.
``CKPT_TEST_START_METHOD=spawn`` switches to plain spawn.

Failures: a child that raises records its traceback (with a timestamp) before its
process group is torn down; the parent then fails with an AssertionError that shows the
*first* failure first (a peer that died of "connection closed" afterwards does not hide
the root cause), followed by the others. A child that hangs dumps all its threads'
stacks (faulthandler) shortly before the deadline and exits; the parent shows those
dumps. Every phase ends with ``ckpt.shutdown()`` and ``dist.destroy_process_group()``.
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
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds one collective may block before gloo gives up (capped by run()'s timeout).
COLLECTIVE_TIMEOUT_S = 60.0
START_METHOD = os.environ.get("CKPT_TEST_START_METHOD", "forkserver")
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint.state_dict",  # ~4 s: imported by ckpt for optimizers
    "torch.distributed.tensor",
    "torch.distributed.device_mesh",
    "torch._dynamo",  # ~2 s: imported by the first torch.optim optimizer
    "numpy",
    "ckpt",
]
_STACKS_BEFORE_DEADLINE_S = 5.0


class Proc:
    """Handle given to ``body`` in every process: its index and the phase helpers."""

    def __init__(self, index: int, nprocs: int, port: int, logdir: str, timeout_s: float) -> None:
        self.index = index  # process index; its rank in every phase that includes it
        self.nprocs = nprocs
        self._port = port
        self._logdir = logdir
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._phase = 0
        self._store: dist.Store | None = None
        self._recorded = False

    def _root_store(self) -> dist.Store:
        if self._store is None:
            self._store = dist.TCPStore(
                "127.0.0.1", self._port, is_master=False, timeout=self._timeout
            )
        return self._store

    def phase(self, world: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(rank, world, *args)`` on processes ``0..world-1`` in a new gloo group.

        Every process must call ``phase``/``solo`` in the same order (processes outside
        the group only count the call). Returns ``fn``'s result, or None where this
        process sat out.
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
        except BaseException:
            self.record_failure(f"phase {self._phase} ({fn.__name__}, {world} ranks)")
            raise
        finally:
            _teardown()

    def solo(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on process 0 only, without torch.distributed."""
        self._phase += 1
        if self.index != 0:
            return None
        try:
            return fn(*args)
        except BaseException:
            self.record_failure(f"phase {self._phase} ({fn.__name__}, one process)")
            raise
        finally:
            _teardown()

    def record_failure(self, where: str) -> None:
        """Write the current exception's traceback for the parent (first call only)."""
        if self._recorded:
            return
        self._recorded = True
        path = Path(self._logdir) / f"error.{self.index}"
        path.write_text(f"{time.time():.6f}\n{where}\n{traceback.format_exc()}")


def _teardown() -> None:
    import ckpt

    # No ckpt.dist.reset_context() here on purpose: ckpt must notice by itself that a
    # later phase runs in a new torch.distributed world (every multi-phase test checks it).
    try:
        ckpt.shutdown()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    stacks = open(os.path.join(logdir, f"stacks.{index}"), "w")  # noqa: SIM115 - faulthandler's
    faulthandler.dump_traceback_later(
        max(1.0, timeout_s - _STACKS_BEFORE_DEADLINE_S), exit=True, file=stacks
    )
    import ckpt

    collective_s = min(COLLECTIVE_TIMEOUT_S, timeout_s)
    ckpt.configure(collective_timeout_s=collective_s)
    proc = Proc(index, nprocs, port, logdir, collective_s)
    try:
        fn(proc, *args)
    except BaseException:
        proc.record_failure("body")
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()
        _teardown()


def run(
    fn: Callable[..., Any], nprocs: int, args: tuple[Any, ...] = (), timeout: float = 120.0
) -> None:
    """Run ``fn(proc, *args)`` in ``nprocs`` processes; raise AssertionError on any failure.

    Fails with the children's tracebacks (first failure first), or, past ``timeout``
    seconds, with every child's stacks.
    """
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    logdir = tempfile.mkdtemp(prefix="ckpt-mp-")
    what = f"{fn.__name__} on {nprocs} processes"
    deadline = time.monotonic() + timeout
    if START_METHOD == "forkserver":
        # Takes effect when the server starts (first run of the session).
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with _loopback_gloo():
        ctx = mp.start_processes(
            _child,
            args=(fn, nprocs, store.port, logdir, timeout, args),
            nprocs=nprocs,
            join=False,
            start_method=START_METHOD,
        )
    try:
        while not ctx.join(timeout=max(0.05, deadline - time.monotonic()), grace_period=2.0):
            if time.monotonic() > deadline + 2 * _STACKS_BEFORE_DEADLINE_S:
                raise AssertionError(f"{what} timed out after {timeout:.0f} s" + _stacks(logdir))
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        errors = _errors(logdir)
        if errors:
            raise AssertionError(f"{what} failed:{errors}" + _stacks(logdir)) from None
        raise AssertionError(f"{what} failed: {e}" + _stacks(logdir)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join()
        del store
        shutil.rmtree(logdir, ignore_errors=True)


def _errors(logdir: str) -> str:
    """Recorded child tracebacks, earliest first."""
    found = []
    for f in Path(logdir).glob("error.*"):
        stamp, where, tb = f.read_text(errors="replace").split("\n", 2)
        found.append((float(stamp), int(f.suffix[1:]), where, tb))
    found.sort()
    out = []
    for i, (_, index, where, tb) in enumerate(found):
        label = "first failure" if i == 0 else "then"
        out.append(f"\n\n--- {label}: process {index}, {where}:\n{tb.rstrip()}")
    return "".join(out)


def _stacks(logdir: str) -> str:
    out = []
    for f in sorted(Path(logdir).glob("stacks.*")):
        text = f.read_text(errors="replace").strip()
        if text:
            out.append(f"\n\n--- process {f.suffix[1:]} stacks:\n{text}")
    return "".join(out)


@contextlib.contextmanager
def _loopback_gloo() -> Iterator[None]:
    """Make gloo use the loopback interface in the children started inside the block."""
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
