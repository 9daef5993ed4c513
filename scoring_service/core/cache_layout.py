"""The Redis key layout and entry format, shared by the online service and the batch jobs.

Keys carry the model version, so a newly activated model never serves another model's scores,
and a *generation*, so a nightly run never exposes a half-written cache::

    fs:1:{model_version}:active                  -> the active generation id
    fs:1:{model_version}:{generation}:c:{id}     -> a customer's entry (JSON)
    fs:1:{model_version}:{generation}:t:{id}     -> a terminal's entry (JSON)
    fs:1:{model_version}:{generation}:manifest   -> the entities the generation holds (sealed, core.known_entities)

and, apart from both (raw payments, the same for every model version and generation)::

    fs:1:intraday:c:{id}                         -> the card's recent payments (sorted set, see below)

A batch run writes every entry under a fresh generation and, only when all are written, points
``active`` at it with one ``SET`` (atomic). Readers resolve the active generation first and then
read both entities of a payment with one ``MGET`` under that generation, so one answer never mixes
two runs. Entries expire after a TTL, which also removes superseded generations. Before any batch
run, a model version's generation is ``ONLINE_GENERATION``: entries the service writes back for
entities it scored itself.

Every entry is stored **sealed** (:func:`seal`): ``$m1$<key id>$<tag>$<entry JSON>``, the tag an
HMAC-SHA256 (``core.integrity``) over the key name and the JSON, so an entry copied to another
key, altered, or written by anyone without the MAC key does not verify (:func:`open_sealed`) and
is read as unseen. The online write-back and the batch writer seal; the online reader opens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from scoring_service.core.integrity import MacKeys

SCHEMA = "1"
ONLINE_GENERATION = "0"
DEFAULT_TTL_S = 3 * 86400

EntityKind = Literal["c", "t"]
EntryOrigin = Literal["batch", "online"]
BATCH: EntryOrigin = "batch"
ONLINE: EntryOrigin = "online"
CUSTOMER: EntityKind = "c"
TERMINAL: EntityKind = "t"


# Intraday state: every payment the service scores is added to its card's sorted set (score: the
# payment's epoch time; member: "<amount>|<transaction id>", so a retried transaction is one member
# and counts once). Kept as long as the cache entries (older members are trimmed on write) and at
# most INTRADAY_MAX_PAYMENTS per card (the newest).
INTRADAY_HORIZON_S = DEFAULT_TTL_S
INTRADAY_MAX_PAYMENTS = 1000


def intraday_key(customer_id: str) -> str:
    return f"fs:{SCHEMA}:intraday:{CUSTOMER}:{customer_id}"


def intraday_member(amount: float, transaction_id: str) -> str:
    return f"{float(amount)!r}|{transaction_id}"


def parse_intraday_member(member: bytes | str) -> tuple[float, str]:
    """(amount, transaction id) of a member written by :func:`intraday_member`."""
    text = member.decode() if isinstance(member, bytes) else member
    amount, _, transaction_id = text.partition("|")
    return float(amount), transaction_id


def active_generation_key(model_version: str) -> str:
    return f"fs:{SCHEMA}:{model_version}:active"


def entity_key(model_version: str, generation: str, kind: EntityKind, entity_id: str) -> str:
    return f"fs:{SCHEMA}:{model_version}:{generation}:{kind}:{entity_id}"


def manifest_key(model_version: str, generation: str) -> str:
    """The generation's sealed list of the entities it holds (``core.known_entities``)."""
    return f"fs:{SCHEMA}:{model_version}:{generation}:manifest"


def entity_of_key(key: bytes | str) -> tuple[EntityKind, str] | None:
    """(kind, id) of an :func:`entity_key` (None for any other key)."""
    text = key.decode() if isinstance(key, bytes) else key
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "fs" or parts[1] != SCHEMA or parts[4] not in (CUSTOMER, TERMINAL):
        return None
    return (CUSTOMER if parts[4] == CUSTOMER else TERMINAL), parts[5]


def generation_pattern(model_version: str, generation: str) -> str:
    """A SCAN pattern matching every entry of one generation (for clean-up and tests)."""
    return f"fs:{SCHEMA}:{model_version}:{generation}:*"


# ---- the seal: $m1$<key id>$<hex tag>$<payload>
SEAL_MARK = b"$m1$"
_TAG_HEX = 32  # core.integrity.TAG_BYTES, in hex


def _mac_message(key: bytes, payload: bytes) -> bytes:
    """What the tag covers: the key name (length-prefixed, so no two (key, payload) pairs collide) and the payload."""
    return b"%d:%s%s" % (len(key), key, payload)


def seal(keys: MacKeys, key: bytes | str, payload: bytes) -> bytes:
    """``payload`` (an encoded entry) as stored under ``key``: with the signing key's id and tag."""
    k = key.encode() if isinstance(key, str) else key
    key_id, tag = keys.sign(_mac_message(k, payload))
    return b"%s%s$%s$%s" % (SEAL_MARK, key_id, tag, payload)


def open_sealed(keys: MacKeys, key: bytes | str, raw: bytes) -> bytes | None:
    """The payload of a value read from ``key``, or None unless its seal verifies (unsealed,
    altered, moved from another key, signed by a key not configured)."""
    if not raw.startswith(SEAL_MARK):
        return None
    id_end = raw.find(b"$", len(SEAL_MARK))
    tag_end = id_end + 1 + _TAG_HEX
    if id_end < 0 or raw[tag_end: tag_end + 1] != b"$":
        return None
    payload = raw[tag_end + 1:]
    k = key.encode() if isinstance(key, str) else key
    if not keys.verify(raw[len(SEAL_MARK): id_end], _mac_message(k, payload), raw[id_end + 1: tag_end]):
        return None
    return payload


def unverified_payload(raw: bytes | str) -> bytes | str:
    """The entry of a stored value without checking its seal (tools and tests; the service verifies)."""
    if isinstance(raw, bytes) and raw.startswith(SEAL_MARK):
        id_end = raw.find(b"$", len(SEAL_MARK))
        return raw[id_end + 2 + _TAG_HEX:]
    return raw


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the cache knows of one entity, as of ``computed_at``.

    ``risk_score`` is the probability that the entity is compromised: the model's score for the
    entity's typical payment (``core.entity_scoring``, the one definition for the nightly, the
    replay and the online write-back), never one payment's score; ``reasons`` explain it.
    ``state`` holds the aggregates the features are computed from (``features.entity_states``).
    A ``batch`` entry's state covers the payments up to ``computed_at`` (the run's as-of): the
    card's intraday payments after it are merged on read (``features.intraday``). An ``online``
    entry (written back by the service for a card no batch run knows) records the state its risk
    was computed on; reads merge the card's intraday payments onto an empty state instead.
    """

    risk_score: float
    state: dict[str, float]
    model_version: str
    computed_at: float  # epoch seconds
    reasons: list[tuple[str, str, float]] = field(default_factory=list)
    generation: str = ONLINE_GENERATION
    origin: EntryOrigin = BATCH  # who computed it: a batch run (nightly, replay) or the online write-back

    def encode(self) -> bytes:
        return json.dumps(
            {
                "s": self.risk_score,
                "f": self.state,
                "m": self.model_version,
                "t": self.computed_at,
                "r": self.reasons,
                "g": self.generation,
                "o": self.origin,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> CacheEntry:
        """The entry of ``encode``'s JSON (a sealed value is read without checking its seal)."""
        d = json.loads(unverified_payload(raw))
        return cls(
            risk_score=float(d["s"]),
            state=d["f"],
            model_version=d["m"],
            computed_at=float(d["t"]),
            reasons=[(r[0], r[1], float(r[2])) for r in d.get("r", ())],
            generation=d.get("g", ONLINE_GENERATION),
            origin=ONLINE if d.get("o") == ONLINE else BATCH,
        )
