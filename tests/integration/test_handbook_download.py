"""``fraudscore data handbook`` against a local HTTP server serving fixture day files in the handbook's format.

The fixtures are small pickles made here with pandas, as the handbook's simulator writes them (one
DataFrame per day, its own index, TX_FRAUD_SCENARIO included). The server counts the requests, so
the tests can say what was downloaded and what was reused.
"""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from scoring_service.adapters.files.handbook_download import RECORDED, default_output
from scoring_service.adapters.files.payments_file import read_payments_file
from scoring_service.cli import app

pytestmark = pytest.mark.integration
DAYS = [date(2018, 4, 1) + timedelta(days=i) for i in range(3)]
PARQUET_TYPES = {"TRANSACTION_ID": "int64", "TX_DATETIME": "timestamp[ns]", "CUSTOMER_ID": "int64", "TERMINAL_ID": "int64",
                 "TX_AMOUNT": "double", "TX_TIME_SECONDS": "int64", "TX_TIME_DAYS": "int64", "TX_FRAUD": "int64"}


def day_frame(day: date, first_id: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(first_id)
    seconds = np.sort(rng.integers(0, 86_400, n)) + (day - DAYS[0]).days * 86_400
    fraud = (rng.random(n) < 0.2).astype(int)
    df = pd.DataFrame({
        "TRANSACTION_ID": np.arange(first_id, first_id + n),
        "TX_DATETIME": pd.Timestamp("2018-04-01") + pd.to_timedelta(seconds, "s"),
        "CUSTOMER_ID": rng.integers(0, 50, n), "TERMINAL_ID": rng.integers(0, 80, n),
        "TX_AMOUNT": rng.gamma(2.0, 30.0, n).round(2), "TX_TIME_SECONDS": seconds, "TX_TIME_DAYS": seconds // 86_400,
        "TX_FRAUD": fraud, "TX_FRAUD_SCENARIO": fraud,
    })
    df.index = df.index + first_id  # the simulator's daily frames keep their slice of the global index
    return df


class Evil:
    """A pickle that creates ``marker`` when it is unpickled: what a tampered file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, served folder, request log): the fixture days, served over real HTTP."""
    root = tmp_path_factory.mktemp("handbook-site")
    first = 0
    for day in DAYS:
        df = day_frame(day, first, 40)
        df.to_pickle(root / f"{day}.pkl", protocol=4)
        first += len(df)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path.rsplit("/", 1)[-1])
            if not self.path.startswith("/data/"):
                self.send_error(404)
                return
            self.path = self.path[len("/data"):]
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data", root, requests  # /data/<day>.pkl, as upstream
    server.shutdown()
    server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(root: Path, tmp: Path, **override: str) -> Path:
    path = tmp / "manifest.txt"
    lines = ["# fixture digests"] + [f"{override.get(str(d), sha256(root / f'{d}.pkl'))}  {d}.pkl" for d in DAYS]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["data", "handbook", *args], env=env)


def test_downloads_verifies_and_writes_the_parquet_the_commands_read(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, requests = site
    requests.clear()
    out = tmp_path / "hb.parquet"
    res = run("--from", "2018-04-01", "--to", "2018-04-03", "--out", str(out), "--base-url", base,
              "--manifest", str(manifest_for(root, tmp_path)), "--json")
    assert res.exit_code == 0, res.output
    assert sorted(requests) == [f"{d}.pkl" for d in DAYS]
    schema = pq.read_schema(out)
    assert {f.name: str(f.type) for f in schema} == PARQUET_TYPES  # the columns of ../shared's handbook file
    df = pd.read_parquet(out)
    expected = pd.concat([pd.read_pickle(root / f"{d}.pkl") for d in DAYS])
    assert len(df) == 120 and df["TRANSACTION_ID"].tolist() == list(range(120))
    assert df["TX_FRAUD"].sum() == expected["TX_FRAUD"].sum()
    assert df["TX_AMOUNT"].tolist() == expected.sort_values("TRANSACTION_ID")["TX_AMOUNT"].tolist()
    assert len(read_payments_file(out)) == 120  # the reader of every command takes it


def test_a_second_run_reuses_verified_files_and_refetches_only_what_is_missing(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, requests = site
    args = ["--from", "2018-04-01", "--to", "2018-04-03", "--out", str(tmp_path / "hb.parquet"), "--base-url", base,
            "--manifest", str(manifest_for(root, tmp_path))]
    assert run(*args).exit_code == 0
    requests.clear()
    cache = tmp_path / "handbook-days"
    (cache / "2018-04-02.pkl").unlink()  # as if the first run had stopped there
    (cache / "2018-04-03.pkl").write_bytes(b"truncated")  # or been cut off mid-file
    res = run(*args, "--json")
    assert res.exit_code == 0, res.output
    assert sorted(requests) == ["2018-04-02.pkl", "2018-04-03.pkl"]
    assert '"downloaded": 2' in res.stdout and '"reused": 1' in res.stdout


def test_a_missing_day_is_a_clear_http_error_naming_the_file(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, _ = site
    manifest = manifest_for(root, tmp_path)
    with manifest.open("a") as f:
        f.write(f"{'0' * 64}  2018-04-04.pkl\n")
    res = run("--from", "2018-04-03", "--to", "2018-04-04", "--out", str(tmp_path / "x.parquet"), "--base-url", base,
              "--manifest", str(manifest))
    assert res.exit_code == 1
    assert "2018-04-04.pkl: HTTP 404" in " ".join(res.stderr.split())
    assert not (tmp_path / "x.parquet").exists()


def test_a_checksum_mismatch_fails_before_anything_is_unpickled(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, _ = site
    marker = tmp_path / "pwned"
    evil_site = tmp_path / "evil"
    evil_site.mkdir()
    (evil_site / "2018-04-02.pkl").write_bytes(pickle.dumps(Evil(marker)))
    good = sha256(root / "2018-04-02.pkl")
    # The server serves a tampered file where the manifest expects the genuine one.
    (root / "2018-04-02.pkl").rename(root / "2018-04-02.pkl.orig")
    (root / "2018-04-02.pkl").write_bytes((evil_site / "2018-04-02.pkl").read_bytes())
    try:
        res = run("--from", "2018-04-01", "--to", "2018-04-03", "--out", str(tmp_path / "x.parquet"), "--base-url", base,
                  "--manifest", str(manifest_for(root, tmp_path, **{"2018-04-02": good})))
    finally:
        (root / "2018-04-02.pkl").unlink()
        (root / "2018-04-02.pkl.orig").rename(root / "2018-04-02.pkl")
    message = " ".join(res.stderr.split())
    assert res.exit_code == 1 and "2018-04-02.pkl: checksum mismatch" in message and good in message
    assert not marker.exists()
    assert not (tmp_path / "handbook-days" / "2018-04-02.pkl").exists()  # discarded, not cached


def test_unlisted_files_are_refused_unless_trusted_then_their_digests_are_kept(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, _ = site
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing verified yet\n")
    args = ["--from", "2018-04-01", "--to", "2018-04-02", "--out", str(tmp_path / "hb.parquet"), "--base-url", base,
            "--manifest", str(empty)]
    refused = run(*args)
    assert refused.exit_code == 1 and "2018-04-01.pkl: no checksum" in " ".join(refused.stderr.split())
    assert run(*args, "--trust-unlisted").exit_code == 0
    recorded = (tmp_path / "handbook-days" / RECORDED).read_text()
    assert f"{sha256(root / '2018-04-01.pkl')}  2018-04-01.pkl" in recorded
    assert run(*args).exit_code == 0  # recorded digests now vouch for the cached files
    (tmp_path / "handbook-days" / "2018-04-01.pkl").write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    assert run(*args).exit_code == 0  # the tampered cached copy is discarded and fetched again
    assert not (tmp_path / "pwned").exists()


def test_even_a_trusted_file_may_only_hold_a_dataframe(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, _ = site
    folder = tmp_path / "evil-site"
    folder.mkdir()
    (folder / "2018-04-01.pkl").write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = run("--from", "2018-04-01", "--to", "2018-04-01", "--out", str(tmp_path / "x.parquet"),
              "--base-url", folder.as_uri(), "--manifest", str(empty), "--trust-unlisted")
    assert res.exit_code == 1 and "refusing io.open" in " ".join(res.stderr.split())
    assert not (tmp_path / "pwned").exists()


def test_defaults_and_bad_input(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root, _ = site
    res = run("--from", "2018-04-01", "--to", "2018-04-01", "--base-url", base, "--manifest", str(manifest_for(root, tmp_path)),
              env={"FRAUDSCORE_DATA_DIR": str(tmp_path / "var")})
    assert res.exit_code == 0, res.output
    assert default_output(tmp_path / "var", date(2018, 4, 1), date(2018, 4, 1)).is_file()
    assert run("--from", "2018-03-31", "--to", "2018-04-01", "--out", str(tmp_path / "y.parquet")).exit_code == 2
    assert run("--from", "April", "--out", str(tmp_path / "y.parquet")).exit_code == 2
    missing = run("--out", str(tmp_path / "y.parquet"), "--manifest", str(tmp_path / "none.txt"))
    assert missing.exit_code == 1 and "not found" in missing.stderr
