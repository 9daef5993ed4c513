import math

import pytest

from scoring_service.core.features import Velocity
from scoring_service.core.policy import APPROVE, DECLINE, REVIEW, Policy, combine_entities

P = Policy(review=0.3, decline=0.7, high_amount=220.0, amount_ratio_review=3.0, amount_ratio_decline=5.0)
USUAL = {"avg_amount_30d": 20.0, "nb_tx_30d": 10.0}


def test_decisions_follow_thresholds():
    assert P.decide(0.1) == APPROVE
    assert P.decide(0.3) == REVIEW
    assert P.decide(0.69) == REVIEW
    assert P.decide(0.7) == DECLINE


def test_high_amount_floors_to_decline():
    risk, reasons = P.apply(0.05, [], 250.0, USUAL)
    assert risk == 0.7 and reasons[0][0] == "AMOUNT_ABOVE_HIGH_LIMIT"


def test_amount_against_customer_usual():
    risk, reasons = P.apply(0.05, [("X", "f", 0.1)], 70.0, USUAL)  # 3.5x usual
    assert risk == 0.3 and reasons[0][0] == "AMOUNT_HIGH_VS_CUSTOMER_USUAL"
    risk, _ = P.apply(0.05, [], 110.0, USUAL)  # 5.5x usual
    assert risk == 0.7


def test_short_history_is_not_trusted_for_ratios():
    risk, reasons = P.apply(0.05, [("X", "f", 0.1)], 110.0, {"avg_amount_30d": 20.0, "nb_tx_30d": 1.0})
    assert risk == 0.05 and reasons == [("X", "f", 0.1)]


def test_floor_never_lowers_a_higher_score():
    risk, reasons = P.apply(0.9, [("M", "f", 2.0)], 250.0, USUAL)
    assert risk == 0.9 and reasons[0][0] == "M"


def test_combine_takes_the_riskier_entity_and_its_reasons_first():
    risk, reasons = combine_entities((0.2, [("A", "a", 1.0), ("C", "c", 0.5)]), (0.6, [("B", "b", 2.0), ("C", "c", 0.1)]))
    assert risk == 0.6
    assert reasons == [("B", "b", 2.0), ("C", "c", 0.1), ("A", "a", 1.0)]  # riskier entity first, no repeats
    assert combine_entities(None, None) == (0.0, [])
    assert combine_entities((0.4, []), None)[0] == 0.4


def test_policy_of_registry_dicts_defaults_to_no_rules():
    p = Policy.of({"review": 0.2, "decline": 0.5}, None)
    assert p.apply(0.1, [], 1e9, USUAL)[0] == 0.1


def test_floors_are_the_rules_training_fraud_rates_when_known():
    p = Policy.of(
        {"review": 0.3, "decline": 0.7},
        {"high_amount": 220.0, "amount_ratio_review": 3.0, "amount_ratio_decline": 5.0,
         "high_amount_fraud_rate": 1.0, "amount_ratio_decline_fraud_rate": 0.85, "amount_ratio_review_fraud_rate": 0.1},
    )
    assert p.apply(0.5, [], 250.0, USUAL)[0] == 1.0
    assert p.apply(0.5, [], 110.0, USUAL)[0] == 0.85  # 5.5x usual
    assert p.apply(0.05, [], 70.0, USUAL)[0] == 0.3  # the rate (0.1) is below the review threshold


# ----------------------------------------------------------------------------------------------
# velocity rules (card testing)
# ----------------------------------------------------------------------------------------------
OLD_POLICY = {"high_amount": 220.0, "amount_ratio_review": 3.0, "amount_ratio_decline": 5.0,
              "high_amount_fraud_rate": 1.0, "amount_ratio_decline_fraud_rate": 0.85, "amount_ratio_review_fraud_rate": 0.1}
NEW_POLICY = {**OLD_POLICY, "velocity_1h_review": 4.0, "velocity_1h_decline": 10.0,
              "velocity_1h_review_fraud_rate": 0.45, "velocity_1h_decline_fraud_rate": 0.95, "typical_amount": 42.5}
PV = Policy.of({"review": 0.3, "decline": 0.7}, NEW_POLICY)


def v1h(n: float) -> Velocity:
    return Velocity(nb_tx_1h=n, nb_tx_1d=n, seconds_since_last=30.0)


def test_policy_of_reads_the_velocity_keys_and_the_typical_amount():
    assert (PV.velocity_1h_review, PV.velocity_1h_decline) == (4.0, 10.0)
    assert (PV.velocity_review_rate, PV.velocity_decline_rate) == (0.45, 0.95)
    assert PV.typical_amount == 42.5


def test_velocity_decline_fires_at_its_threshold_and_not_below():
    floor, rule = PV.payment_floor(20.0, USUAL, v1h(10.0))
    assert floor == 0.95 and rule == ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 10.0)
    floor, rule = PV.payment_floor(20.0, USUAL, v1h(9.0))  # below the decline: the review rule
    assert floor == 0.45 and rule == ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 9.0)


def test_velocity_review_fires_at_its_threshold_and_not_below():
    assert PV.payment_floor(20.0, USUAL, v1h(4.0)) == (0.45, ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 4.0))
    assert PV.payment_floor(20.0, USUAL, v1h(3.0)) == (0.0, None)
    assert PV.payment_floor(20.0, None, v1h(4.0))[0] == 0.45  # no customer history needed (an unseen card)


def test_velocity_floors_are_at_least_the_thresholds():
    p = Policy.of({"review": 0.3, "decline": 0.7}, {**NEW_POLICY, "velocity_1h_review_fraud_rate": 0.1,
                                                    "velocity_1h_decline_fraud_rate": 0.5})
    assert p.payment_floor(20.0, USUAL, v1h(10.0))[0] == 0.7
    assert p.payment_floor(20.0, USUAL, v1h(4.0))[0] == 0.3


def test_rule_order_high_amount_velocity_decline_ratio_decline_velocity_review_ratio_review():
    # 1. high amount before the velocity decline
    assert PV.payment_floor(250.0, USUAL, v1h(20.0))[1][0] == "AMOUNT_ABOVE_HIGH_LIMIT"
    # 2. velocity decline before the ratio decline (110 = 5.5x usual)
    assert PV.payment_floor(110.0, USUAL, v1h(10.0)) == (0.95, ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 10.0))
    # 3. ratio decline before the velocity review
    floor, rule = PV.payment_floor(110.0, USUAL, v1h(5.0))
    assert floor == 0.85 and rule[0] == "AMOUNT_HIGH_VS_CUSTOMER_USUAL"
    # 4. velocity review before the ratio review (70 = 3.5x usual)
    assert PV.payment_floor(70.0, USUAL, v1h(5.0)) == (0.45, ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 5.0))
    # 5. the ratio review when no velocity rule fires
    floor, rule = PV.payment_floor(70.0, USUAL, v1h(2.0))
    assert floor == 0.3 and rule == ("AMOUNT_HIGH_VS_CUSTOMER_USUAL", "amount_to_avg_30d", 3.5)


def test_unknown_velocity_never_fires_the_velocity_rules():
    for amount in (20.0, 70.0, 110.0, 250.0):
        with_none = PV.payment_floor(amount, USUAL, None)
        assert with_none == PV.payment_floor(amount, USUAL)
        assert with_none[1] is None or with_none[1][0] != "CARD_VELOCITY_1H_HIGH"
    assert PV.payment_floor(20.0, USUAL) == (0.0, None)
    assert PV.apply(0.05, [("X", "f", 0.1)], 20.0, USUAL) == (0.05, [("X", "f", 0.1)])


def test_apply_takes_the_velocity():
    risk, reasons = PV.apply(0.05, [("X", "f", 0.1)], 3.0, USUAL, top_k=2, velocity=v1h(12.0))
    assert risk == 0.95 and reasons == [("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 12.0), ("X", "f", 0.1)]
    assert PV.decide(risk) == DECLINE
    risk, reasons = PV.apply(0.99, [("M", "f", 2.0)], 3.0, USUAL, velocity=v1h(12.0))  # never lowers
    assert risk == 0.99 and reasons == [("M", "f", 2.0)]


@pytest.mark.parametrize("amount", [5.0, 20.0, 59.0, 60.0, 70.0, 99.0, 100.0, 110.0, 219.0, 220.0, 1e6])
@pytest.mark.parametrize("state", [USUAL, None, {"avg_amount_30d": 20.0, "nb_tx_30d": 1.0}])
def test_old_policy_dicts_give_todays_floors(amount, state):
    old = Policy.of({"review": 0.3, "decline": 0.7}, OLD_POLICY)
    assert math.isinf(old.velocity_1h_review) and math.isinf(old.velocity_1h_decline)
    assert old.velocity_review_rate == old.velocity_decline_rate == old.typical_amount == 0.0
    today = _todays_floor(old, amount, state)
    for velocity in (None, v1h(1.0), v1h(50.0), Velocity(1e9, 1e9, 0.0)):
        assert old.payment_floor(amount, state, velocity) == today


def _todays_floor(p: Policy, amount: float, state: dict[str, float] | None) -> tuple[float, tuple[str, str, float] | None]:
    """Policy.payment_floor as it was before the velocity rules."""
    if amount >= p.high_amount:
        return max(p.decline, p.high_amount_rate), ("AMOUNT_ABOVE_HIGH_LIMIT", "amount", amount)
    if state and state["avg_amount_30d"] > 0 and state["nb_tx_30d"] >= p.min_history:
        ratio = amount / state["avg_amount_30d"]
        if ratio >= p.amount_ratio_decline:
            return max(p.decline, p.ratio_decline_rate), ("AMOUNT_HIGH_VS_CUSTOMER_USUAL", "amount_to_avg_30d", ratio)
        if ratio >= p.amount_ratio_review:
            return max(p.review, p.ratio_review_rate), ("AMOUNT_HIGH_VS_CUSTOMER_USUAL", "amount_to_avg_30d", ratio)
    return 0.0, None
