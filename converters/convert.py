"""``ckpt-convert`` as a library: plan a conversion (pure data), then execute it.

    plan = plan_conversion("hf-model/", "ckpts/", ConvertOptions(target_format="universal"))
    print(plan.to_json())                  # tensors, bytes, output files; nothing written
    result = execute(plan, options)        # streams tensor by tensor; resumable; atomic
    # or simply: convert(src, dst, options)

Planning reads only metadata: the source's inventory of logical tensors (the *source
layout*), the target's assignment of tensors to output files (the *target layout*),
and the name map (the *spec*; the reshard-spec language's name maps plug in here).
:func:`build_plan` combines them without I/O. Execution holds one source tensor at a
time (peak RSS about 2x the largest tensor + bounded buffers), skips tensors that an
interrupted run already wrote after verifying their checksums, and lets the target
write its commit marker last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ckptd.converters.sources import open_source
from ckptd.converters.sources.base import (
    PlanError,
    Source,
    SourceState,
    TargetExistsError,
    TensorInfo,
)
from ckptd.converters.sources.namemap import Assembler, NameMap, NameMapLike, Segment
from ckptd.converters.targets import Existing, Target, TargetOptions, open_target

if TYPE_CHECKING:  # imported where used: see sources/torchfile.py
    import torch

OPTIM_PREFIXES = ("optim.", "optimizer.")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``5GB`` -> 5e9, ``500MiB`` -> 500 * 2**20, ``1024`` -> 1024 (Hugging Face style)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m or (m.group(3).upper() == "I"):
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MB, 2GiB, 1048576)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).upper()
    base = 1024 if suffix == "IB" else 1000
    power = " KMGT".index(unit) if unit else 0
    size = int(number * base**power)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion may be told (the CLI's flags)."""

    source_format: str | None = None  # None: detected from markers
    target_format: str = "universal"
    step: int | None = None  # universal source: the step read (default latest)
    target_step: int | None = None  # universal target: default the source's step, else 0
    workers: int = 4
    overwrite: bool = False
    weights_only: bool = False
    max_shard_size: int = 5_000_000_000
    name_map: NameMapLike | None = None  # JSON NameMap or a spec's SpecNameMap
    codec: str = "auto"
    progress: bool = False  # byte-based bar on stderr
    variables: tuple[tuple[str, int], ...] = ()  # model variables for spec-driven formats
    target_layout: tuple[tuple[str, int], ...] = ()  # e.g. (("tp", 4), ("pp", 2))
    spec: str | None = None  # shipped spec name or path for spec-driven formats


@dataclass(frozen=True)
class TensorMove:
    """One tensor of the conversion: source name -> target name, and its output."""

    source: str
    target: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    output: str
    segments: tuple[Segment, ...] = ()  # merge/split/transpose; empty: ``source`` as is


@dataclass(frozen=True)
class ConversionPlan:
    """A validated conversion; :func:`execute` carries it out."""

    source_format: str
    source_path: str
    source_step: int | None
    source_fingerprint: str
    target_format: str
    target_path: str
    target_options: TargetOptions
    moves: tuple[TensorMove, ...]
    dropped: tuple[str, ...]  # source names left out (--weights-only, name map)
    skipped: tuple[str, ...]  # source entries that are not tensors
    outputs: tuple[str, ...]  # output files/objects in write order, marker last
    destination: str  # Existing value at planning time
    fingerprint: str = field(default="")

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.moves)

    @property
    def largest_bytes(self) -> int:
        return max((m.nbytes for m in self.moves), default=0)

    def to_json(self) -> dict[str, Any]:
        per_output: dict[str, list[int]] = {}
        for m in self.moves:
            acc = per_output.setdefault(m.output, [0, 0])
            acc[0] += 1
            acc[1] += m.nbytes
        return {
            "source": {
                "format": self.source_format,
                "path": self.source_path,
                "step": self.source_step,
            },
            "target": {
                "format": self.target_format,
                "path": self.target_path,
                "step": self.target_options.step,
            },
            "tensors": len(self.moves),
            "bytes": self.total_bytes,
            "largest_tensor_bytes": self.largest_bytes,
            "dropped": list(self.dropped),
            "skipped": list(self.skipped),
            "destination": self.destination,
            "outputs": [
                {
                    "name": o,
                    "tensors": per_output.get(o, [0, 0])[0],
                    "bytes": per_output.get(o, [0, 0])[1],
                }
                for o in self.outputs
            ],
            "moves": [[m.source, m.target, m.dtype, list(m.shape), m.output] for m in self.moves],
        }


@dataclass(frozen=True)
class ConvertResult:
    """What a finished conversion did."""

    plan: ConversionPlan
    tensors: int
    bytes: int  # logical tensor bytes converted (resumed ones included)
    bytes_written: int
    resumed: tuple[str, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "source": self.plan.source_path,
            "target": self.plan.target_path,
            "from": self.plan.source_format,
            "to": self.plan.target_format,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "bytes_written": self.bytes_written,
            "resumed_tensors": len(self.resumed),
            "seconds": round(self.seconds, 3),
            "outputs": list(self.plan.outputs),
            "skipped": list(self.plan.skipped),
        }


# --------------------------------------------------------------------------- plan


def build_plan(
    inventory: Sequence[TensorInfo],
    target: Target,
    name_map: NameMapLike | None,
    weights_only: bool,
    variables: dict[str, int] | None = None,
) -> tuple[tuple[TensorMove, ...], tuple[str, ...], tuple[str, ...]]:
    """Pure: (source layout, target layout, spec) -> (moves, dropped, outputs).

    The name map may merge or split tensors (``variables`` size a spec's fused parts).
    Raises :class:`PlanError` if two source tensors map to one target name or a target
    name is invalid for the target format.
    """
    dropped: list[str] = []
    if weights_only:  # before the name map: a weights map need not cover optimizer state
        dropped = [t.name for t in inventory if _is_optim(t.name)]
        inventory = [t for t in inventory if not _is_optim(t.name)]
    mapped = (name_map or NameMap()).map_inventory(inventory, variables)
    kept: list[tuple[str, TensorInfo, tuple[Segment, ...]]] = []
    dropped += mapped.dropped
    seen: dict[str, str] = {}
    for m in mapped.tensors:
        new, src = m.target.name, "+".join(m.sources)
        if weights_only and _is_optim(*m.sources, new):
            dropped.extend(m.sources)
            continue
        if new in seen:
            raise PlanError(
                f"source tensors {seen[new]!r} and {src!r} both map to {new!r}; fix the name map"
            )
        seen[new] = src
        target.validate_name(new)
        kept.append((src, m.target, m.segments))
    layout = target.layout([t for _, t, _ in kept])
    output_of = layout.output_of()
    moves = tuple(
        TensorMove(src, t.name, t.dtype, t.shape, t.nbytes, output_of[t.name], seg)
        for src, t, seg in kept
    )
    return moves, tuple(dropped), layout.outputs


def _is_optim(*names: str) -> bool:
    return any(n.startswith(OPTIM_PREFIXES) for n in names)


def open_source_for(src: str, options: ConvertOptions) -> Source:
    """Open ``src`` as :func:`plan_conversion` does (the caller closes it)."""
    return open_source(
        src, options.source_format, options.step, options.workers, options.variables, options.spec
    )


def plan_conversion(
    src: str, dst: str, options: ConvertOptions, *, source: Source | None = None
) -> ConversionPlan:
    """Open ``src`` (metadata only), lay out ``dst`` and return the plan; writes nothing.

    ``source``: ``src`` already opened with :func:`open_source_for`, to be reused by
    :func:`execute` (opening a DeepSpeed or Megatron source unpickles every file's
    metadata); the caller closes it.
    """
    if source is None:
        with open_source_for(src, options) as opened:
            return plan_conversion(src, dst, options, source=opened)
    target = open_target(dst, options.target_format, _target_options(source.step, options))
    variables = {**getattr(source, "variables", {}), **dict(options.variables)}
    moves, dropped, outputs = build_plan(
        source.tensors(), target, options.name_map, options.weights_only, variables
    )
    plan = ConversionPlan(
        source_format=source.format,
        source_path=src,
        source_step=source.step,
        source_fingerprint=source.fingerprint(),
        target_format=target.format,
        target_path=dst,
        target_options=target.options,
        moves=moves,
        dropped=dropped,
        skipped=tuple(source.skipped()),
        outputs=outputs,
        destination=Existing.ABSENT.value,
    )
    fp = _fingerprint(plan)
    existing = target.existing(fp)
    return _replace(plan, fingerprint=fp, destination=existing.value)


def _target_options(source_step: int | None, options: ConvertOptions) -> TargetOptions:
    step = options.target_step
    if step is None:
        step = source_step if source_step is not None else (options.step or 0)
    return TargetOptions(
        step=step,
        max_shard_size=options.max_shard_size,
        workers=options.workers,
        codec=options.codec,
        variables=options.variables,
        target_layout=options.target_layout,
        spec=options.spec,
    )


def _fingerprint(plan: ConversionPlan) -> str:
    doc = {
        "source": [plan.source_format, plan.source_fingerprint, plan.source_step],
        "target": [plan.target_format, asdict(plan.target_options)],
        "moves": [[m.source, m.target, m.dtype, list(m.shape), m.output] for m in plan.moves],
        "segments": [[m.target, [asdict(s) for s in m.segments]] for m in plan.moves if m.segments],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _replace(plan: ConversionPlan, **changes: Any) -> ConversionPlan:
    from dataclasses import replace

    return replace(plan, **changes)


# ------------------------------------------------------------------------ execute


def execute(
    plan: ConversionPlan,
    options: ConvertOptions,
    *,
    on_tensor: Callable[[str, bool], None] | None = None,
    source: Source | None = None,
) -> ConvertResult:
    """Carry out ``plan``: stream every tensor into the target, resume, commit last.

    ``on_tensor(target_name, resumed)`` is called after each tensor is durable (or was
    verified after an interruption). ``source``: the source the plan was made from, still
    open (checked against the plan's fingerprint; the caller closes it); otherwise the
    plan's source is opened again. Raises :class:`TargetExistsError` if the destination
    holds a checkpoint and ``options.overwrite`` is false.
    """
    t0 = time.perf_counter()
    target = open_target(plan.target_path, plan.target_format, plan.target_options)
    existing = target.existing(plan.fingerprint)
    if existing in (Existing.COMPLETE, Existing.OTHER):
        if not options.overwrite:
            what = (
                "a finished conversion or checkpoint"
                if existing is Existing.COMPLETE
                else ("another checkpoint or an interrupted conversion of other inputs")
            )
            raise TargetExistsError(
                f"destination {plan.target_path!r} already holds {what}; "
                "pass --overwrite to replace it"
            )
        target.clear()
    if source is None:
        owned: AbstractContextManager[Source] = open_source(
            plan.source_path,
            plan.source_format,
            plan.source_step,
            options.workers,
            options.variables,
            options.spec,
        )
    else:
        owned = nullcontext(source)
    with owned as source:
        if source.fingerprint() != plan.source_fingerprint:
            raise PlanError(f"source {plan.source_path!r} changed since it was planned; plan again")
        by_target = {m.target: m for m in plan.moves}
        # universal stores trainer state; megatron writes its optimizer groups/LR schedule
        carries = plan.target_format in ("universal", "megatron")
        state = source.source_state() if carries else SourceState()
        bar = _progress_bar(plan.total_bytes, options.progress)
        resumed: list[str] = []

        assembler = Assembler(source, {m.target: (m.source, m.segments) for m in plan.moves})
        fetch = _Fetcher(assembler, by_target)

        def on_done(name: str, nbytes: int, was_resumed: bool) -> None:
            bar.update(nbytes)
            if was_resumed:
                resumed.append(name)
            if on_tensor is not None:
                on_tensor(name, was_resumed)

        infos = [TensorInfo(m.target, m.dtype, m.shape) for m in plan.moves]
        layout = target.layout(infos)
        if layout.outputs != plan.outputs:
            raise PlanError("the target laid out other outputs than planned; plan again")
        provenance = {
            "tool": "ckpt-convert",
            "from": plan.source_format,
            "source": os.path.abspath(plan.source_path)
            if "://" not in plan.source_path
            else plan.source_path,
            "source_step": plan.source_step,
        }
        try:
            outcome = target.write(
                infos,
                layout,
                fetch,
                on_done,
                fingerprint=plan.fingerprint,
                state=state,
                provenance=provenance,
            )
        finally:
            bar.close()
    return ConvertResult(
        plan=plan,
        tensors=len(plan.moves),
        bytes=plan.total_bytes,
        bytes_written=outcome.bytes_written,
        resumed=tuple(resumed),
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _Fetcher:
    """The executor's :class:`~ckptd.converters.targets.base.Fetch`: plan names in,
    tensors (or byte ranges of them) out, through the name map's assembler."""

    assembler: Assembler
    moves: dict[str, TensorMove]

    def _info(self, name: str) -> TensorInfo:
        m = self.moves[name]
        return TensorInfo(m.target, m.dtype, m.shape)

    def __call__(self, name: str) -> torch.Tensor:
        return self.assembler.fetch(name, self._info(name))

    def range(self, name: str, start: int, out: memoryview) -> None:
        self.assembler.fetch_range(name, self._info(name), start, out)

    def prefetch(self, name: str, start: int, nbytes: int) -> None:
        self.assembler.prefetch(name, start, nbytes)


def convert(
    src: str,
    dst: str,
    options: ConvertOptions | None = None,
    *,
    on_tensor: Callable[[str, bool], None] | None = None,
) -> ConvertResult:
    """Plan, then execute, the conversion of ``src`` into ``dst`` (opening ``src`` once)."""
    options = options or ConvertOptions()
    with open_source_for(src, options) as source:
        plan = plan_conversion(src, dst, options, source=source)
        return execute(plan, options, on_tensor=on_tensor, source=source)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        file=sys.stderr,
        disable=not enabled,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="convert",
        dynamic_ncols=True,
    )
