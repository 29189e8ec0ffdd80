"""Erasure codec: field arithmetic vs reedsolo, every erasure pattern, integrity checks.

``ErasureCodecTests`` / ``StripeCodecTests`` are conformance suites: each backend
subclasses them (the ISA-L ones are skipped where the library does not load).
"""

from __future__ import annotations

import itertools

import crc32c
import numpy as np
import pytest

from ckptd.daemon import gf256
from ckptd.daemon.erasure import (
    ErasureCodec,
    Shard,
    ShardHeader,
    StripeCodec,
    available_backends,
    crc32c_combine,
    shard_len_for,
)
from ckptd.errors import IntegrityError, QuorumError

reedsolo = pytest.importorskip("reedsolo")

HAVE_ISAL = "isal" in available_backends()
needs_isal = pytest.mark.skipif(not HAVE_ISAL, reason="ISA-L not loadable (pip install pyeclib)")
GRID = [(k, m) for k in range(1, 7) for m in range(1, 4)]


def _rand(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _erasures(n: int, upto: int) -> list[tuple[int, ...]]:
    return [c for r in range(upto + 1) for c in itertools.combinations(range(n), r)]


def _oracle_parity(k: int, m: int, data: list[np.ndarray]) -> list[bytes]:
    """Parity computed byte by byte with reedsolo's field multiply: the reference."""
    matrix = gf256.cauchy_parity(k, m)
    out = []
    for row in matrix:
        acc = [0] * len(data[0])
        for c, d in zip(row, data):
            for pos, byte in enumerate(d.tolist()):
                acc[pos] ^= reedsolo.gf_mul(c, byte)
        out.append(bytes(acc))
    return out


# ----------------------------------------------------------------- field arithmetic


@pytest.fixture(scope="module")
def rs_tables() -> None:
    reedsolo.init_tables(prim=gf256.PRIM_POLY, generator=gf256.GENERATOR, c_exp=8)


def test_mul_table_matches_reedsolo(rs_tables: None) -> None:
    want = np.array([[reedsolo.gf_mul(a, b) for b in range(256)] for a in range(256)])
    assert np.array_equal(gf256.MUL, want)


def test_inverse_matches_reedsolo(rs_tables: None) -> None:
    for a in range(1, 256):
        assert gf256.gf_inv(a) == reedsolo.gf_inverse(a)
        assert gf256.gf_mul(a, gf256.gf_inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        gf256.gf_inv(0)


def test_mul_table16_is_two_byte_products() -> None:
    t = gf256.mul_table16(0x53)
    v = np.arange(65536)
    assert np.array_equal(t & 0xFF, gf256.MUL[0x53][v & 0xFF])
    assert np.array_equal(t >> 8, gf256.MUL[0x53][v >> 8])


@pytest.mark.parametrize(("k", "m"), [*GRID, (10, 4), (12, 4)])
def test_generator_is_mds(k: int, m: int) -> None:
    g = gf256.generator(k, m)
    assert g[k] == (1,) * k  # first parity row is XOR
    for rows in itertools.combinations(range(k + m), k):
        sub = tuple(g[r] for r in rows)
        assert gf256.mat_mul(gf256.mat_inv(sub), sub) == gf256.generator(k, 0)


# ------------------------------------------------------------- ErasureCodec suite


class ErasureCodecTests:
    backend = "numpy"

    def test_encode_matches_reedsolo_oracle(self, rs_tables: None) -> None:
        for k, m in [(4, 2), (3, 3), (5, 1)]:
            data = [_rand(45, seed=i) for i in range(k)]
            parity = ErasureCodec(k, m, self.backend).encode(data)
            assert [p.tobytes() for p in parity] == _oracle_parity(k, m, data)

    @pytest.mark.parametrize(("k", "m"), GRID)
    def test_every_erasure_pattern(self, k: int, m: int) -> None:
        codec = ErasureCodec(k, m, self.backend)
        for size in (1, 33, 100):
            data = [_rand(size, seed=10 * i + size) for i in range(k)]
            full = data + codec.encode(data)
            for lost in _erasures(k + m, m):
                shards = [None if i in lost else s for i, s in enumerate(full)]
                rebuilt = codec.reconstruct(shards)
                for i, r in zip(lost, rebuilt):
                    assert np.array_equal(r, full[i]), (k, m, size, lost, i)

    @pytest.mark.parametrize(("k", "m"), GRID)
    def test_more_than_m_lost_is_quorum_error(self, k: int, m: int) -> None:
        codec = ErasureCodec(k, m, self.backend)
        data = [_rand(8, i) for i in range(k)]
        full = data + codec.encode(data)
        for lost in itertools.combinations(range(k + m), m + 1):
            with pytest.raises(QuorumError):
                codec.reconstruct([None if i in lost else s for i, s in enumerate(full)])

    def test_xor_when_m_is_1(self) -> None:
        data = [_rand(1001, i) for i in range(5)]
        (parity,) = ErasureCodec(5, 1, self.backend).encode(data)
        assert np.array_equal(parity, np.bitwise_xor.reduce(np.stack(data)))

    def test_writes_into_reused_outputs(self) -> None:
        codec = ErasureCodec(4, 2, self.backend)
        out = [bytearray(200), np.zeros(300, np.uint8)]
        data = [_rand(150, i).tobytes() for i in range(4)]
        parity = codec.encode(data, out=out)
        assert np.shares_memory(parity[1], out[1])
        assert bytes(out[0][:150]) == parity[0].tobytes() and out[0][150:] == bytes(50)
        with pytest.raises(ValueError, match="writable"):
            codec.encode(data, out=[bytes(150), bytes(150)])
        with pytest.raises(ValueError, match="equal lengths"):
            codec.encode([*data[:3], b"x"])

    def test_explicit_lost_ignores_present_shard(self) -> None:
        codec = ErasureCodec(3, 2, self.backend)
        data = [_rand(64, i) for i in range(3)]
        full = data + codec.encode(data)
        damaged = [*full]
        damaged[1] = np.zeros(64, np.uint8)  # present but known bad
        (r,) = codec.reconstruct(damaged, lost=[1])
        assert np.array_equal(r, full[1])


class TestNumpyErasureCodec(ErasureCodecTests):
    backend = "numpy"


@needs_isal
class TestIsalErasureCodec(ErasureCodecTests):
    backend = "isal"


@needs_isal
@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 1000, (1 << 16) + 3])
def test_isal_and_numpy_parity_identical(size: int) -> None:
    for k, m in [(4, 2), (6, 3), (2, 1)]:
        data = [_rand(size, 100 + i) for i in range(k)]
        a = ErasureCodec(k, m, "isal").encode(data)
        b = ErasureCodec(k, m, "numpy").encode(data)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------- StripeCodec suite

SIZES = [0, 1, 5, 64 * 3 + 1, 1000]


class StripeCodecTests:
    backend = "numpy"

    def codec(self, k: int, m: int, stripe: int = 1 << 20, threads: int = 2) -> StripeCodec:
        return StripeCodec(k, m, stripe_bytes=stripe, backend=self.backend, threads=threads)

    @pytest.mark.parametrize(("k", "m"), GRID)
    def test_every_erasure_pattern_small_sizes(self, k: int, m: int) -> None:
        sc = self.codec(k, m, stripe=128)  # several stripes, a partial one at the end
        for size in SIZES:
            obj = _rand(size, size).tobytes()
            wire = [s.to_bytes() for s in sc.encode(obj, generation=3)]
            for lost in _erasures(k + m, m):
                shards = [None if i in lost else w for i, w in enumerate(wire)]
                assert sc.decode(shards, 3).tobytes() == obj, (k, m, size, lost)

    @pytest.mark.parametrize(("k", "m"), [(4, 2), (3, 1), (5, 3)])
    def test_large_object_every_pattern(self, k: int, m: int) -> None:
        obj = _rand(3 * (1 << 20) + 12345, k)
        sc = self.codec(k, m, stripe=256 << 10)
        shards = sc.encode(obj, generation=1)
        out = np.empty(len(obj) + 10, np.uint8)  # reused, larger than needed
        for lost in _erasures(k + m, m):
            got = sc.decode([None if i in lost else s for i, s in enumerate(shards)], 1, out=out)
            assert np.shares_memory(got, out) and np.array_equal(got, obj), lost

    @pytest.mark.parametrize("threads", [1, 3])
    def test_threads_give_identical_shards(self, threads: int) -> None:
        ref = self.codec(5, 3, stripe=64, threads=1)
        sc = self.codec(5, 3, stripe=64, threads=threads)
        for size in (0, 700, 5 * 64 * 7 + 13):  # short and empty data shards straddle ranges
            obj = _rand(size, size)
            want = [s.to_bytes() for s in ref.encode(obj, 2)]
            assert [s.to_bytes() for s in sc.encode(obj, 2)] == want
            for lost in [(0, 4, 7), (1, 2, 3), (5, 6)]:
                shards = [None if i in lost else w for i, w in enumerate(want)]
                assert np.array_equal(sc.decode(shards, 2), obj)
                assert [r.to_bytes() for r in sc.rebuild(shards, 2, lost)] == [
                    want[i] for i in lost]

    def test_data_shards_are_views_and_layout(self) -> None:
        obj = _rand(1000, 0)
        shards = self.codec(4, 2).encode(obj, 0)
        size = shard_len_for(1000, 4)
        assert size == 256 and [len(s.payload) for s in shards] == [256, 256, 256, 232, 256, 256]
        assert all(np.shares_memory(s.payload, obj) for s in shards[:4])
        assert shards[2].payload.tobytes() == obj[512:768].tobytes()

    def test_more_than_m_lost_is_quorum_error(self) -> None:
        sc = self.codec(4, 2)
        wire = [s.to_bytes() for s in sc.encode(_rand(999, 1), 5)]
        for lost in itertools.combinations(range(6), 3):
            with pytest.raises(QuorumError, match="needs 4 valid shards"):
                sc.decode([None if i in lost else w for i, w in enumerate(wire)], 5)

    @pytest.mark.parametrize("target", range(6))
    def test_flipped_bit_is_excluded(self, target: int) -> None:
        sc = self.codec(4, 2, stripe=256)
        obj = _rand(5000, 2).tobytes()
        wire = [bytearray(s.to_bytes()) for s in sc.encode(obj, 9)]
        wire[target][ShardHeader.SIZE + 700] ^= 0x10
        report: dict[int, str] = {}
        # Lose a data shard so that decoding needs parity: survivors are taken data first,
        # so the corrupted shard is read (and must be caught) unless it is the last parity.
        other = 1 if target == 0 else 0
        shards = [None if i == other else w for i, w in enumerate(wire)]
        assert sc.decode(shards, 9, report=report).tobytes() == obj
        assert report[other] == "missing"
        if target < 5:
            assert report[target] == "payload checksum mismatch"
        # With a third bad shard there is no quorum: an error, never garbage.
        shards[next(i for i in range(6) if i not in (target, other))] = None
        with pytest.raises(QuorumError, match="checksum mismatch"):
            sc.decode(shards, 9)

    def test_corrupted_header_and_stale_shard_excluded(self) -> None:
        sc = self.codec(3, 2)
        obj = _rand(777, 3).tobytes()
        new = [bytearray(s.to_bytes()) for s in sc.encode(obj, 8)]
        old = [s.to_bytes() for s in sc.encode(_rand(777, 4).tobytes(), 7)]
        new[0][5] ^= 1  # header byte (version field)
        shards = [new[0], old[1], *new[2:]]
        report: dict[int, str] = {}
        assert sc.decode(shards, 8, report=report).tobytes() == obj
        assert "header checksum" in report[0] and "stale" in report[1]
        with pytest.raises(QuorumError, match="stale"):
            sc.decode([new[0], old[1], old[2], *new[3:]], 8)

    def test_shard_in_wrong_slot_is_excluded(self) -> None:
        sc = self.codec(3, 1)
        wire = [s.to_bytes() for s in sc.encode(_rand(300, 5).tobytes(), 1)]
        with pytest.raises(QuorumError, match="belongs elsewhere"):
            sc.decode([wire[1], wire[0], wire[2], wire[3]], 1)

    def test_corrupted_in_memory_shard_object_excluded(self) -> None:
        sc = self.codec(4, 2)
        obj = _rand(4096, 6)
        shards = sc.encode(obj.copy(), 2)
        shards[0].payload[10] ^= 1  # the data shard is a view: corrupt the source itself
        out = sc.decode([*shards[:5], None], 2)
        assert np.array_equal(out, obj)

    @pytest.mark.parametrize("lost", [(0,), (5,), (1, 4), (3, 5)])
    def test_rebuild_recreates_identical_shards(self, lost: tuple[int, ...]) -> None:
        sc = self.codec(4, 2, stripe=512)
        obj = _rand(3001, 7)
        shards = sc.encode(obj, 11)
        wire = [s.to_bytes() for s in shards]
        rebuilt = sc.rebuild([None if i in lost else w for i, w in enumerate(wire)], 11, lost)
        assert [r.to_bytes() for r in rebuilt] == [wire[i] for i in lost]

    def test_parity_out_reused(self) -> None:
        sc = self.codec(4, 2)
        bufs = [np.empty(4096, np.uint8), np.empty(4096, np.uint8)]
        for seed in range(3):
            obj = _rand(4000 + seed, seed)
            shards = sc.encode(obj, seed, parity_out=bufs)
            assert np.shares_memory(shards[4].payload, bufs[0])
            assert np.array_equal(sc.decode([None, None, *shards[2:]], seed), obj)


class TestNumpyStripeCodec(StripeCodecTests):
    backend = "numpy"


@needs_isal
class TestIsalStripeCodec(StripeCodecTests):
    backend = "isal"


@needs_isal
def test_shards_decode_across_backends() -> None:
    obj = _rand(100_003, 8)
    shards = StripeCodec(4, 2, backend="isal").encode(obj, 1)
    got = StripeCodec(4, 2, backend="numpy").decode([None, *shards[1:3], None, *shards[4:]], 1)
    assert np.array_equal(got, obj)


@pytest.mark.parametrize(("la", "lb"), [(0, 0), (3, 0), (0, 7), (1000, 1), (5, 1 << 20)])
def test_crc32c_combine(la: int, lb: int) -> None:
    a, b = _rand(la, 1).tobytes(), _rand(lb, 2).tobytes()
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), lb) == crc32c.crc32c(a + b)


def test_shard_wire_format_errors() -> None:
    shard = StripeCodec(2, 1).encode(b"hello world", 4)[0]
    wire = shard.to_bytes()
    assert Shard.from_bytes(wire).header == shard.header
    with pytest.raises(IntegrityError, match="truncated"):
        Shard.from_bytes(wire[:20])
    with pytest.raises(IntegrityError, match="payload is"):
        Shard.from_bytes(wire[:-1])
    with pytest.raises(IntegrityError, match="not an erasure shard"):
        ShardHeader.unpack(b"XXXX" + wire[4:])
    bad = bytearray(wire)
    bad[ShardHeader.SIZE] ^= 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        Shard.from_bytes(bad).verify()
