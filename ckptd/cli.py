"""The ``ckpt`` command: list, inspect, verify and garbage-collect checkpoints.

    ckpt ls ROOT
    ckpt inspect ROOT [--step N]
    ckpt verify ROOT [--step N | --all] [--progress] [--workers W]
    ckpt gc ROOT --keep-last K [--keep-every N] [--dry-run]

``ROOT`` is a path or an fsspec URL; ``--storage-option key=value`` (repeatable) goes to
the filesystem, e.g. ``--storage-option endpoint_url=http://127.0.0.1:9000`` for S3.
Every command takes ``--json`` and then prints one JSON object on stdout, always with
an ``ok`` field (``error`` on failure). Exit codes: 0 success; 1 failure (checksum
mismatch, step not committed, missing root, storage error), with one line per problem
on stderr naming the tensor, chunk or file; 2 usage error.

Only committed steps are read. ``gc`` uses :mod:`ckptd.formats.retention`, which also
deletes uncommitted leftovers older than the newest commit (never newer ones: they
may be saves in flight).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from ckptd.chunking import ChunkGrid
from ckptd.dtypes import itemsize_of
from ckptd.errors import CkptError, NotCommittedError
from ckptd.formats import commit as commit_mod
from ckptd.formats.manifest import ChunkRecord, TensorRecord
from ckptd.formats.reader import CheckpointReader
from ckptd.formats.retention import RetentionPolicy, apply_retention
from ckptd.formats.storage import Storage, open_storage


class _Failed(Exception):
    """Raised inside a command after its output is printed: exit with status 1."""


def _parse_option(value: str) -> tuple[str, Any]:
    """``key=value``; the value is read as a JSON scalar when it is one (``true``, ``3``)."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(
            f"expected key=value, got {value!r}", param_hint="--storage-option"
        )
    try:
        parsed = json.loads(raw)
    except ValueError:
        return key, raw
    return key, parsed if isinstance(parsed, (str, int, float, bool)) or parsed is None else raw


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ROOT argument and the options every command takes."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(fn)
    fn = click.option(
        "--storage-option",
        "-o",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Filesystem option for remote roots (repeatable), e.g. endpoint_url=...",
    )(fn)
    return click.argument("root")(fn)


@contextmanager
def _session(root: str, options: tuple[str, ...], as_json: bool) -> Iterator[Storage]:
    """Open the root's storage; turn ckptd and OS errors into exit status 1."""
    opts = dict(_parse_option(o) for o in options)
    local = "://" not in root or root.startswith("file://")
    if local and opts:
        raise click.UsageError("--storage-option applies only to remote (URL) roots")
    try:
        if local and not os.path.isdir(root.removeprefix("file://")):
            raise NotCommittedError(f"no checkpoint root at {root!r} (no such directory)")
        with open_storage(root, **opts) as storage:
            yield storage
    except _Failed:
        sys.exit(1)
    except (CkptError, OSError, ValueError) as e:
        _fail(str(e), as_json)


def _line(e: BaseException | str) -> str:
    """A message on one line, whatever the exception said."""
    return " ".join(str(e).split())


def _fail(message: str, as_json: bool) -> NoReturn:
    line = _line(message)
    if as_json:
        _emit({"ok": False, "error": line})
    click.echo(f"ckpt: error: {line}", err=True)
    sys.exit(1)


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _tensor_info(rec: TensorRecord) -> dict[str, Any]:
    grid = ChunkGrid(rec.shape, rec.chunk_shape)
    return {
        "name": rec.name,
        "dtype": rec.dtype,
        "shape": list(rec.shape),
        "chunk_shape": list(rec.chunk_shape),
        "chunks": len(rec.chunks),
        "grid_chunks": grid.n_chunks,
        "codec": rec.codec,
        "level": rec.level,
        "packed": rec.packed,
        "stored_bytes": sum(c.length for c in rec.chunks),
        "logical_bytes": math.prod(rec.shape) * itemsize_of(rec.dtype),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
def main() -> None:
    """List, inspect, verify and garbage-collect ckptd checkpoints."""


@main.command("ls")
@_common
def ls_cmd(root: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """List the checkpoint steps under ROOT (committed ones and leftovers)."""
    with _session(root, storage_options, as_json) as storage:
        latest = commit_mod.latest_step(storage)
        rows: list[dict[str, Any]] = []
        for step in commit_mod.step_dirs(storage):
            row: dict[str, Any] = {"step": step, "committed": False, "latest": step == latest}
            if commit_mod.is_committed(storage, step):
                row["committed"] = True
                try:
                    m = CheckpointReader.open(storage, step).manifest
                    row.update(
                        created=m.created,
                        tensors=len(m.tensors),
                        stored_bytes=sum(c.length for t in m.tensors.values() for c in t.chunks),
                    )
                except CkptError as e:
                    row["error"] = _line(e)
            rows.append(row)
        missing = None if latest is not None else f"no committed checkpoint under {storage.url}"
        if as_json:
            _emit(
                {"ok": latest is not None, "root": storage.url, "latest": latest, "steps": rows}
                | ({"error": missing} if missing else {})
            )
        else:
            for r in rows:
                status = "committed" if r["committed"] else "uncommitted"
                detail = (
                    f"{_when(r.get('created')):19}  {r.get('tensors', '-'):>7}  "
                    f"{_size(r['stored_bytes']) if 'stored_bytes' in r else '-':>10}"
                )
                mark = "  (latest)" if r["latest"] else r.get("error", "")
                click.echo(f"{r['step']:>10}  {status:11}  {detail}{mark}")
        if missing:
            click.echo(f"ckpt: error: {missing}", err=True)
            raise _Failed


@main.command("inspect")
@_common
@click.option("--step", type=click.IntRange(min=0), help="Step to show (default: latest).")
def inspect_cmd(
    root: str, storage_options: tuple[str, ...], as_json: bool, step: int | None
) -> None:
    """Show a checkpoint's manifest: tensors, layout provenance, trainer state."""
    with _session(root, storage_options, as_json) as storage:
        reader = CheckpointReader.open(storage, step)
        m = reader.manifest
        marker = commit_mod.read_marker(storage, reader.step)
        tensors = [_tensor_info(m.tensors[n]) for n in sorted(m.tensors)]
        info = {
            "ok": True,
            "root": storage.url,
            "step": m.step,
            "version": f"{m.version[0]}.{m.version[1]}",
            "writer": m.writer,
            "created": m.created,
            "committed": marker.get("wall_time"),
            "layout": m.layout,
            "state": m.state,
            "per_rank_state": m.per_rank_state,
            "rng": sorted(m.rng),
            "tensors": tensors,
            "stored_bytes": sum(t["stored_bytes"] for t in tensors),
            "logical_bytes": sum(t["logical_bytes"] for t in tensors),
        }
        if as_json:
            _emit(info)
            return
        click.echo(f"step {m.step} of {storage.url}  (format {info['version']}, writer {m.writer})")
        click.echo(f"created {_when(m.created)}, committed {_when(info['committed'])}")
        lay = m.layout
        coords = ", ".join(map(str, lay.get("coords", [])))
        click.echo(
            f"layout: world_size {lay.get('world_size', '?')}, coords {coords}, "
            f"digest {str(lay.get('digest', ''))[:16]}"
        )
        click.echo(
            f"tensors: {len(tensors)}, {_size(info['stored_bytes'])} stored, "
            f"{_size(info['logical_bytes'])} logical"
        )
        width = max([len(t["name"]) for t in tensors] + [4])
        click.echo(
            f"  {'NAME':{width}}  {'DTYPE':9}  {'SHAPE':18}  {'CHUNK':18}  {'N':>4}  "
            f"{'STORED':>10}  CODEC"
        )
        for t in tensors:
            codec = f"{t['codec']}:{t['level']}" + (" packed" if t["packed"] else "")
            click.echo(
                f"  {t['name']:{width}}  {t['dtype']:9}  {t['shape']!s:18}  "
                f"{t['chunk_shape']!s:18}  {t['chunks']:>4}  "
                f"{_size(t['stored_bytes']):>10}  {codec}"
            )
        click.echo(f"trainer state: {json.dumps(m.state, sort_keys=True)}")
        if m.per_rank_state:
            click.echo(f"per-rank state keys: {', '.join(sorted(m.per_rank_state))}")
        if m.rng:
            click.echo(f"rng states: {', '.join(sorted(m.rng))}")


def _verify_step(
    step: int, reader: CheckpointReader | CkptError, workers: int, bar: Any
) -> dict[str, Any]:
    """Read and check every chunk of ``step``; return its report (failures included)."""
    out: dict[str, Any] = {"step": step, "tensors": 0, "chunks": 0, "bytes": 0, "failures": []}
    if isinstance(reader, CkptError):  # the manifest itself could not be read
        out["failures"].append({"tensor": None, "chunk": None, "error": _line(reader)})
        return out
    jobs = []
    for name, rec in sorted(reader.manifest.tensors.items()):
        grid = ChunkGrid(rec.shape, rec.chunk_shape)
        have = {c.index for c in rec.chunks}
        missing = set(grid.indices()) - have if math.prod(rec.shape) else set()
        out["failures"] += [
            {
                "tensor": name,
                "chunk": list(i),
                "error": f"tensor {name!r} chunk {list(i)}: "
                "not in the manifest (checkpoint incomplete)",
            }
            for i in sorted(missing)
        ]
        jobs += [(name, c, grid) for c in rec.chunks]
        out["tensors"] += 1

    def check(name: str, c: ChunkRecord, grid: ChunkGrid) -> dict[str, Any] | None:
        try:
            reader.read_chunk(name, c.index, grid.chunk_box(c.index))
        except (CkptError, OSError, ValueError) as e:
            return {
                "tensor": name,
                "chunk": list(c.index),
                "object": reader.prefix + c.object,
                "error": _line(e),
            }
        return None

    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(check, *job): job[1].length for job in jobs}
        for fut in as_completed(futures):
            out["chunks"] += 1
            out["bytes"] += futures[fut]
            bar.update(futures[fut])
            if (failure := fut.result()) is not None:
                out["failures"].append(failure)
    out["failures"].sort(key=lambda f: (f["tensor"] or "", f["chunk"] or []))
    return out


def _open(storage: Storage, step: int) -> CheckpointReader | CkptError:
    try:
        return CheckpointReader.open(storage, step)
    except CkptError as e:
        return e


@main.command("verify")
@_common
@click.option("--step", type=click.IntRange(min=0), help="Step to verify (default: latest).")
@click.option("--all", "all_steps", is_flag=True, help="Verify every committed step.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Chunks read in parallel.",
)
def verify_cmd(
    root: str,
    storage_options: tuple[str, ...],
    as_json: bool,
    step: int | None,
    all_steps: bool,
    progress: bool | None,
    workers: int,
) -> None:
    """Read every chunk and check every CRC32C; report every failing tensor and chunk."""
    if step is not None and all_steps:
        raise click.UsageError("--step and --all are mutually exclusive")
    from tqdm import tqdm

    with _session(root, storage_options, as_json) as storage:
        if all_steps:
            steps = commit_mod.committed_steps(storage)
        elif step is None:
            latest = commit_mod.latest_step(storage)
            steps = [] if latest is None else [latest]
        else:
            commit_mod.require_committed(storage, step)
            steps = [step]
        if not steps:
            raise NotCommittedError(f"no committed checkpoint under {storage.url}")
        readers = {s: _open(storage, s) for s in steps}
        total = sum(
            c.length
            for r in readers.values()
            if isinstance(r, CheckpointReader)
            for t in r.manifest.tensors.values()
            for c in t.chunks
        )
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not show,
            desc="verify",
        ) as bar:
            reports = [_verify_step(s, r, workers, bar) for s, r in readers.items()]
        failures = [(r["step"], f) for r in reports for f in r["failures"]]
        if as_json:
            for r in reports:
                r["ok"] = not r["failures"]
            _emit({"ok": not failures, "root": storage.url, "steps": reports})
        else:
            for r in reports:
                state = "OK" if not r["failures"] else f"FAILED ({len(r['failures'])} problem(s))"
                click.echo(
                    f"step {r['step']}: {r['tensors']} tensors, {r['chunks']} chunks, "
                    f"{_size(r['bytes'])} checked: {state}"
                )
        for s, f in failures:
            click.echo(f"ckpt: error: step {s}: {f['error']}", err=True)
        if failures:
            raise _Failed


@main.command("gc")
@_common
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    required=True,
    help="Keep the newest K committed steps.",
)
@click.option("--keep-every", type=click.IntRange(min=1), help="Also keep steps divisible by N.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
def gc_cmd(
    root: str,
    storage_options: tuple[str, ...],
    as_json: bool,
    keep_last: int,
    keep_every: int | None,
    dry_run: bool,
) -> None:
    """Apply retention: delete old committed steps and older uncommitted leftovers."""
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every, gc_uncommitted=True)
    with _session(root, storage_options, as_json) as storage:
        committed = commit_mod.committed_steps(storage)
        keep, drop = policy.select(committed)
        newest = committed[-1] if committed else None
        leftovers = [
            s for s in commit_mod.uncommitted_steps(storage) if newest is not None and s < newest
        ]
        if not dry_run:
            done = set(apply_retention(storage, policy))
            drop, leftovers = [s for s in drop if s in done], [s for s in leftovers if s in done]
        if as_json:
            _emit(
                {
                    "ok": True,
                    "root": storage.url,
                    "dry_run": dry_run,
                    "kept": keep,
                    "deleted": drop,
                    "deleted_uncommitted": leftovers,
                }
            )
            return
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"kept {len(keep)} step(s): {keep}")
        click.echo(f"{verb} {len(drop)} committed step(s): {drop}")
        click.echo(f"{verb} {len(leftovers)} uncommitted leftover(s): {leftovers}")


if __name__ == "__main__":
    main()
