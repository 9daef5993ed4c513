"""The model registry: which model versions exist, which one is active, and the audit of changes.

A version's artifact is checked against its recorded sha256 before it is served; a mismatch is
refused with :class:`~scoring_service.adapters.model.gbdt.ModelError` and whatever was serving keeps serving.
"""

from __future__ import annotations

import builtins
import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from scoring_service.adapters.sql.db import AuditEvent, ModelVersion, utcnow

STATUSES = ("active", "shadow", "canary", "retired")  # canary: answers FRAUDSCORE_CANARY_SHARE of the cards
_ACTIVATIONS = ("activate", "promote", "rollback")  # audit actions that make their subject the active version


class RegistryError(Exception):
    """A registry request that cannot be carried out (unknown version, bad state)."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A detached, immutable view of one registered model version."""

    version: str
    framework: str
    artifact_path: str
    sha256: str
    feature_names: list[str]
    thresholds: dict[str, float]
    policy: dict[str, float]
    metrics: dict[str, Any]
    params: dict[str, Any]
    status: str
    description: str
    created_at: dt.datetime
    activated_at: dt.datetime | None

    @classmethod
    def of(cls, row: ModelVersion) -> ModelRecord:
        return cls(
            version=row.version,
            framework=row.framework,
            artifact_path=row.artifact_path,
            sha256=row.sha256,
            feature_names=list(row.feature_names),
            thresholds=dict(row.thresholds),
            policy=dict(row.policy or {}),
            metrics=dict(row.metrics or {}),
            params=dict(row.params or {}),
            status=row.status,
            description=row.description or "",
            created_at=row.created_at,
            activated_at=row.activated_at,
        )


def _actor() -> str:
    """The identity of a change made with direct database access: the process' uid, never an
    environment variable (``$LOGNAME`` says whatever the caller sets). Changes through the admin
    RPC record the authenticated caller instead (``actor=``)."""
    return f"local:{os.getuid()}"


class Registry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _audit(self, session: Session, action: str, subject: str, *, actor: str | None = None, **details: Any) -> None:
        session.add(AuditEvent(actor=(actor or _actor())[:128], action=action, subject=subject, details=details))

    def next_version(self, prefix: str) -> str:
        """``<prefix>-<UTC timestamp>``: sortable, unique enough for humans, safe in Redis keys."""
        return f"{prefix}-{utcnow():%Y%m%dT%H%M%S%f}"[: len(prefix) + 1 + 18]

    def register(
        self,
        *,
        version: str,
        framework: str,
        artifact_path: str | Path,
        sha256: str,
        feature_names: Iterable[str],
        thresholds: dict[str, float],
        policy: dict[str, float] | None = None,
        metrics: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        description: str = "",
        activate: bool = False,
    ) -> ModelRecord:
        if not {"review", "decline"} <= thresholds.keys() or not thresholds["review"] <= thresholds["decline"]:
            raise RegistryError(f"thresholds need review <= decline, got {thresholds}")
        with Session(self.engine) as session, session.begin():
            if session.scalar(select(ModelVersion).where(ModelVersion.version == version)):
                raise RegistryError(f"model version {version!r} is already registered")
            row = ModelVersion(
                version=version,
                framework=framework,
                artifact_path=str(artifact_path),
                sha256=sha256,
                feature_names=list(feature_names),
                thresholds=thresholds,
                policy=policy or {},
                metrics=metrics or {},
                params=params or {},
                description=description,
                status="shadow",
            )
            session.add(row)
            self._audit(session, "register", version, framework=framework, sha256=sha256, metrics=metrics or {})
        if activate:
            return self.activate(version)
        return self.get(version)

    def get(self, version: str) -> ModelRecord:
        with Session(self.engine) as session:
            row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
            if row is None:
                raise RegistryError(f"no model version {version!r}; see `fraudscore model list`")
            return ModelRecord.of(row)

    def list(self) -> list[ModelRecord]:
        with Session(self.engine) as session:
            rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id))
            return [ModelRecord.of(r) for r in rows]

    def active(self) -> ModelRecord | None:
        with Session(self.engine) as session:
            row = session.scalar(
                select(ModelVersion)
                .where(ModelVersion.status == "active")
                .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
            )
            return ModelRecord.of(row) if row else None

    def activate(self, version: str, *, actor: str | None = None, action: str = "activate") -> ModelRecord:
        """Make ``version`` the one active model; the previous active one becomes shadow.

        ``actor``: the authenticated identity to audit (default: ``local:<uid>``)."""
        with Session(self.engine) as session, session.begin():
            row = session.scalar(select(ModelVersion).where(ModelVersion.version == version).with_for_update())
            if row is None:
                raise RegistryError(f"no model version {version!r}; see `fraudscore model list`")
            previous = session.scalars(
                select(ModelVersion).where(ModelVersion.status == "active", ModelVersion.version != version)
            ).all()
            for prev in previous:
                prev.status = "shadow"
            row.status = "active"
            row.activated_at = utcnow()
            self._audit(session, action, version, actor=actor, previous=[p.version for p in previous])
        return self.get(version)

    def set_status(self, version: str, status: str, *, actor: str | None = None) -> ModelRecord:
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if status == "active":
            return self.activate(version, actor=actor)
        with Session(self.engine) as session, session.begin():
            row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
            if row is None:
                raise RegistryError(f"no model version {version!r}; see `fraudscore model list`")
            if row.status == "active" and status == "retired":
                others = session.scalar(
                    select(ModelVersion).where(ModelVersion.status != "retired", ModelVersion.version != version)
                )
                if others is None:
                    raise RegistryError(f"{version!r} is the only model that can serve; register another first")
            row.status = status
            self._audit(session, status, version, actor=actor)
        return self.get(version)

    def retire(self, version: str, *, actor: str | None = None) -> ModelRecord:
        return self.set_status(version, "retired", actor=actor)

    def canary(self) -> ModelRecord | None:
        """The newest version with status ``canary`` (None: no canary in progress)."""
        with Session(self.engine) as session:
            row = session.scalar(select(ModelVersion).where(ModelVersion.status == "canary")
                                 .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc()))
            return ModelRecord.of(row) if row else None

    def promote(self, *, actor: str | None = None) -> ModelRecord:
        """The canary becomes the active version (the previous active one: shadow), audited ``promote``."""
        canary = self.canary()
        if canary is None:
            raise RegistryError("no canary to promote: `fraudscore model canary VERSION` starts one")
        return self.activate(canary.version, actor=actor, action="promote")

    def end_canary(self, *, actor: str | None = None) -> ModelRecord | None:
        """Retire the canary in progress (every card back on the active version), audited ``rollback``;
        None when there is none."""
        with Session(self.engine) as session, session.begin():
            rows = session.scalars(select(ModelVersion).where(ModelVersion.status == "canary")).all()
            versions = [row.version for row in rows]
            for row in rows:
                row.status = "retired"
                self._audit(session, "rollback", row.version, actor=actor, step="canary")
        return self.get(versions[-1]) if versions else None

    def rollback_target(self) -> str:
        """The version that was active before the active one (from the audit log); RegistryError if none."""
        active = self.active()
        if active is None:
            raise RegistryError("no active model to roll back from")
        with Session(self.engine) as session:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(_ACTIVATIONS),
                                                            AuditEvent.subject == active.version)
                                   .order_by(AuditEvent.id.desc()).limit(1)).all()
        previous = [v for v in (rows[0].details.get("previous") or []) if v != active.version] if rows else []
        if not previous:
            raise RegistryError(f"no version was active before {active.version!r}: nothing to roll back to")
        return str(previous[0])

    def previously_active(self, version: str) -> builtins.list[ModelRecord]:
        """The versions that were active before ``version``, the most recently active first, each
        once; retired ones left out (retiring takes a version out of service on purpose).

        A start whose active version does not load serves the first of these that does
        (``ScoringServer``): the version active before it is the one the operators last trusted.
        The newest registered version would not do: a version registered with ``--no-activate``,
        or one only ever shadowed or on canary, was never put on every card by anyone, and a
        damaged file would silently promote it. So the walk reads the audit log's activations
        (``activate``, ``promote``, ``rollback``; each records the versions it replaced), not
        ``created_at``; a canary's ``rollback`` (which retires it, recording no ``previous``) is no
        activation."""
        with Session(self.engine) as session:
            events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(_ACTIVATIONS))
                                     .order_by(AuditEvent.id.desc())).all()
            order: builtins.list[str] = []  # the subject was active after the versions it replaced
            for event in events:
                details = event.details or {}
                if "previous" not in details:
                    continue
                for name in (event.subject, *details["previous"]):
                    if name != version and name not in order:
                        order.append(str(name))
            rows = {row.version: row for row in session.scalars(select(ModelVersion)
                                                                .where(ModelVersion.version.in_(order)))}
            return [ModelRecord.of(rows[name]) for name in order if name in rows and rows[name].status != "retired"]

    def audit_log(self, limit: int = 50) -> builtins.list[AuditEvent]:  # ``list`` here is the method above
        with Session(self.engine) as session:
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)).all()
            session.expunge_all()
            return list(rows)
