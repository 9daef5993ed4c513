"""The model registry and its migrations on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from scoring_service.adapters.sql.db import make_engine, upgrade_schema
from scoring_service.adapters.sql.registry import Registry, RegistryError


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'reg.db'}"
    base = request.getfixturevalue("postgres_url")
    name = f"reg_{tmp_path.name[-20:].lower().replace('-', '_')}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return base.rsplit("/", 1)[0] + f"/{name}"


def _register(reg: Registry, version: str, activate: bool = False):
    return reg.register(
        version=version, framework="xgboost", artifact_path=f"/models/{version}.ubj", sha256="ab" * 32,
        feature_names=["amount", "x"], thresholds={"review": 0.2, "decline": 0.6},
        policy={"high_amount": 220.0}, metrics={"auc_roc": 0.9}, activate=activate,
    )


def test_migrations_create_the_schema_and_are_idempotent(db_url):
    upgrade_schema(db_url)
    upgrade_schema(db_url)
    tables = set(sa.inspect(make_engine(db_url)).get_table_names())
    assert {"model_versions", "batch_runs", "batch_offsets", "audit_log", "alembic_version"} <= tables


def test_register_activate_retire_with_audit(db_url):
    upgrade_schema(db_url)
    reg = Registry(make_engine(db_url))
    assert reg.active() is None
    a = _register(reg, "xgb-a", activate=True)
    assert a.status == "active" and reg.active().version == "xgb-a"
    b = _register(reg, "xgb-b")
    assert b.status == "shadow"
    reg.activate("xgb-b")
    assert reg.active().version == "xgb-b"
    assert reg.get("xgb-a").status == "shadow"  # exactly one active
    reg.retire("xgb-a")
    assert [r.status for r in reg.list()] == ["retired", "active"]
    assert reg.get("xgb-b").thresholds == {"review": 0.2, "decline": 0.6}
    assert reg.get("xgb-b").feature_names == ["amount", "x"]
    actions = [e.action for e in reg.audit_log()]
    assert actions[:3] == ["retired", "activate", "register"]


def test_registry_errors_are_clear(db_url):
    upgrade_schema(db_url)
    reg = Registry(make_engine(db_url))
    _register(reg, "xgb-a", activate=True)
    with pytest.raises(RegistryError, match="already registered"):
        _register(reg, "xgb-a")
    with pytest.raises(RegistryError, match="no model version"):
        reg.activate("nope")
    with pytest.raises(RegistryError, match="only model"):
        reg.retire("xgb-a")
    with pytest.raises(RegistryError, match="review <= decline"):
        reg.register(version="bad", framework="xgboost", artifact_path="/x", sha256="0", feature_names=[],
                     thresholds={"review": 0.9, "decline": 0.1})


def test_previously_active_walks_back_the_activations_and_leaves_out_versions_never_activated(db_url):
    """The start's fallback order (``ScoringServer._load_previous``): the versions active before the
    given one, most recently active first, from the audit log; a version only registered, or on a
    canary that was ended (audited ``rollback`` too, without ``previous``), was never active."""
    upgrade_schema(db_url)
    reg = Registry(make_engine(db_url))
    for version in ("xgb-a", "xgb-b", "xgb-c"):
        _register(reg, version, activate=True)
    _register(reg, "xgb-registered-only")
    _register(reg, "xgb-canary")
    reg.set_status("xgb-canary", "canary")
    reg.end_canary()
    assert [r.version for r in reg.previously_active("xgb-c")] == ["xgb-b", "xgb-a"]

    reg.activate("xgb-a")  # a rollback by hand, then c again: a was active more recently than b
    reg.activate("xgb-c")
    assert [r.version for r in reg.previously_active("xgb-c")] == ["xgb-a", "xgb-b"]
    reg.retire("xgb-a")
    assert [r.version for r in reg.previously_active("xgb-c")] == ["xgb-b"]
    assert reg.previously_active("xgb-b") == [reg.get("xgb-c")]  # the others' history from any version
