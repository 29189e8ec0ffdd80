"""The reshard-spec language: declare how a framework lays out its tensors.

::

    from ckptd.converters.spec import compile_spec, load_shipped
    spec = compile_spec(load_shipped("megatron_llama"), {"heads": 32, ..., "tp": 4},
                        coords={"tp": rank}, prefix="model.")
    layout = spec.layout_for(flat_keys, shapes)      # a ckpt.Layout
    ckpt.save(state, step, root, layout=layout)

See docs/spec-language.md for the grammar.

Every name is loaded from its submodule on first use (PEP 562): the compiler and the
parser (lark) take ~0.1-0.2 s to import, and most ``ckpt-convert`` runs (Hugging Face,
DeepSpeed, universal) compile no spec; modules that may need one import
``ckptd.converters.spec.errors`` up front and the rest where they compile.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real names, for type checkers
    from ckptd.converters.spec.compiler import (
        CompiledSpec,
        SpecLayout,
        SpecRename,
        compile_spec,
        load_spec,
    )
    from ckptd.converters.spec.errors import (
        Loc,
        MissingVariableError,
        SpecCoverageError,
        SpecError,
    )
    from ckptd.converters.spec.parser import GRAMMAR, parse_spec
    from ckptd.converters.spec.rules import POLICIES, TRANSFORMS
    from ckptd.converters.spec.scope import parse_vars
    from ckptd.converters.spec.shipped import list_shipped, load_shipped

_HOME = {
    "CompiledSpec": "compiler",
    "SpecLayout": "compiler",
    "SpecRename": "compiler",
    "compile_spec": "compiler",
    "load_spec": "compiler",
    "Loc": "errors",
    "MissingVariableError": "errors",
    "SpecCoverageError": "errors",
    "SpecError": "errors",
    "GRAMMAR": "parser",
    "parse_spec": "parser",
    "POLICIES": "rules",
    "TRANSFORMS": "rules",
    "parse_vars": "scope",
    "list_shipped": "shipped",
    "load_shipped": "shipped",
}
__all__ = [
    "GRAMMAR",
    "POLICIES",
    "TRANSFORMS",
    "CompiledSpec",
    "Loc",
    "MissingVariableError",
    "SpecCoverageError",
    "SpecError",
    "SpecLayout",
    "SpecRename",
    "compile_spec",
    "list_shipped",
    "load_shipped",
    "load_spec",
    "parse_spec",
    "parse_vars",
]


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule (see the module docstring)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
