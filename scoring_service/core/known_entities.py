"""Which cards and terminals a batch generation knows: the evidence Redis write access cannot erase.

The seal of an entry (``cache_layout.seal``) stops a forged *risk*, not a forged *absence*: after a
``DEL`` of a card's batch entry (or a ``SET`` of an unsealed value, which the reader rejects, or an
eviction under memory pressure) the card looked new, went to the model without its history, and a
card the nightly declined at 0.99 was approved at 0.001 (issue 21). So every batch generation
carries a **manifest**: the set of the entities it wrote, sealed with the batch's MAC key under
the generation's own key name (``cache_layout.manifest_key``), written before the generation is
switched on. The scorer loads and verifies it at each switch and holds it in memory; an entity the
manifest names whose entry is missing or rejected is *known, state lost*: answered degraded, at
least the configured floor (REVIEW), counted, never scored as a new card and never written back.

Form: the sorted array of 64-bit digests (BLAKE2b) of ``"<kind>:<id>"``, 8 bytes an entity (10 M
cards and terminals: 80 MB per process), looked up by binary search (~1-2 us, and only on a
miss: a hit needs no evidence). Exact but for digest collisions (n^2 / 2^65: 3e-6 at 10 M); a
Bloom filter would take ~3.6 bytes an entity at a 1e-6 false-positive rate, each false positive
a new card answered REVIEW until the next nightly, which is why the exact form was chosen first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

FORMAT = b"fsk1"  # the payload's first bytes: the format of what follows (8-byte little-endian digests)


def entity_digest(kind: str, entity_id: str) -> int:
    """The 64-bit digest an entity is known by (``kind``: ``c`` or ``t``)."""
    return int.from_bytes(hashlib.blake2b(f"{kind}:{entity_id}".encode(), digest_size=8).digest(), "little")


class KnownEntities:
    """An immutable set of entity digests (``contains`` by binary search)."""

    __slots__ = ("_digests",)

    def __init__(self, digests: np.ndarray) -> None:
        self._digests = np.unique(np.asarray(digests, dtype=np.uint64))  # sorted, no duplicates

    @classmethod
    def of(cls, entities: Iterable[tuple[str, str]]) -> KnownEntities:
        """From (kind, id) pairs."""
        return cls(np.fromiter((entity_digest(k, i) for k, i in entities), dtype=np.uint64))

    @classmethod
    def empty(cls) -> KnownEntities:
        return cls(np.empty(0, dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._digests.size)

    def contains(self, kind: str, entity_id: str) -> bool:
        if not self._digests.size:
            return False
        d = np.uint64(entity_digest(kind, entity_id))
        i = int(np.searchsorted(self._digests, d))
        return i < self._digests.size and self._digests[i] == d

    def encode(self) -> bytes:
        return FORMAT + self._digests.astype("<u8").tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> KnownEntities:
        """The set of :meth:`encode`'s bytes; ValueError for anything else."""
        if not payload.startswith(FORMAT) or (len(payload) - len(FORMAT)) % 8:
            raise ValueError("not a known-entities manifest")
        return cls(np.frombuffer(payload, dtype="<u8", offset=len(FORMAT)))
