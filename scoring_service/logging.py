"""structlog set-up: JSON in production, readable lines in a terminal; ids hashed, never raw."""

from __future__ import annotations

import hashlib
import logging
import sys

import structlog

_configured = False


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    global _configured
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)


def hash_id(entity_id: str) -> str:
    """A short stable digest of an id, for logs: correlatable, not reversible by reading."""
    return hashlib.blake2b(entity_id.encode(), digest_size=6, person=b"fraudscore").hexdigest()
