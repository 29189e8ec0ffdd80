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


# ------------------------------------------- tiny LLaMA forward (no transformers needed)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding, rotate-half form (HF LLaMA and Megatron-Core); x: [T, h, d]."""
    t, d = x.shape[0], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention; q [T, h, d], k/v [T, h, d] -> [T, h * d]."""
    t, d = q.shape[0], q.shape[-1]
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, -1)


def llama_forward(w: Mapping[str, torch.Tensor], ids: torch.Tensor, heads: int,
                  kv_heads: int) -> torch.Tensor:
    """Logits [T, vocab] of a LLaMA model given in Hugging Face names (float64)."""
    w = {k: v.double() for k, v in w.items()}
    x = w["model.embed_tokens.weight"][ids]
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(len(ids), heads, -1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(len(ids), kv_heads, -1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(len(ids), kv_heads, -1)
        rep = heads // kv_heads  # query head j reads kv head j // rep
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        x = x + _attend(_rope(q), _rope(k), v) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def megatron_llama_forward(ranks: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                           ids: torch.Tensor, heads: int, kv_heads: int,
                           vocab: int) -> torch.Tensor:
    """Logits [T, vocab] computed the way Megatron-Core runs TP x PP ranks.

    ``ranks[(tp_rank, pp_stage)]`` is a rank file's model dict (local names, local
    shards). Each TP rank computes its own query groups (its ``linear_qkv`` rows are
    ``[q heads of group g; k_g; v_g]`` per group) and its ``[gate_r; up_r]`` half of
    ``linear_fc1``; row-parallel outputs are summed over TP ranks (the all-reduce); the
    vocabulary-parallel logits are concatenated and the padding columns cut off.
    Written from Megatron's conventions, independently of ckptd's placements.
    """
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(s for _, s in ranks)
    r = {k: {n: v.double() for n, v in m.items()} for k, m in ranks.items()}
    x = torch.cat([r[(t, 0)]["embedding.word_embeddings.weight"] for t in range(tp)])[ids]
    per_group = heads // kv_heads
    for s in range(pp):
        local = sorted({int(n.split(".")[2]) for n in r[(0, s)] if n.startswith("decoder.layers.")})
        for i in local:
            p = f"decoder.layers.{i}."
            attn = torch.zeros_like(x)
            for t in range(tp):
                m = r[(t, s)]
                h = _rms(x, m[p + "self_attention.linear_qkv.layer_norm_weight"])
                mixed = h @ m[p + "self_attention.linear_qkv.weight"].T
                groups = mixed.shape[-1] // ((per_group + 2) * (x.shape[-1] // heads))
                mixed = mixed.view(len(ids), groups, per_group + 2, -1)
                q = mixed[:, :, :per_group].reshape(len(ids), groups * per_group, -1)
                k = mixed[:, :, per_group].repeat_interleave(per_group, 1)
                v = mixed[:, :, per_group + 1].repeat_interleave(per_group, 1)
                o = _attend(_rope(q), _rope(k), v)
                attn = attn + o @ m[p + "self_attention.linear_proj.weight"].T
            x = x + attn
            mlp = torch.zeros_like(x)
            for t in range(tp):
                m = r[(t, s)]
                h = _rms(x, m[p + "mlp.linear_fc1.layer_norm_weight"])
                g, u = (h @ m[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
                mlp = mlp + (torch.nn.functional.silu(g) * u) @ m[p + "mlp.linear_fc2.weight"].T
            x = x + mlp
    last = pp - 1
    x = _rms(x, r[(0, last)]["decoder.final_layernorm.weight"])
    logits = torch.cat([x @ r[(t, last)]["output_layer.weight"].T for t in range(tp)], -1)
    return logits[:, :vocab]


# ------------------------------------- tiny Mixtral (top-k mixture of experts) forward


def mixtral_forward(w: Mapping[str, torch.Tensor], ids: torch.Tensor, heads: int,
                    kv_heads: int, top_k: int) -> torch.Tensor:
    """Logits [T, vocab] of a Mixtral model given in Hugging Face names (float64).

    Attention as in :func:`llama_forward`; each MLP is a sparse MoE block the way
    ``transformers``' MixtralSparseMoeBlock computes it: softmax over the router logits,
    the ``top_k`` largest kept and renormalised, each token's output the weighted sum of
    its experts' SwiGLU (``w2(silu(w1 x) * w3 x)``)."""
    w = {k: v.double() for k, v in w.items()}
    x = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, -1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(t, kv_heads, -1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, kv_heads, -1)
        rep = heads // kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        x = x + _attend(_rope(q), _rope(k), v) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        probs = (h @ w[p + "block_sparse_moe.gate.weight"].T).softmax(-1)
        top, idx = probs.topk(top_k, -1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in range(probs.shape[-1]):
            e = f"{p}block_sparse_moe.experts.{j}."
            y = torch.nn.functional.silu(h @ w[e + "w1.weight"].T) * (h @ w[e + "w3.weight"].T)
            y = y @ w[e + "w2.weight"].T
            weight = (top * (idx == j)).sum(-1, keepdim=True)  # 0 where j is not chosen
            out = out + weight * y
        x = x + out
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def megatron_moe_forward(ranks: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]],
                         ids: torch.Tensor, heads: int, kv_heads: int, vocab: int,
                         top_k: int, pre_softmax: bool = False) -> torch.Tensor:
    """Logits [T, vocab] of a Megatron-Core LLaMA with MoE layers, run from TP x PP x EP
    rank files ``ranks[(tp_rank, pp_stage, ep_rank)]`` (local names, local shards).

    Attention as in :func:`megatron_llama_forward`. An MoE layer (``mlp.router`` present)
    follows Megatron-Core's TopKRouter (``top_k`` largest logits, softmax over them) and
    token dispatch: EP rank ``r`` numbers its experts from 0, its local expert ``j`` is
    global expert ``r * experts_per_rank + j``; each expert's ``linear_fc1`` holds
    ``[gate_t; up_t]`` on TP rank ``t`` and its ``linear_fc2`` is row-parallel (summed
    over TP). Dense layers run as in :func:`megatron_llama_forward`. Every EP rank holds
    the dense tensors; EP rank 0's are used. Written from Megatron's conventions,
    independently of ckptd's placements.

    With ``pre_softmax`` (``--moe-router-pre-softmax``) the router takes the softmax
    over every expert first and keeps the ``top_k`` largest probabilities as they are.
    A ``linear_qkv.bias`` (``--add-qkv-bias``) is added to each TP rank's local QKV
    output. Shared experts (``mlp.shared_experts.*``, SharedExpertMLP) are a
    column/row-parallel SwiGLU MLP on every token, summed over TP, scaled by
    ``sigmoid(h @ gate_weight.T)`` when the gate is saved, and added to the routed
    experts' output.
    """
    tp = 1 + max(k[0] for k in ranks)
    pp = 1 + max(k[1] for k in ranks)
    ep = 1 + max(k[2] for k in ranks)
    r = {k: {n: v.double() for n, v in m.items()} for k, m in ranks.items()}
    t_ = len(ids)
    x = torch.cat([r[(t, 0, 0)]["embedding.word_embeddings.weight"] for t in range(tp)])[ids]
    per_group = heads // kv_heads
    for s in range(pp):
        local = sorted({int(n.split(".")[2]) for n in r[(0, s, 0)]
                        if n.startswith("decoder.layers.")})  # fmt: skip
        for i in local:
            p = f"decoder.layers.{i}."
            attn = torch.zeros_like(x)
            for t in range(tp):
                m = r[(t, s, 0)]
                h = _rms(x, m[p + "self_attention.linear_qkv.layer_norm_weight"])
                mixed = h @ m[p + "self_attention.linear_qkv.weight"].T
                if p + "self_attention.linear_qkv.bias" in m:
                    mixed = mixed + m[p + "self_attention.linear_qkv.bias"]
                groups = mixed.shape[-1] // ((per_group + 2) * (x.shape[-1] // heads))
                mixed = mixed.view(t_, groups, per_group + 2, -1)
                q = mixed[:, :, :per_group].reshape(t_, groups * per_group, -1)
                k = mixed[:, :, per_group].repeat_interleave(per_group, 1)
                v = mixed[:, :, per_group + 1].repeat_interleave(per_group, 1)
                attn = attn + _attend(_rope(q), _rope(k), v) @ m[
                    p + "self_attention.linear_proj.weight"].T  # fmt: skip
            x = x + attn
            if p + "mlp.router.weight" not in r[(0, s, 0)]:
                mlp = torch.zeros_like(x)
                for t in range(tp):
                    m = r[(t, s, 0)]
                    h = _rms(x, m[p + "mlp.linear_fc1.layer_norm_weight"])
                    g, u = (h @ m[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
                    mlp = mlp + (torch.nn.functional.silu(g) * u) @ m[p + "mlp.linear_fc2.weight"].T
                x = x + mlp
                continue
            h = _rms(x, r[(0, s, 0)][p + "pre_mlp_layernorm.weight"])
            logits = h @ r[(0, s, 0)][p + "mlp.router.weight"].T
            if pre_softmax:
                probs, chosen = logits.softmax(-1).topk(top_k, -1)
            else:
                scores, chosen = logits.topk(top_k, -1)
                probs = scores.softmax(-1)
            out = torch.zeros_like(x)
            for e in range(ep):
                pre = p + "mlp.experts.local_experts."
                local_experts = sorted({int(n.split(".")[6]) for n in r[(0, s, e)]
                                        if n.startswith(pre)})  # fmt: skip
                for j in local_experts:
                    g_id = e * len(local_experts) + j
                    sel = (chosen == g_id).any(-1)  # the tokens dispatched to this expert
                    if not sel.any():
                        continue
                    y = torch.zeros_like(x[sel])
                    for t in range(tp):
                        m = r[(t, s, e)]
                        b = f"{p}mlp.experts.local_experts.{j}."
                        g, u = (h[sel] @ m[b + "linear_fc1.weight"].T).chunk(2, -1)
                        y = y + (torch.nn.functional.silu(g) * u) @ m[b + "linear_fc2.weight"].T
                    out[sel] += (probs * (chosen == g_id))[sel].sum(-1, keepdim=True) * y
            if p + "mlp.shared_experts.linear_fc1.weight" in r[(0, s, 0)]:
                out = out + _megatron_shared_experts(r, s, p, h, tp)
            x = x + out
    last = pp - 1
    x = _rms(x, r[(0, last, 0)]["decoder.final_layernorm.weight"])
    logits = torch.cat([x @ r[(t, last, 0)]["output_layer.weight"].T for t in range(tp)], -1)
    return logits[:, :vocab]


def _megatron_shared_experts(r: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]],
                             s: int, p: str, h: torch.Tensor, tp: int) -> torch.Tensor:
    """SharedExpertMLP of layer prefix ``p`` on stage ``s`` (EP rank 0's copy): each TP
    rank's ``linear_fc1`` is ``[gate_t; up_t]``, ``linear_fc2`` row-parallel (summed),
    times ``sigmoid(h @ gate_weight.T)`` when the gate is saved."""
    out = torch.zeros_like(h)
    b = p + "mlp.shared_experts."
    for t in range(tp):
        m = r[(t, s, 0)]
        g, u = (h @ m[b + "linear_fc1.weight"].T).chunk(2, -1)
        out = out + (torch.nn.functional.silu(g) * u) @ m[b + "linear_fc2.weight"].T
    gate = r[(0, s, 0)].get(p + "mlp.shared_experts.gate_weight")
    return out if gate is None else out * torch.sigmoid(h @ gate.T)


# ------------------------------------------ tiny Qwen2-MoE (shared expert, qkv bias)


def qwen2_moe_forward(w: Mapping[str, torch.Tensor], ids: torch.Tensor, heads: int,
                      kv_heads: int, top_k: int, norm_topk_prob: bool = False) -> torch.Tensor:
    """Logits [T, vocab] of a Qwen2-MoE model given in Hugging Face names (float64).

    As ``transformers``' Qwen2MoeForCausalLM computes it: q/k/v projections with bias;
    each MLP a sparse MoE block whose router (``mlp.gate``) takes the softmax over every
    expert, keeps the ``top_k`` largest (renormalised only with ``norm_topk_prob``) and
    sums those experts' SwiGLU outputs (``down(silu(gate x) * up x)``), plus the shared
    expert's SwiGLU output times ``sigmoid(shared_expert_gate x)``."""
    w = {k: v.double() for k, v in w.items()}
    x = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    silu = torch.nn.functional.silu
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        a = p + "self_attn."
        q = (h @ w[a + "q_proj.weight"].T + w[a + "q_proj.bias"]).view(t, heads, -1)
        k = (h @ w[a + "k_proj.weight"].T + w[a + "k_proj.bias"]).view(t, kv_heads, -1)
        v = (h @ w[a + "v_proj.weight"].T + w[a + "v_proj.bias"]).view(t, kv_heads, -1)
        rep = heads // kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        x = x + _attend(_rope(q), _rope(k), v) @ w[a + "o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        top, idx = (h @ w[p + "mlp.gate.weight"].T).softmax(-1).topk(top_k, -1)
        if norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in range(w[p + "mlp.gate.weight"].shape[0]):
            e = f"{p}mlp.experts.{j}."
            y = silu(h @ w[e + "gate_proj.weight"].T) * (h @ w[e + "up_proj.weight"].T)
            out = out + (top * (idx == j)).sum(-1, keepdim=True) * (y @ w[e + "down_proj.weight"].T)
        e = p + "mlp.shared_expert."
        y = silu(h @ w[e + "gate_proj.weight"].T) * (h @ w[e + "up_proj.weight"].T)
        y = y @ w[e + "down_proj.weight"].T
        x = x + out + torch.sigmoid(h @ w[p + "mlp.shared_expert_gate.weight"].T) * y
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
