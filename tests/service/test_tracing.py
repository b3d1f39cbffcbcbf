"""Tracing from outside (`service.tracing`, `edge_anomaly_client.tracecontext`): one part scored by the
SDK through a real gateway and server, both exporting OTLP/HTTP to a collector on a loopback
port, makes one trace — the SDK's span, the gateway's, the server's stages and the inspection
database's insert, in order — and the JSON log lines of both processes carry its trace id.
With no `OTEL_*` variable nothing is traced and the log lines carry no trace id.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import start_gateway, start_server
from loadtests.otlp_sink import OtlpSink

ROOT = Path(__file__).resolve().parents[2]

# The plant's program: OpenTelemetry set up with an in-memory exporter, one score through the SDK.
CLIENT = """
import json, sys
from pathlib import Path
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from edge_anomaly_client.sdk import AnomalyClient

with AnomalyClient(sys.argv[1]) as client:
    result = client.score(Path(sys.argv[2]).read_bytes(), request_id=sys.argv[3], station="line-7")
print(json.dumps({"request_id": result.request_id, "spans": [
    {"name": s.name, "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}"}
    for s in exporter.get_finished_spans()]}))
"""


@pytest.fixture
def collector() -> Iterator[OtlpSink]:
    sink = OtlpSink(keep=True)
    yield sink
    sink.close()


def _json_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def _one(spans: list[dict], name: str, service: str) -> dict:
    found = [s for s in spans if s["name"] == name and s["service"] == service]
    assert len(found) == 1, f"{name} of {service}: {len(found)} spans in {[s['name'] for s in spans]}"
    return found[0]


def test_one_trace_from_sdk_through_gateway_server_and_database(store, good_and_defect, collector: OtlpSink,
                                                                tmp_path: Path) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "ANOMALY_LOG_FORMAT": "json"}
    server, target = start_server(
        store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
        env={**otel, "ANOMALY_INSPECTION_LOG": "true",
             "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{tmp_path / 'inspections.db'}"})
    try:
        gateway, base = start_gateway(target, tmp_path / "gateway.log", env=otel)
        try:
            script = tmp_path / "client.py"
            script.write_text(CLIENT)
            defect = str(good_and_defect[1][0])
            out = subprocess.run([sys.executable, str(script), base, defect, "SN-trace-1"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120, check=True)
            answer = json.loads(out.stdout.strip().splitlines()[-1])
            assert answer["request_id"] == "SN-trace-1"
            [sdk_span] = answer["spans"]
            assert sdk_span["name"] == "anomaly.Score"
            trace_id = sdk_span["trace_id"]

            def complete() -> list[dict] | None:  # each process exports on its own schedule
                spans = collector.trace(trace_id)
                names = {(s["service"], s["name"]) for s in spans}
                done = {("anomaly-server", "inspection.insert"),
                        ("anomaly-gateway", "/anomaly.v1.AnomalyDetection/Score")} <= names and any(
                    s["parent"] == sdk_span["span_id"] for s in spans)
                return spans if done else None

            spans = wait_for(complete, 30, "the spans of the gateway and of the inspection insert")

            # Straight to the server over gRPC: the context travels in gRPC metadata.
            out = subprocess.run([sys.executable, str(script), target, defect, "SN-trace-2"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120, check=True)
            [direct] = json.loads(out.stdout.strip().splitlines()[-1])["spans"]
            grpc_direct = wait_for(lambda: [s for s in collector.trace(direct["trace_id"])
                                            if s["name"] == "/anomaly.v1.AnomalyDetection/Score"], 30,
                                   "the server's span of the direct gRPC call")
            assert [s["parent"] for s in grpc_direct] == [direct["span_id"]]
            assert [s["service"] for s in grpc_direct] == ["anomaly-server"]
        finally:
            assert gateway.stop() == 0
    finally:
        assert server.stop() == 0

    # The chain of parents: SDK → gateway (HTTP server, then its gRPC client call) → server
    # (gRPC server span, then the data plane's anomaly.score and its stages).
    http_in = next(s for s in spans
                   if s["service"] == "anomaly-gateway" and s["parent"] == sdk_span["span_id"])
    assert "/v1/score" in http_in["name"]
    grpc_out = _one(spans, "/anomaly.v1.AnomalyDetection/Score", "anomaly-gateway")
    grpc_in = _one(spans, "/anomaly.v1.AnomalyDetection/Score", "anomaly-server")
    score = _one(spans, "anomaly.score", "anomaly-server")
    assert grpc_in["parent"] == grpc_out["span_id"]
    assert score["parent"] == grpc_in["span_id"]
    names = ("admission", "decode", "queue", "inference", "decision", "spool", "inspection.insert")
    stages = {name: _one(spans, name, "anomaly-server") for name in names}
    for name in ("admission", "decode", "queue", "inference", "decision", "spool"):
        assert stages[name]["parent"] == score["span_id"], name
    assert stages["inspection.insert"]["parent"] == stages["spool"]["span_id"]  # the spooled row, shipped
    # In order: what ran later started no earlier than what ran before it ended.
    assert http_in["start"] <= grpc_out["start"] <= grpc_in["start"] <= score["start"]
    assert stages["admission"]["end"] <= stages["inference"]["start"]
    assert max(stages[n]["end"] for n in ("decode", "queue")) <= stages["inference"]["start"] + 1
    assert stages["inference"]["end"] <= stages["decision"]["start"] <= stages["spool"]["start"]
    assert stages["spool"]["start"] <= stages["inspection.insert"]["start"]
    assert score["attributes"]["anomaly.request_id"].string_value == "SN-trace-1"
    assert score["attributes"]["anomaly.decision"].string_value in ("OK", "NG")
    # The batch INSERT itself (with SQLAlchemy's statement spans under it) is linked to the part.
    ship = [s for s in collector.spans if s["name"] == "inspection.ship" and trace_id in s["links"]]
    assert len(ship) == 1
    assert any(s["trace_id"] == ship[0]["trace_id"] and s["parent"] == ship[0]["span_id"]
               and "INSERT" in s["name"].upper() for s in collector.spans), "no SQL statement span"

    # The same trace id in the JSON log lines of both processes.
    server_lines = [x for x in _json_lines(tmp_path / "server.log") if x.get("trace_id") == trace_id]
    gateway_lines = [x for x in _json_lines(tmp_path / "gateway.log") if x.get("trace_id") == trace_id]
    assert any(x["message"] == "scored" and x.get("request_id") == "SN-trace-1" for x in server_lines)
    assert any(x["logger"] == "uvicorn.access" and "/v1/score" in x["message"] for x in gateway_lines), \
        "uvicorn's access line is not JSON with the trace id"


def test_tracing_off_by_default(store, good_and_defect, tmp_path: Path) -> None:
    """No OTEL_* variable: nothing traced, no trace ids in the log."""
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  env={"ANOMALY_LOG_FORMAT": "json"})
    try:
        with AnomalyClient(target) as client:
            client.score(good_and_defect[0][0].read_bytes(), request_id="SN-untraced")
    finally:
        assert server.stop() == 0
    lines = _json_lines(tmp_path / "server.log")
    assert any(x["message"] == "scored" for x in lines)
    assert not any("trace_id" in x for x in lines)
    assert not any("tracing on" in x["message"] for x in lines)


def test_collector_down_neither_fails_requests_nor_holds_the_stop(store, good_and_defect,
                                                                  tmp_path: Path) -> None:
    """The collector's port refuses connections: parts are answered, and a SIGTERM stop is
    not held by the exporter's retries (8.4 s measured with the SDK's own exit handler)."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}",
                                       "OTEL_BSP_SCHEDULE_DELAY": "60000"})  # all spans wait for the exit
    try:
        with AnomalyClient(target) as client:
            for i in range(3):
                assert client.score(good_and_defect[0][i].read_bytes(), request_id=f"SN-{i}").request_id
        t0 = time.monotonic()
        assert server.stop() == 0
        stopped = time.monotonic() - t0
    finally:
        server.stop()
    assert stopped < 7.5, f"stop took {stopped:.1f} s"  # 2 s for the spans, the rest the drain
    assert "did not take the last spans" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize(("env", "says"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTLP protocol 'grpc' is not supported"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, "is not an http:// or https:// URL"),
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "knows otlp, console and none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_PROPAGATORS": "bogus"},
     "could not be set up"),
])
def test_settings_tracing_cannot_use_leave_it_off_saying_why(env: dict[str, str], says: str) -> None:
    """A setting the exporter cannot honour is one ERROR line at start and no tracing, never a
    server that does not start or one that says "tracing on" and exports nowhere."""
    import os

    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from service import tracing\nprint('ON' if tracing.configure('anomaly-server') else 'OFF')")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "OFF", out
    assert "tracing stays off" in out.stderr and says in out.stderr, out.stderr
