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

Every line is written whole (docs/observability.md, "Every log line whole"): one ``write()`` of
the line and its newline (:func:`write_whole`), and the worker processes' stderr carried to their
parent by :class:`LogRelay`, the sink's only writer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import select
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

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


PIPE_BUF = select.PIPE_BUF  # a write to a pipe up to this size is never split by the kernel (Linux: 4096)
_write_lock = threading.Lock()  # this process's writers (the log, the relay) never split each other's lines
_relay_fallback: int | None = None  # in a relayed worker: the stderr it inherited, for when its parent is gone


def write_whole(data: bytes) -> None:
    """Write ``data`` (whole lines, newline included) to the current ``sys.stderr`` in one ``write()``.

    The rule of docs/observability.md, "Every line whole": one system call per line, so another
    process appending to the same file (``O_APPEND``, or the descriptor shared since a fork) can
    never land inside it; a pipe keeps writes up to :data:`PIPE_BUF` whole, and the worker
    processes of ``fraudscore serve`` write theirs through :class:`LogRelay` so the parent is the
    pipe's only writer. A short write (a full pipe interrupted by a signal) is finished at once,
    still under the lock. A stream with no descriptor (a test's StringIO) gets one ``write()``.
    """
    stream = sys.stderr
    with _write_lock:
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
            return
        stream.flush()  # anything the process printed before this line stays before it
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except InterruptedError:
                continue
            except BrokenPipeError:
                if fd != 2 or _relay_fallback is None:
                    raise
                os.dup2(_relay_fallback, 2)  # the relaying parent is gone: write where it wrote


class _LineLogger:
    """structlog's logger: each rendered event becomes one whole line (:func:`write_whole`).

    structlog's ``PrintLogger`` calls ``print()``, which writes the text and its newline in two
    calls: with ``PYTHONUNBUFFERED`` (our image and many CI runners set it) two processes'
    events landed on one line and the newlines after them (issue 27).
    """

    def msg(self, message: str) -> None:
        write_whole(message.encode("utf-8", "replace") + b"\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def _line_logger(*_args: Any) -> _LineLogger:
    return _LineLogger()


class LogRelay:
    """The parent's side of its worker processes' stderr: each worker writes into a pipe of its own,
    and one thread per worker copies complete lines to the parent's stderr with :func:`write_whole`.

    So the sink (a file, a pipe to Docker or Kubernetes, a terminal) has one writer however many
    workers there are and however long a line is (a traceback, a 100 KiB event): a line is copied
    only once its newline arrived, never cut by another's. Whatever else a worker writes on its
    stderr (warnings, grpc-core's own lines, a crash's traceback) takes the same path; a last line
    without a newline, from a worker that died mid-write, is finished with one. The cost is the
    parent's: one read and one write per burst of lines (every complete line read goes in one write).
    """

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def process(self, ctx: SpawnContext | ForkContext, target: Callable[..., object], args: tuple[Any, ...] = (),
                name: str | None = None, daemon: bool | None = None) -> BaseProcess:
        """Start ``target(*args)`` in a process of ``ctx`` (spawn or fork) whose stderr is relayed."""
        read_fd, write_fd = os.pipe()
        thread = threading.Thread(target=self._copy, args=(read_fd,), name=f"log-relay-{read_fd}", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        stderr = Connection(write_fd, readable=False)  # passed to a spawned child like any Connection
        proc = ctx.Process(target=_relayed, name=name, args=(stderr, target, *args), daemon=daemon)
        try:
            proc.start()
        finally:
            stderr.close()  # the child's copy is the only one left: its exit is the relay's end-of-file
        return proc

    def _copy(self, fd: int) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, self.CHUNK)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                pending += chunk
                end = pending.rfind(b"\n") + 1
                if end:  # every complete line read so far, in one write
                    write_whole(pending[:end])
                    pending = pending[end:]
        finally:
            if pending:
                write_whole(pending + b"\n")
            os.close(fd)

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait until every worker's last line has been copied (their pipes closed), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _relayed(stderr: Connection, target: Callable[..., object], *args: Any) -> None:
    """A relayed process's first step: its descriptor 2 becomes the relay's pipe, then ``target`` runs."""
    global _relay_fallback
    _relay_fallback = os.dup(2)
    os.dup2(stderr.fileno(), 2)
    stderr.close()
    target(*args)


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
        logger_factory=_line_logger,
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)
