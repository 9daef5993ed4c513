"""The handbook's published daily files -> the one Parquet file the commands read (``fraudscore data handbook``).

Source: the *Fraud Detection Handbook*'s simulated data, repository
``Fraud-Detection-Handbook/simulated-data-raw``, one pickled pandas DataFrame per day
(``data/2018-04-01.pkl`` .. ``data/2018-09-30.pkl``). The default URL pins the repository's commit
(``SOURCE_COMMIT``), so the bytes behind it cannot change.

Pickles are code: unpickling a file runs whatever it says. So a day file is unpickled only after
its SHA-256 matched, and never otherwise:
- the expected digest comes from the manifest committed in the repository
  (``scoring_service/data/handbook_sha256.txt``, ``sha256sum`` format);
- a file the manifest does not list is refused (fail closed) unless the caller passes
  ``trust_unlisted``; then its digest on first download is recorded beside the cached files
  (``SHA256SUMS.recorded``) and every later run checks the cached copy against it;
- even then, unpickling goes through an unpickler that admits only pandas, numpy and a few
  builtin types (defence in depth, not a sandbox: the checksum is the guard).

Resumable: verified day files are cached (``<cache>/<day>.pkl``) and not fetched again; a download
is written to ``.part`` and renamed only once its checksum matched; the Parquet file is written to
a temporary name and renamed at the end.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported on use: the paths and constants here serve light callers (bench/common.py)
    import pandas as pd

SOURCE_REPO = "Fraud-Detection-Handbook/simulated-data-raw"
SOURCE_COMMIT = "6e67dbd0a3bfe0d7ec33abc4bce5f37cd4ff0d6a"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{SOURCE_REPO}/{SOURCE_COMMIT}/data"
FIRST_DAY = date(2018, 4, 1)
LAST_DAY = date(2018, 9, 30)
DEFAULT_START, DEFAULT_END = FIRST_DAY, date(2018, 8, 31)  # the file the README and the benchmarks use
MANIFEST = Path(__file__).resolve().parents[2] / "data" / "handbook_sha256.txt"
RECORDED = "SHA256SUMS.recorded"
# The columns (and types) of the Parquet file the commands read; the pickles also hold TX_FRAUD_SCENARIO.
COLUMNS: dict[str, str] = {
    "TRANSACTION_ID": "int64", "TX_DATETIME": "datetime64[ns]", "CUSTOMER_ID": "int64", "TERMINAL_ID": "int64",
    "TX_AMOUNT": "float64", "TX_TIME_SECONDS": "int64", "TX_TIME_DAYS": "int64", "TX_FRAUD": "int64",
}


class HandbookDownloadError(RuntimeError):
    """A day file could not be fetched, did not match its checksum, or did not hold the handbook's columns."""


def output_name(start: date, end: date) -> str:
    return f"transactions-{start.isoformat()}_{end.isoformat()}.parquet"


def default_output(data_dir: Path, start: date = DEFAULT_START, end: date = DEFAULT_END) -> Path:
    """Where ``fraudscore data handbook`` writes by default: ``<data dir>/handbook/transactions-<from>_<to>.parquet``."""
    return data_dir / "handbook" / output_name(start, end)


def day_names(start: date, end: date) -> list[str]:
    if start > end:
        raise ValueError(f"--from {start} is after --to {end}")
    if start < FIRST_DAY or end > LAST_DAY:
        raise ValueError(f"the handbook's days are {FIRST_DAY} .. {LAST_DAY}, not {start} .. {end}")
    return [f"{start + timedelta(days=i)}.pkl" for i in range((end - start).days + 1)]


def read_manifest(path: Path, *, required: bool = True) -> dict[str, str]:
    """``<sha256>  <file name>`` lines (``sha256sum`` format; ``#`` comments) -> {name: digest}."""
    out: dict[str, str] = {}
    if not path.exists():
        if required:
            raise HandbookDownloadError(f"checksum manifest {path} not found")
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0].lower()):
            raise HandbookDownloadError(f"{path}:{n}: not a '<sha256>  <file>' line: {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DownloadResult:
    out: Path
    rows: int
    frauds: int
    days: int
    downloaded: list[str]
    reused: list[str]
    recorded: list[str]  # unlisted files whose digest was recorded on first use (trust_unlisted)


def fetch_handbook(
    out: Path,
    *,
    start: date = DEFAULT_START,
    end: date = DEFAULT_END,
    base_url: str = DEFAULT_BASE_URL,
    cache_dir: Path | None = None,
    manifest: Path = MANIFEST,
    trust_unlisted: bool = False,
    timeout_s: float = 60.0,
    progress: Callable[[str], None] = lambda _msg: None,
) -> DownloadResult:
    """Fetch (or reuse) each day's file, verify it, and write ``out`` (Parquet, zstd, ``COLUMNS``)."""
    names = day_names(start, end)
    cache = cache_dir or out.parent / "handbook-days"
    expected = read_manifest(manifest)
    recorded_path = cache / RECORDED
    recorded = read_manifest(recorded_path, required=False)
    unlisted = [n for n in names if n not in expected and n not in recorded]
    if unlisted and not trust_unlisted:
        raise HandbookDownloadError(
            f"{unlisted[0]}: no checksum in {manifest} ({len(unlisted)} of {len(names)} files unlisted); a pickle is "
            "only unpickled after its checksum matched. Pass --trust-unlisted to accept the pinned source's files "
            f"and record their checksums in {recorded_path}")
    cache.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(out, 0, 0, len(names), [], [], [])
    frames = []
    for name in names:
        path = cache / name
        want = expected.get(name) or recorded.get(name)
        if path.exists() and (want is None or sha256_of(path) != want):
            path.unlink()  # a cached file we cannot vouch for: fetch it again
        if path.exists():
            result.reused.append(name)
        else:
            got = _download(f"{base_url.rstrip('/')}/{name}", path, name, want, timeout_s)
            result.downloaded.append(name)
            if want is None:
                recorded[name] = got
                result.recorded.append(name)
                _write_recorded(recorded_path, recorded)
            progress(f"{name}: downloaded")
        frames.append(read_day(path, name))
    df = combine(frames)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(tmp, index=False, compression="zstd")
    tmp.replace(out)
    result.rows, result.frauds = len(df), int(df["TX_FRAUD"].sum())
    return result


def _download(url: str, path: Path, name: str, want: str | None, timeout_s: float) -> str:
    """Fetch ``url`` to ``path`` through ``.part``; the digest is checked before the file takes its name."""
    part = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, part.open("wb") as f:  # noqa: S310 - http(s) only
            for block in iter(lambda: resp.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise HandbookDownloadError(f"{name}: HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise HandbookDownloadError(f"{name}: cannot fetch {url}: {reason}") from None
    got = digest.hexdigest()
    if want is not None and got != want:
        part.unlink(missing_ok=True)
        raise HandbookDownloadError(f"{name}: checksum mismatch: expected sha256 {want}, got {got} (from {url}); "
                                    "the file was discarded, not unpickled")
    part.replace(path)
    return got


def _write_recorded(path: Path, digests: dict[str, str]) -> None:
    lines = ["# sha256 of handbook files accepted on first use (--trust-unlisted); checked on every later run"]
    lines += [f"{d}  {n}" for n, d in sorted(digests.items())]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


_ALLOWED_MODULE_PREFIXES = ("pandas", "numpy", "datetime", "pytz", "dateutil", "zoneinfo")
_DENIED_MODULE_PREFIXES = ("pandas.io", "pandas.testing", "pandas.util", "pandas.core.computation",
                           "numpy.lib.npyio", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib")
_ALLOWED_GLOBALS = {
    ("builtins", n) for n in ("slice", "range", "object", "list", "dict", "tuple", "set", "frozenset", "bytearray",
                              "complex", "int", "float", "str", "bytes", "bool")
} | {("copyreg", "_reconstructor"), ("collections", "OrderedDict"), ("_codecs", "encode")}


@cache
def _unpickler() -> type[pickle.Unpickler]:
    from pandas.compat import pickle_compat

    class DataFrameUnpickler(pickle_compat.Unpickler):
        """pandas' compatibility unpickler (old pandas' class paths), admitting only the types a DataFrame is made of.

        pandas, numpy and pyarrow.lib (their readers, evaluators and test helpers excepted), datetime/time-zone types
        and a few builtin containers; anything else (``os.system``, ``builtins.eval``, ``io.open``...) is refused."""

        def find_class(self, module: str, name: str) -> Any:
            mod, attr = pickle_compat._class_locations_map.get((module, name), (module, name))
            ok = (mod, attr) in _ALLOWED_GLOBALS or mod == "pyarrow.lib" or (  # pandas 3's strings are pyarrow arrays
                mod.split(".")[0] in _ALLOWED_MODULE_PREFIXES and not mod.startswith(_DENIED_MODULE_PREFIXES)
                and not attr.startswith(("read_", "load", "eval", "exec", "system")))
            if not ok:
                raise pickle.UnpicklingError(f"refusing {module}.{name}: not a part of a DataFrame")
            return super().find_class(module, name)

    return DataFrameUnpickler


def read_day(path: Path, name: str) -> pd.DataFrame:
    """One verified day file -> its DataFrame (call only after the checksum matched; see the module docstring)."""
    import pandas as pd

    try:
        obj = _unpickler()(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file, named
        raise HandbookDownloadError(f"{name}: not a readable pickle of a DataFrame: {exc}") from None
    if not isinstance(obj, pd.DataFrame):
        raise HandbookDownloadError(f"{name}: holds a {type(obj).__name__}, not a DataFrame")
    missing = [c for c in COLUMNS if c not in obj.columns]
    if missing:
        raise HandbookDownloadError(f"{name}: missing the handbook's columns {missing}")
    return obj


def combine(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The days as one frame of ``COLUMNS``, in transaction order (as the handbook's ``read_from_files``)."""
    import pandas as pd

    df = pd.concat([f[list(COLUMNS)] for f in frames], ignore_index=True)
    df = df.sort_values("TRANSACTION_ID", kind="stable").reset_index(drop=True)
    return df.astype(COLUMNS)
