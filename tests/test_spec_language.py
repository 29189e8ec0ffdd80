"""The reshard-spec language (converters/spec): grammar, errors, compile, coverage, e2e.

The reference slicing here (``_local``) is written with plain torch indexing,
independently of ckptd's placements, so that a placement or compiler bug cannot hide
behind the same code on both sides of a comparison.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckptd.converters.spec import (
    SpecCoverageError,
    SpecError,
    ast,
    compile_spec,
    list_shipped,
    load_shipped,
    parse_spec,
    parse_vars,
)
from ckptd.errors import CkptError
from ckptd.fragments import layout_to_json
from ckptd.layout import LayerOffset, build_rank_layout
from ckptd.statedict import flatten_state

# ------------------------------------------------------------------------ grammar

GOLDEN_SPEC = """\
# Megatron-style GPT
vars: heads, kv_heads = heads, head_dim, vocab
let q_rows = heads * head_dim
emb.weight : split(dim=0) pad(dim=0, size=vocab, multiple=8 * tp)  # padded vocab
layers.{i}.qkv.weight : fused(dim=0, parts=[q: q_rows, k: kv_heads * head_dim, \\
    v: kv_heads * head_dim], groups=kv_heads) split(0)

layers.{i}.*norm* : replicate(policy=average)
layers.{i}.t : dtensor
stage {s}: layers.{i} -> layers.{i + first_layer(s)}
on ep {r}: experts.{e} -> experts.{e + r * (8 // ep)}
rename: hf.{i}.q -> layers.{i}.qkv.weight[q]
drop: *._extra_state, x.y
"""

GOLDEN_DUMP = [
    "2:7 var heads",
    "2:14 var kv_heads = heads",
    "2:32 var head_dim",
    "2:42 var vocab",
    "3:5 let q_rows = (heads * head_dim)",
    "4:1 rule emb.weight : split(dim=0) pad(dim=0, size=vocab, multiple=(8 * tp))",
    "5:1 rule layers.{i}.qkv.weight : fused(dim=0, parts=[q:q_rows, k:(kv_heads * head_dim), "
    "v:(kv_heads * head_dim)], groups=kv_heads) split(_=0)",
    "8:1 rule layers.{i}.*norm* : replicate(policy=average)",
    "9:1 rule layers.{i}.t : dtensor()",
    "10:1 rename[pp s] layers.{i} -> layers.{(i + first_layer(s))}",
    "11:1 rename[ep r] experts.{e} -> experts.{(e + (r * (8 // ep)))}",
    "12:1 rename hf.{i}.q -> layers.{i}.qkv.weight [q]",
    "13:1 drop *._extra_state, x.y",
]


def _e(x: object) -> str:
    from ckptd.converters.spec.expr import BinOp, Call, Neg, Num, Var

    if isinstance(x, Num):
        return str(x.value)
    if isinstance(x, Var):
        return x.name
    if isinstance(x, Neg):
        return f"-{_e(x.operand)}"
    if isinstance(x, BinOp):
        return f"({_e(x.left)} {x.op} {_e(x.right)})"
    if isinstance(x, Call):
        return f"{x.func}({', '.join(_e(a) for a in x.args)})"
    if isinstance(x, tuple):
        return "[" + ", ".join(f"{p.name}:{_e(p.size)}" for p in x) + "]"
    raise AssertionError(x)


def _pat(p: ast.Pattern) -> str:
    out = []
    for it in p.items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, ast.Capture):
            out.append(f"{{{it.name}}}")
        else:
            out.append(f"{{{_e(it)}}}")
    return "".join(out)


def dump(spec: ast.Spec) -> list[str]:
    out = []
    for s in spec.statements:
        at = f"{s.loc.line}:{s.loc.column}"
        if isinstance(s, ast.VarDecl):
            out.append(f"{at} var {s.name}" + (f" = {_e(s.default)}" if s.default else ""))
        elif isinstance(s, ast.Let):
            out.append(f"{at} let {s.name} = {_e(s.expr)}")
        elif isinstance(s, ast.Rule):
            ts = " ".join(
                f"{t.name}(" + ", ".join(f"{a.name or '_'}={_e(a.value)}" for a in t.args) + ")"
                for t in s.transforms
            )
            out.append(f"{at} rule {_pat(s.pattern)} : {ts}")
        elif isinstance(s, ast.Rename):
            kind = f"rename[{s.axis} {s.axis_var}]" if s.axis else "rename"
            part = f" [{s.part}]" if s.part else ""
            out.append(f"{at} {kind} {_pat(s.source)} -> {_pat(s.target)}{part}")
        elif isinstance(s, ast.Drop):
            out.append(f"{at} drop " + ", ".join(_pat(p) for p in s.patterns))
        else:
            out.append(f"{at} include {s.target}")
    return out


def test_golden_grammar() -> None:
    spec = parse_spec(GOLDEN_SPEC, "gpt.ckspec")
    assert dump(spec) == GOLDEN_DUMP
    rule = next(s for s in spec.statements if isinstance(s, ast.Rule) and "qkv" in s.pattern.text)
    assert rule.text.startswith("layers.{i}.qkv.weight : fused(dim=0, parts=[q: q_rows, k:")
    assert "\\" not in rule.text  # continuation lines are joined


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment", "a: replicate", "a: replicate\n", "  a.b : split(0)  # c\n"],
)
def test_grammar_trivia(text: str) -> None:
    compile_spec(text, {})


def test_expressions_evaluate() -> None:
    spec = compile_spec(
        "vars: a, b = a * 2, layers\nlet c = (a + b) * 3 // 2 - -1 % 5\nlet d = round_up(a, 4) + "
        "cdiv(a, 4) + min(a, b) + max(a, b)\nlet e = first_layer(2)",
        {"a": 5, "layers": 8, "pp": 4},
    )
    v = spec.variables
    assert (v["b"], v["c"], v["d"], v["e"], v["tp"]) == (10, 18, 8 + 2 + 5 + 10, 4, 1)


def test_parse_vars() -> None:
    assert parse_vars(["tp=4", "pp=2,ep=2", "hidden=0x10"]) == {
        "tp": 4, "pp": 2, "ep": 2, "hidden": 16}
    for bad in ["tp", "tp=four", "1x=2"]:
        with pytest.raises(SpecError):
            parse_vars([bad])


# ------------------------------------------------------------------------- errors

V = {"heads": 4, "kv_heads": 2, "head_dim": 2, "vocab": 30, "tp": 2}
ERRORS = [
    ("a.b: split(dim=0", 1, 17, "unexpected end of file; expected ')' or ','"),
    ("a.b split(dim=0)", 1, 5, "unexpected 'split'; expected ':'"),
    ("a.b: split(0)\n  c.d: split(0) %", 2, 17, "unexpected '%'"),
    ("a.b: split(0) ; x", 1, 15, "unexpected ';'"),
    ("rename: a.{i} b", 1, 15, "expected '->'"),
    ("a.b: splat(dim=0)", 1, 6, "unknown transform 'splat'"),
    ("a.b: split(dim=heads)", 1, 16, "unknown variable 'heads'"),
    ("vars: heads\na.b: split(dim=heads / 2)", 2, 16, "use '//'"),
    ("vars: heads\na.b: split(dim=heads // (heads - 4))", 2, 26, "division by zero"),
    ("vars: heads\nlet x = heads + unknown_fn(1)", 2, 17, "unknown function 'unknown_fn'"),
    ("a.b: split(dim=min(1))", 1, 16, "min() takes 2 argument(s)"),
    ("vars: kv_heads\na.b: fused(dim=0, parts=[q: 8, k: 3]) split(0)", 2, 32,
     "fused part 'k' has size 3, which does not divide into 2 groups (tp=2)"),
    ("vars: kv_heads\na.b: fused(dim=0, parts=[q: 8, k: 4], groups=3) split(0)", 2, 46,
     "fused groups=3 do not divide over tp=2 ranks"),
    ("vars: kv_heads\na.b: fused(0, parts=[q: 8, k: 2], groups=kv_heads * 2) split(0)", 2, 28,
     "fused part 'k' has size 2, which does not divide into 4 groups"),
    ("a.b: replicate(policy=max)", 1, 23, "policy must be one of"),
    ("a.b: replicate split(0)", 1, 16, "split cannot be combined with replicate"),
    ("a.b: fused(0, parts=[a: 2]) pad(0, size=1)", 1, 29, "pad cannot be combined with fused"),
    ("a.b: split(0) split(0)", 1, 15, "split appears twice"),
    ("a.b: split(0, foo=1)", 1, 15, "split has no argument 'foo'"),
    ("a.b: split(dim=0, 1)", 1, 19, "positional argument follows a keyword"),
    ("a.b: split(dim=[a: 1])", 1, 12, "split(dim=...) must be an expression"),
    ("a.b: pad(dim=0)", 1, 6, "pad needs size="),
    ("a.b: split(0) pad(1, size=3)", 1, 19, "pad(dim=1) must use the same dim as split(dim=0)"),
    ("a.b: pad(0, size=0)", 1, 18, "size must be positive"),
    ("a.b: fused(dim=0, parts=[q:1, q:1])", 1, 31, "fused part 'q' appears twice"),
    ("a.{i}.{i}: split(0)", 1, 8, "capture {i} appears twice"),
    ("a.{i+1}: split(0)", 1, 4, "may only capture a variable"),
    ("rename: a.{i} -> b.{j}", 1, 21, "unknown variable 'j'"),
    ("rename: a -> b*", 1, 14, "may not contain '*'"),
    ("stage {s}: a.{i} -> b.{i + x}", 1, 28, "unknown variable 'x'"),
    ("stage {s + 1}: a.{i} -> b.{i}", 1, 7, "expected '{variable}'"),
    ("on xp {r}: a.{i} -> b.{i}", 1, 1, "unknown parallel axis 'xp'"),
    ("let x = y", 1, 9, "unknown variable 'y'"),
    ("vars: a\nlet a = 1", 2, 5, "'a' is already defined"),
    ("include: no_such_spec", 1, 10, "no shipped spec 'no_such_spec'"),
    ("include: ./missing.ckspec", 1, 10, "cannot include"),
]


@pytest.mark.parametrize("text,line,col,msg", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_error_locations(text: str, line: int, col: int, msg: str) -> None:
    with pytest.raises(SpecError) as ei:
        compile_spec(text, V, {"tp": 0})
    e = ei.value
    assert isinstance(e, CkptError) and isinstance(e, ValueError)
    assert (e.file, e.line, e.column) == ("<string>", line, col), str(e)
    assert msg in e.message, str(e)
    first = str(e).splitlines()
    assert first[0].startswith(f"<string>:{line}:{col}: ")
    # the offending source line is quoted with a caret under the column
    assert first[1].strip() == text.splitlines()[line - 1].strip()
    assert first[2].index("^") - 4 == col - 1


def test_error_names_the_file(tmp_path: Path) -> None:
    inc = tmp_path / "inc.ckspec"
    inc.write_text("# included\n\na.b: split(dim=nope)\n")
    top = tmp_path / "top.ckspec"
    top.write_text("include: inc.ckspec\n")
    with pytest.raises(SpecError) as ei:
        compile_spec(top)
    assert (ei.value.file, ei.value.line, ei.value.column) == (str(inc), 3, 16)
    cyc = tmp_path / "cyc.ckspec"
    cyc.write_text("include: cyc.ckspec\n")
    with pytest.raises(SpecError, match="include cycle"):
        compile_spec(cyc)


def test_missing_variable_fails_where_used() -> None:
    spec = compile_spec("vars: n\na.b: split(dim=0) pad(dim=0, size=n)\nc: replicate", {})
    assert spec.layout_for(["c"]).rules  # rules that need no value still work
    with pytest.raises(SpecError) as ei:
        spec.layout_for(["a.b"])
    assert (ei.value.line, ei.value.column) == (2, 35) and "pass n=" in str(ei.value)


def test_bad_arithmetic_in_a_rename_is_located() -> None:
    spec = compile_spec("rename: x.{n} -> y.{n * 2}\nx.{n}: replicate\ny.{n}: replicate", {})
    assert spec.logical_name("x.3") == "y.6"
    with pytest.raises(SpecError) as ei:
        spec.logical_name("x.abc")
    assert (ei.value.line, ei.value.column) == (1, 21) and "non-integer" in str(ei.value)


# ------------------------------------------------------------------------ coverage


def test_coverage_error_lists_names_and_rules() -> None:
    text = "a.{i}.w : split(0)\n*.w : replicate\nb.x : replicate\ndrop: b.*\n"
    spec = compile_spec(text, {}, prefix="model.")
    names = ["model.a.0.w", "model.b.x", "model.c.y", "model.b.z", "optim.state.c.y"]
    with pytest.raises(SpecCoverageError) as ei:
        spec.check_coverage(names)
    e = ei.value
    assert e.unmatched == ["model.c.y"]
    assert {k: [(loc.line, t) for loc, t in v] for k, v in e.multiple.items()} == {
        "model.a.0.w": [(1, "a.{i}.w : split(0)"), (2, "*.w : replicate")],
        "model.b.x": [(4, "drop: b.*"), (3, "b.x : replicate")],
    }
    assert "model.c.y" in str(e) and "<string>:2:1: *.w : replicate" in str(e)
    with pytest.raises(SpecCoverageError):
        spec.layout_for(names)
    spec.check_coverage(["model.b.z", "model.b.q"])
    lay = spec.layout_for(["model.c.y"], strict=False)  # unmatched: left to ckpt (replicated)
    assert dict(lay.rules) == {}


def test_spec_that_matches_nothing() -> None:
    spec = compile_spec("decoder.layers.{i}.w : split(0)", {})
    with pytest.raises(SpecCoverageError) as ei:
        spec.check_coverage(["model.layers.0.w", "model.layers.1.w"])
    assert ei.value.unmatched == ["model.layers.0.w", "model.layers.1.w"]


# --------------------------------------------------- compile == hand-built layouts

MEGATRON_NAMES = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.final_layernorm.weight",
)
LAYER_NAMES = (
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc2.weight",
)
EXPERT_NAMES = ("linear_fc1.weight", "linear_fc2.weight")


def _cfg(tp: int, pp: int, ep: int, qpg: int = 2, kv: int = 2, hd: int = 2, ffn_per: int = 3,
         vocab: int = 30, layers: int = 4, experts: int = 2, hidden: int = 8) -> dict[str, int]:
    return {"heads": kv * qpg, "kv_heads": kv, "head_dim": hd, "hidden": hidden,
            "ffn": ffn_per * tp, "moe_ffn": ffn_per * tp, "shared_ffn": 2 * ffn_per * tp,
            "vocab": vocab, "layers": layers,
            "experts": experts, "vocab_multiple": 4 * tp, "tp": tp, "pp": pp, "ep": ep}


def _globals(c: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical global tensors (unfused order [Q; K; V], [gate; up]; unpadded vocab)."""
    h, q, kvr = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    shapes = {"embedding.word_embeddings.weight": (c["vocab"], h),
              "output_layer.weight": (c["vocab"], h), "decoder.final_layernorm.weight": (h,)}
    per = {"self_attention.linear_qkv.weight": (q + 2 * kvr, h),
           "self_attention.linear_qkv.layer_norm_weight": (h,),
           "self_attention.linear_proj.weight": (h, q),
           "mlp.linear_fc1.weight": (2 * c["ffn"], h), "mlp.linear_fc1.layer_norm_weight": (h,),
           "mlp.linear_fc2.weight": (h, c["ffn"])}
    for i in range(c["layers"]):
        shapes.update({f"decoder.layers.{i}.{n}": s for n, s in per.items()})
        for e in range(c["experts"]):
            base = f"decoder.layers.{i}.mlp.experts.local_experts.{e}."
            shapes[base + "linear_fc1.weight"] = (2 * c["moe_ffn"], h)
            shapes[base + "linear_fc2.weight"] = (h, c["moe_ffn"])
    out = {}
    for n, s in shapes.items():
        g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(n.encode()))
        out[n] = torch.randn(s, generator=g)
    return out


def _kind(name: str) -> str:
    for suffix, kind in (("word_embeddings.weight", "vocab"), ("output_layer.weight", "vocab"),
                         ("linear_qkv.weight", "qkv"), ("linear_fc1.weight", "gateup"),
                         ("linear_proj.weight", "row"), ("linear_fc2.weight", "row")):
        if name.endswith(suffix):
            return kind
    return "rep"


def _local(name: str, g: torch.Tensor, c: dict[str, int], r: int, fill: float = 777.0
           ) -> torch.Tensor:
    """What Megatron TP rank ``r`` of ``c["tp"]`` holds of canonical ``g`` (plain slicing)."""
    tp, kind = c["tp"], _kind(name)
    if kind == "rep":
        return g.clone()
    if kind == "row":
        n = g.shape[1] // tp
        return g[:, r * n:(r + 1) * n].clone()
    if kind == "vocab":
        m = c["vocab_multiple"]
        padded = -(-c["vocab"] // m) * m
        full = torch.full((padded, g.shape[1]), fill)
        full[: c["vocab"]] = g
        n = padded // tp
        return full[r * n:(r + 1) * n].clone()
    if kind == "gateup":
        f = g.shape[0] // 2
        n = f // tp
        return torch.cat([g[r * n:(r + 1) * n], g[f + r * n:f + (r + 1) * n]])
    hd, kv = c["head_dim"], c["kv_heads"]
    qpg = c["heads"] // kv
    q, k, v = g[: c["heads"] * hd], g[c["heads"] * hd:(c["heads"] + kv) * hd], g[
        (c["heads"] + kv) * hd:]
    rows = []
    per_rank = kv // tp
    for grp in range(r * per_rank, (r + 1) * per_rank):
        rows += [q[grp * qpg * hd:(grp + 1) * qpg * hd], k[grp * hd:(grp + 1) * hd],
                 v[grp * hd:(grp + 1) * hd]]
    return torch.cat(rows)


def _rank_state(glob: dict[str, torch.Tensor], c: dict[str, int], tp_r: int, pp_r: int,
                ep_r: int, with_dense: bool = True) -> dict[str, torch.Tensor]:
    """Local tensors of one (tp, pp, ep) rank, under Megatron's local names."""
    per_stage, per_ep = c["layers"] // c["pp"], c["experts"] // c["ep"]
    out = {}
    for n, g in glob.items():
        parts = n.split(".")
        if n.startswith("decoder.layers."):
            i = int(parts[2])
            if not pp_r * per_stage <= i < (pp_r + 1) * per_stage:
                continue
            parts[2] = str(i - pp_r * per_stage)
            if "local_experts" in parts:
                j = parts.index("local_experts") + 1
                e = int(parts[j])
                if not ep_r * per_ep <= e < (ep_r + 1) * per_ep:
                    continue
                parts[j] = str(e - ep_r * per_ep)
            elif not with_dense:
                continue
        elif not with_dense or pp_r not in ((0,) if "embedding" in n else (c["pp"] - 1,)):
            continue
        out[".".join(parts)] = _local(n, g, c, tp_r)
    return out


def _hand_layout(local: dict[str, torch.Tensor], c: dict[str, int], tp_r: int, pp_r: int,
                 ep_r: int) -> ckpt.Layout:
    """The layout of one rank written by hand with ckpt's placement classes."""
    tp, rules = c["tp"], {}
    parts_qkv = (c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"],
                 c["kv_heads"] * c["head_dim"])
    for n in local:
        key, kind = f"model.{n}", _kind(n)
        ffn = c["moe_ffn"] if "local_experts" in n else c["ffn"]
        rules[key] = {
            "rep": ckpt.Replicated(),
            "row": ckpt.Split(1, tp_r, tp),
            "vocab": ckpt.Split(0, tp_r, tp, global_size=c["vocab"]),
            "gateup": ckpt.Fused(0, (ffn, ffn), tp_r, tp),
            "qkv": ckpt.Fused(0, parts_qkv, tp_r, tp, groups=c["kv_heads"]),
        }[kind]
    layer_off = LayerOffset(pp_r * (c["layers"] // c["pp"]))
    expert_off = LayerOffset(ep_r * (c["experts"] // c["ep"]), segment="local_experts")
    return ckpt.Layout(rules=rules, rename=lambda k: expert_off(layer_off(k)),
                       coords={"tp": tp_r, "pp": pp_r, "ep": ep_r})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tp=st.sampled_from([1, 2, 4]), pp=st.sampled_from([1, 2]), ep=st.sampled_from([1, 2]),
    qpg=st.integers(1, 3), kv_mult=st.integers(1, 2), hd=st.integers(1, 3),
    ffn_per=st.integers(1, 3), vocab=st.integers(5, 40), data=st.data(),
)
def test_compiled_spec_equals_hand_built_layouts(
    tp: int, pp: int, ep: int, qpg: int, kv_mult: int, hd: int, ffn_per: int, vocab: int,
    data: st.DataObject,
) -> None:
    c = _cfg(tp, pp, ep, qpg=qpg, kv=kv_mult * tp, hd=hd, ffn_per=ffn_per, vocab=vocab,
             layers=2 * pp, experts=2 * ep, hidden=4)
    glob = _globals(c)
    tp_r = data.draw(st.integers(0, tp - 1))
    pp_r = data.draw(st.integers(0, pp - 1))
    ep_r = data.draw(st.integers(0, ep - 1))
    local = _rank_state(glob, c, tp_r, pp_r, ep_r)
    state = {"model": local}
    flat = flatten_state(state)
    spec = compile_spec(load_shipped("megatron_llama"), c,
                        coords={"tp": tp_r, "pp": pp_r, "ep": ep_r}, prefix="model.")
    shapes = {k: tuple(t.shape) for k, t in flat.tensors.items()}
    compiled = spec.layout_for(flat.tensors, shapes)
    hand = _hand_layout(local, c, tp_r, pp_r, ep_r)
    got = layout_to_json(build_rank_layout(flat, compiled, 0))
    want = layout_to_json(build_rank_layout(flat, hand, 0))
    assert got == want
    assert dict(compiled.coords) == {"tp": tp_r, "pp": pp_r, "ep": ep_r}


# ------------------------------------------------------------- end to end (ckpt)


def _assert_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), what


def test_save_tp2_pp2_ep2_load_tp1_bit_exact(tmp_path: Path) -> None:
    """TP=2 x PP=2 (x EP=2 for experts) shards saved from one process, loaded at TP=1."""
    c = _cfg(tp=2, pp=2, ep=2)
    glob = _globals(c, seed=3)
    state, rules, specs = {}, {}, {}
    for tp_r in range(2):
        for pp_r in range(2):
            for ep_r in range(2):
                name = f"t{tp_r}p{pp_r}e{ep_r}"
                local = _rank_state(glob, c, tp_r, pp_r, ep_r, with_dense=ep_r == 0)
                state[name] = local
                spec = compile_spec(load_shipped("megatron_llama"), c, prefix=f"{name}.",
                                    coords={"tp": tp_r, "pp": pp_r, "ep": ep_r})
                keys = [f"{name}.{k}" for k in local]
                lay = spec.layout_for(keys, {f"{name}.{k}": tuple(t.shape)
                                             for k, t in local.items()})
                rules.update(lay.rules)
                specs[name] = spec

    def rename(key: str) -> str:  # one process holds 8 "ranks": key prefix -> model.
        fake, _, _ = key.partition(".")
        return "model." + specs[fake].logical_name(key).partition(".")[2]

    ckpt.save(state, 5, str(tmp_path), layout=ckpt.Layout(rules=rules, rename=rename))

    # 1. canonical (no layout): exactly the reference tensors
    target = {"model": {n: torch.full_like(g, -1024.0) for n, g in glob.items()}}
    ckpt.load(target, str(tmp_path), strict=True)
    for n, g in glob.items():
        _assert_bits(target["model"][n], g, n)

    # 2. Megatron TP=1 (interleaved GQA QKV, [gate; up], padded vocab) via the spec
    c1 = _cfg(tp=1, pp=1, ep=1, ffn_per=6)
    c1["vocab_multiple"] = 4
    want = _rank_state(glob, c1, 0, 0, 0)
    tgt = {"model": {n: torch.full_like(t, -1024.0) for n, t in want.items()}}
    spec1 = compile_spec(load_shipped("megatron_llama"), c1, prefix="model.")
    flat = flatten_state(tgt)
    lay1 = spec1.layout_for(flat.tensors, {k: tuple(t.shape) for k, t in flat.tensors.items()})
    ckpt.load(tgt, str(tmp_path), strict=True, layout=lay1)
    for n, w in want.items():
        got = tgt["model"][n]
        if _kind(n) == "vocab":  # padded rows belong to no tensor: only live rows compare
            got, w = got[: c["vocab"]], w[: c["vocab"]]
        _assert_bits(got, w, n)

    # 3. Hugging Face names through the shipped name map (parts of fused tensors)
    hf = _hf_names(c1["layers"])
    tgt_hf = {"model": {}}
    for hname, (mname, sl) in hf.items():
        tgt_hf["model"][hname] = torch.full_like(glob[mname][sl], -1024.0)
    spec_hf = compile_spec(load_shipped("hf_llama_to_megatron"), {**c1, "vocab_multiple": 1},
                           prefix="model.")
    flat = flatten_state(tgt_hf)
    spec_hf.check_coverage(flat.tensors)
    lay_hf = spec_hf.layout_for(flat.tensors, {k: tuple(t.shape)
                                               for k, t in flat.tensors.items()})
    ckpt.load(tgt_hf, str(tmp_path), layout=lay_hf)
    for hname, (mname, sl) in hf.items():
        _assert_bits(tgt_hf["model"][hname], glob[mname][sl], hname)


def _hf_names(layers: int) -> dict[str, tuple[str, slice]]:
    """HF LLaMA name -> (canonical Megatron name, rows of it), for _cfg's defaults."""
    q, kv, f = 4 * 2, 2 * 2, 6
    out = {"model.embed_tokens.weight": ("embedding.word_embeddings.weight", slice(None)),
           "lm_head.weight": ("output_layer.weight", slice(None)),
           "model.norm.weight": ("decoder.final_layernorm.weight", slice(None))}
    for i in range(layers):
        m, a = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = a + "self_attention.linear_qkv.weight"
        out.update({
            m + "self_attn.q_proj.weight": (qkv, slice(0, q)),
            m + "self_attn.k_proj.weight": (qkv, slice(q, q + kv)),
            m + "self_attn.v_proj.weight": (qkv, slice(q + kv, q + 2 * kv)),
            m + "self_attn.o_proj.weight": (a + "self_attention.linear_proj.weight", slice(None)),
            m + "mlp.gate_proj.weight": (a + "mlp.linear_fc1.weight", slice(0, f)),
            m + "mlp.up_proj.weight": (a + "mlp.linear_fc1.weight", slice(f, 2 * f)),
            m + "mlp.down_proj.weight": (a + "mlp.linear_fc2.weight", slice(None)),
            m + "input_layernorm.weight":
                (a + "self_attention.linear_qkv.layer_norm_weight", slice(None)),
            m + "post_attention_layernorm.weight":
                (a + "mlp.linear_fc1.layer_norm_weight", slice(None)),
        })
    return out


# ---------------------------------------------------------------- layout details


def test_drop_policy_and_optimizer_keys_follow_renames() -> None:
    spec = compile_spec(load_shipped("megatron_gpt"), {**_cfg(2, 2, 1), "vocab_multiple": 8},
                        coords={"tp": 1, "pp": 1}, prefix="model.")
    keys = ["model.decoder.layers.0.self_attention.linear_proj.weight",
            "model.decoder.layers.0.self_attention.linear_proj._extra_state",
            "model.decoder.layers.1.input_layernorm.weight"]
    lay = spec.layout_for(keys)
    assert lay.dropped == ("model.decoder.layers.0.self_attention.linear_proj._extra_state",)
    assert lay.policies == {"model.decoder.layers.1.input_layernorm.weight": "check_equal"}
    assert spec.replica_policy(keys[2]) == "check_equal" and spec.replica_policy(keys[0]) is None
    assert lay.rename is not None
    assert lay.rename("optim.state.decoder.layers.1.mlp.linear_fc1.weight.exp_avg") == (
        "optim.state.decoder.layers.3.mlp.linear_fc1.weight.exp_avg")
    assert lay.rules[keys[0]] == ckpt.Split(1, 1, 2)
    assert spec.with_coords({"tp": 0, "pp": 0}).layout_for(keys).rules[keys[0]] == ckpt.Split(
        1, 0, 2)


def test_pad_multiple_is_checked_against_the_local_shape() -> None:
    spec = compile_spec("vars: vocab\nemb: split(0) pad(0, size=vocab, multiple=8)",
                        {"vocab": 30, "tp": 2})
    assert spec.layout_for(["emb"], {"emb": (16, 4)}).rules["emb"] == ckpt.Split(0, 0, 2, 30)
    with pytest.raises(SpecError) as ei:
        spec.layout_for(["emb"], {"emb": (20, 4)})
    assert (ei.value.line, ei.value.column) == (2, 43) and "multiple of 8" in str(ei.value)


def test_path_and_text_inputs(tmp_path: Path) -> None:
    p = tmp_path / "x.ckspec"
    p.write_text("a: replicate\n")
    for src in (p, str(p), "a: replicate", parse_spec("a: replicate")):
        assert compile_spec(src).layout_for(["a"]).rules == {"a": ckpt.Replicated()}
    with pytest.raises(SpecError, match="cannot read spec"):
        compile_spec(str(tmp_path / "nope.ckspec"))


# ------------------------------------------------------------------ shipped specs


def _megatron_gpt_names(layers: int) -> list[str]:
    out = ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
           "output_layer.weight", "decoder.final_layernorm.weight",
           "decoder.final_layernorm.bias"]
    for i in range(layers):
        b = f"decoder.layers.{i}."
        for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                  "mlp.linear_fc2"):
            out += [b + m + ".weight", b + m + ".bias", b + m + "._extra_state"]
        out += [b + "self_attention.linear_qkv.layer_norm_weight",
                b + "self_attention.linear_qkv.layer_norm_bias",
                b + "mlp.linear_fc1.layer_norm_weight", b + "mlp.linear_fc1.layer_norm_bias"]
    return out


def _megatron_llama_names(layers: int) -> list[str]:
    out = list(MEGATRON_NAMES)
    for i in range(layers):
        b = f"decoder.layers.{i}."
        out += [b + n for n in LAYER_NAMES]
        out += [b + "mlp.router.weight", b + "self_attention.linear_qkv._extra_state"]
        out += [f"{b}mlp.experts.local_experts.{e}.{n}" for e in range(2) for n in EXPERT_NAMES]
        # Qwen2-MoE / DeepSeek: shared experts, router expert_bias, --add-qkv-bias and
        # --add-bias-linear biases (dense, router, routed experts)
        out += [b + "mlp.shared_experts." + n for n in
                ("linear_fc1.weight", "linear_fc2.weight", "gate_weight")]  # fmt: skip
        out += [b + n for n in ("mlp.router.expert_bias", "mlp.router.bias",
                                "self_attention.linear_qkv.bias",
                                "self_attention.linear_proj.bias", "mlp.linear_fc1.bias",
                                "mlp.linear_fc2.bias")]  # fmt: skip
        out += [f"{b}mlp.experts.local_experts.{e}.linear_fc{j}.bias" for e in range(2)
                for j in (1, 2)]  # fmt: skip
    return out


def _deepspeed_names(layers: int) -> list[str]:
    out = ["language_model.embedding.word_embeddings.weight",
           "language_model.embedding.position_embeddings.weight",
           "language_model.encoder.final_layernorm.weight",
           "language_model.encoder.final_layernorm.bias", "language_model.output_layer.weight",
           "0.word_embeddings.weight", "0.position_embeddings.weight",
           f"{layers + 2}.weight", f"{layers + 2}.bias"]
    mods = ["input_layernorm", "self_attention.query_key_value", "self_attention.dense",
            "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    for i in range(layers):
        for m in mods:
            for p in ("weight", "bias"):
                out += [f"language_model.encoder.layers.{i}.{m}.{p}", f"{i + 2}.{m}.{p}"]
    return out


def _torchtitan_names(layers: int) -> list[str]:
    out = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(layers):
        out += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        out += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        out += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return out


def _hf_gpt2_names(layers: int) -> list[str]:
    out = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
           "transformer.ln_f.bias", "lm_head.weight"]
    for i in range(layers):
        b = f"transformer.h.{i}."
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            out += [f"{b}{m}.weight", f"{b}{m}.bias"]
        out += [b + "attn.bias", b + "attn.masked_bias"]
    return out


def _hf_mixtral_names(layers: int) -> list[str]:
    out = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(layers):
        m = f"model.layers.{i}."
        out += [m + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        out += [m + "input_layernorm.weight", m + "post_attention_layernorm.weight",
                m + "block_sparse_moe.gate.weight", m + "self_attn.rotary_emb.inv_freq"]
        out += [f"{m}block_sparse_moe.experts.{e}.{w}.weight" for e in range(2)
                for w in ("w1", "w2", "w3")]  # fmt: skip
    return out


def _hf_qwen2_moe_names(layers: int) -> list[str]:
    out = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(layers):
        m = f"model.layers.{i}."
        out += [m + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        out += [m + f"self_attn.{p}_proj.bias" for p in "qkv"]
        out += [m + "input_layernorm.weight", m + "post_attention_layernorm.weight",
                m + "mlp.gate.weight", m + "mlp.shared_expert_gate.weight",
                m + "self_attn.rotary_emb.inv_freq"]  # fmt: skip
        out += [f"{m}mlp.experts.{e}.{w}_proj.weight" for e in range(2)
                for w in ("gate", "up", "down")]  # fmt: skip
        out += [f"{m}mlp.shared_expert.{w}_proj.weight" for w in ("gate", "up", "down")]
    return out


SHIPPED_NAMES = {
    "megatron_gpt": _megatron_gpt_names,
    "megatron_llama": _megatron_llama_names,
    "deepspeed_megatron": _deepspeed_names,
    "torchtitan_llama": _torchtitan_names,
    "hf_llama_to_megatron": lambda n: list(_hf_names(n)),
    "hf_gpt2_to_megatron": _hf_gpt2_names,
    "hf_mixtral_to_megatron": _hf_mixtral_names,
    "hf_qwen2_moe_to_megatron": _hf_qwen2_moe_names,
}


def test_every_shipped_spec_is_tested() -> None:
    assert sorted(SHIPPED_NAMES) == list_shipped()


@pytest.mark.parametrize("name", sorted(SHIPPED_NAMES))
def test_shipped_spec_covers_its_framework(name: str) -> None:
    cfg = {**_cfg(tp=2, pp=2, ep=2), "vocab_multiple": 8}
    spec = compile_spec(load_shipped(name), cfg, coords={"tp": 1, "pp": 1, "ep": 1},
                        prefix="model.")
    keys = ["model." + n for n in SHIPPED_NAMES[name](4)]
    spec.check_coverage(keys)
    spec.check_coverage(["optim.state.not.a.model.key"])  # outside the prefix: skipped
    if name in ("hf_llama_to_megatron", "hf_mixtral_to_megatron", "hf_qwen2_moe_to_megatron"):
        return  # needs shapes (fused parts); exercised end to end above
    if name == "hf_gpt2_to_megatron":  # a name map only: its transposes are no layout
        with pytest.raises(SpecError, match="transpose"):
            spec.layout_for(keys)
        return
    lay = spec.layout_for(keys)
    assert set(lay.rules) | set(lay.dropped) <= set(keys)
    with pytest.raises(SpecCoverageError):
        spec.check_coverage(["model.not.a.tensor.of.this.framework"])


def test_shipped_megatron_stage_and_expert_renames() -> None:
    spec = compile_spec(load_shipped("megatron_llama"), _cfg(tp=1, pp=2, ep=2, layers=8,
                                                             experts=4),
                        coords={"pp": 1, "ep": 1})
    k = "decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"
    assert spec.logical_name(k) == "decoder.layers.6.mlp.experts.local_experts.3.linear_fc2.weight"
    assert spec.logical_name("embedding.word_embeddings.weight") == (
        "embedding.word_embeddings.weight")
    with pytest.raises(SpecError, match="no shipped spec"):
        load_shipped("../etc/passwd")


def test_documented_grammar_is_the_parser_grammar() -> None:
    from ckptd.converters.spec import GRAMMAR

    doc = (Path(__file__).parent.parent / "docs" / "spec-language.md").read_text()
    assert GRAMMAR.strip("\n") in doc


def test_documented_example_compiles() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "spec-language.md").read_text()
    example = doc.split("```\n", 2)[1]
    spec = compile_spec(example, _cfg(tp=2, pp=2, ep=2), coords={"tp": 1, "pp": 1, "ep": 1})
    assert spec.logical_name("decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight") == (
        "decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight")


def test_rename_options_parse_and_layouts_refuse_transpose() -> None:
    spec = parse_spec("rename: a.{i}.w -> b.{i}.w : transpose\nb.{i}.w : replicate\n")
    (ren, _) = spec.statements
    assert [o.name for o in ren.options] == ["transpose"]
    compiled = compile_spec(spec)
    assert compiled.logical_name("a.3.w") == "b.3.w"
    with pytest.raises(SpecError, match=r"<string>:1:30: 'a.3.w' is renamed with ': transpose'"):
        compiled.layout_for(["a.3.w"])
    with pytest.raises(SpecError, match=r"<string>:1:32: transpose takes no arguments"):
        compile_spec("rename: a.w -> b.w : transpose(dim=1)\nb.w : replicate\n")
