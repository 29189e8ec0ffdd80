"""The reshard-spec language: declare how a framework lays out its tensors.

::

    from ckptd.converters.spec import compile_spec, load_shipped
    spec = compile_spec(load_shipped("megatron_llama"), {"heads": 32, ..., "tp": 4},
                        coords={"tp": rank}, prefix="model.")
    layout = spec.layout_for(flat_keys, shapes)      # a ckpt.Layout
    ckpt.save(state, step, root, layout=layout)

See docs/spec-language.md for the grammar.
"""

from ckptd.converters.spec.compiler import (
    CompiledSpec,
    SpecLayout,
    SpecRename,
    compile_spec,
    load_spec,
)
from ckptd.converters.spec.errors import Loc, MissingVariableError, SpecCoverageError, SpecError
from ckptd.converters.spec.parser import GRAMMAR, parse_spec
from ckptd.converters.spec.rules import POLICIES, TRANSFORMS
from ckptd.converters.spec.scope import parse_vars
from ckptd.converters.spec.shipped import list_shipped, load_shipped

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
