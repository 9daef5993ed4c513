"""One server process: the gRPC server, health and reflection, the model and cache watchers.

It serves grpc.health.v1 (SERVING once a model is loaded) and server reflection, watches the
registry for a newly activated model (loaded and verified aside, then swapped in whole) and keeps
the cache's active generation fresh. It gets its registry, cache and options from the composition
root (``scoring_service.bootstrap``) and reads no configuration itself.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError
from scoring_service.adapters.redis.entity_cache import EntityCache
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.logging import get_logger
from scoring_service.online.options import ModelOptions, RequestOptions, ScoringMode, ServerOptions
from scoring_service.online.scorer import Scorer, ServingModel
from scoring_service.online.servicer import FraudScoringServicer
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

log = get_logger(__name__)

ModelLoader = Callable[[ModelRecord], GbdtModel]  # checks the artifact; raises ModelError

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name


class ScoringServer:
    """One server process: gRPC server, scorer, registry watcher, generation refresher."""

    def __init__(
        self,
        registry: Registry,
        cache: EntityCache | None,
        load_model: ModelLoader,
        *,
        mode: ScoringMode,
        intraday: bool = True,
        model_options: ModelOptions,
        request_options: RequestOptions,
        server_options: ServerOptions,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.load_model = load_model
        self.model_options = model_options
        self.request_options = request_options
        self.options = server_options
        self.scorer = Scorer(cache, mode, intraday)
        self.health = health.aio.HealthServicer()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def load_active_model(self) -> bool:
        """Load the registry's active version if it differs from the one serving. True if swapped."""
        record = await asyncio.to_thread(self.registry.active)
        current = self.scorer.serving
        if record is None or (current is not None and current.version == record.version):
            return False
        try:
            model = await asyncio.to_thread(self.load_model, record)
            serving = ServingModel.of(record, model, self.model_options, self._executor)
        except ModelError as exc:
            log.error("model.refused", model_version=record.version, error=str(exc),
                      serving=current.version if current else None)
            return False
        serving.batcher.start()
        if self.cache is not None:
            await self.cache.refresh_generation(serving.version)
        self.scorer.serving = serving  # one reference swap: requests see the old or the new, whole
        log.info("model.serving", model_version=record.version, framework=record.framework, device=serving.model.device,
                 previous=current.version if current else None)
        if current is not None:
            await asyncio.sleep(0.5)
            await current.batcher.stop()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return True

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.options.registry_poll_s)
            try:
                await self.load_active_model()
            except Exception:
                log.exception("model.watch_failed")

    async def _watch_generation(self) -> None:
        while True:
            await asyncio.sleep(self.options.generation_poll_s)
            serving = self.scorer.serving
            if serving is not None and self.cache is not None:
                await self.cache.refresh_generation(serving.version)

    async def start(self) -> int:
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        scoring_pb2_grpc.add_FraudScoringServicer_to_server(FraudScoringServicer(self.scorer, self.request_options), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(self.options.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.options.listen}")
        await self.load_active_model()
        # Everything allocated so far (modules, the model) lives as long as the process: move it out
        # of the collector's sight, so that a full collection walks only what requests allocate.
        # Without it, a gen-2 collection walks ~10^6 objects (pandas, xgboost) in the middle of a request.
        gc.collect()
        gc.freeze()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._watch_registry(), name="registry-watch"),
            asyncio.create_task(self._watch_generation(), name="generation-watch"),
        ]
        log.info("server.started", listen=self.options.listen, port=self.port, pid=os.getpid(),
                 mode=self.scorer.mode.value, model_version=self.scorer.serving.version if self.scorer.serving else None)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scorer.drain()
        if self.scorer.serving is not None:
            await self.scorer.serving.batcher.stop()
        if self.cache is not None:
            await self.cache.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("server.stopped", pid=os.getpid())
