"""API keys and mTLS identities: who may call the service, with which scopes and rate limits.

A key is ``fsk_<32 random bytes, urlsafe base64>``: high-entropy, so a keyed hash is as good as a
slow one (nobody can guess a key to test against a stolen table) and costs one HMAC-SHA256 per
lookup instead of tens of milliseconds of scrypt. The table holds ``HMAC-SHA256(pepper, key)``,
never the key: a copy of the database alone (without the pepper, which lives in the
configuration) tells nothing about the keys. Several peppers may be accepted at once (rotation):
the first hashes new keys, all are tried on lookup (one ``IN`` query).

A row of kind ``mtls`` has no hash: its ``owner`` is a client certificate's subject CN (or a DNS
SAN), an identity the TLS handshake already proved; it carries scopes and limits like a key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import DateTime, Float, Integer, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from scoring_service.adapters.sql.db import Base, utcnow

SCOPES = ("score", "admin")
KINDS = ("key", "mtls")
KEY_PREFIX = "fsk_"


class KeyStoreError(Exception):
    """A key request that cannot be carried out (unknown id, bad scope)."""


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8), default="key")  # key | mtls
    owner: Mapped[str] = mapped_column(String(255))
    scopes: Mapped[str] = mapped_column(String(255))  # space-separated
    key_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    rate_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: the server's default
    burst: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the key (or mTLS identity) row, detached."""

    key_id: int
    kind: str
    owner: str
    scopes: frozenset[str]
    rate_per_s: float | None
    burst: int | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> Principal:
        return cls(row.id, row.kind, row.owner, frozenset(row.scopes.split()), row.rate_per_s, row.burst,
                   row.created_at, row.revoked_at)

    @property
    def identity(self) -> str:
        """What the audit log records: ``key:<id>:<owner>`` or ``mtls:<id>:<cn>``."""
        return f"{self.kind}:{self.key_id}:{self.owner}"


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The ``api_keys`` table; ``peppers[0]`` hashes new keys, every pepper is accepted on lookup."""

    def __init__(self, engine: Engine, peppers: list[bytes]) -> None:
        if not peppers or any(len(p) < 16 for p in peppers):
            raise ValueError("key pepper: give at least one secret of 16 bytes or more")
        self.engine = engine
        self.peppers = peppers

    def hashes(self, secret: str) -> list[str]:
        return [hmac.new(p, secret.encode(), hashlib.sha256).hexdigest() for p in self.peppers]

    def create(self, owner: str, scopes: list[str], *, rate_per_s: float | None = None, burst: int | None = None,
               mtls: bool = False) -> tuple[Principal, str | None]:
        """A new key (the secret is returned once, never stored) or mTLS identity ``owner`` (secret None)."""
        bad = [s for s in scopes if s not in SCOPES]
        if not scopes or bad:
            raise KeyStoreError(f"--scope must be one or more of {', '.join(SCOPES)}, got {' '.join(scopes) or 'none'}")
        if not owner.strip() or len(owner) > 255:
            raise KeyStoreError("--owner must be 1 to 255 characters")
        if (rate_per_s is not None and rate_per_s <= 0) or (burst is not None and burst < 1):
            raise KeyStoreError("--rate must be > 0 and --burst >= 1")
        secret = None if mtls else new_secret()
        with Session(self.engine) as session, session.begin():
            row = ApiKey(kind="mtls" if mtls else "key", owner=owner, scopes=" ".join(sorted(set(scopes))),
                         key_hash=None if secret is None else self.hashes(secret)[0], rate_per_s=rate_per_s, burst=burst)
            session.add(row)
            session.flush()
            return Principal.of(row), secret

    def entries(self) -> list[Principal]:
        with Session(self.engine) as session:
            return [Principal.of(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.id))]

    def revoke(self, key_id: int) -> Principal:
        with Session(self.engine) as session, session.begin():
            row = session.get(ApiKey, key_id)
            if row is None:
                raise KeyStoreError(f"no key {key_id}; see `fraudscore keys list`")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return Principal.of(row)

    def by_secret(self, secret: str) -> Principal | None:
        """The key whose hash matches ``secret`` (revoked or not), else None."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            return None
        with Session(self.engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.kind == "key", ApiKey.key_hash.in_(self.hashes(secret))))
            return Principal.of(row) if row else None

    def by_mtls(self, names: list[str]) -> Principal | None:
        """The newest unrevoked mTLS identity among a certificate's names (CN, SANs), else None."""
        if not names:
            return None
        with Session(self.engine) as session:
            row = session.scalar(
                select(ApiKey).where(ApiKey.kind == "mtls", ApiKey.owner.in_(names), ApiKey.revoked_at.is_(None))
                .order_by(ApiKey.id.desc())
            )
            return Principal.of(row) if row else None


def pepper_file(path: Path) -> bytes:
    """The pepper kept in ``path`` (created, mode 0600, with 32 random bytes on first use)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        except FileExistsError:
            pass  # another process made it first
    return path.read_text().strip().encode()
