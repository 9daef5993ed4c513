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
