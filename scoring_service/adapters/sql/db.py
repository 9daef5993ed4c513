"""Durable state in SQL (SQLAlchemy 2; schema owned by the Alembic migrations in ``migrations/``).

SQLite is the embedded default, PostgreSQL the production one; the same code serves both.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

REPO_ROOT = Path(__file__).resolve().parents[3]  # scoring_service/adapters/sql/db.py -> the repository root
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    framework: Mapped[str] = mapped_column(String(16))
    artifact_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    feature_names: Mapped[list[str]] = mapped_column(JSON)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="shadow")  # active | shadow | retired
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BatchRun(Base):
    __tablename__ = "batch_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(32))  # nightly | replay
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | succeeded | failed
    model_version: Mapped[str] = mapped_column(String(64))
    generation: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    window_end: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    events_consumed: Mapped[int] = mapped_column(BigInteger, default=0)
    dead_letters: Mapped[int] = mapped_column(BigInteger, default=0)
    entities_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    keys_written: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BatchOffset(Base):
    """The offsets a run consumed, per topic partition: [start_offset, end_offset)."""

    __tablename__ = "batch_offsets"
    __table_args__ = (UniqueConstraint("run_id", "topic", "partition"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("batch_runs.id", ondelete="CASCADE"))
    topic: Mapped[str] = mapped_column(String(255))
    partition: Mapped[int] = mapped_column(Integer)
    start_offset: Mapped[int] = mapped_column(BigInteger)
    end_offset: Mapped[int] = mapped_column(BigInteger)


class AuditEvent(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DatabaseUnavailable(Exception):
    """The database cannot be reached: the connection was refused, timed out or broke.

    Raised instead of the driver's error (one line that names the database, its password hidden),
    so that ``serve`` can exit with a clear message and the registry watcher can count a failed poll
    and try again at the next one."""


def display_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: say nothing of it rather than leak it
        return "(unparsable database URL)"


def _unavailable(url: str, exc: BaseException) -> DatabaseUnavailable:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DatabaseUnavailable(f"database {display_url(url)} is unreachable: {first}")


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True, **kwargs)

    @event.listens_for(engine, "handle_error")
    def _connection_errors(context: ExceptionContext) -> None:
        # No connection yet (connect refused / timed out) or one that broke: DatabaseUnavailable.
        # Errors of a statement on a live connection (constraint, syntax, a locked SQLite) stay as they are,
        # and so does a failed pre-ping: the pool then drops that connection and opens a new one.
        if context.is_pre_ping:
            return
        if context.connection is None or context.is_disconnect:
            raise _unavailable(url, context.original_exception) from None

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def check_reachable(url: str) -> None:
    """Connect once: :class:`DatabaseUnavailable` (one line naming the database) when that fails."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def upgrade_schema(url: str) -> None:
    """Bring the database to the newest migration (Alembic ``upgrade head``); DatabaseUnavailable
    when it cannot be reached."""
    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_reachable(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
