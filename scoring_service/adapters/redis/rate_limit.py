"""Per-caller token buckets shared by every worker and replica through Redis.

One Lua script (``EVALSHA``, loaded on first use) refills and takes from the bucket of one key id
in a single round trip, on Redis' clock (``TIME``), so the processes' clocks do not matter and two
workers never both spend the last token. The bucket is a hash ``fs:rl:<key id>`` (tokens, last
refill in ms) that expires once it would be full again.

When Redis does not answer (down, timeout, refused), the limit falls back to a bucket per process
with the same rate and size, and Redis is tried again after ``retry_after_s``: the limit fails
open to "per process" (N workers admit up to N times the rate) rather than refusing every caller
because the cache is down. Authentication never depends on Redis.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

from prometheus_client import Counter

from scoring_service.adapters.redis.cluster import ClusterRedis
from scoring_service.adapters.redis.resp import PipelinedRedis, RedisReplyError
from scoring_service.logging import get_logger

log = get_logger(__name__)

LOCAL_FALLBACK = Counter("fraudscore_rate_limit_local_total", "Rate-limit decisions taken per process (Redis unreachable).")

TOKEN_BUCKET = b"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(math.max(now, ts)))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""
TOKEN_BUCKET_SHA = hashlib.sha1(TOKEN_BUCKET).hexdigest()


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_ms: int  # when refused: how long until enough tokens are back
    shared: bool  # decided by the shared (Redis) bucket; False: this process' own


class _LocalBucket:
    __slots__ = ("tokens", "ts")

    def __init__(self, burst: int) -> None:
        self.tokens = float(burst)
        self.ts = time.monotonic()

    def take(self, rate: float, burst: int, cost: int) -> Verdict:
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.ts) * rate)
        self.ts = now
        if self.tokens >= cost:
            self.tokens -= cost
            return Verdict(True, 0, False)
        return Verdict(False, math.ceil((cost - self.tokens) * 1000 / rate), False)


class RateLimiter:
    """``await limiter.take(key_id, rate, burst, cost)``: a Verdict from the shared bucket (or this process')."""

    def __init__(self, url: str | None, *, timeout_s: float = 0.05, retry_after_s: float = 1.0,
                 cluster: bool = False) -> None:
        # a Redis Cluster: each key's bucket on the node that owns its slot (EVALSHA routes by its key)
        self._redis: PipelinedRedis | ClusterRedis | None = (
            None if not url else ClusterRedis(url) if cluster else PipelinedRedis(url))
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._local: dict[int, _LocalBucket] = {}

    async def take(self, key_id: int, rate: float, burst: int, cost: int = 1) -> Verdict:
        """Take ``cost`` tokens (a ScoreBatch: one per payment) from the bucket of ``key_id``.

        ValueError for a cost past the burst: the bucket never holds that much, so it would be
        refused with a pushback that no wait honours (the caller refuses such a call itself, with
        a status that says why: online/auth.py)."""
        if cost > burst:
            raise ValueError(f"a cost of {cost} tokens is more than the bucket's {burst}")
        if self._redis is not None and time.monotonic() >= self._down_until:
            try:
                return await self._shared(key_id, rate, burst, cost)
            except (OSError, TimeoutError, RedisReplyError) as exc:  # ConnectionError is an OSError
                self._down_until = time.monotonic() + self.retry_after_s
                log.warning("rate_limit.redis_unavailable", error=str(exc) or type(exc).__name__,
                            fallback="per-process bucket", retry_in_s=self.retry_after_s)
        LOCAL_FALLBACK.inc()
        bucket = self._local.get(key_id)
        if bucket is None:
            bucket = self._local[key_id] = _LocalBucket(burst)
        return bucket.take(rate, burst, cost)

    async def _shared(self, key_id: int, rate: float, burst: int, cost: int) -> Verdict:
        assert self._redis is not None
        args = (1, f"fs:rl:{key_id}", repr(float(rate)), burst, cost)
        try:
            reply = await self._redis.execute("EVALSHA", TOKEN_BUCKET_SHA, *args, timeout_s=self.timeout_s)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            reply = await self._redis.execute("EVAL", TOKEN_BUCKET, *args, timeout_s=self.timeout_s)
        allowed, wait = int(reply[0]), int(reply[1])
        return Verdict(allowed == 1, wait, True)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
