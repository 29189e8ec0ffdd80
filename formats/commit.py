"""The commit protocol: when a checkpoint step becomes visible, and how ``latest`` moves.

Layout under a storage root::

    step-000000042/...          contents (chunks, written by every rank)
    step-000000042/zarr.json    manifest (written by the coordinator)
    step-000000042/COMMITTED    commit marker (this module)
    latest                      text: the newest committed step number (a hint)

Save order, one step (every arrow waits for the previous stage to finish):

1. every writer's bytes are durable (each rank's ``Storage.put`` calls returned);
2. the coordinator writes the manifest ``step-N/zarr.json`` (another module);
3. the coordinator calls :func:`commit`: the marker is created with
   ``put_if_absent`` -- the single atomic commit point -- and then ``latest`` is
   advanced with ``put`` (only ever forward);
4. retention (:mod:`ckptd.formats.retention`) deletes old steps with :func:`uncommit`.

Readers only ever see committed steps: they resolve a step with :func:`latest_step`
or :func:`require_committed` and ignore step directories without a marker. A crash
at any point before the marker exists leaves no visible checkpoint and never touches
an older one; a crash between the marker and ``latest`` leaves ``latest`` one step
behind, which the next commit repairs. Only one coordinator commits a given root.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from ckptd.errors import IntegrityError, NotCommittedError, StorageError
from ckptd.formats.storage import ObjectNotFoundError, Storage

log = logging.getLogger(__name__)

MARKER_NAME = "COMMITTED"
LATEST_KEY = "latest"
MARKER_VERSION = 1
_RESERVED = frozenset({"marker_version", "step", "wall_time"})
_STEP_DIR = re.compile(r"step-(\d{9,})")


def step_dir(step: int) -> str:
    """Return the directory name of ``step``: ``step-`` and at least nine digits."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a step must be a non-negative int, got {step!r}")
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """Return the step of a directory name made by :func:`step_dir`, else ``None``."""
    m = _STEP_DIR.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_dir(step) == name else None  # reject non-canonical zero padding


def marker_key(step: int) -> str:
    """Return the key of the commit marker of ``step``."""
    return f"{step_dir(step)}/{MARKER_NAME}"


def commit(storage: Storage, step: int, info: dict[str, Any] | None = None) -> bool:
    """Commit ``step`` (coordinator only, after the manifest is durable); return whether
    ``latest`` moved.

    Writes the marker ``{"marker_version", "step", "wall_time", **info}`` with
    ``put_if_absent`` (a second commit of the same step raises
    :class:`~ckptd.errors.CommitConflictError`), then advances ``latest`` unless a newer
    step is already committed (saves may finish out of order). ``info`` is opaque
    JSON-serializable data such as ``manifest_crc32c``.
    """
    info = dict(info or {})
    clash = _RESERVED & info.keys()
    if clash:
        raise ValueError(f"commit info must not set reserved marker fields {sorted(clash)}")
    marker = {"marker_version": MARKER_VERSION, "step": step, "wall_time": time.time(), **info}
    payload = json.dumps(marker, sort_keys=True).encode()
    storage.put_if_absent(marker_key(step), payload)
    # From here on the step is committed whatever happens: ``latest`` is only a hint
    # (readers fall back to a listing), so failing to move it must not report the save
    # as failed; the next commit repairs it.
    try:
        current = latest_step(storage)
        if current is not None and current > step:
            return False
        storage.put(LATEST_KEY, f"{step}\n".encode())
    except (StorageError, OSError) as e:
        log.warning("step %d is committed but %r was not updated: %s", step, LATEST_KEY, e)
        return False
    return True


def read_marker(storage: Storage, step: int) -> dict[str, Any]:
    """Return the parsed commit marker of ``step``.

    Raises :class:`~ckptd.errors.NotCommittedError` if there is none and
    :class:`~ckptd.errors.IntegrityError` if it is not a marker for this step.
    """
    try:
        raw = storage.get(marker_key(step))
    except ObjectNotFoundError:
        raise _not_committed(storage, step) from None
    try:
        marker = json.loads(raw)
        ok = isinstance(marker, dict) and marker.get("step") == step
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise IntegrityError(
            f"commit marker {marker_key(step)!r} in {storage.url} is corrupt or names "
            f"another step: {raw[:200]!r}"
        )
    return marker


def is_committed(storage: Storage, step: int) -> bool:
    """Return whether ``step`` has a commit marker (existence only, no parsing)."""
    return storage.exists(marker_key(step))


def step_dirs(storage: Storage) -> list[int]:
    """Return every step that has a directory, committed or not, ascending."""
    steps = (parse_step_dir(name) for name in storage.list_dirs(""))
    return sorted(s for s in steps if s is not None)


def committed_steps(storage: Storage) -> list[int]:
    """Return the committed steps, ascending (one listing plus one existence check each)."""
    return [s for s in step_dirs(storage) if is_committed(storage, s)]


def uncommitted_steps(storage: Storage) -> list[int]:
    """Return steps whose directory exists without a marker (in flight or interrupted)."""
    return [s for s in step_dirs(storage) if not is_committed(storage, s)]


def latest_step(storage: Storage) -> int | None:
    """Return the newest committed step, or ``None`` if nothing is committed.

    Fast path: read ``latest`` and check its marker exists. If ``latest`` is missing,
    unparsable, or points to a step without a marker (deleted, or written by a crashed
    tool), fall back to the maximum of :func:`committed_steps`.
    """
    try:
        text = storage.get(LATEST_KEY).decode("ascii").strip()
        step = int(text) if text.isdigit() else None
    except (ObjectNotFoundError, UnicodeDecodeError):
        step = None
    if step is not None and is_committed(storage, step):
        return step
    steps = committed_steps(storage)
    return steps[-1] if steps else None


def require_committed(storage: Storage, step: int) -> None:
    """Raise :class:`~ckptd.errors.NotCommittedError` unless ``step`` is committed."""
    if not is_committed(storage, step):
        raise _not_committed(storage, step)


def uncommit(storage: Storage, step: int) -> None:
    """Delete ``step``: the marker first (it becomes invisible atomically), then contents.

    Idempotent; a crash midway leaves an uncommitted leftover that retention collects.
    Callers must not uncommit the step ``latest`` names unless they accept the
    fallback listing in :func:`latest_step`.
    """
    storage.delete(marker_key(step))
    storage.delete_prefix(step_dir(step))


def _not_committed(storage: Storage, step: int) -> NotCommittedError:
    present = step_dirs(storage)
    committed = [s for s in present if is_committed(storage, s)]
    pending = sorted(set(present) - set(committed))
    hint = f"committed steps: {committed or 'none'}"
    if pending:
        hint += f"; uncommitted (in flight or interrupted) steps: {pending}"
    return NotCommittedError(f"step {step} is not committed in {storage.url} ({hint})")
