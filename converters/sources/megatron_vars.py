"""MoE model variables that the shapes of Megatron tensors tell.

Shared by the legacy source (one rank's local tensors: a TP shard of an EP rank's
experts) and the Megatron target (canonical tensors: ``tp = ep = 1``), so that both
derive ``experts``, ``moe_ffn`` and ``shared_ffn`` the same way; an explicit ``--var``
wins over what is derived (the callers apply it last).

- ``experts``: the highest ``experts.local_experts.{e}`` index + 1, times ``ep``
  (each EP rank numbers its experts from 0).
- ``moe_ffn``: a routed expert's ``linear_fc1.weight`` rows / 2 (``[gate; up]`` of a
  gated unit), times ``tp`` (expert TP size = TP, as the ``megatron_llama`` spec assumes).
- ``shared_ffn`` (``--moe-shared-expert-intermediate-size``): the same for
  ``mlp.shared_experts.linear_fc1.weight``; SharedExpertMLP is an MLP on the TP group
  (Megatron-Core 0.16 ``transformer/moe/shared_experts.py``), its fc1 column-parallel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_EXPERT_FC1 = re.compile(r"\.experts\.local_experts\.\d+\.linear_fc1\.weight$")
_SHARED_FC1 = re.compile(r"(?:^|\.)mlp\.shared_experts\.linear_fc1\.weight$")


def moe_variables(shapes: Mapping[str, Sequence[int]], *, tp: int = 1, ep: int = 1
                  ) -> dict[str, int]:  # fmt: skip
    """``experts``, ``moe_ffn``, ``shared_ffn`` from model tensor shapes (module docstring).

    ``shapes``: model key -> shape, without optimizer entries; a variable whose tensors
    are absent (or whose fc1 rows are odd, not a gated unit) is left out."""
    out: dict[str, int] = {}
    local = [int(m.group(1)) for k in shapes if (m := _EXPERT.search(k))]
    if local:
        out["experts"] = (max(local) + 1) * ep
    for var, pattern in (("moe_ffn", _EXPERT_FC1), ("shared_ffn", _SHARED_FC1)):
        rows = next((s[0] for k, s in shapes.items() if s and pattern.search(k)), None)
        if rows is not None and rows * tp % 2 == 0:
            out[var] = rows * tp // 2
    return out
