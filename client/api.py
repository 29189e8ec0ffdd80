"""The user API: ``save``, ``load``, ``wait``, ``configure``.

One call per rank. Without torch.distributed the same pipeline runs in one process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ckpt.config import Config, ConfigError, from_env
from ckpt.dist import context, reset_context
from ckpt.loader import LoadResult, MergeRule, load_state
from ckpt.saver import SaveHandle, Saver, SaveResult
from ckptd.formats.storage import Storage, open_storage
from ckptd.layout import Layout, local_tensor
from ckptd.statedict import flatten_state

if TYPE_CHECKING:
    from ckptd.converters.spec import CompiledSpec

_lock = threading.RLock()
_config: Config = from_env()
_saver: Saver | None = None
_storages: dict[tuple[str, tuple[tuple[str, Any], ...]], Storage] = {}


def configure(config: Config | None = None, **changes: Any) -> Config:
    """Replace the process configuration (or change some fields); returns it.

    Waits for pending saves first, since staging pools are sized by the configuration.
    """
    global _config, _saver
    with _lock:
        if _saver is not None:
            old, _saver = _saver, None  # as in _get_saver: never keep a closed saver
            old.close()
        base = config or _config
        try:
            _config = replace(base, **changes)
        except TypeError as e:
            raise ConfigError(str(e)) from None
        return _config


def get_config() -> Config:
    """The current process configuration."""
    return _config


def save(
    state: dict[str, Any],
    step: int,
    root: str,
    *,
    blocking: bool = True,
    layout: Layout | None = None,
    spec: CompiledSpec | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SaveHandle:
    """Checkpoint ``state`` as ``step`` under ``root`` (a path or fsspec URL).

    Blocks only while tensors are copied into staging memory when ``blocking=False``;
    the returned handle's ``wait()`` returns when the checkpoint is committed and raises
    any error (a :class:`ckptd.errors.DistributedError` names every failing rank).
    Every rank must call it with the same ``step`` and ``root``. ``spec`` (a compiled
    reshard spec, see docs/spec-language.md) builds the layout from the state's names.
    """
    layout = _layout_from_spec(state, spec) if spec is not None else layout
    saver = _get_saver()
    storage = _storage(root, storage_options)
    return saver.save(state, step, storage, root, layout, blocking)


def load(
    state: dict[str, Any],
    root: str,
    step: int | None = None,
    *,
    strict: bool = False,
    layout: Layout | None = None,
    spec: CompiledSpec | None = None,
    merge: Mapping[str, MergeRule] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Fill ``state`` in place from ``step`` (default: the latest committed) under ``root``.

    Works under any layout: pieces are read from the chunks that hold them. With
    ``strict=True`` keys missing from the checkpoint or unused by every rank raise
    :class:`ckptd.errors.MissingKeysError`; otherwise they are returned (and logged).
    Per-rank trainer state saved under another layout needs a ``merge`` rule. ``spec``
    (a compiled reshard spec) lets e.g. a live Megatron-style model load a universal
    checkpoint directly.
    """
    layout = _layout_from_spec(state, spec) if spec is not None else layout
    storage = _storage(root, storage_options)
    ctx = context(_config.collective_timeout_s)
    daemon = _get_saver().daemon if _config.daemon_socket else None
    return load_state(
        state, storage, step, layout, strict, merge, _config, ctx, daemon=daemon, root=str(root)
    )


def wait(timeout: float | None = None) -> list[SaveResult]:
    """Wait for every pending save of this process; raises the first error."""
    with _lock:
        saver = _saver
    return saver.wait_all(timeout) if saver is not None else []


def shutdown() -> None:
    """Finish pending saves and release threads, staging memory and storage handles."""
    global _saver
    with _lock:
        try:
            if _saver is not None:
                old, _saver = _saver, None  # as in _get_saver: never keep a closed saver
                old.close()
        finally:
            for st in _storages.values():
                st.close()
            _storages.clear()
            reset_context()  # a later torch.distributed world gets fresh groups


def _layout_from_spec(state: dict[str, Any], spec: CompiledSpec) -> Layout:
    """The layout a compiled spec gives this rank's state (coverage checked)."""
    flat = flatten_state(state)
    shapes = {k: tuple(local_tensor(t).shape) for k, t in flat.tensors.items()}
    return spec.layout_for(list(flat.tensors), shapes)


def _get_saver() -> Saver:
    global _saver
    with _lock:
        ctx = context(_config.collective_timeout_s)
        if _saver is None or _saver.ctx is not ctx:
            if _saver is not None:
                # Forget the old saver before closing it: close() re-raises a pending
                # save's error, which must not leave a closed saver installed.
                old, _saver = _saver, None
                old.close()
            _saver = Saver(_config, ctx)
        return _saver


def _storage(root: str, options: Mapping[str, Any] | None) -> Storage:
    key = (str(root), tuple(sorted((options or {}).items())))
    with _lock:
        st = _storages.get(key)
        if st is None:
            st = _storages[key] = open_storage(root, **dict(options or {}))
        return st
