"""Erasure-codec benchmark: candidate implementations side by side, in one run.

For RS(4+2) and XOR(4+1) it measures encode and "rebuild 2 lost shards" (1 for XOR:
data shards 0 and 1, the expensive case) on a 256 MiB object, processed either in
stripes of 1, 4 and 16 MiB of data (k shard pieces of stripe/k bytes each) or handed over
as one object.  GB/s are data bytes (10^9) per median wall time of ``--repeats`` runs
after one warm-up; output buffers are allocated and touched before timing (reused), as
the daemon does.

Candidates:

* ``isal``: ours, ``ErasureCodec(backend="isal")``: ISA-L ``ec_encode_data`` via ctypes,
  writing into reused buffers.
* ``numpy``: ours, ``ErasureCodec(backend="numpy")``: 16-bit product tables (XOR for m=1).
* ``stripe+crc/isal``: ``StripeCodec`` (ISA-L) including CRC32C of every shard and
  checksum verification on rebuild: what the daemon pays end to end (default threads,
  up to 2); ``stripe+crc/isal:t1`` the same on one thread.
* ``pyeclib``: ``ECDriver(ec_type="isa_l_rs_vand")`` (ISA-L inside liberasurecode) through
  its own API (bytes in, new fragment objects out; input converted to bytes untimed).
* ``zfec``: ``zfec.Encoder``/``Decoder`` (C, bytes out).
* ``reedsolo``: pure Python ``RSCodec`` over k+m-byte codewords: the reference oracle,
  timed on 16 KiB only (it runs at about 1 MB/s) and reported for the "object" row.

Every candidate is checked for correctness (round trip, and for ours parity identical to
the numpy reference) before it is timed; ``correct`` is in the JSON.

    python bench/erasure.py --repeats 5 --out bench/results/erasure.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptd.daemon.erasure import ErasureCodec, StripeCodec, available_backends

MiB = 1 << 20
Result = dict[str, Any]
CONFIGS = {"RS(4+2)": (4, 2), "XOR(4+1)": (4, 1)}


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls after one untimed warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def stripes(shard_len: int, piece: int) -> list[tuple[int, int]]:
    """(offset, length) within a shard of each stripe's piece (piece = stripe bytes / k)."""
    return [(o, min(piece, shard_len - o)) for o in range(0, shard_len, piece)]


class Case(ABC):
    """One candidate for one (k, m): builds encode/rebuild closures over a data object."""

    name = ""

    def __init__(self, k: int, m: int, obj: np.ndarray) -> None:
        self.k, self.m, self.obj = k, m, obj
        self.shard = len(obj) // k
        self.data = [obj[i * self.shard : (i + 1) * self.shard] for i in range(k)]

    @abstractmethod
    def check(self) -> bool:
        """Encode, lose shards, rebuild: True if the result is bit-exact."""

    @abstractmethod
    def encode(self, stripe: int | None) -> Callable[[], object]:
        """A closure encoding the object (in stripes of ``stripe`` bytes, or whole)."""

    @abstractmethod
    def rebuild(self, stripe: int | None) -> Callable[[], object]:
        """A closure rebuilding the lost shards."""


class OursCase(Case):
    """``ErasureCodec`` over shard views, stripe by stripe, into pre-faulted buffers."""

    def __init__(self, k: int, m: int, obj: np.ndarray, backend: str) -> None:
        super().__init__(k, m, obj)
        self.name = backend
        self.codec = ErasureCodec(k, m, backend)
        self.parity = [np.ones(self.shard, np.uint8) for _ in range(m)]
        self.lost = list(range(min(2, m)))
        self.rebuilt = [np.ones(self.shard, np.uint8) for _ in self.lost]

    def check(self) -> bool:
        n = 4096
        ref = ErasureCodec(self.k, self.m, "numpy").encode([d[:n] for d in self.data])
        mine = self.codec.encode([d[:n] for d in self.data])
        full = [d[:n] for d in self.data] + mine
        got = self.codec.reconstruct([None if i in self.lost else s for i, s in enumerate(full)])
        return all(np.array_equal(a, b) for a, b in zip(ref, mine)) and all(
            np.array_equal(g, self.data[i][:n]) for g, i in zip(got, self.lost))

    def encode(self, stripe: int | None) -> Callable[[], object]:
        pieces = stripes(self.shard, (stripe or len(self.obj)) // self.k)

        def run() -> None:
            for off, n in pieces:
                self.codec.encode([d[off : off + n] for d in self.data],
                                  out=[p[off : off + n] for p in self.parity])
        return run

    def rebuild(self, stripe: int | None) -> Callable[[], object]:
        self.encode(None)()
        full = self.data + self.parity
        pieces = stripes(self.shard, (stripe or len(self.obj)) // self.k)

        def run() -> None:
            for off, n in pieces:
                shards = [None if i in self.lost else s[off : off + n] for i, s in enumerate(full)]
                self.codec.reconstruct(shards, out=[r[off : off + n] for r in self.rebuilt])
        return run


class StripeCrcCase(Case):
    """``StripeCodec``: checksummed shards; the stripe size is its ``stripe_bytes``."""

    def __init__(self, k: int, m: int, obj: np.ndarray, threads: int | None = None) -> None:
        super().__init__(k, m, obj)
        self.threads = threads
        self.name = "stripe+crc/isal" + (f":t{threads}" if threads else "")
        self.parity = [np.ones(self.shard, np.uint8) for _ in range(m)]
        self.lost = list(range(min(2, m)))
        self.rebuilt = [np.ones(self.shard, np.uint8) for _ in self.lost]

    def _codec(self, stripe: int | None) -> StripeCodec:
        per_shard = (stripe or len(self.obj)) // self.k
        return StripeCodec(self.k, self.m, stripe_bytes=per_shard, backend="isal",
                           threads=self.threads)

    def check(self) -> bool:
        sc = self._codec(4 * MiB)
        small = self.obj[: 3 * MiB + 7]
        shards = sc.encode(small, 1)
        got = sc.decode([None if i in self.lost else s for i, s in enumerate(shards)], 1)
        return bool(np.array_equal(got, small))

    def encode(self, stripe: int | None) -> Callable[[], object]:
        sc = self._codec(stripe)
        return lambda: sc.encode(self.obj, 1, parity_out=self.parity)

    def rebuild(self, stripe: int | None) -> Callable[[], object]:
        sc = self._codec(stripe)
        shards = sc.encode(self.obj, 1, parity_out=self.parity)
        avail = [None if i in self.lost else s for i, s in enumerate(shards)]
        return lambda: sc.rebuild(avail, 1, self.lost, out=self.rebuilt)


class PyeclibCase(Case):
    name = "pyeclib"

    def __init__(self, k: int, m: int, obj: np.ndarray) -> None:
        super().__init__(k, m, obj)
        from pyeclib.ec_iface import ECDriver

        self.driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
        self.lost = list(range(min(2, m)))
        self._chunks: dict[int | None, list[bytes]] = {}

    def chunks(self, stripe: int | None) -> list[bytes]:
        if stripe not in self._chunks:  # bytes conversion untimed: pyeclib needs bytes
            self._chunks.clear()
            step = stripe or len(self.obj)
            self._chunks[stripe] = [self.obj[o : o + step].tobytes()
                                    for o in range(0, len(self.obj), step)]
        return self._chunks[stripe]

    def check(self) -> bool:
        payload = self.obj[: MiB + 3].tobytes()
        frags = self.driver.encode(payload)
        keep = [f for i, f in enumerate(frags) if i not in self.lost]
        rebuilt = self.driver.reconstruct(keep, self.lost)
        return self.driver.decode(keep) == payload and rebuilt == [frags[i] for i in self.lost]

    def encode(self, stripe: int | None) -> Callable[[], object]:
        chunks = self.chunks(stripe)
        return lambda: [self.driver.encode(c) for c in chunks]

    def rebuild(self, stripe: int | None) -> Callable[[], object]:
        frags = [self.driver.encode(c) for c in self.chunks(stripe)]
        keep = [[f for i, f in enumerate(fr) if i not in self.lost] for fr in frags]
        return lambda: [self.driver.reconstruct(kp, self.lost) for kp in keep]


class ZfecCase(Case):
    name = "zfec"

    def __init__(self, k: int, m: int, obj: np.ndarray) -> None:
        super().__init__(k, m, obj)
        import zfec

        self.enc = zfec.Encoder(k, k + m)
        self.dec = zfec.Decoder(k, k + m)
        self.lost = list(range(min(2, m)))

    def _blocks(self, stripe: int | None) -> list[list[memoryview]]:
        pieces = stripes(self.shard, (stripe or len(self.obj)) // self.k)
        return [[memoryview(d[o : o + n]) for d in self.data] for o, n in pieces]

    def check(self) -> bool:
        blocks = [d[:4096].tobytes() for d in self.data]
        parity = self.enc.encode(blocks, list(range(self.k, self.k + self.m)))
        full = blocks + list(parity)
        nums = tuple(i for i in range(self.k + self.m) if i not in self.lost)[: self.k]
        out = self.dec.decode(tuple(full[i] for i in nums), nums)
        return [bytes(o) for o in out] == blocks

    def encode(self, stripe: int | None) -> Callable[[], object]:
        blocks = self._blocks(stripe)
        want = list(range(self.k, self.k + self.m))
        return lambda: [self.enc.encode(b, want) for b in blocks]

    def rebuild(self, stripe: int | None) -> Callable[[], object]:
        want = list(range(self.k, self.k + self.m))
        nums = tuple(i for i in range(self.k + self.m) if i not in self.lost)[: self.k]
        inputs = []
        for b in self._blocks(stripe):
            full = list(b) + list(self.enc.encode(b, want))
            inputs.append(tuple(full[i] for i in nums))  # a tuple: zfec reorders lists
        return lambda: [self.dec.decode(t, nums) for t in inputs]


def reedsolo_row(k: int, m: int, repeats: int) -> Result:
    """The pure-Python oracle on 16 KiB of data (4096 codewords of k bytes)."""
    import reedsolo

    rsc = reedsolo.RSCodec(nsym=m, nsize=k + m)
    data = bytearray(np.random.default_rng(1).integers(0, 256, 16 << 10, dtype=np.uint8))
    words = [data[o : o + k] for o in range(0, len(data), k)]
    coded = [rsc.encode(w) for w in words]
    lost = list(range(min(2, m)))
    ok = all(rsc.decode(bytearray(c), erase_pos=lost)[0] == w for c, w in zip(coded[:64], words))
    enc = statistics.median(timed(lambda: [rsc.encode(w) for w in words], repeats))
    reb = statistics.median(timed(lambda: [rsc.decode(c, erase_pos=lost) for c in coded],
                                  max(1, repeats // 2)))
    return {"impl": "reedsolo", "size": "16 KiB", "correct": ok,
            "encode_gbps": len(data) / enc / 1e9, "rebuild_gbps": len(data) / reb / 1e9}


CASES: dict[str, Callable[[int, int, np.ndarray], Case]] = {
    "isal": lambda k, m, o: OursCase(k, m, o, "isal"),
    "numpy": lambda k, m, o: OursCase(k, m, o, "numpy"),
    "stripe+crc/isal": StripeCrcCase,
    "stripe+crc/isal:t1": lambda k, m, o: StripeCrcCase(k, m, o, threads=1),
    "pyeclib": PyeclibCase,
    "zfec": ZfecCase,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    obj = np.frombuffer(rng.bytes(args.object_mib * MiB), dtype=np.uint8)
    sizes: list[int | None] = [s * MiB for s in args.stripes_mib] + [None]
    results: list[Result] = []
    for label, (k, m) in CONFIGS.items():
        for name in args.impls:
            if name == "reedsolo":
                row = reedsolo_row(k, m, args.repeats)
                results.append({"config": label, **row})
                print(f"  {label} {name}: {row['encode_gbps']:.6f} GB/s", file=sys.stderr)
                continue
            if (name == "isal" or name.startswith("stripe")) and "isal" not in available_backends():
                print(f"  skip {name}: ISA-L not loadable", file=sys.stderr)
                continue
            try:
                case = CASES[name](k, m, obj)
            except ImportError as exc:
                print(f"  skip {name}: {exc}", file=sys.stderr)
                continue
            correct = case.check()
            for size in sizes:
                reps = args.repeats if name != "numpy" else max(3, args.repeats // 2)
                enc = timed(case.encode(size), reps)
                reb = timed(case.rebuild(size), reps)
                row = {"config": label, "impl": name, "correct": correct,
                       "size": f"{size // MiB} MiB stripes" if size else
                               f"one {args.object_mib} MiB object",
                       "encode_gbps": len(obj) / statistics.median(enc) / 1e9,
                       "rebuild_gbps": len(obj) / statistics.median(reb) / 1e9,
                       "encode_s": enc, "rebuild_s": reb}
                results.append(row)
                print(f"  {label} {name} {row['size']}: enc {row['encode_gbps']:.2f} "
                      f"rebuild {row['rebuild_gbps']:.2f} GB/s", file=sys.stderr)
            del case
    return {"results": results, "machine": machine_info(), "args": vars(args),
            "chosen": choose(results), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()}


def choose(results: list[Result]) -> dict[str, Any]:
    """The fastest correct implementation on RS(4+2) 1-4 MiB stripes (what the daemon uses)."""
    scores: dict[str, list[float]] = {}
    for r in results:
        if (r["config"] == "RS(4+2)" and r["correct"] and r["size"] in ("1 MiB stripes",
                                                                          "4 MiB stripes")
                and r["impl"] in ("isal", "numpy")):  # selectable backends of ErasureCodec
            scores.setdefault(r["impl"], []).append(r["encode_gbps"] + r["rebuild_gbps"])
    best = max(scores, key=lambda n: statistics.mean(scores[n])) if scores else None
    return {"backend": best, "rule": "max mean(encode + rebuild GB/s), RS(4+2), 1-4 MiB, "
                                     "correct only"}


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__}


def table(report: dict[str, Any]) -> str:
    lines = ["| config | impl | size | correct | encode GB/s | rebuild-2 GB/s |",
             "|---|---|---|---|---:|---:|"]
    for r in report["results"]:
        fmt = "{:.2f}" if r["encode_gbps"] >= 0.01 else "{:.6f}"
        lines.append(f"| {r['config']} | {r['impl']} | {r['size']} | {r['correct']} | "
                     f"{fmt.format(r['encode_gbps'])} | {fmt.format(r['rebuild_gbps'])} |")
    lines.append("")
    lines.append(f"chosen default backend: **{report['chosen']['backend']}** "
                 f"({report['chosen']['rule']}); load average (1/5/15 min) before / after: "
                 f"{_load(report['loadavg_before'])} / {_load(report['loadavg_after'])} on "
                 f"{report['machine']['cores']} cores")
    return "\n".join(lines)


def _load(avg: tuple[float, ...] | list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    p.add_argument("--object-mib", type=int, default=256, help="data bytes per measurement")
    p.add_argument("--stripes-mib", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--impls", nargs="+", default=[*CASES, "reedsolo"], help="candidates")
    p.add_argument("--out", help="write the JSON report (with the markdown table) here")
    args = p.parse_args(argv)
    report = run(args)
    report["table"] = table(report)
    print(report["table"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
