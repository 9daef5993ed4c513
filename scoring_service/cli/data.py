"""``fraudscore data handbook``: the handbook's published daily files -> the Parquet file the commands read."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from scoring_service.adapters.files import handbook_download as hb
from scoring_service.cli.common import cli_settings, console, err, fail


def _day(value: str, flag: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        fail(f"{flag}: not a date (YYYY-MM-DD): {value!r}")


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Data sets: the handbook's simulated payments.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command()
    def handbook(
        start: Annotated[str, typer.Option("--from", help=f"First day ({hb.FIRST_DAY} or later).")] = str(hb.DEFAULT_START),
        end: Annotated[str, typer.Option("--to", help=f"Last day ({hb.LAST_DAY} or earlier).")] = str(hb.DEFAULT_END),
        out: Annotated[Path | None, typer.Option(
            help="Parquet file to write (default: <data dir>/handbook/transactions-<from>_<to>.parquet).")] = None,
        base_url: Annotated[str, typer.Option(help="Where the day files are (<base-url>/<day>.pkl).")] = hb.DEFAULT_BASE_URL,
        cache_dir: Annotated[Path | None, typer.Option(
            help="Where verified day files are kept between runs (default: beside --out, handbook-days/).")] = None,
        manifest: Annotated[Path, typer.Option(help="sha256sum-format checksums of the day files.")] = hb.MANIFEST,
        trust_unlisted: Annotated[bool, typer.Option(
            help="Accept files the manifest does not list, recording their checksums on first download.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Download the handbook's daily files, verify their SHA-256, write the Parquet file (resumable).

        Each file is unpickled only after its checksum matched (a pickle is code): see
        scoring_service/adapters/files/handbook_download.py."""
        first, last = _day(start, "--from"), _day(end, "--to")
        target = out or hb.default_output(cli_settings().data_dir, first, last)
        try:
            result = hb.fetch_handbook(target, start=first, end=last, base_url=base_url, cache_dir=cache_dir,
                                       manifest=manifest, trust_unlisted=trust_unlisted,
                                       progress=lambda msg: err.print(msg, highlight=False))
        except ValueError as exc:  # a date range outside the handbook's
            fail(str(exc), 2)
        except hb.HandbookDownloadError as exc:
            fail(str(exc), 1)
        summary = {"out": str(result.out), "rows": result.rows, "frauds": result.frauds, "days": result.days,
                   "downloaded": len(result.downloaded), "reused": len(result.reused),
                   "checksums_recorded": len(result.recorded)}
        if as_json:
            print(json.dumps(summary))
        else:
            console.print(f"wrote {result.out}: {result.rows:,} payments ({result.frauds:,} fraud) from {result.days} days "
                          f"({len(result.downloaded)} downloaded, {len(result.reused)} reused)")
