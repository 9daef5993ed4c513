"""Pure helpers of the backtest (``bench/backtest.py``): the cold-start cohort, per-group summaries, card-testing detection.

* :func:`choose_cohort` / :func:`rename_cohort`: a seeded share of the cards that pay in the replayed
  days gets a new customer id (``new-<id>``) in the Score() traffic only, so the nightly job never
  knows them and their first payment reaches the model as an unseen card.
* :func:`scored_frame` joins the answers with the payments (one answer per payment, same order);
  :func:`group_summary` gives one group's served metrics with the definitions of
  ``scoring_service.batch.replay.summarise`` (``scoring_service.core.metrics``);
  :func:`cohort_summaries` the cohort and the rest.
* :func:`detection_summary`: among the cards with card-testing payments (``TX_FRAUD_SCENARIO`` 4),
  the share declined before / at or before their first large (>= 50) card-testing payment.
* :func:`parse_window` / :func:`split_day` / :func:`in_window`: a Redis outage window (``HH:MM-HH:MM``,
  event time of day) and each day's payments before / during / after it; :func:`decision_counts`: what
  the answers of a group of payments decided (frauds passed and stopped, genuine payments reviewed).

No I/O, no service: unit-tested on hand-made frames (``tests/unit/test_backtest_groups.py``,
``tests/unit/test_backtest_outage.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.core.metrics import average_precision, card_precision_at_k, card_precision_per_day

NEW_PREFIX = "new-"
SCENARIO_COLUMN = "TX_FRAUD_SCENARIO"
CARD_TESTING = 4
LARGE_AMOUNT = 50.0
DECLINE = "DECLINE"
APPROVE = "APPROVE"


# ------------------------------------------------------------------------------------ cohort
def choose_cohort(customer_ids: Iterable[Any], share: float, seed: int) -> set[str]:
    """A seeded ``share`` of the distinct ``customer_ids`` (as str); the same ids and seed give the same cohort."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"cohort share must be in [0, 1], got {share}")
    ids = np.array(sorted({str(c) for c in customer_ids}), dtype=object)
    n = int(round(share * len(ids)))
    if n == 0:
        return set()
    rng = np.random.default_rng(seed)
    return set(ids[rng.choice(len(ids), size=n, replace=False)].tolist())


def rename_cohort(payments: pd.DataFrame, cohort: set[str], prefix: str = NEW_PREFIX) -> pd.DataFrame:
    """A copy of ``payments`` where the cohort's customer ids are ``prefix + id`` (the same new id every day)."""
    out = payments.copy()
    ids = out["customer_id"].astype(str)
    out["customer_id"] = np.where(ids.isin(cohort), prefix + ids, ids)
    return out


# ------------------------------------------------------------------------------------ per-group metrics
def scored_frame(payments: pd.DataFrame, answers: list[dict[str, Any]]) -> pd.DataFrame:
    """The payments (normalised frame, with ``is_fraud``) and their answers, side by side, in replay order."""
    if len(payments) != len(answers):
        raise ValueError(f"{len(payments)} payments but {len(answers)} answers")
    cols = [c for c in ("transaction_id", "customer_id", "terminal_id", "amount", "timestamp", "is_fraud") if c in payments]
    df = payments[cols].reset_index(drop=True).copy()
    df["score"] = [a.get("risk_score", np.nan) for a in answers]
    df["source"] = [a.get("source", "ERROR") for a in answers]
    df["decision"] = [a.get("decision", "") for a in answers]
    df["degraded"] = [bool(a.get("degraded", False)) for a in answers]
    df["reasons"] = [tuple(a.get("reasons", ())) for a in answers]  # reason codes, when the replay recorded them
    return df


def group_summary(scored: pd.DataFrame, k: int = 100) -> dict[str, Any]:
    """Served metrics of one group of payments (a :func:`scored_frame`, or rows of one).

    ``average_precision`` and ``card_precision_at_100`` as ``summarise`` computes them (answered,
    labelled payments); ``card_precision_at_100_ceiling``: the same CP@k for a perfect ranker (score
    = label), i.e. what the group's number of compromised cards per day allows.
    """
    ok = scored["source"] != "ERROR"
    labelled_mask = ok & (scored["is_fraud"] >= 0)
    labelled = scored.loc[labelled_mask]
    y = (labelled["is_fraud"] == 1).astype(int).to_numpy()
    s = labelled["score"].to_numpy(dtype=np.float64)
    ap = float(average_precision(y, s)) if y.sum() > 0 else float("nan")
    perfect = labelled.assign(_perfect=labelled["is_fraud"].astype(np.float64))
    nan = float("nan")
    sources = scored["source"].value_counts().to_dict()
    n_ok = int(ok.sum())
    return {
        "requests": int(len(scored)),
        "cards": int(scored["customer_id"].nunique()),
        "errors": int((~ok).sum()),
        "degraded": int(scored["degraded"].sum()) if "degraded" in scored else 0,
        "labelled": int(labelled_mask.sum()),
        "frauds": int(y.sum()),
        "fraud_cards": int(labelled.loc[labelled["is_fraud"] == 1, "customer_id"].nunique()),
        "average_precision": ap,
        "card_precision_at_100": card_precision_at_k(labelled, k=k) if len(labelled) else nan,
        "card_precision_at_100_per_day": card_precision_per_day(labelled, k=k),
        "card_precision_at_100_ceiling": card_precision_at_k(perfect, k=k, score_col="_perfect") if len(labelled) else nan,
        "cache_hit_ratio": (sources.get("CACHE", 0) / n_ok) if n_ok else 0.0,
        "decline_ratio": float((scored.loc[ok, "decision"] == DECLINE).mean()) if n_ok else 0.0,
        "sources": {str(k_): int(v) for k_, v in sources.items()},
    }


def cohort_summaries(scored: pd.DataFrame, in_cohort: pd.Series | np.ndarray) -> dict[str, dict[str, Any]]:
    """:func:`group_summary` of the cohort's payments and of the rest's (``in_cohort``: one bool per row)."""
    mask = np.asarray(in_cohort, dtype=bool)
    if len(mask) != len(scored):
        raise ValueError(f"{len(scored)} rows but {len(mask)} cohort flags")
    return {"cohort": group_summary(scored.loc[mask]), "rest": group_summary(scored.loc[~mask])}


# ------------------------------------------------------------------------------------ card testing
def scenarios_by_transaction(raw: pd.DataFrame) -> pd.Series | None:
    """``TX_FRAUD_SCENARIO`` indexed by transaction id (as str), or None when ``raw`` has no such column."""
    if SCENARIO_COLUMN not in raw.columns:
        return None
    id_col = "TRANSACTION_ID" if "TRANSACTION_ID" in raw.columns else "transaction_id"
    return pd.Series(raw[SCENARIO_COLUMN].fillna(0).astype("int8").to_numpy(), index=raw[id_col].astype(str).to_numpy(),
                     name="scenario")


def attach_scenarios(scored: pd.DataFrame, scenarios: pd.Series) -> pd.Series:
    """One scenario per row of ``scored`` (0 where the transaction id is not in ``scenarios``)."""
    return scored["transaction_id"].astype(str).map(scenarios).fillna(0).astype("int8").reset_index(drop=True)


def detection_summary(scored: pd.DataFrame, scenario: pd.Series | np.ndarray, card: pd.Series | np.ndarray | None = None,
                      *, large: float = LARGE_AMOUNT) -> dict[str, Any]:
    """Card-testing detection among the cards with scenario-4 payments in ``scored`` (rows in replay order).

    For each such card: its first large payment is its first scenario-4 payment of ``amount >= large``
    (none when it falls after the replayed days); a DECLINE answer counts when it was given to any
    payment of the card from its first scenario-4 payment on. ``declined_before_large``: the share
    of cards with such a DECLINE strictly before the first large payment (any, when there is no large
    one in the replay); ``declined_at_or_before_large``: the same, the first large payment included.
    ``card``: the card of each row (defaults to ``customer_id``; pass the original ids when the
    traffic renamed some). Order = row order of ``scored`` (time order, as replayed).
    """
    sc = np.asarray(scenario)
    if len(sc) != len(scored):
        raise ValueError(f"{len(scored)} rows but {len(sc)} scenarios")
    df = pd.DataFrame({
        "card": np.asarray(scored["customer_id"] if card is None else card).astype(str),
        "seq": np.arange(len(scored)),
        "ct": sc == CARD_TESTING,
        "amount": scored["amount"].to_numpy(dtype=np.float64),
        "declined": (scored["decision"] == DECLINE).to_numpy(),
    })
    ct = df[df["ct"]]
    empty = {"cards": 0, "cards_with_large_in_replay": 0, "declined_before_large": float("nan"),
             "declined_at_or_before_large": float("nan"), "card_testing_payments": 0, "large_payments": 0,
             "large_declined_share": float("nan"), "small_declined_share": float("nan")}
    if ct.empty:
        return empty
    first = ct.groupby("card")["seq"].min().rename("first")
    big = ct.loc[ct["amount"] >= large].groupby("card")["seq"].min().rename("big")
    cards = pd.concat([first, big], axis=1)
    cards["big"] = cards["big"].fillna(np.inf)
    dec = df[df["declined"] & df["card"].isin(cards.index)].join(cards, on="card")
    dec = dec[dec["seq"] >= dec["first"]]
    before = dec[dec["seq"] < dec["big"]].groupby("card").size()
    at_or_before = dec[dec["seq"] <= dec["big"]].groupby("card").size()
    n = len(cards)
    is_large = ct["amount"] >= large
    return {
        "cards": int(n),
        "cards_with_large_in_replay": int(np.isfinite(cards["big"]).sum()),
        "declined_before_large": float(len(before) / n),
        "declined_at_or_before_large": float(len(at_or_before) / n),
        "card_testing_payments": int(len(ct)),
        "large_payments": int(is_large.sum()),
        "large_declined_share": float(ct.loc[is_large, "declined"].mean()) if is_large.any() else float("nan"),
        "small_declined_share": float(ct.loc[~is_large, "declined"].mean()) if (~is_large).any() else float("nan"),
    }


# ------------------------------------------------------------------------------------ Redis outage
def parse_window(spec: str) -> tuple[pd.Timedelta, pd.Timedelta]:
    """``HH:MM-HH:MM`` -> (start, end) as times of day; the window lies inside one day (start < end, end <= 24:00)."""
    try:
        start, end = (pd.Timedelta(hours=int(h), minutes=int(m))
                      for h, m in (part.strip().split(":") for part in spec.split("-")))
    except ValueError:
        raise ValueError(f"window must be HH:MM-HH:MM, got {spec!r}") from None
    if not pd.Timedelta(0) <= start < end <= pd.Timedelta(days=1):
        raise ValueError(f"window must start before it ends, inside one day: {spec!r}")
    return start, end


def in_window(timestamps: pd.Series, window: tuple[pd.Timedelta, pd.Timedelta]) -> np.ndarray:
    """Whether each timestamp's time of day is in [start, end) (any day)."""
    ts = pd.to_datetime(timestamps)
    time_of_day = ts - ts.dt.normalize()
    return ((time_of_day >= window[0]) & (time_of_day < window[1])).to_numpy()


def split_day(payments: pd.DataFrame, day: pd.Timestamp,
              window: tuple[pd.Timedelta, pd.Timedelta]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``payments`` (one day's) before, during and after the window on ``day``, by timestamp, order kept."""
    ts = payments["timestamp"]
    start, end = day + window[0], day + window[1]
    return payments[ts < start], payments[(ts >= start) & (ts < end)], payments[ts >= end]


def decision_counts(scored: pd.DataFrame) -> dict[str, Any]:
    """What the answers of a group of payments (a :func:`scored_frame`, or rows of one) decided.

    ``frauds_passed``: frauds answered APPROVE; ``frauds_stopped``: frauds answered REVIEW or DECLINE;
    ``genuine_stopped``: genuine payments answered REVIEW or DECLINE (``genuine_declined``: DECLINE);
    errors (no answer) are counted apart, in neither. ``reasons``: answers carrying each reason code.
    """
    ok = (scored["source"] != "ERROR").to_numpy()
    fraud = (scored["is_fraud"] == 1).to_numpy()
    genuine = (scored["is_fraud"] == 0).to_numpy()
    decision = scored["decision"].to_numpy()
    stopped = ok & (decision != APPROVE)
    reasons: dict[str, int] = {}
    for codes in scored.get("reasons", pd.Series([()] * len(scored))):
        for code in set(codes):
            reasons[code] = reasons.get(code, 0) + 1
    return {
        "payments": int(len(scored)),
        "errors": int((~ok).sum()),
        "frauds": int(fraud.sum()),
        "frauds_passed": int((ok & fraud & (decision == APPROVE)).sum()),
        "frauds_stopped": int((fraud & stopped).sum()),
        "genuine": int(genuine.sum()),
        "genuine_stopped": int((genuine & stopped).sum()),
        "genuine_declined": int((genuine & ok & (decision == DECLINE)).sum()),
        "degraded": int(scored["degraded"].sum()),
        "sources": {str(k): int(v) for k, v in scored["source"].value_counts().items()},
        "decisions": {str(k): int(v) for k, v in scored.loc[ok, "decision"].value_counts().items()},
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
