"""``fraudscore keys create | list | revoke``: the API keys (and mTLS identities) callers present.

A key is printed once, at creation; the database keeps only its HMAC (``adapters/sql/keys.py``).
The running servers see a new key at once and a revocation within ``FRAUDSCORE_AUTH_CACHE_TTL_S``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from scoring_service import bootstrap
from scoring_service.adapters.sql.keys import KeyStoreError
from scoring_service.cli.common import cli_settings, console, fail

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Who holds the key (a team, a service); with --mtls: the client "
                                       "certificate's subject CN (or a DNS SAN).")],
    scope: Annotated[list[str], typer.Option(help="score (Score, ScoreBatch) or admin (the admin RPC); repeat for both.")],
    rate: Annotated[float | None, typer.Option(help="Calls per second [FRAUDSCORE_RATE_LIMIT_PER_S].")] = None,
    burst: Annotated[int | None, typer.Option(help="Token bucket size [FRAUDSCORE_RATE_LIMIT_BURST].")] = None,
    mtls: Annotated[bool, typer.Option("--mtls", help="An mTLS identity (no secret): callers presenting a client "
                                       "certificate with this CN get these scopes without a key.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key and print it ONCE (it cannot be shown again), or register an mTLS identity."""
    settings = cli_settings()
    try:
        principal, secret = bootstrap.key_store(settings).create(owner, scope, rate_per_s=rate, burst=burst, mtls=mtls)
    except KeyStoreError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({"id": principal.key_id, "kind": principal.kind, "owner": principal.owner,
                          "scopes": sorted(principal.scopes), "key": secret}))
        return
    scopes = " ".join(sorted(principal.scopes))
    print(f"id: {principal.key_id}  kind: {principal.kind}  owner: {principal.owner}  scopes: {scopes}")
    if secret is not None:
        print(f"key: {secret}")
        print("(shown once: store it now; callers send it as the x-api-key metadata)")


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List keys and mTLS identities (never their secrets)."""
    rows = bootstrap.key_store(cli_settings()).entries()
    if as_json:
        print(json.dumps([
            {"id": p.key_id, "kind": p.kind, "owner": p.owner, "scopes": sorted(p.scopes), "rate_per_s": p.rate_per_s,
             "burst": p.burst, "created_at": p.created_at.isoformat(),
             "revoked_at": p.revoked_at.isoformat() if p.revoked_at else None}
            for p in rows
        ], indent=2))
        return
    table = Table(title="API keys")
    for col in ("id", "kind", "owner", "scopes", "rate/s", "burst", "created", "revoked"):
        table.add_column(col)
    for p in rows:
        table.add_row(str(p.key_id), p.kind, p.owner, " ".join(sorted(p.scopes)),
                      "default" if p.rate_per_s is None else f"{p.rate_per_s:g}",
                      "default" if p.burst is None else str(p.burst), f"{p.created_at:%Y-%m-%d %H:%M}",
                      f"{p.revoked_at:%Y-%m-%d %H:%M}" if p.revoked_at else "-")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(metavar="ID", help="The key's id (fraudscore keys list).")]) -> None:
    """Revoke key ID: servers refuse it within FRAUDSCORE_AUTH_CACHE_TTL_S (default 5 s)."""
    try:
        principal = bootstrap.key_store(cli_settings()).revoke(key_id)
    except KeyStoreError as exc:
        fail(str(exc))
    print(f"revoked key {principal.key_id} ({principal.owner})")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
