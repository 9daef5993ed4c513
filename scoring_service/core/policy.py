"""How a payment's risk score and decision are made from entity scores and transaction rules.

One module, imported by the online service and the batch jobs (the backtest), so the rules are
the same everywhere.

Cache answers (no model call)::

    base       = max(customer.risk_score, terminal.risk_score)       # either entity compromised
    risk_score = max(base, floors triggered by the payment itself)

Each entity's cached ``risk_score`` is the model's score for the entity's typical payment at
batch time (see ``entity_scoring``): the probability that the card, or the terminal, is
compromised now. The payment-level rules come from the active model version's ``policy``,
learned from its training data:

* ``amount >= high_amount`` raises the score to the fraud rate that rule had in the training
  data, and at least to the decline threshold (AMOUNT_ABOVE_HIGH_LIMIT);
* ``amount / customer's 30-day average >= amount_ratio_decline`` raises it to that rule's
  training fraud rate and at least the decline threshold; ``>= amount_ratio_review`` to its rate
  and at least the review threshold (AMOUNT_HIGH_VS_CUSTOMER_USUAL);
* the card's payments in the last hour (``Velocity.nb_tx_1h``, from its intraday payments, see
  ``features.velocity``) ``>= velocity_1h_decline`` raises it to that rule's training fraud rate
  and at least the decline threshold; ``>= velocity_1h_review`` to its rate and at least the
  review threshold (CARD_VELOCITY_1H_HIGH: card testing, a burst of payments). Unknown velocity
  (``None``) fires neither.

A floor is a calibrated probability, not just a threshold, so payments a rule catches rank by how
often that rule is right: an amount over the high limit (always fraud in the handbook data) ranks
above any payment of a card whose cached risk (its typical payment's score) is 0.3.

The amount-ratio rules only judge payments below the high amount, and only when the customer has
at least ``min_history`` payments in its 30-day window (``nb_tx_30d`` of its state): below that
its average is not trusted. The rules are tried in this order, the first that fires sets the
floor: high amount, velocity decline, amount-ratio decline, velocity review, amount-ratio review.
Training learns each rule's threshold and rate on the payments it fires on, in that order
(``training.decision_rules.learn_policy``); a policy without a rule's keys (a model registered
before the rule existed) never fires it. ``typical_amount`` is the median training amount (0 =
unknown).

Model answers use the model's probability for this payment as ``risk_score``; the same floors
apply, so a rule never says less on the model path than on the cache path.

Decision: ``risk_score >= thresholds["decline"]`` -> DECLINE, ``>= thresholds["review"]`` ->
REVIEW, else APPROVE; both thresholds belong to the active model version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scoring_service.core.features.velocity import Velocity

Reason = tuple[str, str, float]

APPROVE, REVIEW, DECLINE = "APPROVE", "REVIEW", "DECLINE"
DECISIONS = (APPROVE, REVIEW, DECLINE)
# payments the customer must have in its 30-day window before its average amount is trusted
MIN_HISTORY = 3.0
_INF = float("inf")


@dataclass(frozen=True, slots=True)
class Policy:
    review: float
    decline: float
    high_amount: float = float("inf")
    amount_ratio_review: float = float("inf")
    amount_ratio_decline: float = float("inf")
    min_history: float = MIN_HISTORY  # payments in 30 days before the customer's average is trusted
    high_amount_rate: float = 0.0  # training fraud rate of each rule (0 = unknown: the threshold alone)
    ratio_decline_rate: float = 0.0
    ratio_review_rate: float = 0.0
    velocity_1h_review: float = _INF  # the card's payments in the last hour (this one included)
    velocity_1h_decline: float = _INF
    velocity_review_rate: float = 0.0
    velocity_decline_rate: float = 0.0
    typical_amount: float = 0.0  # the median training amount (0 = unknown)

    @classmethod
    def of(cls, thresholds: dict[str, float], policy: dict[str, float] | None) -> Policy:
        p = policy or {}
        return cls(
            review=float(thresholds["review"]),
            decline=float(thresholds["decline"]),
            high_amount=float(p.get("high_amount", float("inf"))),
            amount_ratio_review=float(p.get("amount_ratio_review", float("inf"))),
            amount_ratio_decline=float(p.get("amount_ratio_decline", float("inf"))),
            min_history=float(p.get("min_history", MIN_HISTORY)),
            high_amount_rate=float(p.get("high_amount_fraud_rate", 0.0)),
            ratio_decline_rate=float(p.get("amount_ratio_decline_fraud_rate", 0.0)),
            ratio_review_rate=float(p.get("amount_ratio_review_fraud_rate", 0.0)),
            velocity_1h_review=float(p.get("velocity_1h_review", _INF)),
            velocity_1h_decline=float(p.get("velocity_1h_decline", _INF)),
            velocity_review_rate=float(p.get("velocity_1h_review_fraud_rate", 0.0)),
            velocity_decline_rate=float(p.get("velocity_1h_decline_fraud_rate", 0.0)),
            typical_amount=float(p.get("typical_amount", 0.0)),
        )

    def decide(self, risk_score: float) -> str:
        if risk_score >= self.decline:
            return DECLINE
        if risk_score >= self.review:
            return REVIEW
        return APPROVE

    def payment_floor(
        self, amount: float, customer_state: dict[str, float] | None, velocity: Velocity | None = None
    ) -> tuple[float, Reason | None]:
        """The lowest score this payment alone deserves, and the rule that set it.

        The rules are tried in order and the first that fires sets the floor: the high amount; the
        velocity decline; then, for a customer with ``min_history`` payments and a positive average,
        the decline ratio; the velocity review; the review ratio. ``velocity=None`` (unknown) fires
        no velocity rule. ``learn_policy`` measures each rule's rate where it fires.
        """
        if amount >= self.high_amount:
            return max(self.decline, self.high_amount_rate), ("AMOUNT_ABOVE_HIGH_LIMIT", "amount", amount)
        n_1h = velocity.nb_tx_1h if velocity is not None else None
        if n_1h is not None and n_1h >= self.velocity_1h_decline:
            return max(self.decline, self.velocity_decline_rate), ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", n_1h)
        ratio = self._amount_ratio(amount, customer_state)
        if ratio is not None and ratio >= self.amount_ratio_decline:
            return max(self.decline, self.ratio_decline_rate), ("AMOUNT_HIGH_VS_CUSTOMER_USUAL", "amount_to_avg_30d", ratio)
        if n_1h is not None and n_1h >= self.velocity_1h_review:
            return max(self.review, self.velocity_review_rate), ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", n_1h)
        if ratio is not None and ratio >= self.amount_ratio_review:
            return max(self.review, self.ratio_review_rate), ("AMOUNT_HIGH_VS_CUSTOMER_USUAL", "amount_to_avg_30d", ratio)
        return 0.0, None

    def _amount_ratio(self, amount: float, customer_state: dict[str, float] | None) -> float | None:
        """amount / the customer's 30-day average, when its history is trusted (else None)."""
        if not customer_state:
            return None
        usual = float(customer_state.get("avg_amount_30d", 0.0) or 0.0)
        history = float(customer_state.get("nb_tx_30d", 0.0) or 0.0)
        if usual > 0 and history >= self.min_history:
            return amount / usual
        return None

    def apply(
        self, base_score: float, base_reasons: Sequence[Reason], amount: float, customer_state: dict[str, float] | None,
        top_k: int = 3, velocity: Velocity | None = None,
    ) -> tuple[float, list[Reason]]:
        """Raise ``base_score`` to the payment's floor; ``base_reasons`` come most important first."""
        floor, rule = self.payment_floor(amount, customer_state, velocity)
        reasons = list(base_reasons)
        if rule is not None and floor > base_score:
            return floor, [rule, *reasons][:top_k]
        return base_score, reasons[:top_k]


def combine_entities(
    customer: tuple[float, Sequence[Reason]] | None, terminal: tuple[float, Sequence[Reason]] | None
) -> tuple[float, list[Reason]]:
    """Entity scores -> the payment's base score (the max) and the reasons of the riskier entity first.

    An entity's reasons are the model's reason codes for its typical payment (the payment its
    cached score is the model's score of, see ``entity_scoring``); their feature names already say
    which entity they are about (``customer_*``, ``terminal_*``), so they pass through unchanged,
    and a reason both entities share is given once.
    """
    parts: list[tuple[float, list[Reason]]] = []
    if customer is not None:
        parts.append((customer[0], list(customer[1])))
    if terminal is not None:
        parts.append((terminal[0], list(terminal[1])))
    if not parts:
        return 0.0, []
    parts.sort(key=lambda p: -p[0])
    seen: set[str] = set()
    reasons: list[Reason] = []
    for _, rs in parts:
        for r in rs:
            if r[0] not in seen:
                seen.add(r[0])
                reasons.append(r)
    return parts[0][0], reasons
