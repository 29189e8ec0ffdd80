"""Erasure codec: systematic Reed-Solomon over GF(2^8), XOR when m = 1.

Two layers:

* ``ErasureCodec(k, m)``: k equal-length data buffers -> m parity buffers, and back.
  Systematic (data shards are never rewritten), MDS (any k of the k + m shards
  decode), generator ``[I; P]`` with ``P`` the column-normalized Cauchy matrix of
  ``gf256.cauchy_parity``: its first row is all ones, so RS(k, 1) is plain XOR parity.
* ``StripeCodec(k, m)``: one byte object of any length -> k + m checksummed ``Shard``
  objects (``ShardHeader``: k, m, index, length, generation, CRC32C), processed in
  MiB-sized stripes through reused scratch buffers; corrupted or stale shards are
  excluded from decoding, and more than m bad shards raise ``QuorumError``.

Backends compute ``dst_i = sum_j M[i][j] * src_j`` over buffers:

* ``"isal"``: Intel ISA-L's ``ec_encode_data`` called through ``ctypes``, writing straight
  into the caller's buffers (no allocation, no copy; ``ctypes`` releases the GIL). The
  shared library comes from the system (``libisal.so.2``) or from the ``pyeclib`` wheel,
  which bundles it. Chosen by measurement (``bench/erasure.py``): it is 5-20x faster
  than the alternatives measured, and calling it directly avoids the allocations and
  copies that make ``pyeclib``'s own API slow on large objects.
* ``"numpy"``: vectorized table lookups (``gf256.region_matmul``), always available.

All backends use the same generator matrix, so their parity is byte-identical and shards
written by one decode with the other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ckptd.daemon import gf256
from ckptd.daemon.gf256 import Matrix
from ckptd.errors import QuorumError

Buffer = Any  # anything exposing the buffer protocol (bytes, bytearray, memoryview, ndarray)

__all__ = [
    "Backend",
    "ErasureCodec",
    "IsalBackend",
    "NumpyBackend",
    "available_backends",
    "default_backend",
]


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
        gf256.region_matmul(plan, srcs, dsts, tmp[:n])  # type: ignore[arg-type]


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


def _isal_candidates() -> list[str]:
    """Where libisal may be: the system first, then the copy bundled in pyeclib's wheel."""
    found = []
    system = ctypes.util.find_library("isal")
    if system:
        found.append(system)
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        found += sorted(glob.glob(os.path.join(site, "pyeclib.libs", "libisal*.so*")))
    return found


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
        matrix = gf256.cauchy_parity(3, 2)
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
        src_ptrs = (ctypes.c_void_p * plan.cols)(*[a.ctypes.data for a in srcs])
        dst_ptrs = (ctypes.c_void_p * plan.rows)(*[a.ctypes.data for a in dsts])
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


def as_array(buf: Buffer, *, writable: bool = False, what: str = "buffer") -> np.ndarray:
    """A flat uint8 view of ``buf`` without copying; ``ValueError`` if that is impossible."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"{what} must be contiguous")
        arr = buf.reshape(-1).view(np.uint8)
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} must be writable (got a read-only buffer)")
    return arr


class ErasureCodec:
    """Systematic RS(k, m) over equal-length buffers: ``encode`` and ``reconstruct``.

    Shard indices ``0..k-1`` are data, ``k..k+m-1`` parity.  Thread-safe: the only state
    is a small cache of decode plans (one per erasure pattern, bounded) behind a lock.
    Both methods write into caller-provided ``out`` buffers when given (reuse them: that
    is what keeps a stripe loop free of allocations), else into new arrays.
    """

    _MAX_PLANS = 256

    def __init__(self, k: int, m: int, backend: str | Backend | None = None) -> None:
        if not (1 <= k and 0 <= m and k + m <= 256):
            raise ValueError(f"need 1 <= k, 0 <= m, k + m <= 256; got k={k}, m={m}")
        self.k, self.m, self.n = k, m, k + m
        if backend is None:
            self.backend = default_backend()
        elif isinstance(backend, str):
            self.backend = get_backend(backend)
        else:
            self.backend = backend
        self.generator = gf256.generator(k, m)
        self._encode_plan = self.backend.plan(gf256.cauchy_parity(k, m))
        self._plans: dict[tuple[tuple[int, ...], tuple[int, ...]], object] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ErasureCodec(k={self.k}, m={self.m}, backend={self.backend.name!r})"

    def encode(
        self, data: Sequence[Buffer], out: Sequence[Buffer] | None = None
    ) -> list[np.ndarray]:
        """Parity of k equal-length data buffers: m arrays (views of ``out`` if given)."""
        if len(data) != self.k:
            raise ValueError(f"expected {self.k} data shards, got {len(data)}")
        srcs = [as_array(d, what=f"data shard {i}") for i, d in enumerate(data)]
        size = _common_length(srcs)
        dsts = self._outputs(out, self.m, size)
        self.backend.apply(self._encode_plan, srcs, dsts)
        return dsts

    def reconstruct(
        self,
        shards: Sequence[Buffer | None],
        lost: Sequence[int] | None = None,
        out: Sequence[Buffer] | None = None,
    ) -> list[np.ndarray]:
        """Rebuild the shards listed in ``lost`` (default: every ``None``) from any k others.

        ``shards`` has k + m entries, ``None`` for a missing one; a shard listed in ``lost``
        is never read even if present.  Returns one array per ``lost`` index, in order.
        Raises ``QuorumError`` when fewer than k shards remain.
        """
        if len(shards) != self.n:
            raise ValueError(f"expected {self.n} shard slots, got {len(shards)}")
        if lost is None:
            lost = [i for i, s in enumerate(shards) if s is None]
        lost_t = tuple(lost)
        if any(not 0 <= i < self.n for i in lost_t) or len(set(lost_t)) != len(lost_t):
            raise ValueError(f"lost indices must be distinct and in [0, {self.n}): {lost_t}")
        usable = [i for i, s in enumerate(shards) if s is not None and i not in lost_t]
        if len(usable) < self.k:
            raise QuorumError(
                f"RS({self.k}+{self.m}) needs {self.k} intact shards, only {len(usable)} "
                f"available ({self.n - len(usable)} missing, at most {self.m} tolerated)"
            )
        # Prefer data shards: when only parity is lost this is exactly the encode matrix.
        survivors = tuple(usable[: self.k])
        srcs = [as_array(shards[i], what=f"shard {i}") for i in survivors]
        size = _common_length(srcs)
        dsts = self._outputs(out, len(lost_t), size)
        if lost_t:
            self.backend.apply(self.decode_plan(survivors, lost_t), srcs, dsts)
        return dsts

    def decode_matrix(self, survivors: Sequence[int], lost: Sequence[int]) -> Matrix:
        """Rows that map the k ``survivors`` to the ``lost`` shards: ``G[lost] @ G[surv]^-1``."""
        inv = gf256.mat_inv(tuple(self.generator[i] for i in survivors))
        return gf256.mat_mul(tuple(self.generator[i] for i in lost), inv)

    def decode_plan(self, survivors: tuple[int, ...], lost: tuple[int, ...]) -> object:
        """The backend plan for one erasure pattern, cached (patterns repeat per stripe)."""
        key = (survivors, lost)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = self.backend.plan(self.decode_matrix(survivors, lost))
            with self._lock:
                if len(self._plans) >= self._MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _outputs(self, out: Sequence[Buffer] | None, count: int, size: int) -> list[np.ndarray]:
        if out is None:
            return [np.empty(size, dtype=np.uint8) for _ in range(count)]
        if len(out) != count:
            raise ValueError(f"expected {count} output buffers, got {len(out)}")
        dsts = [as_array(o, writable=True, what=f"output {i}") for i, o in enumerate(out)]
        for i, d in enumerate(dsts):
            if len(d) < size:
                raise ValueError(f"output {i} holds {len(d)} bytes, {size} needed")
        return [d[:size] for d in dsts]


def _common_length(arrays: Sequence[np.ndarray]) -> int:
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"shards must have equal lengths, got {sorted(sizes)}")
    return sizes.pop() if sizes else 0
