"""Megatron-core ``torch_dist`` keys -> virtual TP1xPP1xEP1 rank-file tensors (pure).

:mod:`megatron_dist` reads a torch_dist checkpoint as if it were one legacy rank file
of a TP1xPP1xEP1 run; this module decides, from DCP's metadata alone (key, global
shape), which box of which DCP entry each such virtual tensor is. No I/O here.

Forms of a parameter key (``sharded_state_dict`` keys of Megatron-core 0.8-0.16):

- ``decoder.layers.<rest>``: a homogeneous ``TransformerBlock`` stacks the layers on a
  leading axis of size ``num_layers`` (offset ``(0, global_layer, num_layers)``).
- ``decoder.layers.<i>.<rest>``: non-homogeneous blocks (``moe_layer_freq > 1``,
  heterogeneous specs, ``singleton_local_shards``) keep the global layer number.
- Experts, under ``<layer>.mlp.experts.``:

  - ``experts.linear_fc{1,2}.{weight,bias}``: ``SequentialMLP`` (each local expert's
    ``MLP`` with the offset ``(axis, global_expert, num_experts)``), ``GroupedMLP``
    (``weight1``/``weight2`` transposed back to ``[out, in]`` per expert, EP offset
    ``ep_rank`` of ``ep_size`` on the expert axis) and ``TEGroupedMLP`` (per-GEMM
    weights with the global expert offset) all save this key, with an expert axis of
    size ``num_experts`` right after the layer axis (if stacked); fc1 of a gated unit is
    ``[gate; up]`` over the whole expert FFN (the SwiGLU factories put TP rank ``r``'s
    halves at fragments ``r`` and ``tp + r`` of ``2 * tp``). ``local_experts.<param>``
    (no index) is taken as the same form.
  - ``experts.<g>.<param>``: ``singleton_local_shards``: one key per global expert
    ``g``, no expert axis; a gated fc1 is saved as two keys, ``weight_w`` (gate) and
    ``weight_v`` (up), joined here into one ``[gate; up]`` tensor (also for dense
    ``mlp.linear_fc1.weight_w``/``_v``).

  Every expert tensor becomes ``decoder.layers.{i}.mlp.experts.local_experts.{g}.
  <param>`` with the global expert index ``g``, the names the legacy source gives. Any
  other key under ``mlp.experts.`` (a per-expert key with a *local* index, an unknown
  parameter, a shape without the expected axes) is a :class:`MoEKeyError` naming it.
- Optimizer state ``optimizer.state.<kind>.<param key>`` follows its parameter, in the
  same shape or in Megatron-core's flattened form ``(*fragments per axis, chunk numel)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ckptd.converters.sources.base import SourceFormatError

STACK_PREFIX = "decoder.layers."
EXPERT_INFIX = ".mlp.experts.local_experts."
_LAYER_NUM = re.compile(r"^(\d+)\.")
_EXPERT_PARAM = r"linear_fc[12]\.(?:weight|bias)"  # a gated fc1's _w/_v already cut off
_EXPERT_AXIS = re.compile(rf"^(?:experts|local_experts)\.(?P<param>{_EXPERT_PARAM})$")
_EXPERT_ONE = re.compile(rf"^experts\.(?P<g>\d+)\.(?P<param>{_EXPERT_PARAM})$")
_LOCAL_INDEXED = re.compile(r"^local_experts\.\d+\.")
_HALF = re.compile(r"^(?P<base>.*\.linear_fc1\.(?:weight|bias))_(?P<half>[wv])$")

Entries = Mapping[str, tuple[str, tuple[int, ...]]]  # fqn -> (dtype name, global shape)


class MoEKeyError(SourceFormatError):
    """An expert (MoE) key whose layout cannot be identified unambiguously."""


@dataclass(frozen=True)
class Part:
    """One box of DCP entry ``fqn``: the parameter at index ``lead`` of its leading
    (layer, expert) axes, possibly stored in Megatron's flattened-fragments form."""

    fqn: str
    lead: tuple[int, ...]  # index on each leading axis; () for the whole entry
    lead_sizes: tuple[int, ...]  # the leading axes' sizes in the parameter's shape
    shape: tuple[int, ...]  # the part's shape: the parameter's without the leading axes
    frags: tuple[int, ...] | None = None  # flattened form: fragments per parameter axis

    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, lengths) to read from the stored entry."""
        k = len(self.lead)
        if self.frags is None:
            return (*self.lead, *(0,) * len(self.shape)), ((1,) * k + self.shape)
        # the fragment holding ``lead``: a leading axis may be cut into fewer fragments
        # than its size (GroupedMLP: one fragment per EP rank holds several experts)
        local = self._local_lead()
        chunk = tuple(i // n for i, n in zip(self.lead, local, strict=True))
        rest = self.frags[k:]
        numel = math.prod(local) * math.prod(self.shape) // math.prod(rest)
        return (*chunk, *(0,) * len(rest), 0), ((1,) * k + rest + (numel,))

    def finish(self, stored: torch.Tensor) -> torch.Tensor:
        """The part in its own shape from the box :meth:`box` names, as read."""
        if self.frags is None:
            return stored.reshape(self.shape)
        k = len(self.lead)
        local = self._local_lead()
        full = unflatten(stored, (1,) * k + self.frags[k:], (*local, *self.shape))
        within = tuple(i % n for i, n in zip(self.lead, local, strict=True))
        return full[within] if within else full

    def _local_lead(self) -> tuple[int, ...]:
        assert self.frags is not None
        k = len(self.lead)
        return tuple(s // f for s, f in zip(self.lead_sizes, self.frags[:k], strict=True))


@dataclass(frozen=True)
class Virtual:
    """A tensor of the virtual TP1xPP1xEP1 rank file: its parts concatenated on dim 0
    (one part, or fc1's gate and up halves when saved as ``_w``/``_v``)."""

    parts: tuple[Part, ...]
    shape: tuple[int, ...]

    @property
    def fqn(self) -> str:
        """The DCP entry of the first part (the dtype's source)."""
        return self.parts[0].fqn


@dataclass(frozen=True)
class _Decomposed:
    """How a parameter key is laid out: leading axes and the per-index name template."""

    layer_axis: bool  # stacked: leading axis of num_layers
    expert_axis: bool  # leading axis of num_experts (after the layer axis)
    template: str  # name with {i} (layer) and {g} (expert) where those are axes
    half: str | None  # "w"/"v": gate/up half of a gated fc1 saved apart


def stack_depth(entries: Entries) -> int | None:
    """``num_layers``: the leading axis every stacked ``decoder.layers.X`` key shares."""
    depths = {
        shape[0]
        for fqn, (_, shape) in entries.items()
        if fqn.startswith(STACK_PREFIX) and not _LAYER_NUM.match(fqn[len(STACK_PREFIX) :]) and shape
    }
    if len(depths) > 1:
        raise SourceFormatError(
            f"stacked decoder.layers.* tensors disagree on num_layers: {sorted(depths)}"
        )
    return depths.pop() if depths else None


def _decompose(pkey: str, pshape: tuple[int, ...], layers: int | None) -> _Decomposed:
    """Leading axes and canonical name template of parameter key ``pkey``."""
    key, half = pkey, None  # ``key`` names the stored key in errors
    m = _HALF.match(pkey)
    if m is not None:
        pkey, half = m.group("base"), m.group("half")
    if ".mlp.experts." not in pkey:
        rest = pkey[len(STACK_PREFIX) :] if pkey.startswith(STACK_PREFIX) else None
        stacked = rest is not None and not _LAYER_NUM.match(rest) and layers is not None
        template = f"{STACK_PREFIX}{{i}}.{rest}" if stacked else pkey
        return _Decomposed(stacked, False, template, half)
    if not pkey.startswith(STACK_PREFIX):
        raise MoEKeyError(f"{key!r}: an expert key outside decoder.layers (not read)")
    rest = pkey[len(STACK_PREFIX) :]
    num = _LAYER_NUM.match(rest)
    layer = f"{num.group(1)}" if num else "{i}"
    head, _, sub = (rest[num.end() :] if num else rest).partition("mlp.experts.")
    if head:
        raise MoEKeyError(f"{key!r}: experts not directly under the layer's mlp (not read)")
    one, axis = _EXPERT_ONE.match(sub), _EXPERT_AXIS.match(sub)
    if one is not None:
        g, param, expert_axis = one.group("g"), one.group("param"), False
    elif axis is not None:
        g, param, expert_axis = "{g}", axis.group("param"), True
    elif _LOCAL_INDEXED.match(sub):
        raise MoEKeyError(
            f"{key!r}: a per-expert key with a local expert index (not Megatron-core's "
            "sharded form): the expert-parallel rank that holds it is unknown"
        )
    else:
        raise MoEKeyError(
            f"{key!r}: unknown expert key form (read: mlp.experts.experts.<param> with an "
            "expert axis, mlp.experts.experts.<g>.<param>; <param> linear_fc1/linear_fc2 "
            "weight or bias)"
        )
    stacked = num is None
    if stacked and layers is None:
        raise MoEKeyError(f"{key!r}: a stacked expert key but no layer depth")
    ndim = 2 if param.endswith("weight") else 1
    want = int(stacked) + int(expert_axis) + ndim
    if len(pshape) != want:
        axes = ["layers"] * stacked + ["experts"] * expert_axis + ["out", "in"][:ndim]
        raise MoEKeyError(
            f"{key!r}: shape {list(pshape)} is not [{', '.join(axes)}] (an expert layout "
            "this reader does not know; GroupedMLP's raw weight1/weight2 are not read)"
        )
    template = f"{STACK_PREFIX}{layer}{EXPERT_INFIX}{g}.{param}"
    return _Decomposed(stacked, expert_axis, template, half)


def expand(
    pkey: str,
    pshape: tuple[int, ...],
    layers: int | None,
    frags: tuple[int, ...] | None = None,
    fqn: str | None = None,
) -> list[tuple[str, str | None, Part]]:
    """(virtual name, half, part) of each tensor parameter key ``pkey`` (of global shape
    ``pshape``, stored as ``fqn``: the parameter or its optimizer state) holds."""
    fqn = fqn or pkey
    d = _decompose(pkey, pshape, layers)
    k = int(d.layer_axis) + int(d.expert_axis)
    if frags is not None and len(frags) != len(pshape):
        raise SourceFormatError(
            f"{fqn!r}: flattened form with {len(frags)} axes, not {len(pshape)}"
        )
    if k == 0:
        return [(d.template, d.half, Part(fqn, (), (), pshape, frags))]
    axes = ["i"] * d.layer_axis + ["g"] * d.expert_axis
    out = []
    for lead in _product([range(n) for n in pshape[:k]]):
        name = d.template.format(**dict(zip(axes, lead, strict=True)))
        out.append((name, d.half, Part(fqn, lead, pshape[:k], pshape[k:], frags)))
    return out


def _product(ranges: list[range]) -> Iterable[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


def join_halves(found: Mapping[str, list[tuple[str | None, Part]]]) -> dict[str, Virtual]:
    """Virtual tensors from the parts found per name: a lone part as it is, a gate (``w``)
    and an up (``v``) half concatenated on dim 0; anything else is an error."""
    out: dict[str, Virtual] = {}
    for name, parts in found.items():
        halves = {h: p for h, p in parts}
        if len(parts) == 1 and None in halves:
            out[name] = Virtual((parts[0][1],), parts[0][1].shape)
            continue
        if len(parts) != 2 or set(halves) != {"w", "v"}:
            keys = sorted(p.fqn for _, p in parts)
            raise SourceFormatError(
                f"{name!r}: expected one key or a gate/up pair (_w and _v), found {keys}"
            )
        w, v = halves["w"], halves["v"]
        if w.shape[1:] != v.shape[1:] or not w.shape:
            raise SourceFormatError(
                f"{name!r}: gate {w.fqn!r} {list(w.shape)} and up {v.fqn!r} "
                f"{list(v.shape)} do not concatenate on dim 0"
            )
        out[name] = Virtual((w, v), (w.shape[0] + v.shape[0], *w.shape[1:]))
    return out


def expert_index(name: str) -> tuple[str, int] | None:
    """(layer prefix ``decoder.layers.<i>``, global expert) of an expert tensor's name."""
    head, sep, tail = name.partition(EXPERT_INFIX)
    if not sep:
        return None
    g = tail.split(".", 1)[0]
    return (head, int(g)) if g.isdigit() else None


def check_experts(virtual: Mapping[str, Virtual]) -> None:
    """Each expert parameter of an MoE layer exists for exactly the experts ``0 .. E-1``,
    E the rows of the layer's router (when saved): an expert axis that is something
    else, or experts missing from one parameter, show up here."""
    found: dict[tuple[str, str], set[int]] = {}
    for name in virtual:
        ix = expert_index(name)
        if ix is not None and not name.startswith("optim."):
            param = name.partition(f"{EXPERT_INFIX}{ix[1]}.")[2]
            found.setdefault((ix[0], param), set()).add(ix[1])
    counts: dict[str, int] = {}
    for (layer, _), experts in found.items():
        counts[layer] = max(counts.get(layer, 0), max(experts) + 1)
    for (layer, param), experts in sorted(found.items()):
        router = virtual.get(f"{layer}.mlp.router.weight")
        n = router.shape[0] if router is not None and router.shape else counts[layer]
        if experts != set(range(n)):
            prefix = f"{layer}{EXPERT_INFIX}"
            src = sorted(
                {
                    p.fqn
                    for k, v in virtual.items()
                    if k.startswith(prefix) and k.endswith(f".{param}")
                    for p in v.parts
                }
            )
            raise MoEKeyError(
                f"{layer}: {param} of experts {sorted(experts)} (from {src}) does not match "
                f"{'the router' if router is not None else 'the other expert tensors'} "
                f"({n} experts): an expert layout this reader does not know"
            )


def flattened_frags(shape: tuple[int, ...], pshape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Fragments per axis if ``shape`` is Megatron's ``(*fragments, local_numel)`` form."""
    if len(shape) != len(pshape) + 1:
        return None
    frags = shape[:-1]
    if any(f <= 0 or p % f for f, p in zip(frags, pshape, strict=True)):
        return None
    if math.prod(p // f for f, p in zip(frags, pshape, strict=True)) != shape[-1]:
        return None
    return tuple(frags)


def unflatten(x: torch.Tensor, frags: tuple[int, ...], full: tuple[int, ...]) -> torch.Tensor:
    """``(*frags, n)`` (each fragment's local chunk flattened) back to ``full``."""
    local = [s // f for s, f in zip(full, frags, strict=True)]
    k = len(frags)
    y = x.reshape(*frags, *local)
    perm = [j for i in range(k) for j in (i, k + i)]
    return y.permute(perm).reshape(full)
