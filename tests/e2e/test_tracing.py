"""OpenTelemetry spans of Score() (online/tracing.py), caught by the SDK's in-memory exporter.

The server runs in this process (the exporter must be here), on a real port, over a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from scoring_service import bootstrap
from scoring_service.config import Settings
from scoring_service.online import tracing
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc


async def _score_new_card(model_data_dir: Path, redis_url: str, exporter: InMemorySpanExporter) -> scoring_pb2.ScoreResponse:
    settings = Settings(data_dir=model_data_dir, listen="127.0.0.1:0", auth="off", max_queue_ms=0, log_requests=False)
    server = bootstrap.scoring_server(settings, redis_url)
    tracing.configure("otlp", exporter=exporter)  # after the composition root configured it from the settings (off)
    try:
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await scoring_pb2_grpc.FraudScoringStub(channel).Score(scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(transaction_id="t1", customer_id=f"tr-{uuid.uuid4().hex}",
                                                    terminal_id="17", amount=42.0)), timeout=5)
        await server.scorer.drain()  # the write-back, after the answer
        return answer
    finally:
        await server.stop(drain_s=0)
        tracing.configure("off")


def test_score_spans_nest_under_the_call(model_data_dir: Path, redis_url: str) -> None:
    exporter = InMemorySpanExporter()
    answer = asyncio.run(_score_new_card(model_data_dir, redis_url, exporter))
    assert answer.source == scoring_pb2.MODEL
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (root,) = by_name["fraudscore.Score"]
    assert root.parent is None
    assert root.attributes["fraudscore.model_version"] == answer.model_version

    def children(parent: object) -> set[str]:
        return {s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}

    # the call: admission, the cache read, the row's wait in the batcher and its model call, the write-back
    assert {"admission", "cache.read", "batcher.wait", "inference", "write_back"} <= children(root)
    assert all(s.context.trace_id == root.context.trace_id for s in spans)
    (admission,) = by_name["admission"]
    assert admission.attributes["admitted"] is True
    # the write-back scores the card's entity row through the batcher: its own wait and model call
    (write_back,) = by_name["write_back"]
    assert children(write_back) == {"batcher.wait", "inference"}
    inference = next(s for s in by_name["inference"] if s.parent.span_id == root.context.span_id)
    wait = next(s for s in by_name["batcher.wait"] if s.parent.span_id == root.context.span_id)
    assert wait.end_time <= inference.start_time + 1 and inference.end_time <= root.end_time
    assert inference.attributes["device"] == "cpu"


def test_tracing_is_off_by_default_and_refuses_unknown_modes() -> None:
    assert Settings().otel == "off"
    tracing.configure("off")
    assert not tracing.enabled()
    with tracing.span("x") as s:
        assert s is None
    try:
        tracing.configure("jaeger")
    except ValueError as exc:
        assert "off or otlp" in str(exc)
    else:
        raise AssertionError("an unknown mode was accepted")
