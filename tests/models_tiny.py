"""Tiny models and *reference* slicing for the multi-process layout tests.

Every process builds the same global (canonical, unfused, unpadded) tensors from a seed,
then derives its local tensors with the plain torch slicing below. This slicing is
written independently of ckptd's placements on purpose: a test compares what ckpt
loaded with what these functions say a rank must hold, so a placement bug cannot hide
behind the same code on both sides.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

import ckpt

# A GPT-like block, small enough for 8 processes on 2 cores.
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 8, 4, 4, 32, 48, 50
Q_ROWS, KV_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
SENTINEL = -1024.0  # a load target holds this before the load (exact in bf16; never drawn by randn)


# ----------------------------------------------------------------------- global tensors


def gen(
    name: str, shape: Iterable[int], seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A deterministic tensor for ``name`` (same bits in every process)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(tuple(shape), generator=g)
    if "exp_avg_sq" in name:
        t = t.abs()
    return t.to(dtype)


def adam_globals(params: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Global Adam moments for every parameter: ``{"<name>.exp_avg": ..., ...}``."""
    return {
        f"{n}.{k}": gen(f"{n}.{k}", p.shape, seed, p.dtype)
        for n, p in params.items()
        for k in ADAM_KEYS
    }


# --------------------------------------------------------------- Megatron-style specs


@dataclass(frozen=True)
class TSpec:
    """A logical tensor and how Megatron-style TP lays it out.

    kind: ``rep`` (replicated), ``col`` (split dim 0), ``row`` (split dim 1), ``vocab``
    (split dim 0 of a padded vocabulary), ``qkv`` (fused Q/K/V with GQA groups),
    ``gateup`` (fused gate/up, one group per rank).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    dtype: torch.dtype = torch.float32


def gpt_specs(layers: int) -> list[TSpec]:
    specs = [TSpec("embed.weight", (VOCAB, HIDDEN), "vocab")]
    for i in range(layers):
        p = f"layers.{i}."
        specs += [
            TSpec(p + "attn.qkv.weight", (Q_ROWS + 2 * KV_ROWS, HIDDEN), "qkv"),
            TSpec(p + "attn.qkv.bias", (Q_ROWS + 2 * KV_ROWS,), "qkv"),
            TSpec(p + "attn.proj.weight", (HIDDEN, Q_ROWS), "row"),
            TSpec(p + "attn.proj.bias", (HIDDEN,), "rep"),
            TSpec(p + "norm.weight", (HIDDEN,), "rep", torch.bfloat16),
            TSpec(p + "mlp.gate_up.weight", (2 * FFN, HIDDEN), "gateup"),
            TSpec(p + "mlp.fc1.weight", (FFN, HIDDEN), "col"),
            TSpec(p + "mlp.fc1.bias", (FFN,), "col"),
            TSpec(p + "mlp.fc2.weight", (HIDDEN, FFN), "row"),
        ]
    specs += [
        TSpec("final_norm.weight", (HIDDEN,), "rep"),
        TSpec("head.weight", (VOCAB, HIDDEN), "vocab"),
    ]
    return specs


def padded_vocab(tp: int, multiple: int = 8) -> int:
    """Megatron pads the vocabulary to a multiple of ``multiple * tp``."""
    m = multiple * tp
    return -(-VOCAB // m) * m


def tp_placement(spec: TSpec, r: int, tp: int) -> ckpt.Placement:
    if spec.kind == "rep":
        return ckpt.Replicated()
    if spec.kind == "col":
        return ckpt.Split(0, r, tp)
    if spec.kind == "row":
        return ckpt.Split(1, r, tp)
    if spec.kind == "vocab":
        return ckpt.Split(0, r, tp, global_size=VOCAB)
    if spec.kind == "qkv":
        return ckpt.Fused(0, parts=(Q_ROWS, KV_ROWS, KV_ROWS), index=r, count=tp, groups=KV_HEADS)
    if spec.kind == "gateup":
        return ckpt.Fused(0, parts=(FFN, FFN), index=r, count=tp)
    raise ValueError(spec.kind)


def tp_local(spec: TSpec, g: torch.Tensor, r: int, tp: int, fill: float = SENTINEL) -> torch.Tensor:
    """Reference: what TP rank ``r`` of ``tp`` holds of global tensor ``g`` (padding = fill)."""
    k = spec.kind
    if k == "rep":
        return g.clone()
    if k == "col":
        n = g.shape[0] // tp
        return g[r * n : (r + 1) * n].clone()
    if k == "row":
        n = g.shape[1] // tp
        return g[:, r * n : (r + 1) * n].clone()
    if k == "vocab":
        n = padded_vocab(tp) // tp
        out = torch.full((n, *g.shape[1:]), fill, dtype=g.dtype)
        lo, hi = r * n, min((r + 1) * n, g.shape[0])
        if hi > lo:
            out[: hi - lo] = g[lo:hi]
        return out
    if k == "qkv":
        q, kk, v = g[:Q_ROWS], g[Q_ROWS : Q_ROWS + KV_ROWS], g[Q_ROWS + KV_ROWS :]
        qg, kg = Q_ROWS // KV_HEADS, KV_ROWS // KV_HEADS
        per = KV_HEADS // tp
        rows = []
        for j in range(r * per, (r + 1) * per):  # Megatron GQA order: [q_j, k_j, v_j] per group
            rows += [q[j * qg : (j + 1) * qg], kk[j * kg : (j + 1) * kg], v[j * kg : (j + 1) * kg]]
        return torch.cat(rows).clone()
    if k == "gateup":
        gate, up = g[:FFN], g[FFN:]
        n = FFN // tp
        return torch.cat([gate[r * n : (r + 1) * n], up[r * n : (r + 1) * n]]).clone()
    raise ValueError(k)


def tp_padding_mask(spec: TSpec, r: int, tp: int) -> torch.Tensor:
    """True where the local tensor of TP rank ``r`` is padding (belongs to no logical tensor)."""
    zeros = torch.zeros(spec.shape)
    return tp_local(TSpec(spec.name, spec.shape, spec.kind), zeros, r, tp, fill=1.0).bool()


# ----------------------------------------------------------------------- DTensor / chunk


def chunk_bounds(n: int, r: int, world: int) -> tuple[int, int]:
    """torch.chunk semantics with trailing empty shards (what DTensor Shard does)."""
    step = -(-n // world)
    lo = min(r * step, n)
    return lo, min(lo + step, n)


# -------------------------------------------------------------------------- ZeRO flat


def flat_offsets(shapes: Mapping[str, tuple[int, ...]], align: int) -> tuple[dict[str, int], int]:
    """Offsets of the params laid out back to back, each at a multiple of ``align``."""
    off, out = 0, {}
    for n, s in shapes.items():
        off = -(-off // align) * align
        out[n] = off
        off += math.prod(s)
    return out, off


def flat_buffer(
    globals_: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    align: int,
    total: int,
    fill: float,
) -> torch.Tensor:
    """The whole flat buffer of ``total`` elements: ``globals_[names[n]]`` at n's offset."""
    offsets, _ = flat_offsets({n: tuple(globals_[g].shape) for n, g in names.items()}, align)
    buf = torch.full((total,), fill)
    for n, g in names.items():
        t = globals_[g].reshape(-1)
        buf[offsets[n] : offsets[n] + t.numel()] = t
    return buf


# ------------------------------------------------------------------------- modules


def module_from(tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state_dict keys are ``tensors``' keys (dotted names)."""
    root = torch.nn.Module()
    for fqn, t in tensors.items():
        *path, leaf = fqn.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.clone()))
    return root


def adam_with_state(
    model: torch.nn.Module, moments: Mapping[str, torch.Tensor] | None, step: float
) -> torch.optim.Adam:
    """A real Adam over ``model`` whose state is ``moments[f"{fqn}.exp_avg"]`` etc.

    With ``moments=None`` the state is filled with SENTINEL (a load target).
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for fqn, p in model.named_parameters():
        st = {"step": torch.tensor(float(step))}
        for k in ADAM_KEYS:
            st[k] = (
                moments[f"{fqn}.{k}"].clone()
                if moments is not None
                else torch.full_like(p, SENTINEL)
            )
        opt.state[p] = st
    return opt


# ------------------------------------------------------------------------- checks


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view(
            {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        )
    return t


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-exact equality (dtype, shape, every bit) with a message naming ``what``."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), (
        f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    )
    a, b = _bits(got), _bits(want)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {len(bad)} of {got.numel()} elements differ; first at {list(i)}: "
            f"got {got[i].item()!r}, want {want[i].item()!r}"
        )


def assert_local(
    got: torch.Tensor, want: torch.Tensor, pad: torch.Tensor | None, what: str
) -> None:
    """Live elements bit-exact; padding either untouched (SENTINEL) or zero-filled."""
    if pad is None or not bool(pad.any()):
        assert_bits(got, want, what)
        return
    assert_bits(got[~pad], want[~pad], what + " (live part)")
    p = got[pad].float()
    ok = bool((p == SENTINEL).all()) or bool((p == 0).all())
    assert ok, f"{what}: padding was overwritten with data: {p[:8].tolist()}"
