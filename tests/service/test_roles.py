"""Roles (issue 35, fault 7), on real servers, a real gateway and a real MLflow store.

Keys carry a role, `score` ⊂ `operate` ⊂ `admin`: a scoring key cannot load or unload
versions, read statistics or send feedback (PERMISSION_DENIED over gRPC, 403 over HTTP) and
nothing changes; a bare key is a scoring key. Model control has a cap on pinned versions.
Feedback records the key's name that sent it; the quality report flags conflicting verdicts
and ignores verdicts on request ids it never decided. `anomaly reference add` refuses an
unknown category, a name that escapes its folder, an image already in the set with the
other expectation and item 513, writing nothing; `reference list` and `remove` work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import register_copy, register_tiny, tracking_uri, wait_for
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from anomaly.oip import inference_pb2 as v2
from anomaly.oip import inference_pb2_grpc as v2_grpc
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from cli.main import app
from loadtests.launch import start_gateway, start_server
from service.promotion.rules import MAX_REFERENCE_ITEMS, PLANT_REFERENCE_TAG

SCORE_KEY, OPERATE_KEY, ADMIN_KEY, BARE_KEY = ("score-key-1b7e2a", "operate-key-93ac41", "admin-key-5f02d9",
                                               "bare-key-c4d1e8")
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def _load(version: str, name: str = "anomaly-detector") -> v2.RepositoryModelLoadRequest:
    request = v2.RepositoryModelLoadRequest(model_name=name)
    request.parameters["version"].string_param = version
    return request


def _unload(version: str, name: str = "anomaly-detector") -> v2.RepositoryModelUnloadRequest:
    request = v2.RepositoryModelUnloadRequest(model_name=name)
    request.parameters["version"].string_param = version
    return request


def _code(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status a call ends with (OK when it answers)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _ready_versions(v2_stub, key: str = "") -> set[str]:  # type: ignore[no-untyped-def]
    index = v2_stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=True), timeout=10,
                                    metadata=_md(key) if key else None)
    return {m.version for m in index.models}


@pytest.fixture(scope="module")
def versions(store, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two more versions of the session's model, to load and pin."""
    work = tmp_path_factory.mktemp("roles-versions")
    return register_copy(store, work, "roles-a"), register_copy(store, work, "roles-b")


@pytest.fixture(scope="module")
def keyed(store, versions, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server with a key of each role (and a bare one), an inspection log and a cap of one
    pinned version; a gateway in front of it."""
    work = tmp_path_factory.mktemp("roles")
    keys_file = work / "keys.txt"
    admin = json.dumps({"key": ADMIN_KEY, "role": "admin", "name": "ops"})
    keys_file.write_text(f"# the operators' keys\n{admin}\noperate:review:{OPERATE_KEY}\n")
    db = f"sqlite:///{work / 'inspections.db'}"
    env = {"ANOMALY_API_KEYS": json.dumps([f"score:line-1:{SCORE_KEY}", BARE_KEY]),
           "ANOMALY_API_KEYS_FILE": str(keys_file), "ANOMALY_INSPECTION_LOG": "true",
           "ANOMALY_INSPECTION_DB_URL": db, "ANOMALY_MAX_PINNED_MODELS": "1"}
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    gateway, base = start_gateway(target, work / "gateway.log")
    with grpc.insecure_channel(target) as ch:
        yield {"target": target, "base": base, "db": db, "log": work / "server.log",
               "v1": pb_grpc.AnomalyDetectionStub(ch), "v2": v2_grpc.GRPCInferenceServiceStub(ch)}
    gateway.stop()
    assert child.stop() == 0, (work / "server.log").read_text()[-3000:]
    logs = (work / "server.log").read_text() + (work / "gateway.log").read_text()
    for key in (SCORE_KEY, OPERATE_KEY, ADMIN_KEY, BARE_KEY):
        assert key not in logs


def test_a_score_key_cannot_control_models_or_send_feedback(keyed, store, versions, good_and_defect) -> None:
    v1, v2_stub, base = keyed["v1"], keyed["v2"], keyed["base"]
    image = good_and_defect[1][0].read_bytes()
    version_a, _ = versions
    for key in (BARE_KEY, SCORE_KEY):
        md = _md(key)
        # What scoring needs answers.
        assert v1.Score(pb.ScoreRequest(encoded=image, request_id="score-key-part"), timeout=30,
                        metadata=md).model.version == store.version
        assert v1.ListModels(pb.ListModelsRequest(), timeout=10, metadata=md).models
        assert v1.GetModel(pb.GetModelRequest(), timeout=10, metadata=md).ref.version == store.version
        assert v2_stub.ModelMetadata(v2.ModelMetadataRequest(name=store.model_name), timeout=10, metadata=md)
        assert v2_stub.ServerMetadata(v2.ServerMetadataRequest(), timeout=10, metadata=md).name
        # Model control, statistics and feedback do not.
        for call, request in ((v2_stub.RepositoryModelLoad, _load(version_a)),
                              (v2_stub.RepositoryModelUnload, _unload(store.version)),
                              (v2_stub.RepositoryIndex, v2.RepositoryIndexRequest()),
                              (v2_stub.ModelStatistics, v2.ModelStatisticsRequest()),
                              (v1.Feedback, pb.FeedbackRequest(request_id="score-key-part", verdict="OK"))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=60, metadata=md)
            assert err.value.code() == DENIED, (call, err.value)
            assert key not in err.value.details() and "role" in err.value.details()
        # The same through the gateway: 403.
        headers = {"x-api-key": key}
        r = httpx.post(f"{base}/v2/repository/models/{store.model_name}/load", headers=headers,
                       json={"parameters": {"version": version_a}}, timeout=60)
        assert r.status_code == 403 and "error" in r.json(), r.text
        r = httpx.post(f"{base}/v1/feedback", headers=headers, json={"request_id": "score-key-part",
                                                                      "verdict": "OK"}, timeout=30)
        assert r.status_code == 403 and r.json()["grpc_status"] == "PERMISSION_DENIED", r.text
        assert httpx.get(f"{base}/v2/models/stats", headers=headers, timeout=30).status_code == 403
    # An operate key sends feedback but controls no model either.
    operate = _md(OPERATE_KEY)
    assert _code(v2_stub.RepositoryModelLoad, _load(version_a), timeout=60, metadata=operate) == DENIED
    # Nothing changed: only the served version is loaded, and no feedback was recorded.
    assert _ready_versions(v2_stub, ADMIN_KEY) == {store.version}
    time.sleep(1.0)  # the spool ships within 0.2 s
    engine = create_engine(keyed["db"])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM feedback")).scalar() == 0
    engine.dispose()


def test_an_admin_key_controls_models_within_the_pin_cap(keyed, store, versions) -> None:
    v2_stub, base, md = keyed["v2"], keyed["base"], _md(ADMIN_KEY)
    version_a, version_b = versions
    v2_stub.RepositoryModelLoad(_load(version_a), timeout=120, metadata=md)
    assert _ready_versions(v2_stub, ADMIN_KEY) == {store.version, version_a}
    with pytest.raises(grpc.RpcError) as err:  # a second pinned version: beyond the cap of one
        v2_stub.RepositoryModelLoad(_load(version_b), timeout=120, metadata=md)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ANOMALY_MAX_PINNED_MODELS" in err.value.details() and version_a in err.value.details()
    assert version_b not in _ready_versions(v2_stub, ADMIN_KEY)
    v2_stub.RepositoryModelLoad(_load(version_a), timeout=120, metadata=md)  # pinned already: fine
    assert v2_stub.ModelStatistics(v2.ModelStatisticsRequest(), timeout=10, metadata=md).model_stats
    v2_stub.RepositoryModelUnload(_unload(version_a), timeout=30, metadata=md)
    # Through the gateway, with the admin key.
    headers = {"x-api-key": ADMIN_KEY}
    r = httpx.post(f"{base}/v2/repository/models/{store.model_name}/load", headers=headers,
                   json={"parameters": {"version": version_b}}, timeout=120)
    assert r.status_code == 200, r.text
    assert version_b in _ready_versions(v2_stub, ADMIN_KEY)
    r = httpx.post(f"{base}/v2/repository/models/{store.model_name}/unload", headers=headers,
                   json={"parameters": {"version": version_b}}, timeout=30)
    assert r.status_code == 200, r.text
    assert _ready_versions(v2_stub, ADMIN_KEY) == {store.version}


def _feedback_rows(db: str, expected: int) -> list[tuple]:
    engine = create_engine(db)

    def rows() -> list[tuple]:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT request_id, verdict, sender FROM feedback ORDER BY id")).all()
        return found if len(found) >= expected else []

    try:
        return wait_for(rows, what=f"{expected} feedback rows")
    finally:
        engine.dispose()


def test_feedback_records_its_sender_and_the_report_flags_conflicts(keyed, store, good_and_defect,
                                                                    tmp_path: Path) -> None:
    v1, base, db = keyed["v1"], keyed["base"], keyed["db"]
    goods, defects = good_and_defect
    parts = {f"roles-good-{i}": (p, False) for i, p in enumerate(goods[:3])}
    parts |= {f"roles-defect-{i}": (p, True) for i, p in enumerate(defects[:4])}
    scores = {}
    for rid, (path, _) in parts.items():
        category = path.parent.parent.parent.name
        r = v1.Score(pb.ScoreRequest(encoded=path.read_bytes(), category=category, request_id=rid),
                     timeout=30, metadata=_md(SCORE_KEY))
        scores[rid] = (r.score, category)
    conflict = "roles-defect-0"
    for rid, (_, defective) in parts.items():
        v1.Feedback(pb.FeedbackRequest(request_id=rid, verdict="NG" if defective else "OK"), timeout=30,
                    metadata=_md(OPERATE_KEY))
    # One OK on a real defect's id (a mistake, or a hostile client), through the gateway with
    # the admin key (admin ⊇ operate), and a verdict on a request id the server never decided.
    r = httpx.post(f"{base}/v1/feedback", headers={"x-api-key": ADMIN_KEY},
                   json={"request_id": conflict, "verdict": "OK"}, timeout=30)
    assert r.status_code == 200, r.text
    v1.Feedback(pb.FeedbackRequest(request_id="roles-never-scored", verdict="OK"), timeout=30,
                metadata=_md(OPERATE_KEY))
    rows = _feedback_rows(db, len(parts) + 2)
    senders = {(rid, verdict): sender for rid, verdict, sender in rows}
    assert senders[(conflict, "OK")] == "ops" and senders[(conflict, "NG")] == "review"
    assert {s for (rid, _), s in senders.items() if rid != conflict} == {"review"}

    from service.inspection.quality import review

    report = review(db)
    assert [c.request_id for c in report.conflicts] == [conflict]
    assert {v for v, _ in report.conflicts[0].verdicts} == {"OK", "NG"}
    assert report.unknown == 1 and report.unknown_ids == ["roles-never-scored"]
    category = scores[conflict][1]
    proposal = next(p for p in report.proposals if p.category == category)
    defects_here = [rid for rid, (_, defective) in parts.items()
                    if defective and scores[rid][1] == category and rid != conflict]
    assert proposal.confirmed_defects == len(defects_here)  # the conflicting part is left out
    if defects_here:
        assert proposal.threshold == min(scores[rid][0] for rid in defects_here)
    result = CliRunner().invoke(app, ["quality-report", "--db", db], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert conflict in result.output and "conflicting" in result.output
    assert "1 verdict(s) on request ids never decided" in result.output


@pytest.fixture(scope="module")
def open_server(store, versions, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server without keys (everyone may do everything), an inspection log, one pin."""
    work = tmp_path_factory.mktemp("roles-open")
    db = f"sqlite:///{work / 'inspections.db'}"
    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": db,
           "ANOMALY_MAX_PINNED_MODELS": "1"}
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    yield target, db
    assert child.stop() == 0, (work / "server.log").read_text()[-3000:]


def test_without_keys_the_pin_cap_holds_and_feedback_is_anonymous(open_server, store, versions) -> None:
    target, db = open_server
    version_a, version_b = versions
    with grpc.insecure_channel(target) as ch:
        v2_stub, v1 = v2_grpc.GRPCInferenceServiceStub(ch), pb_grpc.AnomalyDetectionStub(ch)
        v2_stub.RepositoryModelLoad(_load(version_a), timeout=120)
        assert _code(v2_stub.RepositoryModelLoad, _load(version_b), timeout=120) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _ready_versions(v2_stub) == {store.version, version_a}
        v2_stub.RepositoryModelUnload(_unload(version_a), timeout=30)
        v1.Feedback(pb.FeedbackRequest(request_id="open-1", verdict="NG"), timeout=30)
    [(_, _, sender)] = _feedback_rows(db, 1)
    assert sender == "anonymous@127.0.0.1"


def test_a_promotion_never_waits_behind_model_control_loads(store, versions, tmp_path: Path) -> None:
    """Two ad-hoc loads of versions whose check hangs (the probe child's time limit) are in
    flight; an alias moved meanwhile is followed within seconds, before either ends."""
    import threading

    hanging = [register_tiny(store, "hang", tmp_path) for _ in range(2)]
    alias = "roles-promotion"
    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    client.set_registered_model_alias(store.model_name, alias, store.version)
    probe_s = 25
    env = {"ANOMALY_POLL_INTERVAL_S": "0.3", "ANOMALY_GATE": "false",
           "ANOMALY_LOAD_PROBE_TIMEOUT_S": str(probe_s)}
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env=env)
    ended: list[float] = []
    try:
        with grpc.insecure_channel(target) as ch:
            v1, v2_stub = pb_grpc.AnomalyDetectionStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)

            def load(version: str) -> None:
                _code(v2_stub.RepositoryModelLoad, _load(version), timeout=3 * probe_s)
                ended.append(time.monotonic())

            loads = [threading.Thread(target=load, args=(v,)) for v in hanging]
            start = time.monotonic()
            for t in loads:
                t.start()
            time.sleep(1.0)  # both loads under way
            client.set_registered_model_alias(store.model_name, alias, versions[0])
            served = lambda: v1.GetModel(pb.GetModelRequest(alias=alias), timeout=10).ref.version  # noqa: E731
            wait_for(lambda: served() == versions[0], timeout=3 * probe_s, what="the promotion")
            promoted = time.monotonic()
            for t in loads:
                t.join()
    finally:
        client.set_registered_model_alias(store.model_name, alias, store.version)
        child.stop()
    assert promoted - start < probe_s and not [t for t in ended if t < promoted], (promoted - start, ended)


# -- reference sets ---------------------------------------------------------------------------
def _png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def reference_model(store, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registered model of its own (categories brick and coffee) for the plant's set."""
    name = "roles-reference"
    register_copy(store, tmp_path_factory.mktemp("roles-reference"), "reference", model_name=name)
    return name


def _reference(store, *args: str) -> object:  # type: ignore[no-untyped-def]
    with tracking_uri(store.tracking_uri):
        return CliRunner().invoke(app, ["reference", *args])


def _plant_items(store, name: str) -> list[dict]:  # type: ignore[no-untyped-def]
    result = _reference(store, "list", "--model", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["items"]


def test_reference_add_refuses_misuse_and_writes_nothing(store, reference_model, good_and_defect,
                                                         tmp_path: Path) -> None:
    name, client = reference_model, MlflowClient(store.tracking_uri, store.tracking_uri)
    good = str(good_and_defect[0][0])
    for category, message in (("bolt", "category 'bolt'"), ("../brick", "not a valid category"),
                              ("brick/../coffee", "not a valid category"),
                              ("bri\x1bck", "not a valid category")):
        result = _reference(store, "add", "--model", name, "--category", category, "--expect", "OK", good)
        assert result.exit_code != 0 and message in result.output, (category, result.output)
    assert PLANT_REFERENCE_TAG not in (client.get_registered_model(name).tags or {})  # nothing written

    result = _reference(store, "add", "--model", name, "--category", "brick", "--expect", "OK", good)
    assert result.exit_code == 0 and "holds 1 known parts" in result.output, result.output
    run_id = client.get_registered_model(name).tags[PLANT_REFERENCE_TAG]
    result = _reference(store, "add", "--model", name, "--category", "brick", "--expect", "NG", good)
    assert result.exit_code != 0 and "already in the reference set" in result.output and "OK" in result.output
    result = _reference(store, "add", "--model", name, "--category", "coffee", "--expect", "OK", good)
    assert result.exit_code != 0 and "already in the reference set" in result.output
    assert [i["expect"] for i in _plant_items(store, name)] == ["OK"]

    # Item 513: the whole add is refused, nothing written; up to 512 is fine.
    images = [str(_png(tmp_path / f"part-{i}.png", i)) for i in range(MAX_REFERENCE_ITEMS)]
    result = _reference(store, "add", "--model", name, "--category", "coffee", "--expect", "NG", *images)
    assert result.exit_code != 0 and f"at most {MAX_REFERENCE_ITEMS}" in result.output, result.output
    assert len(_plant_items(store, name)) == 1
    result = _reference(store, "add", "--model", name, "--category", "coffee", "--expect", "NG", *images[1:])
    assert result.exit_code == 0, result.output
    assert f"holds {MAX_REFERENCE_ITEMS} known parts" in result.output
    result = _reference(store, "add", "--model", name, "--category", "coffee", "--expect", "NG", images[0])
    assert result.exit_code != 0 and f"at most {MAX_REFERENCE_ITEMS}" in result.output
    assert client.get_registered_model(name).tags[PLANT_REFERENCE_TAG] == run_id

    # list and remove (by stored file name, by content hash).
    items = _plant_items(store, name)
    assert len(items) == MAX_REFERENCE_ITEMS and items[0]["category"] == "brick"
    assert all(len(i["sha256"]) == 64 and "/" not in i["file"].split("/", 2)[-1] for i in items)
    text_list = _reference(store, "list", "--model", name)
    assert text_list.exit_code == 0 and items[0]["file"] in text_list.output
    result = _reference(store, "remove", "--model", name, items[0]["file"])
    assert result.exit_code == 0, result.output
    result = _reference(store, "remove", "--model", name, items[1]["sha256"][:12])
    assert result.exit_code == 0, result.output
    left = _plant_items(store, name)
    assert len(left) == MAX_REFERENCE_ITEMS - 2
    assert {i["file"] for i in left}.isdisjoint({items[0]["file"], items[1]["file"]})
    result = _reference(store, "remove", "--model", name, "no-such-part.png")
    assert result.exit_code != 0 and "no-such-part.png" in result.output
    # Now there is room again: the removed good part can come back with its expectation.
    result = _reference(store, "add", "--model", name, "--category", "brick", "--expect", "OK", good)
    assert result.exit_code == 0 and f"holds {MAX_REFERENCE_ITEMS - 1} known parts" in result.output


def test_every_call_needs_a_role_and_key_entries_parse(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from service.keys import parse_entry, parse_file
    from service.protocol.grpc.security import METHOD_ROLES, OPEN_SERVICES, _peer_host, needed_role
    from service.settings import Settings

    for service in (pb.DESCRIPTOR.services_by_name["AnomalyDetection"],
                    v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]):
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            assert path in METHOD_ROLES or path.startswith(OPEN_SERVICES), path
    assert needed_role("/some.New/Method") == "admin"  # an unlisted call needs the most
    bare = parse_entry("plain-secret")
    assert (bare.granted, bare.role, bare.name) == ("score", None, bare.name) and bare.name.startswith("key-")
    k = parse_entry("operate:line-2:se:cret")
    assert (k.granted, k.name, k.key.get_secret_value()) == ("operate", "line-2", "se:cret")
    assert parse_entry({"key": "s3", "role": "admin", "name": "ops"}).granted == "admin"
    assert parse_entry("scorer:x:y").granted == "score"  # not a role: a bare key
    for bad in ('{"key": "leaky-secret", "role": "root"}', "admin:bad name:leaky-secret",
                '{"key": "leaky-secret"'):
        with pytest.raises(ValueError) as err:
            parse_file(f"# comment\n\n{bad}\n")
        assert "line 3" in str(err.value) and "leaky-secret" not in str(err.value)
    with pytest.raises(ValueError) as err:
        Settings(api_keys=["admin:bad name:leaky-secret"])
    assert "leaky-secret" not in str(err.value)
    (tmp_path / "keys").write_text("admin:a:same-secret\nscore:b:same-secret\n")
    from service.protocol.grpc.security import load_api_keys

    with pytest.raises(ValueError, match="same secret"):
        load_api_keys(Settings(api_keys_file=tmp_path / "keys"))
    assert [_peer_host(p) for p in ("ipv4:10.0.0.5:4242", "ipv6:[::1]:4242", "in-process")] == \
        ["10.0.0.5", "::1", "in-process"]
    # Every form survives the trip to the children of `--processes` (settings as ANOMALY_*).
    from service.processes import child_env

    entries = ["bare-secret", "admin:ops:a:b", {"key": "k2", "role": "operate", "name": "rev"}]
    settings = Settings(api_keys=entries, grpc_port=5000)
    assert "a:b" not in repr(settings) and "k2" not in repr(settings)
    monkeypatch.setenv("ANOMALY_API_KEYS", child_env(settings, 0)["ANOMALY_API_KEYS"])
    roles = [(k.name, k.granted, k.key.get_secret_value()) for k in load_api_keys(Settings())]
    assert roles == [(parse_entry("bare-secret").name, "score", "bare-secret"), ("ops", "admin", "a:b"),
                     ("rev", "operate", "k2")]


def test_roles_are_documented() -> None:
    root = Path(__file__).resolve().parents[2]
    api, promotion = (root / "docs" / "api.md").read_text(), (root / "docs" / "promotion.md").read_text()
    assert "`ANOMALY_MAX_PINNED_MODELS`" in (root / "docs" / "settings.md").read_text()
    assert "**Roles.**" in api
    assert "## 7. Roles" in promotion and "role:name:secret" in promotion
    for role in ("`score`", "`operate`", "`admin`"):
        assert role in promotion and role in api
