"""An OTLP/HTTP trace receiver on a loopback port: what a collector is to a traced server,
for the benchmark's traced path (which counts spans) and the tracing tests (which keep them).

Point a process at it with `OTEL_EXPORTER_OTLP_ENDPOINT=<sink.endpoint>`; it answers every
`POST /v1/traces` (protobuf, gzip or not) with an empty `ExportTraceServiceResponse`.
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class OtlpSink:
    """Receives spans until `close()`; `keep`: also keep each span as a dict (`spans`)."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.spans: list[dict] = []
        self.received = 0  # spans, kept or not
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                sink.receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="otlp-sink", daemon=True).start()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        """Count (and with `keep`, keep) the spans of one export."""
        spans = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    spans.append({
                        "service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                        "links": [link.trace_id.hex() for link in s.links],
                        "attributes": {a.key: a.value for a in s.attributes}} if self.keep else {})
        with self._lock:
            self.received += len(spans)
            if self.keep:
                self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[dict]:
        """The kept spans of one trace."""
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()
