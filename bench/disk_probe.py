"""Raw disk write probe: what the disk under a checkpoint root can do, durably.

Measures sequential write throughput (``write`` + ``syncfs``, like a save's durability
step) for combinations of:

- ``writers``: threads writing at once (each one ``pwrite`` in flight, the GIL is
  released during the call), i.e. the queue depth seen by the filesystem;
- ``write size``: bytes per ``pwrite`` call (the block layer splits large O_DIRECT
  writes into ``max_sectors_kb`` requests and keeps them in flight together);
- ``layout``: ``files`` (every writer writes its own series of ``--file-mib`` files,
  like chunk objects), ``onefile`` (all writers fill disjoint stripes of one big file);
- ``alloc``: ``fresh`` (files grow as they are written) or ``falloc`` (``fallocate``
  to the final size first);
- ``io``: ``direct`` (``O_DIRECT`` from a page-aligned buffer) or ``buffered``
  (page cache, then ``syncfs``; the peer's way);
- ``pages``: what backs the source buffer: ``4k`` (ordinary pages) or ``thp``
  (private anonymous memory with ``MADV_HUGEPAGE``). An ``O_DIRECT`` request holds at
  most ``max_segments`` (254 on virtio-blk) physically contiguous segments, so 4 KiB
  pages cap a request near 1 MiB (and a 1 MiB bio splits into 254 + 2 pages: 0.5 MiB on
  average), while 2 MiB pages let it reach ``max_sectors_kb`` (4 MiB here).

Every trial also reports the average size of the write requests the device completed
(from ``/sys/dev/block/MAJ:MIN/stat``; other writers on the machine blur it a little).

Trials of all configurations are interleaved round-robin per repeat (the disk drifts;
interleaving spreads the drift over every configuration), each into a fresh
directory that is deleted right after it (the rhythm ``bench/save_load.py`` uses).

    python bench/disk_probe.py --total-gib 1 --repeats 3 --out bench/results/disk_probe.json
    python bench/disk_probe.py --writers 1,2 --sizes 8 --layouts files --io direct  # quick
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Trial:
    """One configuration of the probe."""

    io: str  # "direct" | "buffered"
    layout: str  # "files" | "onefile"
    alloc: str  # "fresh" | "falloc"
    writers: int
    write_mib: int
    pages: str = "4k"  # "4k" | "thp"

    def label(self) -> str:
        return (
            f"{self.io}/{self.layout}/{self.alloc}/{self.pages}/w{self.writers}/{self.write_mib}MiB"
        )


def syncfs(path: str) -> None:
    """``syncfs(2)`` on the filesystem holding ``path`` (falls back to ``sync``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


HUGE = 2 * MIB


def aligned_buffer(nbytes: int, pages: str) -> tuple[mmap.mmap, memoryview]:
    """A 2 MiB-aligned, pre-faulted buffer of random bytes (no zero-page tricks).

    Private anonymous memory: shared anonymous memory is shmem, which does not get
    transparent huge pages under the default ``shmem_enabled=never``.
    """
    buf = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if pages == "thp":
        buf.madvise(mmap.MADV_HUGEPAGE)
    elif hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    start = -addr % HUGE
    view = memoryview(buf)[start : start + nbytes]
    chunk = os.urandom(min(nbytes, 4 * MIB))
    for off in range(0, nbytes, len(chunk)):
        view[off : off + len(chunk)] = chunk[: nbytes - off]
    return buf, view


def device_stat_path(path: str) -> str | None:
    """``/sys/dev/block/MAJ:MIN/stat`` of the device holding ``path`` (None if unknown)."""
    dev = os.stat(path).st_dev
    p = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    return p if os.path.exists(p) else None


def write_counters(stat_path: str | None) -> tuple[int, int]:
    """(completed write requests, sectors written) of the device, (0, 0) if unknown."""
    if stat_path is None:
        return 0, 0
    with open(stat_path) as f:
        fields = f.read().split()
    return int(fields[4]), int(fields[6])


def _open(path: str, trial: Trial, size: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    if trial.io == "direct":
        flags |= os.O_DIRECT
    fd = os.open(path, flags, 0o644)
    if trial.alloc == "falloc":
        os.posix_fallocate(fd, 0, size)
    return fd


def run_trial(trial: Trial, root: Path, total: int, file_bytes: int) -> float:
    """Write ``total`` bytes as configured, then ``syncfs``; return seconds (buffers are
    allocated and filled before the clock starts)."""
    ws = trial.write_mib * MIB
    made = [aligned_buffer(ws, trial.pages) for _ in range(trial.writers)]
    views = [v for _, v in made]
    root.mkdir(parents=True)
    errors: list[BaseException] = []

    def write_range(fd: int, view: memoryview, start: int, end: int) -> None:
        off = start
        while off < end:
            n = min(ws, end - off)
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:n], off + done)
            off += n

    def files_writer(w: int) -> None:
        try:
            per = total // trial.writers
            nfiles = max(1, per // file_bytes)
            for i in range(nfiles):
                size = per // nfiles
                fd = _open(str(root / f"w{w}-{i}.bin"), trial, size)
                try:
                    write_range(fd, views[w], 0, size)
                finally:
                    os.close(fd)
        except BaseException as e:
            errors.append(e)

    def onefile_writer(w: int, fd: int) -> None:
        # Stripes of file_bytes, dealt round-robin: writers advance side by side, so
        # the file's extents are allocated in order, as a shared-file writer would.
        try:
            stripes = range(w * file_bytes, total, trial.writers * file_bytes)
            for s in stripes:
                write_range(fd, views[w], s, min(s + file_bytes, total))
        except BaseException as e:
            errors.append(e)

    t0 = time.perf_counter()
    shared_fd = -1
    if trial.layout == "onefile":
        shared_fd = _open(str(root / "all.bin"), trial, total)
        threads = [
            threading.Thread(target=onefile_writer, args=(w, shared_fd))
            for w in range(trial.writers)
        ]
    else:
        threads = [threading.Thread(target=files_writer, args=(w,)) for w in range(trial.writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if shared_fd >= 0:
        os.close(shared_fd)
    syncfs(str(root))
    elapsed = time.perf_counter() - t0
    for b in views:
        b.release()
    for m, _ in made:
        m.close()
    if errors:
        raise errors[0]
    return elapsed


def trials_from(args: argparse.Namespace) -> list[Trial]:
    """The cross product of the CLI lists."""

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    def words(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    return [
        Trial(io, layout, alloc, w, size, pages)
        for io, layout, alloc, pages, w, size in itertools.product(
            words(args.io),
            words(args.layouts),
            words(args.alloc),
            words(args.pages),
            ints(args.writers),
            ints(args.sizes),
        )
        if not (io == "buffered" and pages == "thp")  # the page cache is the source there
    ]


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--total-gib", type=float, default=1.0, help="bytes written per trial")
    ap.add_argument("--file-mib", type=int, default=32, help="file (files) / stripe (onefile)")
    ap.add_argument("--writers", default="1,2,4", help="concurrent writer threads")
    ap.add_argument("--sizes", default="1,4,8,16,32", help="MiB per pwrite")
    ap.add_argument("--layouts", default="files,onefile")
    ap.add_argument("--alloc", default="fresh,falloc")
    ap.add_argument("--io", default="direct", help="direct,buffered")
    ap.add_argument("--pages", default="4k,thp", help="source buffer pages: 4k,thp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="directory on the disk under test (default $TMPDIR)")
    ap.add_argument("--out", help="JSON results path")
    args = ap.parse_args(argv)

    total = int(args.total_gib * (1 << 30))
    file_bytes = args.file_mib * MIB
    trials = trials_from(args)
    times: dict[Trial, list[float]] = {t: [] for t in trials}
    req_mib: dict[Trial, list[float]] = {t: [] for t in trials}
    base = Path(tempfile.mkdtemp(prefix="disk-probe-", dir=args.workdir))
    stat_path = device_stat_path(str(base))
    t_start = time.time()
    try:
        for rep in range(args.repeats):
            order = trials if rep % 2 == 0 else trials[::-1]  # no config always goes first
            for trial in order:
                root = base / "t"
                os.sync()
                ios0, sectors0 = write_counters(stat_path)
                try:
                    times[trial].append(run_trial(trial, root, total, file_bytes))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                ios1, sectors1 = write_counters(stat_path)
                req_mib[trial].append((sectors1 - sectors0) * 512 / max(1, ios1 - ios0) / MIB)
                print(f"  rep {rep} {trial.label()}: {total / times[trial][-1] / 1e9:.2f} GB/s, "
                      f"{req_mib[trial][-1]:.2f} MiB/request", file=sys.stderr, flush=True
                      )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = ["| io | layout | alloc | pages | writers | MiB/write | GB/s med | GB/s all "
            "| MiB/request |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    results = []
    for t in trials:
        gbps = [total / s / 1e9 for s in times[t]]
        req = statistics.median(req_mib[t])
        results.append({**asdict(t), "seconds": times[t], "gbps_median": statistics.median(gbps),
                        "mib_per_request": req})  # fmt: skip
        rows.append(f"| {t.io} | {t.layout} | {t.alloc} | {t.pages} | {t.writers} "
                    f"| {t.write_mib} | {statistics.median(gbps):.2f} "
                    f"| {' '.join(f'{g:.2f}' for g in gbps)} | {req:.2f} |")  # fmt: skip
    table = "\n".join(rows)
    print(table)
    load = os.getloadavg()
    meta = {"total_bytes": total, "file_bytes": file_bytes, "repeats": args.repeats,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
            "minutes": round((time.time() - t_start) / 60, 1), "loadavg_end": load}  # fmt: skip
    print(json.dumps(meta))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "table": table}))


if __name__ == "__main__":
    main()
