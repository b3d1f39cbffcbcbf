"""Security, for real: certificates generated here (a CA, a server certificate for
127.0.0.1, a client certificate), a gRPC server with API keys + mutual TLS, the gateway
over HTTPS reaching it with its own client certificate, and the SDK on both paths.
Also: no unpickling in the serve path, and keys never reach the logs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anomaly.channel import channel_credentials
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import start_gateway, start_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret-key-7f1c9a"


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _cert(name: str, issuer: tuple | None, *, ca: bool = False, server: bool = False):  # noqa: ANN202
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[1].subject, issuer[0]) if issuer else (subject, key)
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return key, b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = _cert("test CA", None, ca=True)
    server = _cert("127.0.0.1", ca, server=True)
    client = _cert("line-1 client", ca)
    (d / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    s_cert, s_key = _write(d / "server", *server)
    c_cert, c_key = _write(d / "client", *client)
    return {"ca": d / "ca.pem", "server_cert": s_cert, "server_key": s_key,
            "client_cert": c_cert, "client_key": c_key}


@pytest.fixture(scope="module")
def secure_server(store, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("secure")
    env = {"ANOMALY_API_KEYS": f'["{KEY}"]', "ANOMALY_TLS_CERT_FILE": str(pki["server_cert"]),
           "ANOMALY_TLS_KEY_FILE": str(pki["server_key"]), "ANOMALY_TLS_CLIENT_CA_FILE": str(pki["ca"])}
    creds = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    child, target = start_server(store.tracking_uri, logs / "server.log", cache_dir=logs / "cache", env=env,
                                 credentials=creds)
    yield target, logs / "server.log"
    assert child.stop() == 0


def test_mtls_and_api_key_over_grpc(secure_server, pki, good_and_defect) -> None:
    target, _ = secure_server
    image = good_and_defect[1][0].read_bytes()
    mtls = {"tls_ca_file": pki["ca"], "client_cert_file": pki["client_cert"],
            "client_key_file": pki["client_key"]}
    with AnomalyClient(target, api_key=KEY, **mtls) as client:
        assert client.score(image).model.version
    with AnomalyClient(target, api_key="wrong", retries=0, **mtls) as client, \
            pytest.raises(AnomalyError) as info:
        client.score(image)
    assert info.value.code == "UNAUTHENTICATED" and "wrong" not in info.value.message
    with AnomalyClient(target, retries=0, **mtls) as client, pytest.raises(AnomalyError) as info:
        client.score(image)  # no key at all
    assert info.value.code == "UNAUTHENTICATED"
    # Health stays open without a key (orchestrator probes), but still needs the client certificate.
    creds = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    with grpc.secure_channel(target, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stream = pb_grpc.AnomalyDetectionStub(ch).ScoreStream(iter([pb.ScoreRequest(encoded=image)]),
                                                              timeout=10)
        with pytest.raises(grpc.RpcError) as rpc:
            list(stream)
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Without a client certificate the TLS handshake itself fails; plaintext too.
    with AnomalyClient(target, api_key=KEY, tls_ca_file=pki["ca"], retries=0, timeout=5) as client, \
            pytest.raises(AnomalyError) as info:
        client.score(image)
    assert info.value.code == "UNAVAILABLE"
    with AnomalyClient(target, api_key=KEY, retries=0, timeout=5) as client, pytest.raises(AnomalyError):
        client.score(image)


def test_https_gateway_forwards_the_key_over_mtls(secure_server, pki, good_and_defect,
                                                  tmp_path: Path) -> None:
    target, server_log = secure_server
    env = {"ANOMALY_HTTPS_CERT_FILE": str(pki["server_cert"]),
           "ANOMALY_HTTPS_KEY_FILE": str(pki["server_key"]),
           "ANOMALY_GRPC_TLS_CA_FILE": str(pki["ca"]),
           "ANOMALY_GRPC_CLIENT_CERT_FILE": str(pki["client_cert"]),
           "ANOMALY_GRPC_CLIENT_KEY_FILE": str(pki["client_key"])}
    gateway, base = start_gateway(target, tmp_path / "gateway.log", env=env, verify=str(pki["ca"]))
    image = good_and_defect[1][0].read_bytes()
    try:
        assert base.startswith("https://")
        with AnomalyClient(base, api_key=KEY, tls_ca_file=pki["ca"]) as client:
            assert client.score(image, request_id="https-1").request_id == "https-1"
        with AnomalyClient(base, tls_ca_file=pki["ca"], retries=0) as client, \
                pytest.raises(AnomalyError) as info:
            client.score(image)
        assert info.value.code == "UNAUTHENTICATED" and info.value.http_status == 401
        with pytest.raises(httpx.ConnectError):  # the gateway's certificate is not from a public CA
            httpx.get(f"{base}/healthz", timeout=5)
    finally:
        gateway.stop()
    logs = server_log.read_text() + (tmp_path / "gateway.log").read_text()
    assert KEY not in logs and "TLS on with client certificates required" in logs


def test_no_unpickling_in_the_serve_path() -> None:
    """The server loads ONNX files and JSON/YAML metadata only: nothing in service/ or
    clients/ may deserialize pickles (or call torch.load / joblib / numpy with pickles)."""
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\b|\bcloudpickle\b|\bjoblib\b|torch\.load"
                         r"|allow_pickle\s*=\s*True|yaml\.load\(|\bdill\b")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for top in ("service", "clients")
                 for p in (ROOT / top).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_keys_are_secret_in_settings() -> None:
    from service.settings import Settings

    s = Settings(api_keys=[KEY])
    assert KEY not in repr(s) and KEY not in str(s.model_dump())


def test_hotfolder_and_score_commands_reach_a_secured_server(secure_server, pki, good_and_defect,
                                                              tmp_path: Path) -> None:
    """Security parity: `anomaly hotfolder` and `anomaly score` take the SDK's API-key (value,
    environment or file) and mutual-TLS options."""
    from typer.testing import CliRunner

    from cli.main import app

    target, _ = secure_server
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    tls = ["--tls-ca", str(pki["ca"]), "--client-cert", str(pki["client_cert"]),
           "--client-key", str(pki["client_key"])]
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, path in enumerate(good_and_defect[0][:3]):
        (inbox / f"part-{i}.png").write_bytes(path.read_bytes())
    runner = CliRunner()
    hot = runner.invoke(app, ["hotfolder", str(inbox), "--target", target, "--until-empty", "--seconds", "60",
                              "--settle", "0", "--api-key-file", str(key_file), *tls])
    assert hot.exit_code == 0, hot.output
    assert len(list((inbox / "OK").glob("*.png")) + list((inbox / "NG").glob("*.png"))) == 3
    scored = runner.invoke(app, ["score", str(good_and_defect[1][0]), "--target", target, *tls],
                           env={"ANOMALY_API_KEY": KEY})
    assert scored.exit_code == 0, scored.output
    refused = runner.invoke(app, ["score", str(good_and_defect[1][0]), "--target", target, "--api-key",
                                  "wrong", *tls], env={"COLUMNS": "250"})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output and "wrong" not in refused.output
    half = runner.invoke(app, ["score", str(good_and_defect[1][0]), "--target", target,
                               "--client-cert", str(pki["client_cert"])])
    assert half.exit_code == 2 and "--client-key" in half.output
