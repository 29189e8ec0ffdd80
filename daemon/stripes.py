"""Rotated-stripe geometry of one erasure group for one step (pure: no I/O).

An erasure group has ``n`` members (daemons, in the order ``form_groups`` gives) and a
parameter ``m``; ``k = n - m``.  Each member's *protected payload* (the rank-ordered
concatenation of the snapshots it holds for the step) is cut into ``k`` blocks of
``block_bytes`` each, one common size for the whole group and step::

    block_bytes = ceil(max(sizes) / k), rounded up to 64 bytes

A shorter payload is zero-extended (virtually: nobody stores the zeros).  There are ``n``
stripes; stripe ``j`` is one RS(k, m) code word whose shard ``s`` is held by member
``(j + s) mod n``:

* shards ``s = p < k`` are data: block ``p`` of member ``(j + p) mod n``, in place in
  that member's snapshots;
* shards ``s = k + q`` are parity row ``q``, computed and stored by member
  ``(j + k + q) mod n``.

So every member holds exactly one shard of every stripe: its own k data blocks (one per
stripe ``j = (i - p) mod n``) and m parity blocks (extra memory ``m / (n - m)``), and
losing any m members loses at most m shards of any stripe, which RS(k, m) tolerates.
Stripes are processed in *pieces* of ``piece_bytes`` (the unit of transfer, checksum and
decoding, so memory stays at a few pieces whatever the payload size).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ALIGN = 64  # block size multiple: keeps every block cache-line aligned in a payload
DEFAULT_PIECE_BYTES = 1 << 20


@dataclass(frozen=True)
class Span:
    """Bytes ``[payload_offset, payload_offset + length)`` of a member's payload: they are
    bytes ``[block_offset, block_offset + length)`` of its data block ``block`` (shard
    index ``block``) in stripe ``stripe``."""

    stripe: int
    block: int
    block_offset: int
    payload_offset: int
    length: int


@dataclass(frozen=True)
class StripeGeometry:
    """Where every block of one group's step lives (see the module docstring).

    ``members``: node names in group order (the same on every member: sort them, as
    ``form_groups`` does); ``m``: parity shards per stripe; ``sizes``: each member's
    payload bytes (a mapping by name, or a sequence in member order); ``piece_bytes``:
    the piece size (a multiple of 64).  Immutable; every member must build an equal one
    (compare ``digest``), which is why it serializes with ``to_json``.
    """

    members: tuple[str, ...]
    m: int
    sizes: tuple[int, ...]
    piece_bytes: int = DEFAULT_PIECE_BYTES
    block_bytes: int = field(init=False)

    def __init__(self, members: Sequence[str], m: int, sizes: Mapping[str, int] | Sequence[int],
                 piece_bytes: int = DEFAULT_PIECE_BYTES) -> None:
        names = tuple(members)
        if isinstance(sizes, Mapping):
            missing = [x for x in names if x not in sizes]
            if missing or len(sizes) != len(names):
                raise ValueError(f"sizes must name exactly the members {names}, "
                                 f"got {sorted(sizes)}")
            size_t = tuple(int(sizes[x]) for x in names)
        else:
            size_t = tuple(int(s) for s in sizes)
        if len(set(names)) != len(names) or not all(isinstance(x, str) and x for x in names):
            raise ValueError(f"members must be distinct non-empty names, got {names}")
        if not 0 <= m < len(names) or len(names) > 256:
            raise ValueError(f"need 0 <= m < n <= 256, got n={len(names)}, m={m}")
        if len(size_t) != len(names) or any(s < 0 for s in size_t):
            raise ValueError(f"need one size >= 0 per member, got {size_t}")
        if piece_bytes <= 0 or piece_bytes % ALIGN:
            raise ValueError(f"piece_bytes must be a positive multiple of {ALIGN}")
        k = len(names) - m
        per = -(-max(size_t, default=0) // k)
        object.__setattr__(self, "members", names)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "sizes", size_t)
        object.__setattr__(self, "piece_bytes", piece_bytes)
        object.__setattr__(self, "block_bytes", -(-per // ALIGN) * ALIGN)

    # -- shape

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def k(self) -> int:
        return self.n - self.m

    @property
    def pieces(self) -> int:
        """Pieces per block (0 for an all-empty step)."""
        return -(-self.block_bytes // self.piece_bytes)

    def piece(self, t: int) -> tuple[int, int]:
        """Block-relative ``[start, end)`` of piece ``t``."""
        if not 0 <= t < self.pieces:
            raise IndexError(f"piece {t} outside [0, {self.pieces})")
        start = t * self.piece_bytes
        return start, min(start + self.piece_bytes, self.block_bytes)

    def index(self, node: str) -> int:
        """Position of ``node`` in the group; ``KeyError`` if it is not a member."""
        try:
            return self.members.index(node)
        except ValueError:
            raise KeyError(f"{node!r} is not a member of the group {list(self.members)}") from None

    def size(self, node: str) -> int:
        return self.sizes[self.index(node)]

    # -- placement

    def stripe(self, j: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(data members in block order p = 0..k-1, parity members in row order q = 0..m-1)."""
        self._check_stripe(j)
        n, k = self.n, self.k
        data = tuple(self.members[(j + p) % n] for p in range(k))
        parity = tuple(self.members[(j + k + q) % n] for q in range(self.m))
        return data, parity

    def holder(self, j: int, shard: int) -> str:
        """The member holding shard ``shard`` (data ``p`` or parity ``k + q``) of stripe ``j``."""
        self._check_stripe(j)
        if not 0 <= shard < self.n:
            raise IndexError(f"shard {shard} outside [0, {self.n})")
        return self.members[(j + shard) % self.n]

    def shard_of(self, node: str, j: int) -> int:
        """The shard index ``node`` holds in stripe ``j`` (< k: its data block of that number)."""
        self._check_stripe(j)
        return (self.index(node) - j) % self.n

    def data_blocks(self, node: str) -> list[tuple[int, int]]:
        """``[(stripe, p)]`` for p = 0..k-1: where each of ``node``'s data blocks is coded."""
        i = self.index(node)
        return [((i - p) % self.n, p) for p in range(self.k)]

    def parity_blocks(self, node: str) -> list[tuple[int, int]]:
        """``[(stripe, q)]``: the parity rows ``node`` computes and stores."""
        i = self.index(node)
        return [((i - self.k - q) % self.n, q) for q in range(self.m)]

    def valid_bytes(self, node: str, p: int, start: int, end: int) -> int:
        """Bytes of block ``p``'s ``[start, end)`` that lie inside ``node``'s payload; the
        rest of the range is the virtual zero extension."""
        first = p * self.block_bytes + start
        return max(0, min(end - start, self.size(node) - first))

    def spans(self, node: str, start: int, end: int) -> list[Span]:
        """Bytes ``[start, end)`` of ``node``'s payload as per-block spans, in order.

        ``end`` may reach ``k * block_bytes`` (into the zero extension) but no further.
        """
        i = self.index(node)
        limit = self.k * self.block_bytes
        if not 0 <= start <= end <= limit:
            raise ValueError(f"range [{start}, {end}) outside [0, {limit}) of {node!r}'s blocks")
        out, pos, b = [], start, self.block_bytes
        while pos < end:
            p, off = divmod(pos, b)
            n = min(b - off, end - pos)
            out.append(Span((i - p) % self.n, p, off, pos, n))
            pos += n
        return out

    def _check_stripe(self, j: int) -> None:
        if not 0 <= j < self.n:
            raise IndexError(f"stripe {j} outside [0, {self.n})")

    # -- identity

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (inverse: :meth:`from_json`); stored with every parity block."""
        return {"members": list(self.members), "m": self.m, "sizes": list(self.sizes),
                "piece_bytes": self.piece_bytes}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StripeGeometry:
        """Parse :meth:`to_json`'s output; ``ValueError`` if it is malformed."""
        try:
            members, m, sizes = obj["members"], obj["m"], obj["sizes"]
            piece = obj.get("piece_bytes", DEFAULT_PIECE_BYTES)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed stripe geometry: {e}") from None
        if not (isinstance(members, list) and all(isinstance(x, str) for x in members)
                and isinstance(sizes, list) and all(type(s) is int for s in sizes)
                and type(m) is int and type(piece) is int):
            raise ValueError("malformed stripe geometry")
        return cls(members, m, sizes, piece)

    @property
    def digest(self) -> int:
        """64-bit fingerprint of the geometry: parity blocks of another geometry (other
        members, sizes or pieces) carry another digest and are never mixed in."""
        raw = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little")
