"""The admin RPC (``fraudscore.v1.ModelAdmin``): registry changes through the running service.

Served on the scoring port, behind ``online/auth.py`` with the scope ``admin``. Each change is
recorded in the audit log with the caller's authenticated identity (``key:<id>:<owner>`` or
``mtls:<id>:<cn>``), never with anything the client says about itself. An activation is refused
(``FAILED_PRECONDITION``) when this process cannot load the version's artifact (checksum,
features), as the service would refuse to serve it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from scoring_service.adapters.model.gbdt import ModelError
from scoring_service.adapters.sql.registry import STATUSES, ModelRecord, Registry, RegistryError
from scoring_service.logging import get_logger
from scoring_service.online.auth import current_caller
from scoring_service.protos import admin_pb2, admin_pb2_grpc

log = get_logger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"].full_name


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """The audited identity: the authenticated caller, else (authentication off) ``unauthenticated:<peer>``."""
    caller = current_caller()
    return caller.identity if caller is not None else f"unauthenticated:{context.peer()}"


class ModelAdminServicer:
    def __init__(self, registry: Registry, load_model: Any) -> None:
        self.registry = registry
        self.load_model = load_model  # ModelRecord -> model; raises ModelError

    async def _activate(self, version: str, actor: str, action: str, context: grpc.aio.ServicerContext) -> ModelRecord:
        record = await asyncio.to_thread(self.registry.get, version)
        try:
            await asyncio.to_thread(self.load_model, record)
        except ModelError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"not activated: {exc}")
        return await asyncio.to_thread(lambda: self.registry.activate(version, actor=actor, action=action))

    async def _answer(self, record: ModelRecord, actor: str, previous: ModelRecord | None, action: str) -> Any:
        log.info("admin.changed", action=action, model_version=record.version, status=record.status, actor=actor)
        return admin_pb2.ModelStatusResponse(version=record.version, status=record.status, actor=actor,
                                             previous_active=previous.version if previous else "")

    async def SetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if not request.version:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version: is required")
        if request.status not in STATUSES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"status: must be one of {', '.join(STATUSES)}, got {request.status!r}")
        actor = caller_identity(context)
        previous = await asyncio.to_thread(self.registry.active)
        try:
            if request.status == "active":
                record = await self._activate(request.version, actor, "activate", context)
            else:
                record = await asyncio.to_thread(
                    lambda: self.registry.set_status(request.version, request.status, actor=actor))
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return await self._answer(record, actor, previous, "activate" if request.status == "active" else request.status)

    async def Rollback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        actor = caller_identity(context)
        previous = await asyncio.to_thread(self.registry.active)
        try:
            target = await asyncio.to_thread(self.registry.rollback_target)
            record = await self._activate(target, actor, "rollback", context)
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return await self._answer(record, actor, previous, "rollback")


def add_to_server(servicer: ModelAdminServicer, server: grpc.aio.Server) -> None:
    admin_pb2_grpc.add_ModelAdminServicer_to_server(servicer, server)
