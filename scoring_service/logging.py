"""structlog set-up: JSON in production, readable lines in a terminal; ids keyed-hashed, secrets never.

One processor (:func:`redact`), before the renderer, is the single place log events are cleaned:

* ids: ``hash_id`` is an HMAC-SHA256 keyed by the log id key (``set_log_id_key``; until one is
  set, a random key of this process), so a log line's card id cannot be recovered by hashing
  candidates; fields named ``customer_id``, ``terminal_id`` or ``card_id`` are hashed here.
* ``request_id`` / ``transaction_id``: runs of 12 or more digits (a card number put there) become
  ``[digits]``, then at most 64 characters are kept.
* secrets: fields named like one (password, secret, token, api key, authorization, MAC or pepper
  key) are replaced by ``[redacted]``; in every string, a URL's password becomes ``***`` and every
  value registered with :func:`register_secret` (the Redis password, the MAC and log keys)
  becomes ``[redacted]``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

_configured = False
_id_mac = hmac.new(secrets.token_bytes(32), digestmod=hashlib.sha256)  # until set_log_id_key
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None

MAX_REQUEST_ID = 64
REDACTED = "[redacted]"
_ID_FIELDS = frozenset({"customer_id", "terminal_id", "card_id"})
_SANITISED_FIELDS = frozenset({"request_id", "transaction_id"})
_SECRET_FIELD = re.compile(r"(^|[_-])(pass|password|passwd|secrets?|token|api[_-]?key|apikey|authorization|"
                           r"mac_keys?|pepper|log_id_key)($|[_-])", re.IGNORECASE)
_DIGIT_RUN = re.compile(r"\d{12,}")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")


def set_log_id_key(key: str | bytes) -> None:
    """The key of :func:`hash_id` (``FRAUDSCORE_LOG_ID_KEY``, or the data directory's); registered as a secret."""
    global _id_mac
    raw = key.encode() if isinstance(key, str) else key
    _id_mac = hmac.new(raw, digestmod=hashlib.sha256)
    if isinstance(key, str):
        register_secret(key)


def register_secret(value: str | None) -> None:
    """Never let ``value`` appear in a log line (values under 6 characters are not worth matching)."""
    global _secret_pattern
    if not value or len(value) < 6 or value in _secrets:
        return
    _secrets.add(value)
    alternatives = sorted(_secrets, key=len, reverse=True)
    _secret_pattern = re.compile("|".join(re.escape(s) for s in alternatives))


def hash_id(entity_id: str) -> str:
    """A short keyed digest of an id, for logs: correlatable with the key, not recoverable without it."""
    m = _id_mac.copy()
    m.update(entity_id.encode())
    return m.hexdigest()[:16]


def sanitise_request_id(value: str) -> str:
    """A caller's id as logged: digit runs that could be card numbers removed, at most 64 characters."""
    return _DIGIT_RUN.sub("[digits]", value)[:MAX_REQUEST_ID]


def scrub(text: str) -> str:
    """``text`` without URL passwords and registered secrets."""
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    if _secret_pattern is not None:
        text = _secret_pattern.sub(REDACTED, text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_FIELD.search(str(k)) else _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor: keyed-hash ids, sanitise request ids, remove secrets (see the module doc)."""
    for key, value in event_dict.items():
        if key in _ID_FIELDS and value is not None:
            event_dict[key] = hash_id(str(value))
        elif key in _SANITISED_FIELDS and isinstance(value, str):
            event_dict[key] = sanitise_request_id(scrub(value))
        elif _SECRET_FIELD.search(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _clean(value)
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write, not at configuration: a command
    run twice in one process (tests, embedding) must not keep writing to a stream closed since."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


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
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)
