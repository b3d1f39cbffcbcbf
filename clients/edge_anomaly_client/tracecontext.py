"""The SDK's part in a part's trace: a client span per call and the W3C trace context
(`traceparent`, `tracestate`) on the wire, in gRPC metadata or HTTP headers.

Only with OpenTelemetry's API installed (`pip install 'edge-anomaly[tracing]'`) and a tracer
provider set up by the plant's own program; otherwise every function here does nothing (the
API alone makes non-recording spans and injects no header).
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    from opentelemetry import propagate, trace
except Exception:  # noqa: BLE001 - the SDK without its `tracing` extra, or an OTEL_PROPAGATORS
    propagate = trace = None  # type: ignore[assignment]  # naming one not installed: no tracing

_NULL = contextlib.nullcontext()
# A proxy until the program sets a tracer provider (before or after this import), then its tracer.
_tracer = trace.get_tracer("edge_anomaly.client") if trace is not None else None


def span(rpc: str, attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager:
    """A client span `anomaly.<rpc>` around one call, its retries included."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(f"anomaly.{rpc}", kind=trace.SpanKind.CLIENT, attributes=attributes)


def headers() -> dict[str, str]:
    """The current trace context as W3C headers (empty outside a recording span)."""
    if propagate is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
