"""Safe promotion: reference sets, the promotion gate, live thresholds, operator feedback with
the quality report, and the shadow challenger. Real servers (and a gateway) on loopback, a
real MLflow store, the session's trained model and real image bytes."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import Store, reference_set, register_copy, register_tiny, tracking_uri, wait_for
from mlflow import MlflowClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from cli.main import app
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import free_port, start_gateway, start_server
from service.promotion.rules import (
    GATE_OVERRIDE,
    GATE_OVERRIDE_BY,
    GATE_OVERRIDE_FOR,
    GATE_OVERRIDE_REASON,
    GATE_REASON,
    GATE_STATUS,
    PLANT_REFERENCE_TAG,
)

POLL = {"ANOMALY_POLL_INTERVAL_S": "0.3"}


@pytest.fixture(scope="module")
def client(store: Store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def serve_alias_with_log(store: Store, client: MlflowClient, alias: str, version: str,
                         tmp_path: Path, env: dict[str, str] | None = None) -> tuple[object, str, str]:
    """A server following `alias` (moved to `version`) with an inspection log in `tmp_path`;
    returns (its process, its target, the log's database URL)."""
    client.set_registered_model_alias(store.model_name, alias, version)
    db = f"sqlite:///{tmp_path / 'inspections.db'}"
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={**POLL, "ANOMALY_INSPECTION_LOG": "true",
                                                   "ANOMALY_INSPECTION_DB_URL": db, **(env or {})})
    return child, target, db


def category_of(path: Path) -> str:
    """The category of a sample-data test image (`<category>/test/<defect>/<file>`)."""
    return path.parent.parent.parent.name


def served_version(stub, image: bytes, category: str = "") -> str:
    return stub.Score(pb.ScoreRequest(encoded=image, category=category), timeout=30).model.version


def test_each_version_carries_a_reference_set_its_own_decisions_agree_with(store, client, grpc_target,
                                                                          tmp_path: Path) -> None:
    mv = client.get_model_version(store.model_name, store.version)
    local = Path(client.download_artifacts(mv.run_id, "reference", str(tmp_path)))
    items = json.loads((local / "manifest.json").read_text())["items"]
    assert {(i["category"], i["expect"]) for i in items} == {(c, e) for c in ("brick", "coffee")
                                                             for e in ("OK", "NG")}
    with grpc.insecure_channel(grpc_target) as ch:  # the served version decides each as expected
        stub = pb_grpc.AnomalyDetectionStub(ch)
        for item in items:
            image = (local / item["file"]).read_bytes()
            request = pb.ScoreRequest(encoded=image, category=item["category"], version=int(store.version))
            r = stub.Score(request, timeout=30)
            assert r.is_anomalous == (item["expect"] == "NG"), item
    assert "Reference set" in (mv.description or "")
    assert "Each version is one build" in (client.get_registered_model(store.model_name).description or "")


def test_gate_refuses_a_version_that_misses_a_known_defect(store, client, good_and_defect,
                                                           tmp_path: Path) -> None:
    """The old version keeps serving; the reason is in GetModel, the log, a metric and the
    candidate's tags; `gate.override=true` with who and why forces it; a plant's known parts
    are checked too."""
    alias, port = "gate-canary", free_port()
    client.set_registered_model_alias(store.model_name, alias, store.version)
    blind = register_copy(store, tmp_path, "gate-blind", threshold_scale=1e6)
    same = register_copy(store, tmp_path, "gate-same")
    image = good_and_defect[0][0].read_bytes()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={**POLL, "ANOMALY_METRICS_PORT": str(port)})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            get = lambda: stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)  # noqa: E731
            # Who and why, written before the version is ever judged: without gate.override=true
            # they force nothing, and the override below is then one tag change (one judgement),
            # not three that a poll may see one at a time.
            client.set_model_version_tag(store.model_name, blind, GATE_OVERRIDE_BY, "qa-lead")
            client.set_model_version_tag(store.model_name, blind, GATE_OVERRIDE_REASON, "checked by hand")
            client.set_registered_model_alias(store.model_name, alias, blind)
            info = wait_for(lambda: (i := get()).last_error_version == blind and i, what="a refusal")
            assert "refused by the promotion gate" in info.last_error
            assert "would pass as OK" in info.last_error
            assert info.ref.version == store.version and served_version(stub, image) == store.version
            tags = wait_for(lambda: client.get_model_version(store.model_name, blind).tags.get(GATE_STATUS)
                            and client.get_model_version(store.model_name, blind).tags, what="gate tags")
            assert tags[GATE_STATUS] == "refused" and "would pass as OK" in tags[GATE_REASON]
            description = client.get_model_version(store.model_name, blind).description
            assert "Promotion gate**: REFUSED" in description
            time.sleep(1.5)  # five polls: judged once, not scored again at every poll
            assert served_version(stub, image) == store.version
            # A threshold tag on the candidate changes what it decides: it is judged again.
            low = store.build.metadata.image_stats["brick"].min * 0.5  # below every known good
            client.set_model_version_tag(store.model_name, blind, "threshold.brick", f"{low:.6g}")
            info = wait_for(lambda: "known-good parts would be rejected" in (i := get()).last_error and i,
                            what="a new verdict")
            assert info.ref.version == store.version
            client.delete_model_version_tag(store.model_name, blind, "threshold.brick")
            wait_for(lambda: "known-good parts" not in get().last_error, what="the verdict without the tag")

            client.set_model_version_tag(store.model_name, blind, GATE_OVERRIDE, "true")  # forced
            wait_for(lambda: served_version(stub, image) == blind, what="the overridden swap")
            assert client.get_model_version(store.model_name, blind).tags[GATE_STATUS] == "overridden"
            assert not get().last_error

            # The plant's known defects: those the trained model catches, added from the CLI.
            caught = [p for p in good_and_defect[1] if category_of(p) == "brick"
                      and stub.Score(pb.ScoreRequest(encoded=p.read_bytes(), category="brick",
                                                     version=int(store.version)), timeout=30).is_anomalous]
            assert caught
            with tracking_uri(store.tracking_uri):
                result = CliRunner().invoke(app, ["reference", "add", "--category", "brick",
                                                  "--expect", "NG", *map(str, caught)])
            assert result.exit_code == 0, result.output
            assert f"holds {len(caught)} known parts" in result.output
            assert client.get_registered_model(store.model_name).tags[PLANT_REFERENCE_TAG]

            client.set_registered_model_alias(store.model_name, alias, same)  # catches them: passes
            wait_for(lambda: served_version(stub, image) == same, what="the gated swap")
            assert client.get_model_version(store.model_name, same).tags[GATE_STATUS] == "passed"

            for tag in (GATE_OVERRIDE, GATE_OVERRIDE_BY, GATE_OVERRIDE_REASON, GATE_OVERRIDE_FOR):
                client.delete_model_version_tag(store.model_name, blind, tag)
            client.set_registered_model_alias(store.model_name, alias, blind)  # the plant's parts only
            info = wait_for(lambda: (i := get()).last_error_version == blind and i, what="a second refusal")
            assert "plant: brick/" in info.last_error and served_version(stub, image) == same
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        client.set_registered_model_alias(store.model_name, alias, store.version)
        child.stop()
    # passed: the first start (judged against its own reference set) and the gated swap
    for status, count in (("refused", 4), ("overridden", 1), ("passed", 2)):
        labels = f'alias="{alias}",name="{store.model_name}",status="{status}"'
        assert f"anomaly_promotion_gate_total{{{labels}}} {count}.0" in metrics, metrics
    log = (tmp_path / "server.log").read_text()
    start = f"ERROR service.promotion.gate promotion gate: {store.model_name} version {blind} refused"
    refusals = [line for line in log.splitlines() if start in line]
    assert len(refusals) == 4, log[-3000:]  # judged once per move or tag change, not at every poll


def test_threshold_tags_are_checked_as_a_whole(store) -> None:
    from service.promotion.rules import threshold_overrides

    md = store.build.metadata
    brick, overall = md.image_stats["brick"], md.image_stats[""]
    high, low = f"{brick.threshold * 1.1:.9g}", f"{overall.threshold * 0.9:.9g}"
    assert threshold_overrides({"threshold": "0.3", "threshold.brick": high, "threshold.global": low,
                                "architecture": "stfpm"}, md) == {"brick": float(high), "": float(low)}
    absurd = f"{brick.max + 21 * max(brick.max - brick.min, abs(brick.threshold)):.9g}"
    for tags, message in (({"threshold.brick": "x"}, "is not a number"),
                          ({"threshold.brick": "inf"}, "not a finite number"),
                          ({"threshold.coffee": low, "threshold.bolt": "1"}, "does not know"),
                          ({"threshold.brick": "0"}, "is not positive"),
                          ({"threshold.brick": "-1e-9"}, "is not positive"),
                          ({"threshold.brick": absurd}, "is absurd"),
                          ({"threshold.global": "1e9"}, "is absurd")):
        with pytest.raises(ValueError, match=message):
            threshold_overrides(tags, md)
    global_md = md.model_copy(update={"categories": [*md.categories, "global"]})
    with pytest.raises(ValueError, match="ambiguous"):
        threshold_overrides({"threshold.global": "1"}, global_md)


def test_gate_refuses_when_the_plant_reference_run_is_gone(store, client, good_and_defect,
                                                           tmp_path: Path) -> None:
    """A `reference.run_id` naming a run that no longer exists, or a run whose manifest is
    garbage, is a broken reference set: the move is refused with that reason (not taken for an
    unknown model), the old version keeps serving, and once the tag is fixed the move is judged
    again (after ANOMALY_FAILED_RETRY_S) and goes through."""
    name = "gate-broken-plant"
    first = register_copy(store, tmp_path, "first", model_name=name,
                          reference=reference_set(store, client, tmp_path))
    second = register_copy(store, tmp_path, "second", model_name=name)
    client.set_registered_model_alias(name, "champion", first)
    client.set_registered_model_tag(name, PLANT_REFERENCE_TAG, uuid.uuid4().hex)  # a deleted run
    image = good_and_defect[0][0].read_bytes()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 model=name, env={**POLL, "ANOMALY_FAILED_RETRY_S": "2"})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            get = lambda: stub.GetModel(pb.GetModelRequest(model=name, alias="champion"), timeout=10)  # noqa: E731
            served = lambda: stub.Score(pb.ScoreRequest(model=name, encoded=image), timeout=30)  # noqa: E731
            client.set_registered_model_alias(name, "champion", second)
            info = wait_for(lambda: (i := get()).last_error_version == second and i, what="a refusal")
            assert "a reference set cannot be read" in info.last_error and "plant" in info.last_error
            assert info.ref.version == first and served().model.version == first
            # A plant run whose manifest is not JSON: refused again, with that reason.
            broken = client.create_run(client.get_experiment_by_name("anomaly-detection").experiment_id)
            manifest = tmp_path / "garbage" / "manifest.json"
            manifest.parent.mkdir()
            manifest.write_text("{not json")
            client.log_artifact(broken.info.run_id, str(manifest), "reference")
            client.set_registered_model_tag(name, PLANT_REFERENCE_TAG, broken.info.run_id)
            info = wait_for(lambda: "manifest.json cannot be read" in (i := get()).last_error and i,
                            what="the manifest's refusal")
            assert served().model.version == first
            client.delete_registered_model_tag(name, PLANT_REFERENCE_TAG)
            wait_for(lambda: served().model.version == second, what="the move once the tag is fixed")
            assert client.get_model_version(name, second).tags[GATE_STATUS] == "passed"
    finally:
        child.stop()


def test_reference_add_refuses_what_the_server_could_not_read(store, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with tracking_uri(store.tracking_uri):
        result = CliRunner().invoke(app, ["reference", "add", "--category", "brick", "--expect", "NG",
                                          str(bad)])
        assert result.exit_code == 1 and "cannot be decoded" in result.output
        result = CliRunner().invoke(app, ["reference", "add", "--expect", "MAYBE", str(bad)])
        assert result.exit_code == 1 and "not one of OK, NG" in result.output


def test_threshold_tags_are_followed_live_and_bad_ones_refused(store, client, good_and_defect,
                                                               tmp_path: Path) -> None:
    """A threshold tag the gate passes is followed with no new version and no restart; a tag
    that is not a threshold of this model is refused as a whole and the old ones stay."""
    alias = "threshold-canary"
    parts = reference_set(store, client, tmp_path)
    version = register_copy(store, tmp_path, "live-thresholds", reference=parts)
    child, target, db = serve_alias_with_log(store, client, alias, version, tmp_path)
    defect = good_and_defect[1][0].read_bytes()
    category = category_of(good_and_defect[1][0])
    tag = f"threshold.{category}"
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            get = lambda: stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)  # noqa: E731
            score = lambda rid: stub.Score(pb.ScoreRequest(encoded=defect, category=category,  # noqa: E731
                                                           request_id=rid), timeout=30)
            before = score("before")
            assert before.threshold_source == "model" and get().threshold_sources[category] == "model"
            value = f"{before.threshold * 0.999:.9g}"  # a small, safe change: the gate passes it
            client.set_model_version_tag(store.model_name, version, tag, value)
            info = wait_for(lambda: (i := get()).threshold_sources[category] == tag and i, what="the tag")
            assert info.thresholds[category] == pytest.approx(float(value))
            assert info.threshold_sources[""] == "model"
            after = score("after")
            assert after.threshold == pytest.approx(float(value)) and after.threshold_source == tag
            assert after.model.version == version  # no new version, no restart

            for key, wrong, why in ((tag, "abc", "is not a number"), (tag, "nan", "not a finite number"),
                                    ("threshold.nope", "1", "does not know")):
                client.set_model_version_tag(store.model_name, version, key, wrong)
                info = wait_for(lambda: (i := get()).last_error and i, what=f"refusal of {key}={wrong}")
                assert "invalid threshold tag" in info.last_error and why in info.last_error
                assert info.thresholds[category] == pytest.approx(float(value))  # the old thresholds stay
                assert score("during").threshold_source == tag
                client.delete_model_version_tag(store.model_name, version, key)
                if key == tag:
                    client.set_model_version_tag(store.model_name, version, tag, value)
                wait_for(lambda: not get().last_error, what="the error to clear")
            client.delete_model_version_tag(store.model_name, version, tag)
            wait_for(lambda: get().threshold_sources[category] == "model", what="calibrated thresholds back")
            assert score("back").threshold == pytest.approx(before.threshold)
    finally:
        child.stop()
    engine = create_engine(db)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT request_id, threshold_source FROM inspections")).all())
    engine.dispose()
    assert rows["before"] == "model" and rows["after"] == tag and rows["back"] == "model"


def test_feedback_quality_report_and_threshold_proposal(store, client, good_and_defect,
                                                       tmp_path: Path) -> None:
    """Verdicts over gRPC and HTTP, bad ones refused; the report counts false calls and
    escapes and proposes thresholds that `thresholds apply` writes and the server follows."""
    alias = "feedback-canary"
    version = register_copy(store, tmp_path, "feedback", reference=reference_set(store, client, tmp_path))
    # The proposal trades false calls for zero escapes: the gate must see no escape, and may see
    # more rejected known goods than its default allows.
    child, target, db = serve_alias_with_log(store, client, alias, version, tmp_path,
                                             env={"ANOMALY_GATE_MAX_FALSE_REJECT": "1"})
    gateway, base = start_gateway(target, tmp_path / "gateway.log")
    goods, defects = good_and_defect
    try:
        results, paths = {}, {}
        with AnomalyClient(target) as grpc_client:
            for i, p in enumerate(goods + defects):
                r = grpc_client.score(p, category=category_of(p), request_id=f"part-{i}", station="line-1")
                results[r.request_id], paths[r.request_id] = (r, p in defects), p
            # The operator confirms every part: gRPC for the goods, HTTP for the defects.
            with AnomalyClient(base) as http_client:
                for rid, (_, defective) in results.items():
                    sdk = http_client if defective else grpc_client
                    ack = sdk.feedback(rid, "NG" if defective else "OK", operator="ana", station="review",
                                       defect_type=paths[rid].parent.name if defective else "")
                    assert ack.request_id == rid and ack.recorded_at
            bad = ((dict(request_id="x", verdict="MAYBE"), "verdict must be one of OK, NG"),
                   (dict(request_id="", verdict="OK"), "request_id is empty"),
                   (dict(request_id="x", verdict="OK", operator="a\nb"), "operator contains"),
                   (dict(request_id="x", verdict="OK", comment="c" * 2001), "at most 2000"))
            for kwargs, message in bad:
                for target_url in (target, base):
                    with AnomalyClient(target_url, retries=0) as c, pytest.raises(AnomalyError) as err:
                        c.feedback(**kwargs)
                    assert err.value.code == "INVALID_ARGUMENT" and message in err.value.message, err.value
            r = httpx.post(f"{base}/v1/feedback", json={"verdict": "OK"})
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        false_calls = sum(1 for r, d in results.values() if r.is_anomalous and not d)
        escapes = sum(1 for r, d in results.values() if not r.is_anomalous and d)

        proposal = tmp_path / "proposal.json"
        result = CliRunner().invoke(app, ["quality-report", "--db", db, "--proposal", str(proposal)],
                                    env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        proposals = json.loads(proposal.read_text())["proposals"]
        assert {p["category"] for p in proposals} == {"brick", "coffee"}
        assert sum(p["false_calls_now"] for p in proposals) == false_calls
        assert sum(p["escapes_now"] for p in proposals) == escapes
        for p in proposals:  # zero escapes at the proposed threshold, on real scores
            scored = [(r.score, d) for r, d in results.values() if r.category == p["category"]]
            assert p["threshold"] == min(s for s, d in scored if d)
            assert p["false_calls_proposed"] == sum(1 for s, d in scored if not d and s >= p["threshold"])
        with tracking_uri(store.tracking_uri):
            result = CliRunner().invoke(app, ["thresholds", "apply", str(proposal)])
        assert result.exit_code == 0, result.output
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            get = lambda: stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)  # noqa: E731
            # `thresholds apply` writes one tag per category; a poll may see one before the other.
            info = wait_for(lambda: all((i := get()).threshold_sources[c] == f"threshold.{c}"
                                        for c in ("brick", "coffee")) and i, what="applied thresholds")
            assert info.thresholds["brick"] == pytest.approx(
                next(p["threshold"] for p in proposals if p["category"] == "brick"))
            for rid, (_, defective) in results.items():  # no escape now
                if defective:
                    p = paths[rid]
                    request = pb.ScoreRequest(encoded=p.read_bytes(), category=category_of(p))
                    assert stub.Score(request, timeout=30).is_anomalous, rid
    finally:
        gateway.stop()
        child.stop()
    engine = create_engine(db)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM feedback WHERE operator = 'ana'")).scalar()
    engine.dispose()
    assert n == len(results)


def test_feedback_needs_the_inspection_log(store, grpc_target, http_base) -> None:
    for target in (grpc_target, http_base):
        with AnomalyClient(target, retries=0) as c, pytest.raises(AnomalyError) as err:
            c.feedback("part-1", "OK")
        assert err.value.code == "FAILED_PRECONDITION" and "ANOMALY_INSPECTION_LOG=true" in err.value.message


def test_shadow_challenger_scores_off_the_hot_path(store, client, good_and_defect, tmp_path: Path) -> None:
    """Both decisions reach the inspection log; metrics give agreement per category; the
    report names the disagreements; under a burst, shadow work is dropped, never an answer."""
    alias, challenger, port = "shadow-canary", "shadow-challenger", free_port()
    blind = register_copy(store, tmp_path, "shadow-blind", threshold_scale=1e6)  # passes everything
    client.set_registered_model_alias(store.model_name, alias, store.version)
    client.set_registered_model_alias(store.model_name, challenger, blind)
    db = f"sqlite:///{tmp_path / 'inspections.db'}"
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={**POLL, "ANOMALY_INSPECTION_LOG": "true",
                                                   "ANOMALY_INSPECTION_DB_URL": db,
                                                   "ANOMALY_SHADOW_ALIAS": challenger,
                                                   "ANOMALY_SHADOW_QUEUE": "2",
                                                   "ANOMALY_METRICS_PORT": str(port)})
    goods, defects = good_and_defect
    try:
        flagged = []
        with AnomalyClient(target) as c:
            for p in goods + defects:
                r = c.score(p, category=category_of(p), request_id=f"s-{uuid.uuid4().hex[:8]}")
                assert r.model.version == store.version
                if r.is_anomalous:
                    flagged.append(r.request_id)
                time.sleep(0.05)  # one at a time: every image is shadowed
        assert flagged
        metrics = lambda: httpx.get(f"http://127.0.0.1:{port}/metrics").text  # noqa: E731
        wait_for(lambda: sum(float(line.split()[-1]) for line in metrics().splitlines()
                             if line.startswith("anomaly_shadow_decisions_total{")) >= len(goods + defects),
                 what="every shadow decision")
        text_metrics = metrics()
        assert 'anomaly_shadow_decisions_total{category="brick",outcome="disagree"}' in text_metrics

        errors: list[Exception] = []

        def burst() -> None:
            try:
                with AnomalyClient(target) as c:
                    for p in (goods + defects)[:6]:
                        c.score(p)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=burst) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert "anomaly_shadow_dropped_total{reason=" in metrics()
        time.sleep(1.0)
    finally:
        client.delete_registered_model_alias(store.model_name, challenger)
        child.stop()
    result = CliRunner().invoke(app, ["shadow-report", "--db", db], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert flagged[0] in result.output  # served NG, challenger OK: named
    engine = create_engine(db)
    with engine.connect() as conn:
        pairs = conn.execute(text(
            "SELECT s.model_version, a.model_version, s.request_id = a.request_id FROM inspections s "
            "JOIN inspections a ON s.served_record_id = a.record_id WHERE s.role = 'shadow'")).all()
    engine.dispose()
    assert len(pairs) >= len(goods + defects)
    assert all(row == (blind, store.version, True) for row in pairs)


def test_shadow_failures_never_reach_the_answers(store, client, good_and_defect, tmp_path: Path) -> None:
    """A challenger that produces NaN on black images: each such shadow decision is counted
    as an error and nothing else happens; the answers (no inspection log here) are unchanged."""
    import io

    from PIL import Image

    alias, challenger, port = "shadow-fault-canary", "shadow-fault-challenger", free_port()
    client.set_registered_model_alias(store.model_name, alias, store.version)
    nan_on_black = register_tiny(store, "nan_on_black", tmp_path)
    client.set_registered_model_alias(store.model_name, challenger, nan_on_black)
    black = io.BytesIO()
    Image.new("RGB", (160, 160)).save(black, format="PNG")
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={**POLL, "ANOMALY_SHADOW_ALIAS": challenger,
                                                   "ANOMALY_METRICS_PORT": str(port)})
    try:
        with AnomalyClient(target) as c:
            for image in (black.getvalue(),) * 3 + (good_and_defect[0][0].read_bytes(),):
                r = c.score(image, category="brick")
                assert r.model.version == store.version and math.isfinite(r.score)
                time.sleep(0.1)
            metrics = lambda: httpx.get(f"http://127.0.0.1:{port}/metrics").text  # noqa: E731
            line = 'anomaly_shadow_decisions_total{category="brick",outcome="error"} 3.0'
            wait_for(lambda: line in metrics(), what="three shadow errors")
            assert c.score(black.getvalue(), category="brick").model.version == store.version
        log = (tmp_path / "server.log").read_text()
        assert log.count("could not score request_id=") >= 3 and "non-finite" in log
    finally:
        client.delete_registered_model_alias(store.model_name, challenger)
        child.stop()
