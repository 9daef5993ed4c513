"""Payments from a Parquet file: the handbook's columns or the normalised payments frame.

The one reader of payment files, used by the file event source of the batch jobs, ``events
publish``, training on the handbook file and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scoring_service.core.events import PAYMENT_COLUMNS
from scoring_service.core.features import normalise_handbook

__all__ = ["PAYMENT_COLUMNS", "PaymentsFileError", "read_payments_file"]


class PaymentsFileError(ValueError):
    """The file holds neither handbook columns nor a normalised payments frame."""


def read_payments_file(path: str | Path) -> pd.DataFrame:
    """A parquet file of handbook columns or of the normalised frame -> normalised frame."""
    df = pd.read_parquet(Path(path))
    if "TRANSACTION_ID" in df.columns:
        return normalise_handbook(df)
    missing = [c for c in PAYMENT_COLUMNS if c not in df.columns]
    if missing:
        raise PaymentsFileError(f"{path}: neither handbook columns nor a payments frame (missing {missing})")
    df = df.copy()
    for c in ("transaction_id", "customer_id", "terminal_id"):
        df[c] = df[c].astype(str)
    df["amount"] = df["amount"].astype("float64")
    ts = pd.to_datetime(df["timestamp"])
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    df["timestamp"] = ts.astype("datetime64[ns]")
    return df
