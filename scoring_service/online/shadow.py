"""The versions beside the active one: a shadow scored in the background, a canary answering a share of cards.

``Rollout.watch`` (one task per server process) reads the registry every ``registry_poll_s`` and:

* **shadow** (``FRAUDSCORE_SHADOW_SHARE`` > 0): the newest version with status ``shadow`` that was
  never active (a freshly registered one; versions that served before are shadow too, by demotion,
  and are left alone) is loaded beside the active one. After an answer, a ``share`` of the payments
  are put on a bounded queue (``FRAUDSCORE_SHADOW_QUEUE``; full: dropped and counted) with what the
  request already read; background workers score them with the shadow model (its own micro-batcher
  and model thread, never inline on the event loop) and compare with the answer given:
  ``fraudscore_shadow_score_diff`` (|shadow - answer|) and ``fraudscore_shadow_decision_flips_total``.
  Nothing of it is on the answer's path but one ``put_nowait``.
* **canary** (``FRAUDSCORE_CANARY_SHARE`` > 0): the newest version with status ``canary`` answers the
  cards in the share (``scorer.in_canary``: a stable hash of the customer id), always through its
  model (the cache's risks are the active version's), tagged with its version; it writes nothing
  back to the cache.
* **drift**: the active version's live bin counts (``core.drift.LiveDrift``) against the training
  profile stored with it (``params.drift_profile``), exported by ``telemetry.DRIFT``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Histogram

from scoring_service.adapters.model.gbdt import ModelError
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core import features
from scoring_service.core.drift import LiveDrift
from scoring_service.core.validation import Payment
from scoring_service.logging import get_logger
from scoring_service.online import telemetry
from scoring_service.online.scorer import Known, ScoreResult, ServingModel

if TYPE_CHECKING:
    from scoring_service.online.server import ScoringServer

log = get_logger(__name__)

SHADOW_SCORED = Counter("fraudscore_shadow_scored_total", "Payments the shadow version scored (background).",
                        ["version"])
SHADOW_DROPPED = Counter("fraudscore_shadow_dropped_total", "Payments not shadow-scored: queue full, or model error.",
                         ["reason"])
SHADOW_DIFF = Histogram("fraudscore_shadow_score_diff", "|shadow risk score - the answer's risk score| per payment.",
                        ["version"], buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
SHADOW_FLIPS = Counter("fraudscore_shadow_decision_flips_total", "Payments whose shadow decision differs from the "
                       "answer's, by the answer's decision and the shadow's.", ["version", "answer", "shadow"])
_WORKERS = 8  # concurrent shadow scorings: enough for the shadow's batcher to form batches


def pick_shadow(records: list[ModelRecord]) -> ModelRecord | None:
    """The newest version with status shadow that was never active (None: none)."""
    fresh = [r for r in records if r.status == "shadow" and r.activated_at is None]
    return max(fresh, key=lambda r: r.created_at) if fresh else None


def pick_canary(records: list[ModelRecord]) -> ModelRecord | None:
    canaries = [r for r in records if r.status == "canary"]
    return max(canaries, key=lambda r: r.created_at) if canaries else None


class ShadowScorer:
    """A share of the answered payments, scored again by the shadow version in the background."""

    def __init__(self, serving: ServingModel, share: float, max_queue: int) -> None:
        self.serving = serving
        self.share = share
        self._queue: asyncio.Queue[tuple[Payment, Known, ScoreResult]] = asyncio.Queue(max_queue)
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.serving.batcher.start()
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name="shadow") for _ in range(_WORKERS)]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.serving.batcher.stop()

    def offer(self, payment: Payment, known: Known, result: ScoreResult) -> None:
        """After an answer: queue the payment for the shadow (its share; dropped and counted when full)."""
        if self.share < 1.0 and random.random() >= self.share:
            return
        try:
            self._queue.put_nowait((payment, known, result))
        except asyncio.QueueFull:
            SHADOW_DROPPED.labels("queue_full").inc()

    async def _work(self) -> None:
        while True:
            payment, known, result = await self._queue.get()
            try:
                await self.score(payment, known, result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                SHADOW_DROPPED.labels("error").inc()
                log.warning("shadow.failed", error=type(exc).__name__, model_version=self.serving.version)

    async def score(self, payment: Payment, known: Known, result: ScoreResult) -> tuple[float, str]:
        """The shadow's risk score and decision for the payment, compared with the answer (metrics)."""
        s = self.serving
        row = features.online_features(payment.amount, payment.timestamp, known.state,
                                       known.terminal.state if known.terminal else None)
        prob, reasons = await s.batcher.submit(row)
        risk, _ = s.policy.apply(prob, reasons, payment.amount, known.state, s.top_k, known.velocity)
        decision = s.policy.decide(risk)
        SHADOW_SCORED.labels(s.version).inc()
        SHADOW_DIFF.labels(s.version).observe(abs(risk - result.risk_score))
        if decision != result.decision:
            SHADOW_FLIPS.labels(s.version, result.decision, decision).inc()
        return risk, decision


class Rollout:
    """Keeps the shadow, the canary and the drift counts of one server process in step with the registry."""

    def __init__(self, server: ScoringServer, options: telemetry.ObservabilityOptions) -> None:
        self.server = server
        self.options = options
        self.shadow: ShadowScorer | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-model")
        self._refused: set[str] = set()
        self._drift_version: str | None = None
        server.scorer.on_model_row = self._observe_row

    def _observe_row(self, version: str, row: np.ndarray, prob: float) -> None:
        drift = telemetry.DRIFT.drift
        if drift is not None and version == self._drift_version:
            drift.observe(row, prob)

    async def watch(self) -> None:
        try:
            while True:
                try:
                    await self.refresh()
                except Exception:
                    log.exception("rollout.refresh_failed")
                await asyncio.sleep(self.server.options.registry_poll_s)
        finally:
            if self.shadow is not None:
                await self.shadow.stop()
            if self.server.scorer.canary is not None:
                await self.server.scorer.canary.batcher.stop()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def refresh(self) -> None:
        scorer = self.server.scorer
        serving = scorer.serving
        if serving is not None and serving.version != self._drift_version:
            profile = serving.record.params.get("drift_profile")
            telemetry.DRIFT.drift = LiveDrift(profile, serving.record.feature_names) if profile else None
            telemetry.DRIFT.version = serving.version
            self._drift_version = serving.version
            if not profile:
                log.warning("drift.no_profile", model_version=serving.version, fix="retrain: profiles are stored at training")
        records = await asyncio.to_thread(self.server.registry.list)
        want_shadow = pick_shadow(records) if self.options.shadow_share > 0 else None
        want_canary = pick_canary(records) if self.options.canary_share > 0 else None
        await self._set_canary(want_canary)
        await self._set_shadow(want_shadow)
        telemetry.observe_versions({
            "active": serving.version if serving else None,
            "shadow": self.shadow.serving.version if self.shadow else None,
            "canary": scorer.canary.version if scorer.canary else None,
        })

    async def _load(self, record: ModelRecord, inline: bool) -> ServingModel | None:
        try:
            model = await asyncio.to_thread(self.server.load_model, record)
        except ModelError as exc:
            if record.version not in self._refused:
                self._refused.add(record.version)
                log.error("rollout.model_refused", model_version=record.version, status=record.status, error=str(exc))
            return None
        options = self.server.model_options
        if not inline:  # the shadow never scores on the event loop
            options = dataclasses.replace(options, batch_inline_max_rows=0)
        return ServingModel.of(record, model, options, self._executor)

    async def _set_canary(self, record: ModelRecord | None) -> None:
        scorer = self.server.scorer
        current = scorer.canary
        if (current.version if current else None) == (record.version if record else None):
            return
        new = await self._load(record, inline=True) if record is not None else None
        if record is not None and new is None:
            return
        if new is not None:
            new.batcher.start()
        scorer.canary_share = self.options.canary_share
        scorer.canary = new
        log.info("rollout.canary", model_version=new.version if new else None, share=self.options.canary_share,
                 previous=current.version if current else None)
        if current is not None:
            await asyncio.sleep(0.5)  # calls already routed to it finish
            await current.batcher.stop()

    async def _set_shadow(self, record: ModelRecord | None) -> None:
        current = self.shadow
        if (current.serving.version if current else None) == (record.version if record else None):
            return
        new = await self._load(record, inline=False) if record is not None else None
        if record is not None and new is None:
            return
        observers = self.server.scorer.observers
        if current is not None:
            observers.remove(current.offer)
        self.shadow = None
        if new is not None:
            self.shadow = ShadowScorer(new, self.options.shadow_share, self.options.shadow_queue)
            self.shadow.start()
            observers.append(self.shadow.offer)
        log.info("rollout.shadow", model_version=new.version if new else None, share=self.options.shadow_share,
                 previous=current.serving.version if current else None)
        if current is not None:
            await current.stop()
