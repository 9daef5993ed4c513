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
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError
from scoring_service.adapters.redis.entity_cache import EntityCache
from scoring_service.adapters.sql.db import DatabaseUnavailable
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.logging import get_logger
from scoring_service.online.admin import ADMIN_SERVICE, ModelAdminServicer
from scoring_service.online.admin import add_to_server as add_admin_to_server
from scoring_service.online.admission import AdmissionControl
from scoring_service.online.auth import Security
from scoring_service.online.options import ModelOptions, RequestOptions, ScoringMode, ServerOptions
from scoring_service.online.scorer import Scorer, ServingModel
from scoring_service.online.servicer import FraudScoringServicer, add_to_server
from scoring_service.protos import scoring_pb2

log = get_logger(__name__)

ModelLoader = Callable[[ModelRecord], GbdtModel]  # checks the artifact; raises ModelError

MODEL_REFUSED = Counter("fraudscore_model_refused_total", "Model versions that could not be loaded.")
MODEL_MISMATCH = Gauge("fraudscore_model_mismatch", "1 while the version serving is not the registry's active one.")
REGISTRY_POLL_FAILED = Counter("fraudscore_registry_poll_failures_total",
                               "Registry polls that failed (database unreachable, ...); the model serving keeps serving.")
MODEL_INFO = Gauge("fraudscore_model_info", "The version serving and the registry's active one (value 1).",
                   ["serving", "active"])


def _report_versions(active: ModelRecord | None, serving: str | None) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(serving or "", active.version if active else "").set(1)
    MODEL_MISMATCH.set(1 if active is not None and serving is not None and active.version != serving else 0)


SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name

# The end of a drain (``ScoringServer.stop``): how long no new call must have arrived before the
# server stops, at most how long it waits for that, and how long its GOAWAY gets to leave before the
# answers held back meanwhile go out; what an answer keeps back from its caller's deadline.
_CLOSE_QUIET_S = 0.02
_CLOSE_MAX_S = 0.25
_GOAWAY_S = 0.02
_DEADLINE_MARGIN_S = 0.005


class HeldAnswers:
    """The servicer, with its answers held back at the very end of a drain (``ScoringServer.stop``).

    grpc-core cancels (CANCELLED: for the caller, maybe processed) every call that reaches the
    server after its shutdown began, or that still waits to be picked up then. So, before shutting
    down, the server holds each answer it finishes until its GOAWAY has gone out (a fraction of a
    second; never past the caller's deadline): a client waiting for its answer sends nothing new
    meanwhile, and one that gets it learns first that the connection is closing, so its next call
    goes to a new connection, which is refused (UNAVAILABLE: not processed).
    """

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer
        self.closing = False
        self.last_call = 0.0  # when the last call arrived while closing
        self._released = asyncio.Event()

    def __getattr__(self, name: str) -> Any:  # any other method of the servicer, as it is
        return getattr(self._servicer, name)

    def release(self) -> None:
        self._released.set()

    async def _hold(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        timeout = None if remaining is None else remaining - _DEADLINE_MARGIN_S
        if self._released.is_set() or (timeout is not None and timeout <= 0):
            return
        try:
            await asyncio.wait_for(self._released.wait(), timeout)
        except TimeoutError:
            pass

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self.closing:
            self.last_call = time.monotonic()
        answer = await self._servicer.Score(request, context)
        if self.closing:
            await self._hold(context)
        return answer

    async def ScoreBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self.closing:
            self.last_call = time.monotonic()
        answer = await self._servicer.ScoreBatch(request, context)
        if self.closing:
            await self._hold(context)
        return answer


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
        fallback_min_decision: str = "REVIEW",
        model_options: ModelOptions,
        request_options: RequestOptions,
        server_options: ServerOptions,
        security: Security | None = None,
    ) -> None:
        self.security = security or Security()  # TLS and caller authentication (online/auth.py)
        self.registry = registry
        self.cache = cache
        self.load_model = load_model
        self.model_options = model_options
        self.request_options = request_options
        self.options = server_options
        self.scorer = Scorer(cache, mode, intraday, fallback_min_decision)
        self._refused: set[str] = set()  # versions that did not load (logged once each)
        self._none_loads_logged: str | None = None  # the active version whose model.no_version_loads was logged
        self.health = health.aio.HealthServicer()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._tasks: list[asyncio.Task[None]] = []
        self._answers = HeldAnswers(FraudScoringServicer(self.scorer, request_options))
        self.server: grpc.aio.Server | None = None
        self.port = 0
        # online/telemetry.py: interceptors around admission control, background watchers (shadow, canary)
        self.outer_interceptors: list[grpc.aio.ServerInterceptor] = []
        self.inner_interceptors: list[grpc.aio.ServerInterceptor] = []
        self.refusal_observers: list[Callable[[str, str], None]] = []  # (method, code) of each call admission refused
        self.watchers: list[Callable[[], Coroutine[Any, Any, None]]] = []

    async def load_active_model(self) -> bool:
        """Load the registry's active version if it differs from the one serving. True if swapped.

        A version that cannot be loaded (missing or damaged artifact, wrong features) is refused and
        logged once; whatever serves keeps serving. At start, with nothing serving, the version active
        before it that loads is served instead, loudly (``model.serving_previous_version``), so one
        bad artifact does not keep the service NOT_SERVING (``_load_previous``).
        ``fraudscore_model_mismatch`` is 1 while the version serving is not the registry's active one."""
        record = await asyncio.to_thread(self.registry.active)
        current = self.scorer.serving
        _report_versions(record, current.version if current else None)
        if record is None or (current is not None and current.version == record.version):
            return False
        serving = await self._load(record, current)
        if serving is None and current is None:
            serving = await self._load_previous(record)
        if serving is None:
            return False
        record = serving.record
        serving.batcher.start()
        if self.cache is not None:
            await self.cache.refresh_generation(serving.version)
        self.scorer.serving = serving  # one reference swap: requests see the old or the new, whole
        log.info("model.serving", model_version=record.version, framework=record.framework, device=serving.model.device,
                 previous=current.version if current else None)
        active = await asyncio.to_thread(self.registry.active)
        _report_versions(active, record.version)
        if current is not None:
            await asyncio.sleep(0.5)
            await current.batcher.stop()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return True

    async def _load(self, record: ModelRecord, current: ServingModel | None) -> ServingModel | None:
        try:
            model = await asyncio.to_thread(self.load_model, record)
        except ModelError as exc:
            if record.version not in self._refused:
                self._refused.add(record.version)
                MODEL_REFUSED.inc()
                log.error("model.refused", model_version=record.version, error=str(exc),
                          serving=current.version if current else None)
            return None
        return ServingModel.of(record, model, self.model_options, self._executor)

    async def _load_previous(self, refused: ModelRecord) -> ServingModel | None:
        """For a start whose active version does not load: the first that loads of the versions active
        before it, walking back (``Registry.previously_active``, from the audit log).

        Never a version nobody activated (only registered with ``--no-activate``, shadowed, on canary): the
        newest registered version was served before, and a damaged file put an unreviewed model on
        every card. With none that loads, None and one ``model.no_version_loads`` line per active
        version (not one per registry poll): the service stays NOT_SERVING, a load balancer sends
        nothing to it, and its registry watcher serves the next version activated, as with an empty
        registry. Exiting instead would put a supervisor into a restart loop that changes nothing."""
        records = await asyncio.to_thread(self.registry.previously_active, refused.version)
        for record in records:
            serving = await self._load(record, None)
            if serving is not None:
                log.error("model.serving_previous_version", active=refused.version, serving=record.version,
                          fix="activate a version whose artifact loads (fraudscore model activate VERSION)")
                return serving
        if self._none_loads_logged != refused.version:
            self._none_loads_logged = refused.version
            log.error("model.no_version_loads", active=refused.version, tried=[r.version for r in records],
                      health="NOT_SERVING",
                      fix="activate a version whose artifact loads (fraudscore model activate VERSION)")
        return None

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.options.registry_poll_s)
            try:
                await self.load_active_model()
            except DatabaseUnavailable as exc:  # the database is down: keep serving, count it, try again
                REGISTRY_POLL_FAILED.inc()
                serving = self.scorer.serving
                log.error("model.watch_failed", error=str(exc), serving=serving.version if serving else None)
            except Exception:
                REGISTRY_POLL_FAILED.inc()
                log.exception("model.watch_failed")

    async def _watch_generation(self) -> None:
        while True:
            await asyncio.sleep(self.options.generation_poll_s)
            serving = self.scorer.serving
            if serving is not None and self.cache is not None:
                await self.cache.refresh_generation(serving.version)

    def _pending_options(self) -> list[tuple[str, int]]:
        """grpc-core's own bound on the calls waiting for this process (docs/overload.md)."""
        n = self.options.max_pending_calls
        return [("grpc.server.max_pending_requests", n), ("grpc.server.max_pending_requests_hard_limit", n)] if n else []

    async def start(self) -> int:
        admission = AdmissionControl(
            {f"/{SERVICE_NAME}/Score", f"/{SERVICE_NAME}/ScoreBatch"}, max_in_flight=self.options.max_in_flight,
            min_time_s=self.options.min_call_time_ms / 1000.0, pushback_ms=self.options.pushback_ms,
            max_queue_s=self.options.max_queue_ms / 1000.0, queue_from_deadline=self.options.queue_from_deadline,
            on_refused=self.refusal_observers, prechecks=self.security.prechecks(),
        )
        self.server = grpc.aio.server(
            # admission first: a refused call costs no key check, decoding or telemetry wrapper (online/admission.py)
            interceptors=[admission, *self.outer_interceptors, *self.security.interceptors(), *self.inner_interceptors],
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                *self._pending_options(),
            ],
        )
        add_to_server(self._answers, self.server)
        add_admin_to_server(ModelAdminServicer(self.registry, self.load_model), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.security.bind(self.server, self.options.listen)
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
        self._tasks += [asyncio.create_task(watch(), name=watch.__qualname__) for watch in self.watchers]
        self._tasks.append(asyncio.create_task(admission.lag.run(), name="loop-lag"))  # online/admission.py
        log.info("server.started", listen=self.options.listen, port=self.port, pid=os.getpid(),
                 mode=self.scorer.mode.value, model_version=self.scorer.serving.version if self.scorer.serving else None)
        return self.port

    async def stop(self, drain_s: float | None = None, hurry: asyncio.Event | None = None) -> None:
        """Drain, then stop: every call is answered, or refused before the server accepted it.

        1. Health turns NOT_SERVING at once (for good: a model swap no longer sets it back), and the
           server keeps serving for ``drain_s`` (default ``options.drain_s``; cut short when
           ``hurry`` is set), so that load balancers stop routing to it.
        2. Closing: answers are held back (``HeldAnswers``) until no new call has come for
           ``_CLOSE_QUIET_S`` (at most ``_CLOSE_MAX_S``).
        3. The gRPC server stops: GOAWAY to every client, the port closed (new connections are
           refused); then the held answers go out; the calls in flight get up to
           ``options.stop_grace_s`` to finish. Then the background write-backs are awaited.
        """
        drain_s = self.options.drain_s if drain_s is None else drain_s
        await self.health.enter_graceful_shutdown()
        log.info("server.draining", drain_s=drain_s, pid=os.getpid())
        if drain_s > 0:
            try:
                await asyncio.wait_for((hurry or asyncio.Event()).wait(), drain_s)
            except TimeoutError:
                pass
        if self.server is not None:
            answers = self._answers
            answers.closing = True
            answers.last_call = closing = time.monotonic()
            while time.monotonic() - answers.last_call < _CLOSE_QUIET_S and time.monotonic() - closing < _CLOSE_MAX_S:
                await asyncio.sleep(_CLOSE_QUIET_S / 4)
            quiet = time.monotonic() - answers.last_call >= _CLOSE_QUIET_S
            stopping = asyncio.ensure_future(self.server.stop(self.options.stop_grace_s))
            await asyncio.sleep(_GOAWAY_S)  # the shutdown (GOAWAY, port closed) ran on the task's first step
            answers.release()
            await stopping
            # quiet=false: calls were still arriving (clients that ignore health); grpc-core cancelled those in transit.
            log.info("server.closed", close_s=round(time.monotonic() - closing, 3), quiet=quiet, pid=os.getpid())
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scorer.drain()
        if self.scorer.serving is not None:
            await self.scorer.serving.batcher.stop()
        if self.cache is not None:
            await self.cache.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.security.close()
        log.info("server.stopped", pid=os.getpid())
