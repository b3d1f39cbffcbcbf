"""The small ones of issue 16, point 8: TLS settings that contradict each other, the warning
for an exposed server without keys, reflection off, internal errors that leak nothing,
log lines that cannot be forged, and a decode-memory estimate that holds."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from cli.main import app
from loadtests.launch import start_server
from service.dataplane.data_plane import DataPlane
from service.logs import JsonFormatter, TextFormatter
from service.protocol.grpc.security import exposure_warning
from service.protocol.grpc.server import GrpcServer
from service.settings import Settings


@pytest.mark.parametrize(("fields", "message"), [
    ({"tls_client_ca_file": "ca.pem"}, "without a server certificate"),
    ({"tls_cert_file": "s.pem"}, "ANOMALY_TLS_KEY_FILE is not"),
    ({"tls_key_file": "s.key"}, "ANOMALY_TLS_CERT_FILE is not"),
    ({"grpc_client_cert_file": "c.pem"}, "ANOMALY_GRPC_CLIENT_KEY_FILE is not"),
    ({"https_key_file": "h.key"}, "ANOMALY_HTTPS_CERT_FILE is not"),
])
def test_inconsistent_tls_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


def test_inconsistent_tls_is_a_one_line_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_TLS_CLIENT_CA_FILE", "/nonexistent/ca.pem")
    result = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert "error: invalid settings" in result.output and "plaintext" in result.output
    assert "Traceback" not in result.output


def test_exposed_without_keys_warns() -> None:
    assert exposure_warning("0.0.0.0", has_keys=False) and "ANOMALY_API_KEYS" in exposure_warning("::", False)
    assert exposure_warning("10.1.2.3", has_keys=False)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.5"):
        assert exposure_warning(host, has_keys=False) is None
    assert exposure_warning("0.0.0.0", has_keys=True) is None


def test_reflection_can_be_turned_off(store, tmp_path: Path) -> None:
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_REFLECTION": "false"})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        child.stop()


class _BrokenPlane(DataPlane):
    """A data plane with a bug: anything it raises is unforeseen by the servicer."""

    async def score(self, req):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret-internal-detail: /etc/anomaly/db-password=hunter2")


def test_unforeseen_errors_answer_a_reference_not_the_text(store, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(tracking_uri=store.tracking_uri, grpc_port=0, cache_dir=tmp_path / "cache")

    async def main() -> grpc.aio.AioRpcError:
        server = GrpcServer(settings, _BrokenPlane(settings))
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.AnomalyDetectionStub(ch).Score(
                        pb.ScoreRequest(encoded=b"x", request_id="SN-42"), timeout=10)
                return info.value
        finally:
            await server.stop(0)

    with caplog.at_level(logging.ERROR):
        error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "SN-42" in error.details() and "secret" not in error.details()
    assert any("secret-internal-detail" in str(r.exc_info) and "SN-42" in r.getMessage()
               for r in caplog.records)


def test_text_log_lines_cannot_be_forged() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "scored %s", ("part\nFAKE ERROR",), None)
    record.request_id = "id\r\n2026-12-02 INFO forged\x1b[31m\u2028"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "part\\nFAKE ERROR" in line and "request_id=id\\r\\n2026-12-02 INFO forged\\x1b[31m\\u2028" in line


def test_log_lines_are_bounded_and_carry_no_colour_codes() -> None:
    """A library quoting what a client sent (OpenTelemetry's propagators quote a 30 kB
    `baggage` header) writes a bounded line in either format; uvicorn's `color_message` (its
    message again, with terminal codes) is not a field."""
    record = logging.LogRecord("opentelemetry.baggage.propagation", logging.WARNING, __file__, 1,
                               "Baggage header `%s` exceeded the maximum", ("k=v," * 10_000,), None)
    record.color_message = "\x1b[1mUvicorn\x1b[0m"
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert len(line) < 4300 and "characters cut" in line and "color_message" not in line, line[-200:]
    assert json.loads(JsonFormatter().format(record))["message"].endswith("(36038 more characters cut)")


ESTIMATE = textwrap.dedent("""
    import sys
    from service.runtime.imaging import decode_probe, preprocess, probe_image
    data = open(sys.argv[1], "rb").read()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
    base = status("VmRSS:")
    probe = probe_image(data, max_bytes=1 << 30, max_pixels=1 << 30)
    x = preprocess(decode_probe(probe), (256, 256))
    print(probe.mode, status("VmHWM:") - base, probe.cost)
""")


def _big_image(mode: str, path: Path) -> None:
    rng = np.random.default_rng(0)
    h, w = 3000, 4000
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path, format="TIFF")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).quantize(64)
        im.save(path, format="PNG", transparency=0)
    else:
        Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode).save(
            path, format="PNG", compress_level=1)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_decode_memory_estimate_covers_the_measured_peak(mode: str, tmp_path: Path) -> None:
    """The budget is only as good as `Probe.cost`: decode a 12-megapixel image in a fresh
    process (which only reads the file) and compare its measured peak resident memory with
    the estimate."""
    path = tmp_path / "big.img"
    _big_image(mode, path)
    out = subprocess.run([sys.executable, "-c", ESTIMATE, str(path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    probed, measured, cost = out.stdout.split()
    print(f"{probed}: measured {int(measured) >> 20} MB, estimated {int(cost) >> 20} MB")
    assert int(measured) <= int(cost), (probed, int(measured) >> 20, int(cost) >> 20)
    assert int(cost) <= 3 * max(int(measured), 12_000_000 * 2)  # an estimate, not a wild guess


def test_gray_and_16_bit_images_match_their_rgb_decoding() -> None:
    """Gray stays one channel until after the resize; the model input is the same as when
    the gray image is expanded to RGB first."""
    from service.runtime.imaging import decode_image, decode_probe, preprocess, probe_image

    rng = np.random.default_rng(3)
    for arr in (rng.integers(0, 256, (301, 257), dtype=np.uint8),
                rng.integers(0, 65536, (301, 257), dtype=np.uint16)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
        fused = preprocess(decode_probe(probe_image(data)), (128, 128))
        expanded = preprocess(np.ascontiguousarray(decode_image(data)), (128, 128))
        assert np.array_equal(fused, expanded)
