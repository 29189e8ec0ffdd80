"""Target: the ckptd universal format, written with :class:`UniversalWriter`.

Resumable per tensor (the writer's sidecar, CRC32C-verified on resume); the step's
commit marker is the completion marker; ``latest`` moves if the step is the newest.
Tensors are reported done (``on_done``) when the writer makes them durable: once per
256 MiB sync window (one ``syncfs``), not per tensor. Tensors are streamed from the
source chunk by chunk (``Fetch.range``) into reused staging buffers, so memory is the
writer's in-flight chunks (64 MiB) and the chunk being read, whatever the tensor sizes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from ckptd.converters.sources.base import PlanError, SourceState, TensorInfo
from ckptd.converters.targets.base import (
    Existing,
    Fetch,
    OnDone,
    Target,
    TargetLayout,
    WriteOutcome,
)
from ckptd.errors import InvalidKeyError
from ckptd.formats import commit as commit_mod
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.keys import validate_key
from ckptd.formats.storage import ObjectNotFoundError, Storage, open_storage
from ckptd.formats.universal_io import PROGRESS_NAME, UniversalWriter, parse_progress
from ckptd.formats.writer import WriterOptions
from ckptd.keys import validate_state_key


class UniversalTarget(Target):
    """Writes ``DST/step-<N>/`` (N = ``options.step``) under the root ``DST``."""

    format = "universal"

    def validate_name(self, name: str) -> None:
        try:
            validate_state_key(name)
            validate_key(name)
        except InvalidKeyError as e:
            raise PlanError(f"cannot name a universal tensor {name!r}: {e}") from e

    def layout(self, tensors: Sequence[TensorInfo]) -> TargetLayout:
        sd = commit_mod.step_dir(self.options.step)
        assignment = tuple((t.name, sd) for t in tensors)
        return TargetLayout(assignment, (f"{sd}/", f"{sd}/zarr.json", f"{sd}/COMMITTED"))

    def _storage(self) -> Storage:
        return open_storage(self.path)

    def existing(self, fingerprint: str) -> Existing:
        local = "://" not in self.path or self.path.startswith("file://")
        if local:
            p = self.path.removeprefix("file://")
            if os.path.exists(p) and not os.path.isdir(p):
                return Existing.OTHER
            if not os.path.isdir(p):
                return Existing.ABSENT
        with self._storage() as st:
            step = self.options.step
            if commit_mod.is_committed(st, step):
                return Existing.COMPLETE
            if step not in commit_mod.step_dirs(st):
                return Existing.ABSENT
            key = f"{commit_mod.step_dir(step)}/{PROGRESS_NAME}"
            try:
                doc = parse_progress(st.get(key), f"{st.url}/{key}")
            except ObjectNotFoundError:
                return Existing.OTHER  # an interrupted ckpt.save or foreign leftover
            return Existing.RESUMABLE if doc["fingerprint"] == fingerprint else Existing.OTHER

    def clear(self) -> None:
        with self._storage() as st:
            commit_mod.uncommit(st, self.options.step)

    def write(
        self,
        tensors: Sequence[TensorInfo],
        layout: TargetLayout,
        fetch: Fetch,
        on_done: OnDone,
        *,
        fingerprint: str,
        state: SourceState,
        provenance: dict[str, Any],
    ) -> WriteOutcome:
        opts = self.options
        nbytes = {t.name: t.nbytes for t in tensors}
        with self._storage() as st:
            writer = UniversalWriter.resume(
                st,
                opts.step,
                CodecPolicy(codec=opts.codec),
                WriterOptions(workers=opts.workers, max_inflight_bytes=64 << 20),
                fingerprint=fingerprint,
                on_durable=lambda name: on_done(name, nbytes[name], False),
            )
            try:
                for t in tensors:
                    if writer.is_done(t.name):
                        on_done(t.name, t.nbytes, True)
                        continue
                    # Chunk by chunk into reused buffers, never the whole tensor: memory
                    # is the writer's in-flight chunks (formats/universal_io.py, "Memory").
                    writer.add_ranges(
                        t.name,
                        t.dtype,
                        t.shape,
                        functools.partial(fetch.range, t.name),
                        functools.partial(fetch.prefetch, t.name),
                    )
                layout_doc = {"world_size": 1, "coords": ["rank=0"], "digest": ""}
                writer.set_state(
                    state.state,
                    state.per_rank_state,
                    state.rng,
                    layout_doc | {"converted_from": provenance},
                )
                written = writer.commit()
            except BaseException:
                writer.abort()
                raise
        return WriteOutcome(written, writer.resumed)
