"""RESP2 request encoding: the one encoder of this package.

Both Redis paths of the service send what is built here: the asyncio client of the request path
(``resp.PipelinedRedis``: :func:`pack`, :func:`pack_many`) and the bulk generation writer
(``cache_writer``: :func:`pack_set_ex_many`). A command is a RESP2 array of bulk strings; ``str``
arguments are sent UTF-8 encoded, ``bytes`` as they are, numbers as their ``str()``, exactly as
redis-py packs them.

:func:`pack_set_ex_many` is the bulk writer's fast path: millions of ``SET key value EX ttl`` per
nightly run, so the command's fixed parts (and the TTL) are formatted once per chunk and each item
costs one ``%`` of a prepared template (redis-py's per-command packing is the bottleneck at these
rates; see bench/cache_write.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Arg = bytes | str | int | float

__all__ = ["Arg", "pack", "pack_many", "pack_set_ex_many"]


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def pack_many(commands: Iterable[Sequence[Arg]]) -> bytes:
    """A pipeline: the commands one after the other, in one buffer."""
    return b"".join([pack(c) for c in commands])


def pack_set_ex_many(items: Iterable[tuple[bytes, bytes]], ttl_s: int) -> bytes:
    """``SET key value EX ttl_s`` for every (key, value), pipelined: equal to
    ``pack_many(("SET", k, v, "EX", int(ttl_s)) for k, v in items)``, several times faster."""
    ttl = str(int(ttl_s)).encode()
    # The TTL is fixed per call: bake it into the template (digits only, so no "%" to escape).
    template = b"*5\r\n$3\r\nSET\r\n$%%d\r\n%%s\r\n$%%d\r\n%%s\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)
    return b"".join([template % (len(k), k, len(v), v) for k, v in items])
