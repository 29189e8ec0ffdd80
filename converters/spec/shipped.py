"""Specs shipped with ckptd (package data under ``specs/``) and include resolution."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import SpecError


def list_shipped() -> list[str]:
    """Names of the shipped specs (``megatron_gpt``, ``hf_llama_to_megatron`` ...)."""
    root = resources.files(__package__).joinpath("specs")
    return sorted(p.name[: -len(".ckspec")] for p in root.iterdir() if p.name.endswith(".ckspec"))


def load_shipped(name: str) -> ast.Spec:
    """Parse the shipped spec ``name`` (with or without ``.ckspec``)."""
    stem = name[: -len(".ckspec")] if name.endswith(".ckspec") else name
    if not re.fullmatch(r"[A-Za-z0-9_]+", stem) or stem not in list_shipped():
        raise SpecError(f"no shipped spec {name!r} (shipped: {', '.join(list_shipped())})")
    res = resources.files(__package__).joinpath("specs", f"{stem}.ckspec")
    from ckptd.converters.spec.parser import parse_spec  # lazily: lark is slow to import

    return parse_spec(res.read_text(), f"<shipped>/{stem}.ckspec", f"<shipped>/{stem}")


def find_include(target: str, including: str | None) -> ast.Spec:
    """``include: NAME`` is a shipped spec; anything else a path relative to the includer."""
    if re.fullmatch(r"[A-Za-z0-9_]+", target):
        return load_shipped(target)
    if including is None or including.startswith("<shipped>"):
        base = Path.cwd()
    else:
        base = Path(including).parent
    path = (base / target).resolve()
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot include {target!r}: {e.strerror or e}") from None
    from ckptd.converters.spec.parser import parse_spec  # lazily: lark is slow to import

    return parse_spec(text, str(path), str(path))
