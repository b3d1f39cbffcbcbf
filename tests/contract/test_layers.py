"""The structure holds: the import rules of `[tool.importlinter]` (checked with
import-linter, and shown to catch a violation), the gateway's JSON schema is the proto's,
and both SDK transports map a result the same way."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from anomaly.http_json import from_json, to_json
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.wire import TIMING_KEYS
from edge_anomaly_client.sdk import AnomalyClient

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "LC_ALL": "C.UTF-8"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_import_rules_hold() -> None:
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _contract_modules(config: dict) -> set[str]:
    """Every module of this project a contract names (containers' rooms included)."""
    roots = set(config["root_packages"])
    named: set[str] = set(roots)
    for contract in config["contracts"]:
        containers = contract.get("containers", [""])
        for key in ("source_modules", "forbidden_modules", "layers", "ancestors"):
            for entry in contract.get(key, []):
                for part in entry.replace("|", ":").split(":"):
                    for container in containers:
                        name = f"{container}.{part.strip()}" if container else part.strip()
                        if name.split(".")[0] in roots:
                            named.add(name)
    return named


@pytest.mark.parametrize(("importer", "imported", "broken"), [
    ("service", "clients", "Only the CLI imports every layer"),
    ("service", "registry", "Only the CLI imports every layer"),
    ("registry", "clients", "Only the CLI imports every layer"),
    ("clients", "service", "Clients (the SDK and the hot folder) never import the server"),
    ("edge_anomaly_client", "service", "Clients (the SDK and the hot folder) never import the server"),
    ("anomaly", "service", "Only the CLI imports every layer"),
    ("loadtests", "studies", "Only the CLI imports every layer"),
    ("service.runtime", "service.dataplane", "Inside the server: protocols over the data plane"),
    ("service.inspection", "service.promotion", "Inside the server: protocols over the data plane"),
    ("service.protocol.grpc", "service.runtime", "Protocol translators see the data plane"),
    ("service.protocol.rest", "service.protocol.grpc.server", "The HTTP gateway forwards only"),
])
def test_the_rules_catch_a_violation(tmp_path: Path, importer: str, imported: str, broken: str) -> None:
    """The project's own contracts, run over a tree of the same packages where
    `importer` imports `imported`, report it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for module in sorted(_contract_modules(config) | {importer, imported}):
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            folder = tmp_path.joinpath(*parts[:depth])
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
            (folder / "core.py").touch()
    tmp_path.joinpath(*importer.split("."), "core.py").write_text(f"import {imported}.core\n")
    lines = ["[tool.importlinter]", f"root_packages = {config['root_packages']!r}",
             f"include_external_packages = {str(config['include_external_packages']).lower()}"]
    for contract in config["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        for key, value in contract.items():
            toml_value = str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')
            lines.append(f"{key} = {toml_value}")
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    proc = _lint(tmp_path, pythonpath=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{importer}.core -> {imported}.core" in proc.stdout
    assert broken in proc.stdout.split("Broken contracts")[1]


def test_the_gateway_process_loads_no_model_runtime() -> None:
    """The gateway only forwards: importing it (and building its app) in a fresh interpreter
    loads neither ONNX Runtime, SQLAlchemy, MLflow nor the server's data plane."""
    code = ("import sys\n"
            "from service.protocol.rest.gateway import create_app\n"
            "from service.settings import Settings\n"
            "create_app(Settings(grpc_target='127.0.0.1:1'))\n"
            "heavy = ('onnxruntime', 'sqlalchemy', 'mlflow', 'torch', 'service.dataplane.data_plane',\n"
            "         'service.protocol.grpc.server', 'service.runtime.engine')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def _fields(model: type) -> set[str]:
    return set(model.model_fields)


def _proto_fields(message: type) -> set[str]:
    """The field names of `message` as the gateway's JSON spells them."""
    return {f"{f.name}_base64" if f.type == f.TYPE_BYTES else f.name for f in message.DESCRIPTOR.fields}


def test_gateway_schema_is_the_proto() -> None:
    from service.protocol.rest import gateway

    assert _fields(gateway.ScoreOut) == _proto_fields(pb.ScoreResponse)
    assert _fields(gateway.ModelOut) == _proto_fields(pb.ModelInfo)
    assert _fields(gateway.ModelRefOut) == _proto_fields(pb.ModelRef)
    assert _fields(gateway.FeedbackIn) == _proto_fields(pb.FeedbackRequest)
    assert _fields(gateway.FeedbackOut) == _proto_fields(pb.FeedbackResponse)
    assert tuple(gateway.TimingsOut.model_fields) == TIMING_KEYS == tuple(
        f.name for f in pb.Timings.DESCRIPTOR.fields)


def test_json_round_trip() -> None:
    response = pb.ScoreResponse(request_id="SN-1", score=1.25, normalized_score=0.75, is_anomalous=True,
                                threshold=0.5, category="brick", anomaly_map_png=b"\x89PNG\x00",
                                model=pb.ModelRef(name="m", version="3", alias="champion"),
                                timings=pb.Timings(**{k: i + 0.5 for i, k in enumerate(TIMING_KEYS)}))
    data = to_json(response)
    assert data["anomaly_map_png_base64"] == "iVBORwA=" and "anomaly_map_png" not in data
    assert from_json(data, pb.ScoreResponse) == response
    assert to_json(pb.ScoreResponse(request_id="x"))["anomaly_map_png_base64"] is None
    info = pb.ModelInfo(ref=pb.ModelRef(name="m", version="1"), thresholds={"brick": 0.25},
                        categories=["brick"], max_image_bytes=1 << 33)
    assert from_json(to_json(info), pb.ModelInfo) == info
    assert from_json({**to_json(info), "a_field_from_a_newer_gateway": 1}, pb.ModelInfo) == info


def test_both_transports_give_the_same_result(grpc_target: str, http_base: str, sample_root: Path) -> None:
    image = next((sample_root / "brick" / "test" / "patch").glob("*.png"))
    results = []
    for target in (grpc_target, http_base):
        with AnomalyClient(target) as client:
            results.append(client.score(image, category="brick", request_id="same",
                                        return_anomaly_map=True))
    over_grpc, over_http = results
    assert set(over_grpc.timings) == set(over_http.timings) == set(TIMING_KEYS)
    assert over_http.anomaly_map_png[:4] == b"\x89PNG"
    assert {**over_grpc.__dict__, "timings": None} == {**over_http.__dict__, "timings": None}


def test_an_answer_that_does_not_fit_the_contract_is_a_clear_error() -> None:
    """A gateway (or a proxy in front of one) answering JSON of another shape gets an
    `AnomalyError` naming the message it should have been, not a KeyError."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edge_anomaly_client.sdk import AnomalyError

    class WrongShape(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"score": "very high", "model": ["not", "an", "object"]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongShape)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with AnomalyClient(f"http://127.0.0.1:{server.server_port}", retries=0) as client:
            with pytest.raises(AnomalyError) as err:
                client.score(b"\x89PNG not really")
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.code == "INTERNAL" and "does not fit ScoreResponse" in err.value.message


# -- one answer schema: the proto is the source; every other copy is checked field by field ------------
def _filled(message: type) -> object:
    """An instance of `message` with every field set to a distinct non-default value."""
    from google.protobuf.descriptor import FieldDescriptor as F

    msg = message()
    for i, f in enumerate(message.DESCRIPTOR.fields, start=1):
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            value = f"v{i}" if value_field.type == F.TYPE_STRING else i + 0.5
            getattr(msg, f.name).update({f"k{i}": value})
        elif f.message_type is not None:
            getattr(msg, f.name).CopyFrom(_filled(type(getattr(msg, f.name))))
        elif f.is_repeated:
            getattr(msg, f.name).extend([f"r{i}a", f"r{i}b"])
        elif f.type == F.TYPE_STRING:
            setattr(msg, f.name, "SERVING" if f.name == "state" else f"s{i}")
        elif f.type == F.TYPE_BYTES:
            setattr(msg, f.name, bytes([i, 255]))
        elif f.type == F.TYPE_BOOL:
            setattr(msg, f.name, True)
        elif f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            setattr(msg, f.name, i + 0.25)
        else:
            setattr(msg, f.name, i + 1000)
    return msg


def _same(sdk_value: object, proto: object) -> None:
    """Every field of the proto message `proto` reaches `sdk_value` (a dataclass) unchanged."""
    import dataclasses

    names = [f.name for f in proto.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(sdk_value)] == names or \
        {f.name for f in dataclasses.fields(sdk_value)} == set(names), type(sdk_value).__name__
    for name in names:
        ours, theirs = getattr(sdk_value, name), getattr(proto, name)
        field = proto.DESCRIPTOR.fields_by_name[name]
        if dataclasses.is_dataclass(ours):
            _same(ours, theirs)
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            assert ours == dict(theirs), name
        elif field.message_type is not None:  # flattened: timings as a dict, tiling as a tuple
            values = [getattr(theirs, f.name) for f in field.message_type.fields]
            assert list(ours.values() if isinstance(ours, dict) else ours) == values, name
        elif field.is_repeated:
            assert list(ours) == list(theirs), name
        else:
            assert ours == theirs, name


def test_the_sdk_result_types_are_the_proto() -> None:
    """A new answer field is one edit in the proto plus its mapping: the SDK's types carry every
    field of the messages they map, by name, and its parser copies each one unchanged."""
    from edge_anomaly_client.sdk import AnomalyClient as Client

    client = Client.__new__(Client)
    score = _filled(pb.ScoreResponse)
    _same(client._score_result(score), score)
    info = _filled(pb.ModelInfo)
    _same(client._model_info(info), info)
    feedback = _filled(pb.FeedbackResponse)
    _same(client._parse("Feedback", feedback), feedback)


def test_the_engine_decision_is_the_answer_without_the_request() -> None:
    """The engine's `Decision` holds exactly the answer's fields that a model decides (not the
    request id, the model reference or the timings, which the data plane adds)."""
    import dataclasses

    from service.runtime.engine import Decision

    added_by_the_data_plane = {"request_id", "model", "timings"}
    proto = {f.name for f in pb.ScoreResponse.DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(Decision)} == proto - added_by_the_data_plane


def test_long_modules_say_why_in_their_docstring() -> None:
    """A module of the server over ~400 lines states why it is one module (a newcomer reads
    the rooms from small files; the few long ones say what keeps them together)."""
    import ast

    unexplained = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= 420 or "migrations" in path.parts:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "longer than most" not in doc:
            unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, "long modules without a reason in their docstring: " + ", ".join(unexplained)
