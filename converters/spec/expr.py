"""Integer expressions of the spec language: AST, name check and evaluation.

Expressions are integers combined with ``+ - * // %``, unary minus, parentheses,
variables and a few built-in functions (:data:`FUNCTIONS`). ``/`` is rejected: sizes
are integers, so write ``//``. Every node carries its :class:`Loc` so that an error
points at the offending token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ckptd.converters.spec.errors import Loc, SpecError

Value = int | str
Lookup = Callable[[str, Loc], Value]


@dataclass(frozen=True)
class Num:
    value: int
    loc: Loc


@dataclass(frozen=True)
class Var:
    name: str
    loc: Loc


@dataclass(frozen=True)
class BinOp:
    op: str
    left: Expr
    right: Expr
    loc: Loc


@dataclass(frozen=True)
class Neg:
    operand: Expr
    loc: Loc


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    loc: Loc


Expr = Num | Var | BinOp | Neg | Call

#: Built-in functions: name -> (arity, description). ``first_layer`` reads the
#: variables ``layers`` and ``pp``; the others are pure.
FUNCTIONS: dict[str, tuple[int, str]] = {
    "min": (2, "the smaller of two integers"),
    "max": (2, "the larger of two integers"),
    "cdiv": (2, "ceiling division: cdiv(a, b) = (a + b - 1) // b"),
    "round_up": (2, "a rounded up to a multiple of m"),
    "first_layer": (1, "first global layer of pipeline stage s: s * (layers // pp)"),
}


def names(e: Expr) -> Iterator[Var]:
    """Every variable reference in ``e`` (functions that read variables included)."""
    if isinstance(e, Var):
        yield e
    elif isinstance(e, BinOp):
        yield from names(e.left)
        yield from names(e.right)
    elif isinstance(e, Neg):
        yield from names(e.operand)
    elif isinstance(e, Call):
        if e.func == "first_layer":
            yield Var("layers", e.loc)
            yield Var("pp", e.loc)
        for a in e.args:
            yield from names(a)


def check_names(e: Expr, known: Callable[[str], bool]) -> None:
    """Raise :class:`SpecError` at the first unknown variable or function of ``e``."""
    for node in _walk(e):
        if isinstance(node, Call):
            if node.func not in FUNCTIONS:
                raise SpecError(
                    f"unknown function {node.func!r} (known: {', '.join(sorted(FUNCTIONS))})",
                    node.loc,
                )
            arity = FUNCTIONS[node.func][0]
            if len(node.args) != arity:
                raise SpecError(
                    f"{node.func}() takes {arity} argument(s), got {len(node.args)}", node.loc
                )
    for v in names(e):
        if not known(v.name):
            raise SpecError(
                f"unknown variable {v.name!r}: declare it on a 'vars:' line, define it with "
                "'let', or capture it in the pattern",
                v.loc,
            )


def _walk(e: Expr) -> Iterator[Expr]:
    yield e
    if isinstance(e, BinOp):
        yield from _walk(e.left)
        yield from _walk(e.right)
    elif isinstance(e, Neg):
        yield from _walk(e.operand)
    elif isinstance(e, Call):
        for a in e.args:
            yield from _walk(a)


def evaluate(e: Expr, lookup: Lookup) -> Value:
    """Evaluate ``e``; ``lookup(name, loc)`` gives a variable's value (int or capture str).

    A bare variable may evaluate to a string (a non-numeric capture, substituted into
    a template); arithmetic needs integers and raises :class:`SpecError` otherwise.
    """
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Var):
        return lookup(e.name, e.loc)
    if isinstance(e, Neg):
        return -_int(evaluate(e.operand, lookup), e.operand)
    if isinstance(e, BinOp):
        a = _int(evaluate(e.left, lookup), e.left)
        b = _int(evaluate(e.right, lookup), e.right)
        return _binop(e, a, b)
    args = [_int(evaluate(a, lookup), a) for a in e.args]
    return _call(e, args, lookup)


def evaluate_int(e: Expr, lookup: Lookup) -> int:
    """Like :func:`evaluate` but the result must be an integer."""
    return _int(evaluate(e, lookup), e)


def _binop(e: BinOp, a: int, b: int) -> int:
    if e.op == "+":
        return a + b
    if e.op == "-":
        return a - b
    if e.op == "*":
        return a * b
    if e.op == "/":
        raise SpecError("'/' is not allowed: sizes are integers, use '//'", e.loc)
    if b == 0:
        raise SpecError(f"division by zero in '{a} {e.op} {b}'", e.right.loc)
    return a // b if e.op == "//" else a % b


def _call(e: Call, args: list[int], lookup: Lookup) -> int:
    if e.func == "min":
        return min(args)
    if e.func == "max":
        return max(args)
    if e.func in ("cdiv", "round_up"):
        if args[1] <= 0:
            raise SpecError(f"{e.func}(): second argument must be positive, got {args[1]}",
                            e.args[1].loc)
        q = -(-args[0] // args[1])
        return q if e.func == "cdiv" else q * args[1]
    # first_layer(s)
    layers = _int(lookup("layers", e.loc), e)
    pp = _int(lookup("pp", e.loc), e)
    if pp <= 0 or layers % pp:
        raise SpecError(
            f"first_layer(): {layers} layers do not divide evenly over pp={pp} stages", e.loc
        )
    return args[0] * (layers // pp)


def _int(v: Value, e: Expr) -> int:
    if isinstance(v, int):
        return v
    raise SpecError(f"arithmetic on a non-integer value {v!r}", e.loc)
