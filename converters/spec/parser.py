"""Parse spec text into :class:`~ckptd.converters.spec.ast.Spec` (lark, LALR(1)).

The grammar below is the one documented in ``docs/spec-language.md``. Syntax errors
become :class:`SpecError` with file, line and column. Braced parts of patterns
(``{i}``, ``{i + first_layer(s)}``) are parsed with the same grammar's ``expr`` rule,
and their positions are mapped back into the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from ckptd.converters.spec import ast
from ckptd.converters.spec.errors import Loc, SpecError
from ckptd.converters.spec.expr import BinOp, Call, Expr, Neg, Num, Var

GRAMMAR = r"""
start: _NL? (_stmt _NL)* _stmt?
_stmt: vars_stmt | let_stmt | include_stmt | drop_stmt | rename_stmt | stage_stmt
     | axis_stmt | rule_stmt

vars_stmt: "vars" ":" var_decl ("," var_decl)*
var_decl: NAME ["=" expr]
let_stmt: "let" NAME "=" expr
include_stmt: "include" ":" PATH
drop_stmt: "drop" ":" PATTERN ("," PATTERN)*
rename_stmt: "rename" ":" PATTERN "->" target (":" xform+)?
stage_stmt: "stage" BRACED ":" PATTERN "->" target
axis_stmt: "on" NAME BRACED ":" PATTERN "->" target
target: PATTERN ["[" NAME "]"]
rule_stmt: PATTERN ":" xform+

xform: NAME ("(" [arg ("," arg)*] ")")?
arg: NAME "=" value   -> kwarg
   | value            -> posarg
?value: expr | parts
parts: "[" [part ("," part)*] "]"
part: NAME ":" expr

?expr: sum
?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub
?product: unary
    | product "*" unary  -> mul
    | product "//" unary -> floordiv
    | product "/" unary  -> truediv
    | product "%" unary  -> mod
?unary: atom
    | "-" unary          -> neg
?atom: INT               -> num
    | NAME               -> var
    | NAME "(" [expr ("," expr)*] ")" -> call
    | "(" expr ")"

NAME: /[A-Za-z_][A-Za-z0-9_]*/
INT: /[0-9]+/
PATTERN: /([A-Za-z0-9_*?.]|\{[^}\n]*\})+/
BRACED: /\{[^}\n]*\}/
PATH: /[^\s#]+/
COMMENT: /#[^\n]*/
_NL: /(\r?\n[\t ]*(#[^\n]*)?)+/

%ignore /[\t ]+/
%ignore /\\[\t ]*\r?\n/
%ignore COMMENT
"""

_FRIENDLY = {
    "_NL": "end of line",
    "$END": "end of file",
    "NAME": "a name",
    "INT": "an integer",
    "PATTERN": "a name pattern",
    "BRACED": "'{variable}'",
    "PATH": "a spec name or path",
    "COLON": "':'",
    "COMMA": "','",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "EQUAL": "'='",
    "__ANON_0": "'->'",
}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR, parser="lalr", start=["start", "expr"], propagate_positions=True,
                maybe_placeholders=True)


def parse_spec(text: str, file: str = "<string>", path: str | None = None) -> ast.Spec:
    """Parse ``text`` (named ``file`` in errors). Raises :class:`SpecError`."""
    lines = tuple(text.splitlines())
    try:
        tree = _parser().parse(text, start="start")
    except UnexpectedInput as e:
        raise _syntax_error(e, file, lines) from None
    try:
        stmts = _Build(file, text).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise _with_source(e.orig_exc, lines) from None
        raise
    return ast.Spec(file, tuple(stmts.children), lines, path)


def parse_expr(text: str, loc: Loc) -> Expr:
    """Parse an expression found at ``loc`` (the first character of ``text``)."""
    try:
        tree = _parser().parse(text, start="expr")
    except UnexpectedInput as e:
        col = loc.column + max(getattr(e, "column", 1), 1) - 1
        inner = _syntax_error(e, loc.file, (text,))
        raise SpecError(inner.message, Loc(loc.file, loc.line, col)) from None
    try:
        out = _Build(loc.file, text, base=loc).transform(tree)
    except VisitError as e:  # pragma: no cover - expressions raise nothing while building
        raise e.orig_exc from None
    assert not isinstance(out, Tree)
    return out


def _syntax_error(e: UnexpectedInput, file: str, lines: tuple[str, ...]) -> SpecError:
    line, col = max(getattr(e, "line", 1), 1), max(getattr(e, "column", 1), 1)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        got = "end of line" if tok.type == "_NL" else (
            "end of file" if tok.type == "$END" else repr(str(tok)))
        if tok.type == "$END" and lines:
            line, col = len(lines), len(lines[-1]) + 1
        msg = f"unexpected {got}; expected {_expected(e.expected)}"
    elif isinstance(e, UnexpectedCharacters):
        ch = lines[line - 1][col - 1] if line - 1 < len(lines) and col - 1 < len(
            lines[line - 1]) else "?"
        msg = f"unexpected character {ch!r}; expected {_expected(e.allowed or set())}"
    elif isinstance(e, UnexpectedEOF):
        msg = f"unexpected end of file; expected {_expected(e.expected)}"
    else:  # pragma: no cover - lark's hierarchy is closed
        msg = str(e)
    src = lines[line - 1] if 0 < line <= len(lines) else None
    return SpecError(msg, Loc(file, line, col), src)


def _expected(names: Iterable[str]) -> str:
    shown = sorted({_FRIENDLY.get(n, f"'{n.lower()}'" if n.isupper() else n) for n in names})
    return " or ".join(shown) if len(shown) <= 4 else ", ".join(shown[:6]) + ", ..."


def _with_source(e: SpecError, lines: tuple[str, ...]) -> SpecError:
    if e.loc is None or not 0 < e.loc.line <= len(lines):
        return e
    return type(e)(e.message, e.loc, lines[e.loc.line - 1])


@v_args(meta=True)
class _Build(Transformer):
    """Tree -> AST. ``base`` shifts positions of an embedded expression into the file."""

    def __init__(self, file: str, text: str, base: Loc | None = None) -> None:
        super().__init__()
        self.file, self.text, self.base = file, text, base

    def _loc(self, line: int, column: int) -> Loc:
        if self.base is None:
            return Loc(self.file, line, column)
        return Loc(self.file, self.base.line, self.base.column + column - 1)

    def _mloc(self, meta) -> Loc:
        return self._loc(meta.line, meta.column)

    def _tloc(self, tok: Token) -> Loc:
        return self._loc(tok.line or 1, tok.column or 1)

    def _line_text(self, meta) -> str:
        raw = self.text[meta.start_pos:meta.end_pos]
        return " ".join(re.sub(r"\\[\t ]*\r?\n", " ", raw).split())

    # ------------------------------------------------------------ expressions
    def num(self, meta, c):
        return Num(int(c[0]), self._tloc(c[0]))

    def var(self, meta, c):
        return Var(str(c[0]), self._tloc(c[0]))

    def call(self, meta, c):
        args = tuple(a for a in c[1:] if a is not None)
        return Call(str(c[0]), args, self._tloc(c[0]))

    def neg(self, meta, c):
        return Neg(c[0], self._mloc(meta))

    def _bin(self, op: str, meta, c) -> BinOp:
        return BinOp(op, c[0], c[1], self._mloc(meta))

    def add(self, meta, c):
        return self._bin("+", meta, c)

    def sub(self, meta, c):
        return self._bin("-", meta, c)

    def mul(self, meta, c):
        return self._bin("*", meta, c)

    def floordiv(self, meta, c):
        return self._bin("//", meta, c)

    def truediv(self, meta, c):
        return self._bin("/", meta, c)

    def mod(self, meta, c):
        return self._bin("%", meta, c)

    # ------------------------------------------------------------ statements
    def vars_stmt(self, meta, c):
        return list(c)

    def var_decl(self, meta, c):
        return ast.VarDecl(str(c[0]), c[1], self._tloc(c[0]))

    def let_stmt(self, meta, c):
        return ast.Let(str(c[0]), c[1], self._tloc(c[0]))

    def include_stmt(self, meta, c):
        return ast.Include(str(c[0]), self._tloc(c[0]))

    def drop_stmt(self, meta, c):
        pats = tuple(self._pattern(t, source=True) for t in c)
        return ast.Drop(pats, self._mloc(meta), self._line_text(meta))

    def rename_stmt(self, meta, c):
        src, (tgt, part, ploc) = self._pattern(c[0], source=True), c[1]
        return ast.Rename(src, tgt, None, None, part, ploc, self._mloc(meta),
                          self._line_text(meta), tuple(c[2:]))

    def stage_stmt(self, meta, c):
        return self._axis(meta, "pp", c[0], c[1], c[2])

    def axis_stmt(self, meta, c):
        return self._axis(meta, str(c[0]), c[1], c[2], c[3])

    def _axis(self, meta, axis, braced, src, target):
        var = self._capture_name(braced)
        tgt, part, ploc = target
        return ast.Rename(self._pattern(src, source=True), tgt, axis, var, part, ploc,
                          self._mloc(meta), self._line_text(meta))

    def target(self, meta, c):
        part = c[1]
        return (self._pattern(c[0], source=False), str(part) if part else None,
                self._tloc(part) if part else None)

    def rule_stmt(self, meta, c):
        return ast.Rule(self._pattern(c[0], source=True), tuple(c[1:]), self._mloc(meta),
                        self._line_text(meta))

    def xform(self, meta, c):
        args = tuple(a for a in c[1:] if a is not None)
        return ast.Transform(str(c[0]), args, self._tloc(c[0]))

    def kwarg(self, meta, c):
        return ast.Arg(str(c[0]), c[1], self._tloc(c[0]))

    def posarg(self, meta, c):
        return ast.Arg(None, c[0], self._mloc(meta))

    def parts(self, meta, c):
        return tuple(p for p in c if p is not None)

    def part(self, meta, c):
        return ast.Part(str(c[0]), c[1], self._tloc(c[0]))

    def start(self, meta, c):
        out = []
        for s in c:
            out.extend(s if isinstance(s, list) else [s])
        return Tree("start", out)

    # ------------------------------------------------------------ patterns
    def _capture_name(self, tok: Token) -> str:
        inner = str(tok)[1:-1]
        name = inner.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SpecError(f"expected '{{variable}}', got {str(tok)!r}", self._tloc(tok))
        return name

    def _pattern(self, tok: Token, source: bool) -> ast.Pattern:
        text, loc = str(tok), self._tloc(tok)
        items: list = []
        for m in re.finditer(r"\{([^}]*)\}|[^{]+", text):
            if not m.group(0).startswith("{"):
                items.append(m.group(0))
                continue
            inner_loc = Loc(loc.file, loc.line, loc.column + m.start(1))
            expr = parse_expr(m.group(1), inner_loc) if m.group(1).strip() else None
            if expr is None:
                raise SpecError("empty '{}' in a pattern", Loc(loc.file, loc.line,
                                                              loc.column + m.start()))
            if source:
                if not isinstance(expr, Var):
                    raise SpecError(
                        "a pattern may only capture a variable ('{i}'); expressions belong in "
                        "the target of a rename", inner_loc)
                items.append(ast.Capture(expr.name, expr.loc))
            else:
                items.append(expr)
        return ast.Pattern(text, tuple(items), loc)
