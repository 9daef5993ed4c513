"""OpenTelemetry spans for Score(): off by default, OTLP by configuration (``FRAUDSCORE_OTEL``).

The spans of one call (``docs/observability.md``)::

    fraudscore.Score                     the whole call (telemetry interceptor, outermost)
    +-- admission                        from the call's arrival until admission control let it through
    +-- cache.read                       the Redis round trip
    +-- batcher.wait                     the row's wait in the micro-batcher's queue
    +-- inference                        the model call of the row's batch (timed by the batcher)
    +-- write_back                       a new card's entity risk, after the answer (background)

Off (the default), every helper here is a no-op costing one global read: no span objects at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_admission: ContextVar[Any] = ContextVar("fraudscore_admission_span", default=None)


def configure(mode: str, endpoint: str | None = None, *, exporter: Any = None, service_name: str = "fraudscore") -> None:
    """``off``: no spans; ``otlp``: spans to an OTLP/gRPC collector at ``endpoint`` (batched), or to
    ``exporter`` (each span as it ends: tests give the SDK's in-memory exporter)."""
    global _tracer, _provider
    if mode not in ("off", "otlp"):
        raise ValueError(f"otel must be off or otlp, got {mode!r}")
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    if mode == "off":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or "localhost:4317", insecure=True)))
    _provider = provider
    _tracer = provider.get_tracer("scoring_service")


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one, current inside the block (None when tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes or None) as s:
        yield s


def timed_span(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of the current one, with given wall-clock times (``time.time_ns()``)."""
    if _tracer is None:
        return
    s = _tracer.start_span(name, start_time=start_ns, attributes=attributes or None)
    s.end(end_time=end_ns)


def start_admission() -> None:
    """Open the ``admission`` span (the outer interceptor, before admission control)."""
    if _tracer is not None:
        _admission.set(_tracer.start_span("admission"))


def end_admission(admitted: bool) -> None:
    """Close the ``admission`` span (the inner interceptor once admitted, else the outer one)."""
    s = _admission.get()
    if s is not None:
        s.set_attribute("admitted", admitted)
        s.end()
        _admission.set(None)
