"""GF(2^8) arithmetic for the erasure codec: tables, small matrices, and numpy region ops.

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), i.e. primitive polynomial ``0x11d``
with generator 2: the same field as ISA-L, liberasurecode, zfec and ``reedsolo``'s
default, so generator matrices built here mean the same thing to every backend.

Matrices are small (at most 255 x 255, in practice k + m <= 16) and built once per
erasure pattern, so they are plain tuples of ints; only the region operation
(``dst ^= c * src`` over MiB-sized buffers) is vectorized.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

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
    if not (1 <= k and 0 <= m and k + m <= 256):
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
