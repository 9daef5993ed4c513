"""Keyed MACs of cache entries: HMAC-SHA256 tags, truncated to 128 bits, with key rotation.

Anyone who can write to Redis (a foothold on its network, a leaked password) could otherwise
rewrite a card's cached risk: one ``SET`` turned a DECLINE into an APPROVE. Every entry the
service and the batch jobs write is therefore sealed with a key only they hold, and every read
checks the seal (``core.cache_layout.seal`` / ``open_sealed``); an entry that does not verify is
treated as unseen and scored by the model.

Keys are ``id:secret`` pairs (``FRAUDSCORE_CACHE_MAC_KEYS="k2:...,k1:..."``): the first signs, all
verify. The key id travels with the tag, so a read computes one HMAC, never one per key. Rotation:
add the new key first on every reader, then make it the signer, and drop the old one once every
entry it signed has expired (the cache TTL) or been rewritten (the next nightly run).

128-bit tags: forging one is a 2^-128 guess per try; the full 256 bits would only lengthen every
entry by 32 hex characters.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

__all__ = ["MIN_SECRET_BYTES", "TAG_BYTES", "MacKeyError", "MacKeys", "generate_secret"]

TAG_BYTES = 16
MIN_SECRET_BYTES = 16
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class MacKeyError(ValueError):
    """A key list that cannot be used (the message names the entry, never the secret)."""


def generate_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


class MacKeys:
    """The MAC keys: the first signs, every one verifies. ``repr`` shows the key ids only."""

    __slots__ = ("_macs", "signing_id")

    def __init__(self, pairs: Sequence[tuple[str, bytes]]) -> None:
        if not pairs:
            raise MacKeyError("no MAC key: expected at least one id:secret")
        macs: dict[bytes, hmac.HMAC] = {}
        for key_id, secret in pairs:
            if not _KEY_ID.fullmatch(key_id):
                raise MacKeyError(f"MAC key id {key_id[:40]!r}: use 1-32 letters, digits, '_', '.' or '-'")
            if len(secret) < MIN_SECRET_BYTES:
                raise MacKeyError(f"MAC key {key_id!r}: the secret must be at least {MIN_SECRET_BYTES} bytes")
            if key_id.encode() in macs:
                raise MacKeyError(f"MAC key id {key_id!r} appears twice")
            macs[key_id.encode()] = hmac.new(secret, digestmod=hashlib.sha256)
        self._macs = macs
        self.signing_id: bytes = pairs[0][0].encode()

    @classmethod
    def parse(cls, spec: str, setting: str = "FRAUDSCORE_CACHE_MAC_KEYS") -> MacKeys:
        """``"id:secret,id2:secret2"`` (the first signs); MacKeyError naming ``setting`` if malformed."""
        pairs = []
        for i, item in enumerate((p.strip() for p in spec.split(",")), start=1):
            if not item:
                continue
            key_id, sep, secret = item.partition(":")
            if not sep or not key_id:
                raise MacKeyError(f"{setting}: entry {i} is not id:secret")
            pairs.append((key_id.strip(), secret.encode()))
        try:
            return cls(pairs)
        except MacKeyError as exc:
            raise MacKeyError(f"{setting}: {exc}") from None

    @property
    def key_ids(self) -> list[str]:
        return [k.decode() for k in self._macs]

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        """(the signing key's id, the hex tag of ``message``)."""
        return self.signing_id, self._tag(self._macs[self.signing_id], message)

    def verify(self, key_id: bytes, message: bytes, tag_hex: bytes) -> bool:
        """True only if ``tag_hex`` is ``message``'s tag under the key ``key_id`` (unknown id: False)."""
        mac = self._macs.get(key_id)
        if mac is None:
            return False
        return hmac.compare_digest(self._tag(mac, message), tag_hex)

    @staticmethod
    def _tag(mac: hmac.HMAC, message: bytes) -> bytes:
        m = mac.copy()  # the key's inner/outer pads are hashed once, at construction
        m.update(message)
        return m.digest()[:TAG_BYTES].hex().encode()

    def __repr__(self) -> str:
        return f"MacKeys(signing={self.signing_id.decode()!r}, ids={self.key_ids!r})"
