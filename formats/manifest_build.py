"""Building a step's manifest from the per-rank reports of a save (the coordinator's job).

Every writer of a step -- a rank of the in-process pipeline (``ckpt.saver``) or a daemon
persisting a rank's snapshot (``ckptd.daemon.persist``) -- ends with one *rank report*,
a JSON object::

    {"rank": 2,                       # the saving rank
     "status": None,                  # None: its chunks are durable; else the error, one line
     "chunks": [[name, ChunkRecord.to_json()], ...],
     "rng": {state key: rng state},   # this rank's RNG states ({} if none)
     "objects": {key: JSON leaf},     # this rank's small trainer state
     "coords": "dp=0,tp=1",           # RankLayout.coords_key()
     "bytes": 123,                    # stored bytes this rank wrote
     "records": {name: record JSON}}  # optional: array records (no chunks) it vouches for

The coordinator gathers every rank's report (in rank order), then calls
:func:`build_manifest` and commits it with :func:`commit_manifest`; nothing here does I/O
besides that. The in-process pipeline knows every array record from its own plan and
may leave ``"records"`` out; a daemon only knows the records of its own ranks' snapshots,
so its reports carry them and :func:`merge_records` joins them.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ckptd.errors import CkptError, IntegrityError
from ckptd.formats.manifest import ChunkRecord, Manifest, TensorRecord
from ckptd.formats.universal_io import attach_chunks, commit_manifest
from ckptd.fragments import RankLayout
from ckptd.statedict import json_dumps

__all__ = [
    "build_manifest",
    "commit_manifest",
    "describe",
    "layouts_digest",
    "merge_records",
    "record_json",
    "report_chunks",
    "split_objects",
]

_ABSENT = object()


def describe(exc: BaseException) -> str:
    """One-line description of an error for a report (the ``status`` field)."""
    if isinstance(exc, CkptError):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def layouts_digest(layouts: Sequence[RankLayout]) -> str:
    """The digest of a save's layouts recorded in the manifest (provenance, fast paths)."""
    h = hashlib.sha256()
    for lay in layouts:
        h.update(lay.digest().encode())
    return h.hexdigest()


def record_json(rec: TensorRecord) -> dict[str, Any]:
    """A record's JSON without its chunks (what a report's ``"records"`` holds)."""
    obj = rec.to_json()
    obj.pop("chunks")
    return obj


def merge_records(reports: Sequence[Mapping[str, Any]]) -> dict[str, TensorRecord]:
    """The union of the reports' ``"records"``; ranks must agree on a shared tensor.

    Raises :class:`IntegrityError` if two ranks describe one tensor differently (their
    chunks would not fit one array).
    """
    out: dict[str, TensorRecord] = {}
    for rank, rep in enumerate(reports):
        for name, obj in rep.get("records", {}).items():
            rec = TensorRecord.from_json(name, {**obj, "chunks": []})
            prev = out.setdefault(name, rec)
            if prev != rec:
                who = rep.get("rank", rank)
                raise IntegrityError(
                    f"rank {who} describes tensor {name!r} as {record_json(rec)}, another "
                    f"rank as {record_json(prev)}: the ranks did not save one plan"
                )
    return out


def report_chunks(reports: Sequence[Mapping[str, Any]]) -> list[tuple[str, ChunkRecord]]:
    """Every ``(tensor name, chunk record)`` of the reports; a chunk written twice raises."""
    out: list[tuple[str, ChunkRecord]] = []
    seen: dict[tuple[str, tuple[int, ...]], Any] = {}
    for i, rep in enumerate(reports):
        rank = rep.get("rank", i)  # reports are in rank order; "rank" is optional
        for name, obj in rep["chunks"]:
            c = ChunkRecord.from_json(obj)
            key = (str(name), c.index)
            if key in seen:
                raise IntegrityError(
                    f"chunk {list(c.index)} of {name!r} reported by ranks {seen[key]} and "
                    f"{rank}: the ranks did not save one plan"
                )
            seen[key] = rank
            out.append((str(name), c))
    return out


def split_objects(
    reports: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """JSON leaves equal on every rank are stored once (``state``); the others per rank
    coordinates (``per_rank_state[key][coords]``), only for the ranks that have them."""
    keys = sorted({k for g in reports for k in g["objects"]})
    state: dict[str, Any] = {}
    per_rank: dict[str, dict[str, Any]] = {}
    for k in keys:
        vals = [g["objects"].get(k, _ABSENT) for g in reports]
        if all(v is not _ABSENT for v in vals) and len({json_dumps(v) for v in vals}) == 1:
            state[k] = vals[0]
        else:
            per_rank[k] = {g["coords"]: v for g, v in zip(reports, vals) if v is not _ABSENT}
    return state, per_rank


def build_manifest(
    step: int,
    records: Mapping[str, TensorRecord],
    reports: Sequence[Mapping[str, Any]],
    digest: str,
    tensors: Collection[str] | None = None,
) -> Manifest:
    """The manifest of ``step`` from array ``records`` (without chunks) and the reports of
    every rank, in rank order; ``digest`` is :func:`layouts_digest` of the save.

    ``tensors``, when given, is every logical tensor of the save: a tensor without a
    record is then an error instead of a manifest that silently lacks it. Raises
    :class:`IntegrityError` for chunks of unknown tensors or chunks reported twice.
    """
    if tensors is not None:
        missing = sorted(set(tensors) - set(records))
        if missing:
            raise IntegrityError(
                f"step {step}: no rank reported the array record of {len(missing)} tensor(s), "
                f"e.g. {missing[:5]}"
            )
    chunks = report_chunks(reports)
    unknown = sorted({n for n, _ in chunks} - set(records))
    if unknown:
        raise IntegrityError(f"step {step}: chunks reported for unknown tensors {unknown[:5]}")
    rng = {g["coords"]: g["rng"] for g in reports if g["rng"]}
    state, per_rank = split_objects(reports)
    layout = {
        "world_size": len(reports),
        "coords": [g["coords"] for g in reports],
        "digest": digest,
    }
    return Manifest(
        step=step,
        tensors=attach_chunks(records, chunks),
        layout=layout,
        rng=rng,
        state=state,
        per_rank_state=per_rank,
    )
