"""Payments simulator, written from the handbook's published description (chapter 2).

* customers: a location (x, y) uniform on [0, 100]^2, a mean amount uniform on [5, 100], std =
  mean / 2, a mean number of payments per day uniform on [0, 4];
* terminals: a location uniform on [0, 100]^2;
* a customer pays at terminals within ``radius`` (5) of its location, uniformly chosen;
* per day a Poisson number of payments; time of day ~ Normal(12 h, 20,000 s) (kept if inside the
  day); amount ~ Normal(mean, std), redrawn uniform on [0, 2 mean] when negative, 2 decimals;
* fraud: (1) any amount > 220; (2) each day some terminals (2 per 10,000) are compromised: all
  their payments in the next 28 days are fraud; (3) each day some customers (3 per 5,000) are
  compromised: a third of their payments in the next 14 days get their amount x5 and are fraud;
  (4) card testing (not in the handbook): each day some cards (``card_testing_per_day`` per
  customer, by default 1 per 5,000, :data:`CARD_TESTING_PER_DAY`) are tested: a burst of
  10..25 small payments (amounts uniform on [0.50, 5.00]) within 10 minutes, then 2..5 large
  ones (uniform on [50, 200], below the > 220 rule) within the following hour, all at random
  terminals anywhere (not the card's neighbourhood), all fraud. With the handbook's customers
  (~2 payments a day) that is ~21 fraud payments per 5,000 customers a day, about the size of
  scenario 3 (~27), ~0.2 % of the payments.

``simulate`` returns the handbook file's columns and dtypes (:data:`COLUMNS`), sorted by time,
fully vectorised, then ``TX_FRAUD_SCENARIO`` (int8): 0 genuine, else the first scenario, in the
order above, that made the payment a fraud (scenario 1 judges the amount as drawn, before
scenario 3's x5; a card-testing payment at a compromised terminal is 2). Scenarios 1-3 draw from
the seed's generator in the handbook's order and scenario 4 from a generator spawned from it, so
``card_testing_per_day=0`` gives the payments of scenarios 1-3 exactly as before it existed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = [
    "TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_TIME_SECONDS", "TX_TIME_DAYS", "TX_FRAUD",
]
SCENARIO_COLUMN = "TX_FRAUD_SCENARIO"  # int8 after COLUMNS: 0 genuine, 1..4 the scenario (module docstring)
GENUINE, HIGH_AMOUNT, COMPROMISED_TERMINAL, COMPROMISED_CUSTOMER, CARD_TESTING = range(5)
CARD_TESTING_PER_DAY = 1.0 / 5000  # cards tested per customer per day (scenario 4)
# scenario 4's shape: burst size, burst length (s), small amounts; then large payments, their span (s) and amounts
CARD_TESTING_BURST = (10, 25)
CARD_TESTING_BURST_S = 600
CARD_TESTING_SMALL = (0.50, 5.00)
CARD_TESTING_LARGE_N = (2, 5)
CARD_TESTING_LARGE_S = 3600
CARD_TESTING_LARGE = (50.0, 200.0)


def _terminals_in_radius(cxy: np.ndarray, txy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists (offsets, terminal indices) of the terminals within ``radius`` of each customer,
    through a grid of cells of side ``radius`` (only 9 cells are looked at per customer)."""
    cell = max(radius, 1e-9)
    ncell = int(np.ceil(100.0 / cell)) + 1
    tcx = np.clip((txy[:, 0] // cell).astype(np.int64), 0, ncell - 1)
    tcy = np.clip((txy[:, 1] // cell).astype(np.int64), 0, ncell - 1)
    tcell = tcx * ncell + tcy
    torder = np.argsort(tcell, kind="stable")
    tcell_sorted = tcell[torder]
    starts = np.searchsorted(tcell_sorted, np.arange(ncell * ncell), side="left")
    ends = np.searchsorted(tcell_sorted, np.arange(ncell * ncell), side="right")
    ccx = np.clip((cxy[:, 0] // cell).astype(np.int64), 0, ncell - 1)
    ccy = np.clip((cxy[:, 1] // cell).astype(np.int64), 0, ncell - 1)
    cand_c, cand_t = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            nx, ny = ccx + dx, ccy + dy
            valid = (nx >= 0) & (nx < ncell) & (ny >= 0) & (ny < ncell)
            cid = np.flatnonzero(valid)
            cells = nx[valid] * ncell + ny[valid]
            cnt = ends[cells] - starts[cells]
            rep_c = np.repeat(cid, cnt)
            # positions inside each cell's run
            off = np.repeat(starts[cells] - np.r_[0, np.cumsum(cnt)[:-1]], cnt) + np.arange(cnt.sum())
            cand_c.append(rep_c)
            cand_t.append(torder[off])
    cc = np.concatenate(cand_c)
    tt = np.concatenate(cand_t)
    d2 = ((cxy[cc] - txy[tt]) ** 2).sum(axis=1)
    keep = d2 < radius * radius
    cc, tt = cc[keep], tt[keep]
    o = np.lexsort((tt, cc))
    cc, tt = cc[o], tt[o]
    offsets = np.searchsorted(cc, np.arange(len(cxy) + 1), side="left")
    return offsets, tt


def _card_testing(
    rng: np.random.Generator, n_customers: int, n_terminals: int, n_days: int, per_day: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scenario 4's payments (customer, day, seconds in the day, amount, terminal), unsorted: per
    tested card a burst of small payments in ``CARD_TESTING_BURST_S``, then large ones in the
    following ``CARD_TESTING_LARGE_S``, all inside the day the card is tested."""
    n_ev = rng.poisson(per_day * n_customers, size=n_days)
    ev_day = np.repeat(np.arange(n_days), n_ev)
    n = len(ev_day)
    ev_cust = rng.integers(0, n_customers, size=n)
    start = rng.integers(0, 86400 - CARD_TESTING_BURST_S - CARD_TESTING_LARGE_S, size=n)
    n_small = rng.integers(CARD_TESTING_BURST[0], CARD_TESTING_BURST[1] + 1, size=n)
    n_large = rng.integers(CARD_TESTING_LARGE_N[0], CARD_TESTING_LARGE_N[1] + 1, size=n)
    ev_small, ev_large = np.repeat(np.arange(n), n_small), np.repeat(np.arange(n), n_large)
    secs = np.concatenate([
        start[ev_small] + rng.integers(0, CARD_TESTING_BURST_S, size=len(ev_small)),
        start[ev_large] + CARD_TESTING_BURST_S + rng.integers(0, CARD_TESTING_LARGE_S, size=len(ev_large)),
    ]).astype(np.int64)
    small = rng.uniform(*CARD_TESTING_SMALL, size=len(ev_small))
    large = rng.uniform(*CARD_TESTING_LARGE, size=len(ev_large))
    amount = np.round(np.concatenate([small, large]), 2)
    ev = np.concatenate([ev_small, ev_large])
    term = rng.integers(0, n_terminals, size=len(ev))
    return ev_cust[ev].astype(np.int64), ev_day[ev].astype(np.int64), secs, amount, term.astype(np.int64)


def simulate(
    n_customers: int = 5000,
    n_terminals: int = 10000,
    start_date: str = "2018-04-01",
    n_days: int = 60,
    seed: int = 0,
    radius: float = 5.0,
    card_testing_per_day: float = CARD_TESTING_PER_DAY,
) -> pd.DataFrame:
    """Simulated payments with the handbook file's columns (TRANSACTION_ID ... TX_FRAUD), then
    TX_FRAUD_SCENARIO; ``card_testing_per_day``: cards tested per customer per day (0: none)."""
    rng = np.random.default_rng(seed)
    ct_rng = rng.spawn(1)[0]  # scenario 4's own stream: scenarios 1-3 draw the same with or without it
    cxy = rng.uniform(0, 100, size=(n_customers, 2))
    mean_amount = rng.uniform(5, 100, size=n_customers)
    std_amount = mean_amount / 2
    mean_nb = rng.uniform(0, 4, size=n_customers)
    txy = rng.uniform(0, 100, size=(n_terminals, 2))
    offsets, term_list = _terminals_in_radius(cxy, txy, radius)
    n_avail = np.diff(offsets)

    # payments per customer per day
    counts = rng.poisson(np.broadcast_to(mean_nb[:, None], (n_customers, n_days)))
    counts[n_avail == 0, :] = 0
    cust = np.repeat(np.repeat(np.arange(n_customers), n_days), counts.ravel())
    day = np.repeat(np.tile(np.arange(n_days), n_customers), counts.ravel())
    n = len(cust)
    secs = rng.normal(86400 / 2, 20000, size=n)
    keep = (secs > 0) & (secs < 86400)
    cust, day, secs = cust[keep], day[keep], secs[keep].astype(np.int64)
    n = len(cust)
    amount = rng.normal(mean_amount[cust], std_amount[cust])
    neg = amount < 0
    amount[neg] = rng.uniform(0, mean_amount[cust[neg]] * 2)
    amount = np.round(amount, 2)
    pick = (rng.random(n) * n_avail[cust]).astype(np.int64)
    term = term_list[offsets[cust] + np.minimum(pick, n_avail[cust] - 1)]

    # sort by time (handbook: ordered by TX_DATETIME), ids increasing with time
    tsec = day * 86400 + secs
    o = np.lexsort((term, cust, tsec))
    cust, day, tsec, amount, term = cust[o], day[o], tsec[o], amount[o], term[o]
    fraud = np.zeros(n, dtype=np.int64)
    scenario = np.zeros(n, dtype=np.int8)

    # scenario 1: amount > 220
    fraud[amount > 220] = 1
    scenario[amount > 220] = HIGH_AMOUNT

    # scenario 2: compromised terminals, all payments in the next 28 days
    n_ct = rng.poisson(2.0 * n_terminals / 10000, size=n_days)
    ev_day = np.repeat(np.arange(n_days), n_ct)
    ev_term = rng.integers(0, n_terminals, size=len(ev_day))
    # pairs (terminal, day) compromised, as keys terminal * (n_days + 28) + day
    compromised = np.unique(np.repeat(ev_term, 28) * (n_days + 28) + (ev_day[:, None] + np.arange(28)[None, :]).ravel())
    hit = np.isin(term * (n_days + 28) + day, compromised)
    fraud[hit] = 1
    scenario[hit & (scenario == GENUINE)] = COMPROMISED_TERMINAL

    # scenario 3: compromised customers, a third of their payments in the next 14 days x5
    n_cc = rng.poisson(3.0 * n_customers / 5000, size=n_days)
    ev_day = np.repeat(np.arange(n_days), n_cc)
    ev_cust = rng.integers(0, n_customers, size=len(ev_day))
    if len(ev_day):
        by_cust = np.lexsort((day, cust))  # positions sorted by (customer, day)
        kc = cust[by_cust] * (n_days + 14) + day[by_cust]
        lo = np.searchsorted(kc, ev_cust * (n_days + 14) + ev_day, side="left")
        hi = np.searchsorted(kc, ev_cust * (n_days + 14) + ev_day + 14, side="left")
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):  # one small loop per event (3 a day)
            m = b - a
            if m < 3:
                continue
            chosen = by_cust[a + rng.choice(m, size=m // 3, replace=False)]
            amount[chosen] = amount[chosen] * 5
            fraud[chosen] = 1
            scenario[chosen[scenario[chosen] == GENUINE]] = COMPROMISED_CUSTOMER

    # scenario 4: card testing, merged into the time order (stable: the payments above keep theirs)
    if card_testing_per_day:
        c4, d4, s4, a4, t4 = _card_testing(ct_rng, n_customers, n_terminals, n_days, card_testing_per_day)
        sc4 = np.where(np.isin(t4 * (n_days + 28) + d4, compromised), COMPROMISED_TERMINAL, CARD_TESTING).astype(np.int8)
        cust, day, tsec = np.r_[cust, c4], np.r_[day, d4], np.r_[tsec, d4 * 86400 + s4]
        amount, term = np.r_[amount, a4], np.r_[term, t4]
        fraud, scenario = np.r_[fraud, np.ones(len(c4), dtype=np.int64)], np.r_[scenario, sc4]
        o = np.lexsort((term, cust, tsec))
        cust, day, tsec, amount, term, fraud, scenario = cust[o], day[o], tsec[o], amount[o], term[o], fraud[o], scenario[o]
        n = len(cust)

    start = pd.Timestamp(start_date)
    return pd.DataFrame(
        {
            "TRANSACTION_ID": np.arange(n, dtype=np.int64),
            "TX_DATETIME": (start + pd.to_timedelta(tsec, unit="s")).astype("datetime64[ns]"),
            "CUSTOMER_ID": cust.astype(np.int64),
            "TERMINAL_ID": term.astype(np.int64),
            "TX_AMOUNT": amount.astype(np.float64),
            "TX_TIME_SECONDS": tsec.astype(np.int64),
            "TX_TIME_DAYS": day.astype(np.int64),
            "TX_FRAUD": fraud.astype(np.int64),
            SCENARIO_COLUMN: scenario.astype(np.int8),
        },
        columns=[*COLUMNS, SCENARIO_COLUMN],
    )
