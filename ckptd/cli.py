"""The ``ckpt`` command: list, inspect, verify and garbage-collect checkpoints.

    ckpt ls ROOT
    ckpt inspect ROOT [--step N]
    ckpt verify ROOT [--step N | --all] [--progress] [--workers W]
    ckpt gc ROOT --keep-last K [--keep-every N] [--dry-run]

``ROOT`` is a path or an fsspec URL; ``--storage-option key=value`` (repeatable) goes to
the filesystem, e.g. ``-o endpoint_url=http://127.0.0.1:9000`` for S3. Every command
takes ``--json`` and then prints one JSON object on stdout, always with an ``ok`` field
(and ``error`` when the command could not run). Exit codes: 0 success; 1 failure
(checksum mismatch, step not committed, missing root, storage error) with one line per
problem on stderr naming the tensor, chunk or file; 2 usage error (click's default).

Only committed steps are read, and a local root is never created. ``gc`` applies
:mod:`ckptd.formats.retention`, which also deletes uncommitted leftovers older than the
newest commit (never newer ones: they may be saves in flight).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

import click

from ckptd.chunking import ChunkGrid
from ckptd.dtypes import itemsize_of
from ckptd.errors import CkptError, NotCommittedError
from ckptd.formats import commit as commit_mod
from ckptd.formats.manifest import ChunkRecord, TensorRecord
from ckptd.formats.reader import CheckpointReader
from ckptd.formats.retention import RetentionPolicy, apply_retention
from ckptd.formats.storage import ObjectNotFoundError, Storage, open_storage
from ckptd.formats.zarr_meta import array_metadata

_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "desc": "verify"}


class Failed(Exception):
    """Raised by a command after it printed its report: exit with status 1."""


def _line(e: BaseException | str) -> str:
    """A message on one line, whatever the exception said."""
    return " ".join(str(e).split())


def _parse_option(value: str) -> tuple[str, Any]:
    """``key=value``; the value is read as a JSON scalar when it is one (``true``, ``3``)."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint="'-o'")
    try:
        parsed = json.loads(raw)
    except ValueError:
        return key, raw
    return key, parsed if parsed is None or isinstance(parsed, (str, int, float)) else raw


@contextmanager
def _session(root: str, options: tuple[str, ...], as_json: bool) -> Iterator[Storage]:
    """Open ROOT's storage; turn ckptd, OS and value errors into exit status 1."""
    opts = dict(_parse_option(o) for o in options)
    local = "://" not in root or root.startswith("file://")
    if local and opts:
        raise click.UsageError("--storage-option applies only to remote (URL) roots")
    try:
        if local and not os.path.isdir(root.removeprefix("file://")):
            raise NotCommittedError(f"no checkpoint root at {root!r} (no such directory)")
        with open_storage(root, **opts) as storage:
            yield storage
    except Failed:
        sys.exit(1)
    except (CkptError, OSError, ValueError) as e:
        if as_json:
            _emit({"ok": False, "error": _line(e)})
        click.echo(f"ckpt: error: {_line(e)}", err=True)
        sys.exit(1)


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _command(name: str) -> Callable[[Callable[..., None]], click.Command]:
    """Register ``fn(storage, as_json, **options)`` as ``ckpt NAME ROOT [--json] [-o K=V]``."""

    def register(fn: Callable[..., None]) -> click.Command:
        @functools.wraps(fn)
        def run(root: str, storage_options: tuple[str, ...], as_json: bool, **kw: Any) -> None:
            with _session(root, storage_options, as_json) as storage:
                fn(storage, as_json, **kw)

        run = click.argument("root")(run)
        run = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(run)
        help_ = "Filesystem option for a remote ROOT (repeatable), e.g. endpoint_url=URL."
        opt = click.option("--storage-option", "-o", "storage_options", multiple=True, help=help_)
        return main.command(name)(opt(run))

    return register


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _stored(reader: CheckpointReader) -> int:
    return sum(c.length for t in reader.manifest.tensors.values() for c in t.chunks)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
def main() -> None:
    """List, inspect, verify and garbage-collect ckptd checkpoints."""


@_command("ls")
def ls_cmd(storage: Storage, as_json: bool) -> None:
    """List the checkpoint steps under ROOT (committed ones and leftovers)."""
    latest = commit_mod.latest_step(storage)
    rows: list[dict[str, Any]] = []
    for step in commit_mod.step_dirs(storage):
        row: dict[str, Any] = {"step": step, "committed": False, "latest": step == latest}
        if commit_mod.is_committed(storage, step):
            row["committed"] = True
            try:
                reader = CheckpointReader.open(storage, step)
                m = reader.manifest
                row.update(created=m.created, tensors=len(m.tensors), stored_bytes=_stored(reader))
            except CkptError as e:
                row["error"] = _line(e)
        rows.append(row)
    error = None if latest is not None else f"no committed checkpoint under {storage.url}"
    if as_json:
        out = {"ok": error is None, "root": storage.url, "latest": latest, "steps": rows}
        _emit(out | ({"error": error} if error else {}))
    for r in [] if as_json else rows:
        size = _size(r["stored_bytes"]) if "stored_bytes" in r else "-"
        status = "committed" if r["committed"] else "uncommitted"
        note = "  (latest)" if r["latest"] else "  " + r.get("error", "")
        when = _when(r.get("created"))
        click.echo(
            f"{r['step']:>10}  {status:11}  {when:19}  {r.get('tensors', '-'):>6}  {size:>10}{note}"
        )
    if error:
        click.echo(f"ckpt: error: {error}", err=True)
        raise Failed


def _tensor_info(rec: TensorRecord) -> dict[str, Any]:
    return {
        **{k: v for k, v in rec.to_json().items() if k != "chunks"},
        "name": rec.name,
        "chunks": len(rec.chunks),
        "grid_chunks": ChunkGrid(rec.shape, rec.chunk_shape).n_chunks,
        "stored_bytes": sum(c.length for c in rec.chunks),
        "logical_bytes": math.prod(rec.shape) * itemsize_of(rec.dtype),
    }


@_command("inspect")
@click.option("--step", type=click.IntRange(min=0), help="Step to show (default: latest).")
def inspect_cmd(storage: Storage, as_json: bool, step: int | None) -> None:
    """Show a checkpoint's manifest: tensors, layout provenance, trainer state."""
    reader = CheckpointReader.open(storage, step)
    m = reader.manifest
    tensors = [_tensor_info(m.tensors[n]) for n in sorted(m.tensors)]
    info: dict[str, Any] = {"ok": True, "root": storage.url, "step": m.step, "writer": m.writer}
    info |= {"version": "{}.{}".format(*m.version), "created": m.created, "layout": m.layout}
    info["committed"] = commit_mod.read_marker(storage, reader.step).get("wall_time")
    info |= {"state": m.state, "per_rank_state": m.per_rank_state, "rng": sorted(m.rng)}
    info["tensors"] = tensors
    info["stored_bytes"] = sum(t["stored_bytes"] for t in tensors)
    info["logical_bytes"] = sum(t["logical_bytes"] for t in tensors)
    if as_json:
        _emit(info)
        return
    lay = m.layout
    echo = click.echo
    echo(f"step {m.step} of {storage.url} (format {info['version']}, writer {m.writer})")
    echo(f"created {_when(m.created)}, committed {_when(info['committed'])}")
    coords = ", ".join(map(str, lay.get("coords", [])))
    digest = str(lay.get("digest", ""))[:16]
    echo(f"layout: world_size {lay.get('world_size', '?')}, coords {coords}, digest {digest}")
    stored, logical = _size(info["stored_bytes"]), _size(info["logical_bytes"])
    echo(f"tensors: {len(tensors)}, {stored} stored, {logical} logical")
    w = max([len(t["name"]) for t in tensors] + [4])
    echo(
        f"  {'NAME':{w}}  {'DTYPE':9}  {'SHAPE':16}  {'CHUNK':16}  {'N':>5}  {'STORED':>10}  CODEC"
    )
    for t in tensors:
        codec = f"{t['codec']}:{t['level']}" + (" packed" if t["packed"] else "")
        shapes = f"{t['shape']!s:16}  {t['chunk_shape']!s:16}"
        size = _size(t["stored_bytes"])
        echo(f"  {t['name']:{w}}  {t['dtype']:9}  {shapes}  {t['chunks']:>5}  {size:>10}  {codec}")
    echo(f"trainer state: {json.dumps(m.state, sort_keys=True)}")
    if m.per_rank_state:
        echo(f"per-rank state: {', '.join(sorted(m.per_rank_state))}")
    if m.rng:
        echo(f"rng states: {', '.join(sorted(m.rng))}")


def _open(storage: Storage, step: int) -> CheckpointReader | CkptError:
    try:
        return CheckpointReader.open(storage, step)
    except CkptError as e:
        return e


def _array_meta_problem(reader: CheckpointReader, rec: TensorRecord) -> str | None:
    """Plain zarr readers need ``<name>/zarr.json`` of an unpacked array to match the manifest."""
    key = f"{reader.prefix}{rec.name}/zarr.json"
    try:
        if json.loads(reader.storage.get(key)) == array_metadata(rec):
            return None
    except ObjectNotFoundError:
        return f"tensor {rec.name!r} ({key}): array metadata is missing"
    except (ValueError, UnicodeDecodeError):
        pass
    return f"tensor {rec.name!r} ({key}): array metadata is corrupt or disagrees with the manifest"


def _verify_step(
    step: int, reader: CheckpointReader | CkptError, workers: int, bar: Any
) -> dict[str, Any]:
    """Read and check every chunk of ``step``; return its report with every failure."""
    out: dict[str, Any] = {"step": step, "tensors": 0, "chunks": 0, "bytes": 0, "failures": []}
    if isinstance(reader, CkptError):  # the marker or manifest itself is bad
        out["failures"].append({"tensor": None, "chunk": None, "error": _line(reader)})
        return out
    jobs = []
    for name, rec in sorted(reader.manifest.tensors.items()):
        grid = ChunkGrid(rec.shape, rec.chunk_shape)
        absent = set(grid.indices()) - {c.index for c in rec.chunks} if math.prod(rec.shape) else ()
        for i in sorted(absent):
            error = f"tensor {name!r} chunk {list(i)}: not in the manifest (incomplete checkpoint)"
            out["failures"].append({"tensor": name, "chunk": list(i), "error": error})
        if not rec.packed and (problem := _array_meta_problem(reader, rec)):
            out["failures"].append({"tensor": name, "chunk": None, "error": problem})
        jobs += [(name, c, grid) for c in rec.chunks]
        out["tensors"] += 1

    def check(name: str, c: ChunkRecord, grid: ChunkGrid) -> dict[str, Any] | None:
        try:
            reader.read_chunk(name, c.index, grid.chunk_box(c.index))  # CRC32C, then decode
        except (CkptError, OSError, ValueError) as e:
            obj = reader.prefix + c.object
            return {"tensor": name, "chunk": list(c.index), "object": obj, "error": _line(e)}
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


@_command("verify")
@click.option("--step", type=click.IntRange(min=0), help="Step to verify (default: latest).")
@click.option("--all", "all_steps", is_flag=True, help="Verify every committed step.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
@click.option("--workers", type=click.IntRange(min=1), default=8, help="Parallel chunk reads.")
def verify_cmd(
    storage: Storage,
    as_json: bool,
    step: int | None,
    all_steps: bool,
    progress: bool | None,
    workers: int,
) -> None:
    """Read every chunk and check every CRC32C; report every failing tensor and chunk."""
    from tqdm import tqdm

    if step is not None and all_steps:
        raise click.UsageError("--step and --all are mutually exclusive")
    if all_steps:
        steps = commit_mod.committed_steps(storage)
    elif step is None:
        steps = [s for s in [commit_mod.latest_step(storage)] if s is not None]
    else:
        commit_mod.require_committed(storage, step)
        steps = [step]
    if not steps:
        raise NotCommittedError(f"no committed checkpoint under {storage.url}")
    readers = {s: _open(storage, s) for s in steps}
    total = sum(_stored(r) for r in readers.values() if isinstance(r, CheckpointReader))
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, file=sys.stderr, disable=not show, **_BAR) as bar:
        reports = [_verify_step(s, r, workers, bar) for s, r in readers.items()]
    failures = [(r["step"], f) for r in reports for f in r["failures"]]
    for r in reports:
        r["ok"] = not r["failures"]
        state = "OK" if r["ok"] else f"FAILED ({len(r['failures'])} problem(s))"
        summary = f"{r['tensors']} tensors, {r['chunks']} chunks, {_size(r['bytes'])} checked"
        if not as_json:
            click.echo(f"step {r['step']}: {summary}: {state}")
    if as_json:
        _emit({"ok": not failures, "root": storage.url, "steps": reports})
    for s, f in failures:
        click.echo(f"ckpt: error: step {s}: {f['error']}", err=True)
    if failures:
        raise Failed


@_command("gc")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Keep the newest K.")
@click.option("--keep-every", type=click.IntRange(min=1), help="Also keep steps divisible by N.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
def gc_cmd(
    storage: Storage, as_json: bool, keep_last: int, keep_every: int | None, dry_run: bool
) -> None:
    """Apply retention: delete old committed steps and older uncommitted leftovers."""
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every, gc_uncommitted=True)
    committed = commit_mod.committed_steps(storage)
    keep, drop = policy.select(committed)
    newest = committed[-1] if committed else -1
    leftovers = [s for s in commit_mod.uncommitted_steps(storage) if s < newest]
    if not dry_run:
        done = set(apply_retention(storage, policy))
        drop, leftovers = [s for s in drop if s in done], [s for s in leftovers if s in done]
    if as_json:
        out = {"ok": True, "root": storage.url, "dry_run": dry_run, "kept": keep}
        _emit(out | {"deleted": drop, "deleted_uncommitted": leftovers})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"kept {len(keep)} step(s): {keep}")
    click.echo(f"{verb} {len(drop)} committed step(s): {drop}")
    click.echo(f"{verb} {len(leftovers)} uncommitted leftover(s): {leftovers}")


@main.command("status")
@click.argument("root")
@click.option("--socket", "socket_path", envvar="CKPTD_SOCKET", required=True,
              help="The node's ckptd socket (default $CKPTD_SOCKET).")
@click.option("--token", envvar="CKPTD_JOB_TOKEN", help="Job token (default $CKPTD_JOB_TOKEN).")
@click.option("--job", "job_id", envvar="CKPT_JOB_ID", help="Job id (default: from ROOT).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def status_cmd(root: str, socket_path: str, token: str | None, job_id: str | None,
               as_json: bool) -> None:
    """Show the job of ROOT in the daemons' memory: per step and node, staged, protected
    (group, n, m), persisted, committed; and each daemon's memory against its budget."""
    from ckpt.daemon_client import DaemonClient, job_id_for
    from ckptd.daemon.jobview import format_job, job_rows

    client = DaemonClient(socket_path, token)
    try:
        doc = job_rows(client.job_status(job_id_for(root, job_id)))
    except CkptError as e:
        click.echo(f"ckpt: error: {_line(e)}", err=True)
        sys.exit(1)
    finally:
        client.close()
    if as_json:
        _emit({"ok": True, **doc})
    else:
        click.echo(format_job(doc))


if __name__ == "__main__":
    main()
