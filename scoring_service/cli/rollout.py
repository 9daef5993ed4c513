"""``fraudscore model canary|end-canary|promote|shadow-report``: changing models safely (docs/observability.md).

* ``canary VERSION``: VERSION answers ``FRAUDSCORE_CANARY_SHARE`` of the cards (services started with a share).
* ``end-canary``: the canary is retired, every card back on the active version (audited ``rollback``).
* ``promote``: the canary becomes the active version, in one command, audited (``promote``); ``fraudscore
  model rollback`` (``cli/models.py``) re-activates the version active before it.
* ``shadow-report``: the shadow's disagreement with the answers, summed over the given metrics endpoints.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Annotated, Any

import typer

from scoring_service import bootstrap
from scoring_service.cli.admin_client import (
    ApiKeyOpt,
    DirectOpt,
    Remote,
    ServerOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsOpt,
)
from scoring_service.cli.common import cli_settings, console, fail
from scoring_service.cli.models import model_app


def _registry_call(fn: Any) -> Any:
    from scoring_service.adapters.sql.registry import RegistryError

    try:
        return fn()
    except RegistryError as exc:
        fail(str(exc))


@model_app.command("canary")
def model_canary(version: str, server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False,
                 tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
                 direct: DirectOpt = False) -> None:
    """Start a canary: VERSION answers FRAUDSCORE_CANARY_SHARE of the cards (by a stable hash of the customer id)."""
    remote = Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct)
    remote.check()
    if remote.server:
        answer = remote.set_status(version, "canary")
        console.print(f"{answer.version}: {answer.status} (by {answer.actor})")
        return
    from scoring_service.adapters.model.gbdt import ModelError

    settings = cli_settings()
    registry = bootstrap.registry(settings)
    record = _registry_call(lambda: registry.get(version))
    if record.status == "active":
        fail(f"{version} is the active version already")
    try:  # refuse a canary the service would refuse to load
        bootstrap.model_loader(settings, device="cpu")(record)
    except ModelError as exc:
        fail(f"not a canary: {exc}")
    record = _registry_call(lambda: registry.set_status(version, "canary"))
    console.print(f"{record.version}: canary")


@model_app.command("promote")
def model_promote(version: Annotated[str | None, typer.Argument(help="The canary (required with --server; "
                                                                 "default with --direct: the registry's canary).")] = None,
                  server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False, tls_ca: TlsCaOpt = None,
                  tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None, direct: DirectOpt = False) -> None:
    """The canary becomes the active version (the previous active one: shadow); audited. Undo: `model rollback`."""
    remote = Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct)
    remote.check()
    if remote.server:
        if version is None:
            fail("give the canary VERSION with --server")
        answer = remote.set_status(version, "active")
        console.print(f"{answer.version}: {answer.status} (by {answer.actor}; previously active: "
                      f"{answer.previous_active or '-'})")
        return
    registry = bootstrap.registry(cli_settings())
    canary = registry.canary()
    if version is not None and (canary is None or canary.version != version):
        fail(f"{version} is not the canary (the canary: {canary.version if canary else 'none'})")
    record = _registry_call(registry.promote)
    console.print(f"{record.version}: active (promoted)")


@model_app.command("end-canary")
def model_end_canary(version: Annotated[str | None, typer.Argument(help="The canary (required with --server).")] = None,
                     server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False, tls_ca: TlsCaOpt = None,
                     tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None, direct: DirectOpt = False) -> None:
    """Stop the canary in progress: retire it, every card back on the active version; audited."""
    remote = Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct)
    remote.check()
    if remote.server:
        if version is None:
            fail("give the canary VERSION with --server")
        answer = remote.set_status(version, "retired")
        console.print(f"{answer.version}: {answer.status} (by {answer.actor})")
        return
    registry = bootstrap.registry(cli_settings())
    ended = _registry_call(registry.end_canary)
    if ended is None:
        fail("no canary in progress")
    console.print(f"{ended.version}: retired (canary rolled back)")


def _scrape(server: str, timeout_s: float = 5.0) -> str:
    url = server if "://" in server else f"http://{server}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode("utf-8", errors="replace"))
    except (OSError, ValueError) as exc:
        fail(f"--metrics {server}: no metrics at {url}: {exc}", 1)


def shadow_summary(bodies: list[str]) -> dict[str, Any]:
    """The shadow metrics of several endpoints (one per worker), summed, per shadow version."""
    from prometheus_client.parser import text_string_to_metric_families

    versions: dict[str, dict[str, Any]] = {}
    dropped = 0.0

    def of(version: str) -> dict[str, Any]:
        return versions.setdefault(version, {"scored": 0, "flips": 0, "flips_by": {}, "diff_sum": 0.0, "diff_count": 0})

    for body in bodies:
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if s.name == "fraudscore_shadow_scored_total":
                    of(s.labels["version"])["scored"] += int(s.value)
                elif s.name == "fraudscore_shadow_decision_flips_total":
                    v = of(s.labels["version"])
                    v["flips"] += int(s.value)
                    key = f"{s.labels['answer']}->{s.labels['shadow']}"
                    v["flips_by"][key] = v["flips_by"].get(key, 0) + int(s.value)
                elif s.name == "fraudscore_shadow_score_diff_sum":
                    of(s.labels["version"])["diff_sum"] += s.value
                elif s.name == "fraudscore_shadow_score_diff_count":
                    of(s.labels["version"])["diff_count"] += int(s.value)
                elif s.name == "fraudscore_shadow_dropped_total":
                    dropped += s.value
    for v in versions.values():
        v["flip_rate"] = v["flips"] / v["scored"] if v["scored"] else 0.0
        v["mean_abs_diff"] = v["diff_sum"] / v["diff_count"] if v["diff_count"] else 0.0
    return {"versions": versions, "dropped": int(dropped)}


@model_app.command("shadow-report")
def model_shadow_report(
    metrics: Annotated[list[str], typer.Option("--metrics", help="A server's metrics endpoint host:port "
                                               "(FRAUDSCORE_METRICS_PORT; repeat for each worker).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How the shadow version disagrees with the answers: payments scored, decision flips, mean |score difference|."""
    summary = shadow_summary([_scrape(m) for m in metrics])
    if as_json:
        print(json.dumps(summary))
        return
    if not summary["versions"]:
        print("no shadow scoring seen (FRAUDSCORE_SHADOW_SHARE > 0 and a registered, never-active shadow version?)")
    for version, v in summary["versions"].items():
        print(f"shadow {version}: scored {v['scored']}, decision flips {v['flips']} ({v['flip_rate']:.1%}), "
              f"mean |score diff| {v['mean_abs_diff']:.4f}, flips {v['flips_by']}")
    print(f"dropped: {summary['dropped']}")


def register(app: typer.Typer) -> None:
    """The commands are on ``fraudscore model`` (registered by ``cli.models``); importing this module adds them."""
