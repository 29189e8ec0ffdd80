"""GF(2^8) for the erasure codec: field tables, small matrices, and region-multiply backends.

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), i.e. primitive polynomial ``0x11d``
with generator 2: the same field as ISA-L, liberasurecode, zfec and ``reedsolo``'s
default, so generator matrices built here mean the same thing to every backend.

Matrices are small (at most 255 x 255, in practice k + m <= 16) and built once per
erasure pattern, so they are plain tuples of ints; only the region operation
(``dsts = M @ srcs`` over MiB-sized buffers) is fast, in one of two backends: ISA-L
through ctypes, or numpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np

PRIM_POLY = 0x11D
GENERATOR = 2

Matrix = tuple[tuple[int, ...], ...]


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    # EXP is doubled (510 entries) so that EXP[LOG[a] + LOG[b]] needs no modulo.
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= PRIM_POLY
    exp[255:510] = exp[0:255]
    return exp, log


EXP, LOG = _build_tables()
EXP.setflags(write=False)
LOG.setflags(write=False)


def _build_mul_table() -> np.ndarray:
    a = np.arange(256)
    prod = EXP[(LOG[a][:, None] + LOG[a][None, :])]
    prod[0, :] = 0
    prod[:, 0] = 0
    return prod.astype(np.uint8)


#: ``MUL[a, b] == a * b`` in the field (64 KiB).
MUL = _build_mul_table()
MUL.setflags(write=False)
#: ``INV[a] == a^-1`` for a != 0; ``INV[0] == 0`` (never used: 0 has no inverse).
INV = np.zeros(256, dtype=np.uint8)
INV[1:] = EXP[255 - LOG[np.arange(1, 256)]]
INV.setflags(write=False)


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(MUL[a, b])


def gf_inv(a: int) -> int:
    """Multiplicative inverse; ``ZeroDivisionError`` for 0."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(INV[a])


def mat_mul(a: Matrix, b: Matrix) -> Matrix:
    """Matrix product over the field (addition is XOR)."""
    cols = len(b[0])
    out = []
    for row in a:
        acc = [0] * cols
        for x, brow in zip(row, b):
            if x:
                mrow = MUL[x]
                for j, y in enumerate(brow):
                    acc[j] ^= int(mrow[y])
        out.append(tuple(acc))
    return tuple(out)


def mat_inv(a: Matrix) -> Matrix:
    """Inverse of a square matrix by Gauss-Jordan elimination; ``ValueError`` if singular."""
    n = len(a)
    work = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if work[r][col]), None)
        if pivot is None:
            raise ValueError("matrix is singular over GF(2^8)")
        work[col], work[pivot] = work[pivot], work[col]
        scale = int(INV[work[col][col]])
        work[col] = [int(MUL[scale, v]) for v in work[col]]
        for r in range(n):
            f = work[r][col]
            if r != col and f:
                work[r] = [v ^ int(MUL[f, p]) for v, p in zip(work[r], work[col])]
    return tuple(tuple(row[n:]) for row in work)


@lru_cache(maxsize=64)
def cauchy_parity(k: int, m: int) -> Matrix:
    """The m x k parity part of a systematic MDS generator ``[I_k; P]``.

    ``P[i][j] = 1 / (x_i + y_j)`` with ``x_i = k + i`` and ``y_j = j`` (ISA-L's
    ``gf_gen_cauchy1_matrix``), then every column is scaled so that the first parity row
    is all ones.  Scaling columns (or rows) keeps every square submatrix of a Cauchy
    matrix non-singular, so the code stays MDS (any k of the k + m shards decode), and
    parity 0 becomes the plain XOR of the data: RS(k, 1) *is* the XOR code, and the first
    parity of RS(k, m) can be checked or rebuilt with XOR alone.
    """
    if k < 1 or m < 0 or k + m > 256:
        raise ValueError(f"need 1 <= k and 0 <= m and k + m <= 256, got k={k} m={m}")
    rows = [[int(INV[(k + i) ^ j]) for j in range(k)] for i in range(m)]
    if m:
        col_scale = [int(INV[rows[0][j]]) for j in range(k)]
        rows = [[int(MUL[c, v]) for c, v in zip(col_scale, row)] for row in rows]
    return tuple(tuple(r) for r in rows)


def generator(k: int, m: int) -> Matrix:
    """The full (k + m) x k systematic generator: identity rows, then ``cauchy_parity``."""
    ident = tuple(tuple(int(i == j) for j in range(k)) for i in range(k))
    return ident + cauchy_parity(k, m)


@lru_cache(maxsize=256)
def mul_table16(c: int) -> np.ndarray:
    """Products of ``c`` with both bytes of every uint16, as a 65536-entry uint16 table.

    Looking up two bytes at a time halves the number of numpy gather operations; the
    table is 128 KiB, which stays in L2.  Both bytes are multiplied independently, so
    the table is endianness-agnostic.
    """
    v = np.arange(65536, dtype=np.uint32)
    row = MUL[c].astype(np.uint32)
    table = (row[v & 0xFF] | (row[v >> 8] << 8)).astype(np.uint16)
    table.setflags(write=False)
    return table


def region_matmul(
    matrix: Matrix, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray], tmp: np.ndarray
) -> None:
    """``dsts[i] = sum_j matrix[i][j] * srcs[j]`` over equal-length uint8 arrays (numpy).

    ``tmp`` is caller-owned scratch of the same length, reused so that a stripe loop
    allocates nothing.  Coefficient 1 is a plain XOR; 0 is skipped.
    """
    n = len(dsts[0]) if dsts else 0
    even = n & ~1
    tmp16 = tmp[:even].view(np.uint16)
    for row, dst in zip(matrix, dsts):
        first = True
        for c, src in zip(row, srcs):
            if c == 0:
                continue
            if c == 1:
                product = src
            else:
                np.take(mul_table16(c), src[:even].view(np.uint16), out=tmp16)
                if even != n:  # odd tail byte
                    tmp[even:] = MUL[c][src[even:]]
                product = tmp
            if first:
                np.copyto(dst, product)
                first = False
            else:
                np.bitwise_xor(dst, product, out=dst)
        if first:  # an all-zero row (never produced by our generators, but be total)
            dst[:] = 0


# --------------------------------------------------------------------------------------
# Region-multiply backends: the only code that touches bulk data.


class Backend(Protocol):
    """Computes ``dsts[i] = sum_j matrix[i][j] * srcs[j]`` over GF(2^8), byte-wise.

    ``plan`` is called once per matrix (per codec, per erasure pattern) and its result
    reused for every stripe.  ``apply`` may be called from several threads at once with
    the same plan (plans are read-only); ``srcs``/``dsts`` are equal-length contiguous
    uint8 arrays, ``dsts`` writable and not overlapping ``srcs``.
    """

    name: str

    def plan(self, matrix: Matrix) -> object: ...

    def apply(self, plan: object, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
        ...


class NumpyBackend:
    """Pure-numpy fallback: 16-bit product tables and XOR (about 0.7 GB/s for RS(4+2))."""

    name = "numpy"

    def __init__(self) -> None:
        # Scratch per thread: apply() must not allocate per stripe (fresh pages fault at
        # 1-2 GB/s) and must be callable from several threads.
        self._local = threading.local()

    def plan(self, matrix: Matrix) -> object:
        return matrix

    def apply(self, plan: object, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
        if not dsts:
            return
        n = len(dsts[0])
        tmp = getattr(self._local, "tmp", None)
        if tmp is None or len(tmp) < n:
            tmp = self._local.tmp = np.empty(n, dtype=np.uint8)
        region_matmul(plan, srcs, dsts, tmp[:n])  # type: ignore[arg-type]


class _IsalPlan:
    """Expanded ISA-L multiplication tables for one matrix (32 bytes per coefficient)."""

    __slots__ = ("cols", "rows", "tables")

    def __init__(self, lib: ctypes.CDLL, matrix: Matrix) -> None:
        self.rows = len(matrix)
        self.cols = len(matrix[0]) if matrix else 0
        flat = [c for row in matrix for c in row]
        coeffs = (ctypes.c_ubyte * max(1, len(flat)))(*flat)
        self.tables = (ctypes.c_ubyte * max(1, 32 * len(flat)))()
        if flat:
            lib.ec_init_tables(self.cols, self.rows, coeffs, self.tables)


def _isal_candidates() -> Iterator[str]:
    """Where libisal may be: the system's soname first, then the copy bundled in pyeclib's
    wheel, then whatever ``find_library`` finds (last: it runs ``ldconfig``/``gcc``
    subprocesses, ~0.5 s, on the path of a loader's first rebuild)."""
    yield "libisal.so.2"
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        yield from sorted(glob.glob(os.path.join(site, "pyeclib.libs", "libisal*.so*")))
    system = ctypes.util.find_library("isal")
    if system:
        yield system


class IsalBackend:
    """ISA-L ``ec_encode_data`` through ctypes (AVX2/AVX-512/GFNI picked by ISA-L itself)."""

    name = "isal"

    def __init__(self, path: str | None = None) -> None:
        paths = [path] if path else _isal_candidates()
        errors = []
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
                lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                               ctypes.c_void_p]
                lib.ec_init_tables.restype = None
                lib.ec_encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                lib.ec_encode_data.restype = None
            except (OSError, AttributeError) as exc:
                errors.append(f"{p}: {exc}")
                continue
            self._lib = lib
            self.path = p
            self._self_test()
            return
        raise ImportError(
            "ISA-L not found (install the system package libisal2 or `pip install pyeclib`); "
            + ("; ".join(errors) if errors else "no candidate library")
        )

    def _self_test(self) -> None:
        # A wrong library or ABI would silently produce wrong parity: compare once with
        # the numpy reference on an odd length that exercises the SIMD body and tail.
        rng = np.random.default_rng(0)
        matrix = cauchy_parity(3, 2)
        srcs = [rng.integers(0, 256, 97, dtype=np.uint8) for _ in range(3)]
        got = [np.empty(97, np.uint8) for _ in range(2)]
        want = [np.empty(97, np.uint8) for _ in range(2)]
        self.apply(self.plan(matrix), srcs, got)
        NumpyBackend().apply(matrix, srcs, want)
        if not all(np.array_equal(a, b) for a, b in zip(got, want)):
            raise ImportError(f"ISA-L at {self.path} failed the self-test")

    def plan(self, matrix: Matrix) -> object:
        return _IsalPlan(self._lib, matrix)

    def apply(self, plan: object, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
        assert isinstance(plan, _IsalPlan)
        n = len(dsts[0]) if dsts else 0
        if n == 0 or plan.rows == 0:
            return
        # __array_interface__ is ~30% cheaper than .ctypes.data; this runs once per stripe.
        src_ptrs = (ctypes.c_void_p * plan.cols)(*[a.__array_interface__["data"][0] for a in srcs])
        dst_ptrs = (ctypes.c_void_p * plan.rows)(*[a.__array_interface__["data"][0] for a in dsts])
        # The arrays (and so the memory the pointers name) stay referenced by the caller.
        self._lib.ec_encode_data(n, plan.cols, plan.rows, plan.tables, src_ptrs, dst_ptrs)


_BACKENDS: dict[str, type] = {"isal": IsalBackend, "numpy": NumpyBackend}
_instances: dict[str, Backend] = {}
_instances_lock = threading.Lock()


def get_backend(name: str) -> Backend:
    """The shared, stateless instance of a backend by name; ``ImportError`` if unavailable."""
    with _instances_lock:
        if name not in _instances:
            if name not in _BACKENDS:
                raise ValueError(f"unknown erasure backend {name!r}; known: {sorted(_BACKENDS)}")
            _instances[name] = _BACKENDS[name]()
        return _instances[name]


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, fastest first."""
    names = []
    for name in _BACKENDS:
        try:
            get_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default_backend() -> Backend:
    """ISA-L when it loads (measured fastest, see bench/erasure.py), else numpy."""
    try:
        return get_backend("isal")
    except ImportError:
        return get_backend("numpy")
