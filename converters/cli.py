"""The ``ckpt-convert`` command: a thin shell over :mod:`ckptd.converters.convert`.

    ckpt-convert SRC DST [--from F] [--to T] [--step N] [--workers N] [--dry-run]
                 [--overwrite] [--weights-only] [--max-shard-size S]
                 [--rename-map FILE.json|SPEC|reverse:SPEC] [--json] [--progress/--no-progress]

Exit codes: 0 success; 1 failure (missing source, malformed input, destination exists
without ``--overwrite``, storage error), one line on stderr saying why; 2 usage error.
With ``--json`` one JSON object goes to stdout (``ok`` always set, ``error`` on failure).
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import click

from ckptd.converters.convert import (
    ConvertOptions,
    execute,
    open_source_for,
    parse_size,
    plan_conversion,
)
from ckptd.converters.sources import SOURCES
from ckptd.converters.sources.namemap import load_name_map
from ckptd.converters.spec import parse_vars
from ckptd.converters.targets import TARGETS
from ckptd.errors import CkptError

_FORMATS = sorted({*SOURCES, "safetensors"})
_TARGETS = sorted({*TARGETS, "safetensors"})


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_plan(plan: dict[str, Any]) -> None:
    echo = click.echo
    s, t = plan["source"], plan["target"]
    echo(f"plan: {s['path']} ({s['format']}) -> {t['path']} ({t['format']})")
    echo(
        f"  {plan['tensors']} tensors, {_human(plan['bytes'])} "
        f"(largest {_human(plan['largest_tensor_bytes'])})"
    )
    if plan["dropped"]:
        echo(f"  dropped: {len(plan['dropped'])} tensor(s)")
    if plan["skipped"]:
        echo(f"  skipped non-tensor entries: {', '.join(plan['skipped'])}")
    echo(f"  destination: {plan['destination']}")
    echo("  outputs:")
    for o in plan["outputs"]:
        extra = f"  {o['tensors']} tensors, {_human(o['bytes'])}" if o["tensors"] else ""
        echo(f"    {o['name']}{extra}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("dst")
@click.option(
    "--from",
    "source_format",
    type=click.Choice(_FORMATS),
    help="Source format (default: detected from its markers).",
)
@click.option(
    "--to",
    "target_format",
    type=click.Choice(_TARGETS),
    default="universal",
    show_default=True,
    help="Target format.",
)
@click.option(
    "--step",
    type=click.IntRange(min=0),
    help="Universal source: the step to read "
    "(default latest); other sources: the step a universal target is written as.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Parallel chunk reads/writes within one tensor.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing destination.")
@click.option("--weights-only", is_flag=True, help="Drop optimizer state (optim.* names).")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    callback=_size,
    help="Hugging Face target: bytes per shard (5GB, 500MB, 2GiB).",
)
@click.option(
    "--rename-map",
    type=click.Path(dir_okay=False),
    help='JSON name map (exact renames, or {"rules": [...]} with regexes), or a reshard '
    "spec (shipped name or .ckspec) whose renames merge/split fused tensors; "
    "reverse:NAME applies it backwards.",
)
@click.option(
    "--var",
    "variables",
    multiple=True,
    metavar="K=V",
    help="Model variable for spec-driven formats (Megatron): --var heads=32 --var kv_heads=8.",
)
@click.option(
    "--target-layout",
    default=None,
    metavar="tp=N,pp=M",
    help=(
        "Parallel layout of the target: Megatron tp=4,pp=2[,ep=2,vpp=2]; "
        "DeepSpeed dp=4[,zero=2,groups=2]."
    ),
)
@click.option("--spec", default=None, help="Shipped reshard spec name or a .ckspec path.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Byte progress bar on stderr (default: when stderr is a terminal).",
)
@click.version_option(package_name="ckptd")
def main(
    src: str,
    dst: str,
    source_format: str | None,
    target_format: str,
    step: int | None,
    workers: int,
    dry_run: bool,
    overwrite: bool,
    weights_only: bool,
    max_shard_size: int,
    rename_map: str | None,
    variables: tuple[str, ...],
    target_layout: str | None,
    spec: str | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Convert the checkpoint SRC into DST, streaming tensor by tensor."""
    _freeze_imports()
    try:
        options = ConvertOptions(
            source_format=source_format,
            target_format=target_format,
            step=step,
            workers=workers,
            overwrite=overwrite,
            weights_only=weights_only,
            max_shard_size=max_shard_size,
            name_map=load_name_map(rename_map) if rename_map else None,
            progress=sys.stderr.isatty() if progress is None else progress,
            variables=tuple(sorted(parse_vars(list(variables)).items())),
            target_layout=tuple(sorted(parse_vars([target_layout]).items()))
            if target_layout
            else (),
            spec=spec,
        )
        with open_source_for(src, options) as source:  # opened once for plan and execute
            plan = plan_conversion(src, dst, options, source=source)
            if dry_run:
                doc = plan.to_json()
                if as_json:
                    click.echo(json.dumps({"ok": True, "dry_run": True, **doc}, indent=2))
                else:
                    _print_plan(doc)
                return
            result = execute(plan, options, source=source)
    except (CkptError, OSError, ValueError) as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": _line(e)}))
        click.echo(f"ckpt-convert: error: {_line(e)}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(
            f"converted {result.tensors} tensors ({_human(result.bytes)}) in "
            f"{result.seconds:.1f} s -> {dst}"
            + (f" ({len(result.resumed)} resumed)" if result.resumed else ""),
            err=True,
        )


def _freeze_imports() -> None:
    """Keep what is alive when the command starts (interpreter, torch and ckptd modules:
    ~170k objects) out of the cyclic garbage collector's full collections.

    Each full collection rescans them otherwise: measured 0.07-0.12 s each, one or two
    per conversion plus one at interpreter exit, as much as a fifth of the work of
    converting a 2 GiB checkpoint beyond importing torch. The command owns its process,
    so this is not undone (the exit collection skips them too); modules and their
    functions stay alive until exit anyway. The library (:func:`convert`) never does this.
    """
    gc.freeze()


if __name__ == "__main__":
    main()
