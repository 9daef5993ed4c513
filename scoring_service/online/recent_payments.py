"""What this process saw of each card in the last hour: evidence of a burst that Redis cannot erase.

The card's intraday list lives in Redis, so whoever can write there could erase it: one ``DEL`` of
``fs:1:intraday:c:<card>`` after a burst (AAAADDDD) made the 9th payment an APPROVE (issue 21).
Every process therefore also remembers, in memory, the payments it scored of each card over the
velocity rules' window (one hour) and merges them into what Redis returns (by transaction id, so
a payment is counted once). Payments it remembers that Redis lost (older than a write's round
trip: :data:`SETTLE_S`) are counted as ``intraday_missing`` in ``fraudscore_cache_integrity_total``.

Bounded: at most :data:`MAX_CARDS` cards (the least recently seen are forgotten first) and
:data:`MAX_PER_CARD` payments a card, about 20 MB at the bounds. A caller's connection stays with
one worker (SO_REUSEPORT balances connections, not calls), so a burst on one connection is seen
whole by one process; bursts spread over many connections are seen in part by each.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from scoring_service.core.features.intraday import IntradayPayment
from scoring_service.core.features.velocity import VELOCITY_WINDOWS_S

WINDOW_S = min(VELOCITY_WINDOWS_S.values())  # the shortest velocity window (the rules use the hour)
MAX_CARDS = 50_000
MAX_PER_CARD = 64
SETTLE_S = 2.0  # a payment recorded this recently may still be on its way to Redis (written in the background)


class RecentPayments:
    """Per card, the payments this process scored within :data:`WINDOW_S` (newest last)."""

    def __init__(self, max_cards: int = MAX_CARDS, max_per_card: int = MAX_PER_CARD, window_s: float = WINDOW_S) -> None:
        self._cards: OrderedDict[str, list[IntradayPayment]] = OrderedDict()
        self.max_cards, self.max_per_card, self.window_s = max_cards, max_per_card, window_s

    def record(self, customer_id: str, payment: IntradayPayment) -> None:
        seen = self._cards.pop(customer_id, None) or []
        if not any(p.transaction_id == payment.transaction_id for p in seen):
            seen.append(payment)
        cutoff = payment.timestamp - self.window_s
        if seen[0].timestamp < cutoff or len(seen) > self.max_per_card:
            seen = [p for p in seen if p.timestamp >= cutoff][-self.max_per_card:]
        self._cards[customer_id] = seen  # most recently seen last
        if len(self._cards) > self.max_cards:
            self._cards.popitem(last=False)

    def merged(self, customer_id: str, stored: Sequence[IntradayPayment], now: float) -> tuple[list[IntradayPayment], int]:
        """(``stored`` with this process's recent payments of the card it lacks, how many of those had settled)."""
        seen = self._cards.get(customer_id)
        if not seen:
            return list(stored), 0
        ids = {p.transaction_id for p in stored}
        extra = [p for p in seen if p.transaction_id not in ids and p.timestamp >= now - self.window_s]
        if not extra:
            return list(stored), 0
        lost = sum(1 for p in extra if p.timestamp <= now - SETTLE_S)
        return sorted([*stored, *extra], key=lambda p: p.timestamp), lost
