"""The demo: train a tiny GPT on 4 gloo processes, kill it, resume on 2, compare.

    python -m ckptd.demo [--root DIR] [--no-daemon]

Two ``ckptd`` daemons run on this host as two "nodes" (node-a, node-b: an erasure group
with n = 2, m = 1), persisting to local disk under the root. Phase A: 4 processes (2 per
node) train with ZeRO-1 (parameters replicated, Adam moments flat-partitioned over
data-parallel ranks), saving asynchronously every 5 steps into the daemons' shared
memory. The job is SIGKILLed mid-run, and then node-b's daemon too: the node is lost.
Phase B: 2 processes on node-a (a different ZeRO-1 partition) load the newest step from
memory (node-b's ranks rebuilt from node-a's data and parity), check that the restored
global state hashes to what was saved, and train on. A reference run trains
uninterrupted in one process; the final parameters must be bit-identical (every rank
computes the full-batch gradient, so the arithmetic does not depend on the number of
ranks). ``--no-daemon`` runs the same job with the in-process pipeline (storage only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 64, 32, 4, 2, 16, 16
LR, BETAS, EPS = 3e-3, (0.9, 0.95), 1e-8
TOTAL_STEPS, SAVE_EVERY, KILL_AFTER = 40, 5, 23


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(DIM, dim=-1)
        q, k, v = (z.view(b, t, HEADS, DIM // HEADS).transpose(1, 2) for z in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, DIM))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-like language model small enough to train on a laptop CPU in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.layers:
            x = blk(x)
        return self.head(self.norm(x))


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:  # every parameter takes part in the loss
        raise RuntimeError("a parameter got no gradient")
    return p.grad


def batch_for(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data: sequences that count up modulo VOCAB from a random start."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


class Zero1:
    """ZeRO-1 Adam: each data-parallel rank owns a contiguous range of the flat params."""

    def __init__(self, model: nn.Module, rank: int, world: int) -> None:
        self.params = [p for _, p in model.named_parameters()]
        self.names = [n for n, _ in model.named_parameters()]
        total = sum(p.numel() for p in self.params)
        self.lo, self.hi = total * rank // world, total * (rank + 1) // world
        self.exp_avg = torch.zeros(self.hi - self.lo)
        self.exp_avg_sq = torch.zeros(self.hi - self.lo)
        self.world = world

    def layout_rules(self) -> dict[str, Any]:
        import ckpt

        shapes = [(n, tuple(p.shape)) for n, p in zip(self.names, self.params)]
        return {
            f"optim.{kind}": ckpt.FlatShard.pack(
                [(f"optim.{n}.{kind}", s) for n, s in shapes], self.lo
            )
            for kind in ("exp_avg", "exp_avg_sq")
        }

    @torch.no_grad()
    def step(self, t: int) -> None:
        flat_p = torch.cat([p.reshape(-1) for p in self.params])
        flat_g = torch.cat([_grad(p).reshape(-1) for p in self.params])
        p, g = flat_p[self.lo : self.hi], flat_g[self.lo : self.hi]
        self.exp_avg.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
        self.exp_avg_sq.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        denom = (self.exp_avg_sq / bc2).sqrt_().add_(EPS)
        p.addcdiv_(self.exp_avg, denom, value=-LR / bc1)
        if self.world > 1:  # every rank gets every updated range
            parts = [torch.empty(0)] * self.world
            sizes = [0] * self.world
            dist.all_gather_object(sizes, p.numel())
            parts = [torch.empty(n) for n in sizes]
            dist.all_gather(parts, p.contiguous())
            flat_p = torch.cat(parts)
        else:
            flat_p[self.lo : self.hi] = p
        off = 0
        for q in self.params:
            q.copy_(flat_p[off : off + q.numel()].view_as(q))
            off += q.numel()


def global_state_hash(model: nn.Module, opt: Zero1) -> str:
    """SHA-256 of the full global state (params + gathered Adam moments), rank-independent."""
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        h.update(p.detach().numpy().tobytes())
    for buf in (opt.exp_avg, opt.exp_avg_sq):
        if opt.world > 1:
            sizes = [0] * opt.world
            dist.all_gather_object(sizes, buf.numel())
            parts = [torch.empty(n) for n in sizes]
            dist.all_gather(parts, buf)
            buf = torch.cat(parts)
        h.update(buf.numpy().tobytes())
    return h.hexdigest()[:16]


def train(
    rank: int, world: int, port: int, root: str, resume: bool, stop_at: int, log_path: str,
    sockets: tuple[str, ...] = (), token: str | None = None,
) -> None:
    """One rank of a training job (phase A, phase B or the reference when world == 1).

    ``sockets``: the daemons' sockets; rank r uses ``sockets[r * len(sockets) // world]``.
    """
    import ckpt

    if sockets:
        ckpt.configure(daemon_socket=sockets[rank * len(sockets) // world], daemon_token=token)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = TinyGPT()
    opt = Zero1(model, rank, world)
    trainer: dict[str, Any] = {"step": 0, "state_hash": ""}
    state = {
        "model": model,
        "optim": {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq},
        "trainer": trainer,
        "rng": ckpt.RNGState(),
    }
    layout = ckpt.Layout(rules=opt.layout_rules(), coords={"dp": rank})
    log = open(log_path, "a") if rank == 0 else None  # noqa: SIM115 - closed at exit

    def emit(**kw: Any) -> None:
        if log is not None:
            log.write(json.dumps(kw) + "\n")
            log.flush()

    if resume:
        res = ckpt.load(state, root, layout=layout, strict=True)
        now = global_state_hash(model, opt)
        emit(
            event="resumed",
            step=res.step,
            saved_hash=trainer["state_hash"],
            loaded_hash=now,
            load_s=round(res.seconds, 3),
            source=res.source,
        )
    handle = None
    for step in range(trainer["step"] + 1, stop_at + 1):
        x, y = batch_for(step)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(step)
        trainer["step"] = step
        emit(event="step", step=step, loss=round(loss.item(), 6), world=world)
        if root and step % SAVE_EVERY == 0:
            trainer["state_hash"] = global_state_hash(model, opt)
            handle = ckpt.save(state, step, root, blocking=False, layout=layout)
            emit(event="saved", step=step, stall_ms=round(handle.stall_s * 1e3, 2))
    if handle is not None:
        handle.wait()
    if world == 1 or rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, log_path + ".final.pt")
    ckpt.shutdown()
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    world: int, root: str, resume: bool, stop_at: int, log: str,
    sockets: tuple[str, ...] = (), token: str | None = None,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=train, args=(r, world, port, root, resume, stop_at, log, sockets, token)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _events(log: str) -> list[dict[str, Any]]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run phases A and B and the reference, print what happened, exit 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="checkpoint root (default: a temp dir)")
    ap.add_argument("--no-daemon", action="store_true", help="in-process pipeline only")
    args = ap.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="ckptd-demo-")
    os.makedirs(root, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="ckptd-demo-logs-")
    print(f"checkpoint root: {root}")
    daemons = None if args.no_daemon else DemoDaemons(logs)
    try:
        return _run(root, logs, daemons)
    finally:
        if daemons is not None:
            daemons.stop()


def _run(root: str, logs: str, daemons: DemoDaemons | None) -> int:
    sockets: tuple[str, ...] = ()
    token = None
    if daemons is not None:
        daemons.start()
        sockets, token = tuple(daemons.sockets), daemons.token
        print(f"daemons: {', '.join(daemons.names)} on this host (erasure n=2, m=1), "
              f"persisting to {root}")
    where = " through the daemons" if daemons else ""
    print(f"phase A: 4 ranks (ZeRO-1 over DP=4), async save{where} every {SAVE_EVERY} steps")
    log_a = os.path.join(logs, "a.jsonl")
    procs = _start(4, root, False, TOTAL_STEPS, log_a, sockets, token)
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [e["step"] for e in _events(log_a) if e["event"] == "step"]
        if steps and max(steps) >= KILL_AFTER:
            break
        if not any(p.is_alive() for p in procs):
            print("phase A exited early", file=sys.stderr)
            return 1
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()
    ev = _events(log_a)
    for e in ev:
        if e["event"] == "step":
            print(f"  A step {e['step']:3d}  loss {e['loss']:.4f}")
        elif e["event"] == "saved":
            print(f"  A saved step {e['step']} asynchronously (stall {e['stall_ms']} ms)")
    print(
        f"  SIGKILLed all 4 ranks after step {max(e['step'] for e in ev if e['event'] == 'step')}"
    )
    if daemons is not None:
        newest = max(e["step"] for e in ev if e["event"] == "saved")
        protected = daemons.wait_protected(root, newest)
        daemons.kill("node-b")
        print(f"  step {newest} {'protected' if protected else 'NOT protected'} by the group; "
              "SIGKILLed node-b's daemon: node-b and its memory are lost")
        sockets = (daemons.sockets[0],)

    print("phase B: 2 ranks (ZeRO-1 over DP=2) resume from the newest step")
    log_b = os.path.join(logs, "b.jsonl")
    procs = _start(2, root, True, TOTAL_STEPS, log_b, sockets, token)
    for p in procs:
        p.join(300)
    if any(p.exitcode != 0 for p in procs):
        print("phase B failed", file=sys.stderr)
        return 1
    ev_b = _events(log_b)
    res = next(e for e in ev_b if e["event"] == "resumed")
    src = res["source"]
    if src == "memory" and daemons is not None:
        src = "memory (node-b's ranks rebuilt from node-a's data and parity)"
    print(
        f"  loaded step {res['step']} from {src} in {res['load_s']} s; state hash saved "
        f"{res['saved_hash']} / restored {res['loaded_hash']}"
    )
    for e in ev_b:
        if e["event"] == "step":
            print(f"  B step {e['step']:3d}  loss {e['loss']:.4f}")

    print("reference: 1 process, uninterrupted")
    log_r = os.path.join(logs, "ref.jsonl")
    train(0, 1, 0, "", False, TOTAL_STEPS, log_r)
    ref = {e["step"]: e["loss"] for e in _events(log_r) if e["event"] == "step"}
    resumed = {e["step"]: e["loss"] for e in ev_b if e["event"] == "step"}
    final_b = torch.load(log_b + ".final.pt", weights_only=True)
    final_r = torch.load(log_r + ".final.pt", weights_only=True)
    max_diff = max((final_b[k] - final_r[k]).abs().max().item() for k in final_r)
    same_losses = all(resumed[s] == ref[s] for s in resumed)
    ok = res["saved_hash"] == res["loaded_hash"] and same_losses and max_diff == 0.0
    print(f"  losses after resume identical to the reference: {same_losses}")
    print(
        f"  final parameters max |diff| vs reference: {max_diff} "
        f"({'bit-identical' if max_diff == 0 else 'DIFFERENT'})"
    )
    print(
        "demo " + ("PASSED" if ok else "FAILED") + f" (final loss {ref[TOTAL_STEPS]:.4f}, "
        f"first {ref[1]:.4f}; {math.ceil(TOTAL_STEPS / SAVE_EVERY)} saves planned)"
    )
    return 0 if ok else 1


class DemoDaemons:
    """Two ckptd processes on this host (the demo's "nodes"), in a private temp dir."""

    names = ("node-a", "node-b")

    def __init__(self, logs: str) -> None:
        import secrets

        self.base = tempfile.mkdtemp(prefix="ckd-", dir="/tmp")  # short: unix socket paths
        self.logs = logs
        self.token = secrets.token_hex(16)
        self.sockets = [os.path.join(self.base, n, "run", "ckptd.sock") for n in self.names]
        self.procs: dict[str, Any] = {}

    def start(self) -> None:
        import subprocess

        import yaml

        token_file = os.path.join(self.base, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(self.token)
        ports = [_free_port() for _ in self.names]
        for i, name in enumerate(self.names):
            os.makedirs(os.path.join(self.base, name), mode=0o700)  # ckptd makes run/ itself
            cfg = {
                "node_name": name,
                "socket_path": self.sockets[i],
                "listen": {"host": "127.0.0.1", "port": ports[i]},
                "data": {"port": 0},
                "metrics": {"host": "127.0.0.1", "port": 0},
                "peers": {"static": [f"{n}=127.0.0.1:{p}" for n, p in zip(self.names, ports)],
                          "heartbeat_interval_s": 0.2, "lost_after_s": 1.0},
                "erasure": {"n": 2, "m": 1},
                "memory": {"shm_dir": os.path.join(self.base, name, "shm"),
                           "budget_bytes": "512MiB"},
                "auth": {"token_file": token_file},
            }
            path = os.path.join(self.base, f"{name}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            log = open(os.path.join(self.logs, f"{name}.log"), "wb")  # noqa: SIM115
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ckptd.daemon.main", "--config", path],
                stdout=subprocess.DEVNULL, stderr=log,
                env={k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")})
        from ckpt.daemon_client import DaemonClient

        deadline = time.time() + 60
        for sock in self.sockets:
            while True:
                try:
                    client = DaemonClient(sock, self.token)
                    try:
                        client.status()
                    finally:
                        client.close()
                    break
                except Exception as e:
                    if time.time() > deadline:
                        raise RuntimeError(
                            f"ckptd at {sock} did not start; logs in {self.logs}") from e
                    time.sleep(0.1)

    def wait_protected(self, root: str, step: int, timeout: float = 30.0) -> bool:
        """True once both daemons report ``step`` protected (bounded wait)."""
        from ckpt.daemon_client import DaemonClient, job_id_for

        client = DaemonClient(self.sockets[0], self.token)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                st = client.job_status(job_id_for(root))
                ok = [s.protected for v in st.nodes for s in v.local.steps if s.step == step]
                if len(ok) == 2 and all(ok):
                    return True
                time.sleep(0.1)
            return False
        finally:
            client.close()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        import shutil

        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except Exception:
                proc.kill()
        shutil.rmtree(self.base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
