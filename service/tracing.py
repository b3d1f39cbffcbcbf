"""Tracing with OpenTelemetry: one trace per inspected part, from the client through the
gateway and the server's stages to the inspection database.

Off by default, and then free: nothing is instrumented, `span()` is a shared null context and
`current_ids()` returns None. It is on when an exporter is configured by OpenTelemetry's own
variables (the OpenTelemetry SDK's environment specification):

- `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (OTLP over HTTP/protobuf,
  e.g. `http://127.0.0.1:4318`), or `OTEL_TRACES_EXPORTER=otlp|console`;
- `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keeps it off whatever else is set.

The usual others apply as the SDK reads them: `OTEL_SERVICE_NAME` (default `anomaly-server` or
`anomaly-gateway`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`.

What is traced when on:
- the gateway: FastAPI's server spans, and its gRPC client calls, which carry the W3C
  `traceparent` to the server in gRPC metadata;
- the server: gRPC's server spans; the data plane's `anomaly.score` with its stages
  (admission, decode, queue, inference, decision, spool), the stages' times as measured for
  the answer's `timings`;
- the inspection log: each shipped decision gets an `inspection.insert` span in its own
  trace, timed as the batch INSERT that carried it, and the batch's `inspection.ship` span
  (with SQLAlchemy's statement spans) is linked to every decision in it;
- JSON log lines (`service.logs`) carry `trace_id` and `span_id`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

_NULL = contextlib.nullcontext()
EXIT_FLUSH_S = 2.0  # the longest an exit waits for the collector
_tracer: Any = None  # the project's tracer once `configure` has run; None: tracing off
_provider: Any = None


def requested(env: dict[str, str] | None = None) -> bool:
    """Whether OpenTelemetry's variables ask for traces to be exported."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    return bool(exporters) or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                   or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    """Whether this process traces (`configure` found an exporter configured)."""
    return _tracer is not None


def configure(service_name: str) -> bool:
    """Set up the tracer provider and exporters from the `OTEL_*` variables, once per process.
    Returns whether tracing is on. An unusable configuration (an unknown exporter name)
    is logged and leaves tracing off rather than stopping the process."""
    if _tracer is not None:
        return True
    if not requested():
        return False
    try:
        return _configure(service_name)
    except Exception as exc:  # noqa: BLE001 - e.g. OTEL_PROPAGATORS naming one not installed
        log.error("tracing stays off: OpenTelemetry could not be set up (%s: %s)", type(exc).__name__, exc)
        return False


def _configure(service_name: str) -> bool:
    global _tracer, _provider
    from opentelemetry import propagate, trace  # noqa: F401 - propagate: fail here, not per request
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    names = {e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
             if e.strip()} or {"otlp"}
    unknown = names - {"otlp", "console"}
    if unknown:
        log.error("tracing stays off: OTEL_TRACES_EXPORTER names %s; this server knows otlp, console "
                  "and none", ", ".join(sorted(unknown)))
        return False
    problem = _otlp_problem(os.environ) if "otlp" in names else None
    if problem:
        log.error("tracing stays off: %s", problem)
        return False
    # Which process (a `--processes N` child, a replica) made a span: host and pid, unless given.
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name,
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # see _flush_at_exit
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in names:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(_flush_at_exit, provider)
    _provider = provider
    _tracer = provider.get_tracer("edge-anomaly")
    log.info("tracing on: exporting spans of %s (%s)", resource.attributes.get(SERVICE_NAME),
             ", ".join(sorted(names)))
    return True


def _otlp_problem(env: dict[str, str]) -> str | None:
    """Why the OTLP settings cannot work with this server's exporter (OTLP over HTTP with
    protobuf), or None."""
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol != "http/protobuf":
        return (f"OTLP protocol {protocol!r} is not supported: this server exports OTLP over HTTP "
                "(http/protobuf); set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and the collector's "
                "HTTP port (4318 by default)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = env.get(name, "").strip()
        if value and not value.lower().startswith(("http://", "https://")):
            return f"{name}={value!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:4318)"
    return None


def _flush_at_exit(provider: Any) -> None:
    """Send the spans still buffered, for at most `EXIT_FLUSH_S`: the SDK's own exit handler
    retries a collector that is down for up to its export timeout (8.4 s measured with the
    connection refused), which would stretch every stop past its grace."""
    done = threading.Thread(target=provider.shutdown, name="otel-exit-flush", daemon=True)
    done.start()
    done.join(EXIT_FLUSH_S)
    if done.is_alive():
        log.warning("tracing: the collector did not take the last spans within %.0f s; dropped", EXIT_FLUSH_S)


def span(name: str, attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager:
    """A span around a block (child of the current one), or a shared null context when off."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def current() -> Any:
    """The current span context (to parent spans made later, elsewhere), or None when off or
    outside any span."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


def anchor() -> Any:
    """The current span context for keeping until later (`current()` without the caller's
    W3C `tracestate`, which a client may fill with up to 8 KB): a few dozen bytes each."""
    ctx = current()
    if ctx is None:
        return None
    from opentelemetry.trace import SpanContext

    return SpanContext(ctx.trace_id, ctx.span_id, is_remote=False, trace_flags=ctx.trace_flags)


def annotate(attributes: dict[str, Any]) -> None:
    """Set attributes on the current span (nothing when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


def current_ids() -> tuple[str, str] | None:
    """The current trace id and span id in hex (as OTLP and W3C write them), or None."""
    ctx = current()
    if ctx is None:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def timed(name: str, parent: Any, start_ns: int, end_ns: int,
          attributes: dict[str, Any] | None = None) -> None:
    """Record a span that has already happened (a stage measured elsewhere, or an INSERT
    that carried many decisions) under `parent`, a span context from `current()`."""
    if _tracer is None or parent is None:
        return
    from opentelemetry import trace

    context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    s = _tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
    s.end(end_time=max(start_ns, end_ns))


def stages(parent: Any, end_ns: int, durations: Sequence[tuple[str, float]]) -> None:
    """Record consecutive stages that ended at `end_ns`, laid back to back in the given order
    (each `(name, seconds)`), under `parent`."""
    if _tracer is None or parent is None:
        return
    t = end_ns - sum(int(s * 1e9) for _, s in durations)
    for name, seconds in durations:
        ns = int(seconds * 1e9)
        timed(name, parent, t, t + ns)
        t += ns


@contextlib.contextmanager
def linked(name: str, parents: Sequence[Any], attributes: dict[str, Any] | None = None) -> Iterator[None]:
    """A new root span linked to each of `parents` (work done for many traces at once)."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import Link

    with _tracer.start_as_current_span(name, links=[Link(p) for p in parents if p is not None],
                                       attributes=attributes):
        yield


def server_interceptors() -> list[Any]:
    """Interceptors for the gRPC aio server that continue the caller's trace (none when off)."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]


def client_interceptors() -> list[Any]:
    """Interceptors for gRPC aio channels that send the current trace to the server (none when off)."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider))


def instrument_app(app: Any) -> None:
    """FastAPI server spans for `app` (continuing a `traceparent` the caller sent), when on."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="healthz,readyz,metrics")


def instrument_engine(engine: Any) -> None:
    """SQLAlchemy statement spans for `engine` alone, when on (not every engine of the
    process: MLflow's registry store polls its own database all day)."""
    if _tracer is None:
        return
    try:
        from opentelemetry.instrumentation.sqlalchemy import __version__
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import get_meter

        usage = get_meter(__name__).create_up_down_counter("db.client.connections.usage")
        EngineTracer(_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__),
                     engine, usage)
    except Exception as exc:  # an instrumentation release with another interface: no SQL spans
        log.warning("tracing: SQL statements of the inspection log are not traced (%s: %s)",
                    type(exc).__name__, exc)
