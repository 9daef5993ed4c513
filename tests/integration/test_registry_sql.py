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
