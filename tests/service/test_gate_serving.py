"""The promotion gate is a property of what serves, not of a swap (issue 35, faults 1 and 2).

Real servers on loopback, SIGKILLed and started again on the same cache folder; a real MLflow
store; the session's trained model registered again with thresholds that let every defect
pass, or carrying live threshold tags that would."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import Store, reference_set, register_copy, wait_for
from mlflow import MlflowClient

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import ChildProcess, free_port, start_server
from service.promotion.rules import (
    GATE_AGAINST,
    GATE_OVERRIDE,
    GATE_OVERRIDE_BY,
    GATE_OVERRIDE_FOR,
    GATE_OVERRIDE_REASON,
    GATE_STATUS,
)

POLL = {"ANOMALY_POLL_INTERVAL_S": "0.3"}


@pytest.fixture(scope="module")
def client(store: Store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def caught_defect(stub, good_and_defect, version: str) -> tuple[bytes, str]:
    """A defective test image (and its category) that `version` answers NG."""
    for path in good_and_defect[1]:
        category = path.parent.parent.parent.name
        image = path.read_bytes()
        request = pb.ScoreRequest(encoded=image, category=category, version=int(version))
        if stub.Score(request, timeout=30).is_anomalous:
            return image, category
    raise AssertionError("the session model catches none of the defects")


def kill(child: ChildProcess) -> None:
    """SIGKILL, as a crash or an OOM kill does: no drain, nothing flushed."""
    child.signal(signal.SIGKILL)
    assert child.proc is not None
    child.proc.wait(30)


def info(stub, alias: str, model: str = "") -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(model=model, alias=alias), timeout=10)


@pytest.mark.timeout(600)
def test_a_restart_never_serves_a_version_the_gate_refused(store, client, good_and_defect,
                                                           tmp_path: Path) -> None:
    """Fault 1: champion moved to a version the gate refused; the server is SIGKILLed and started
    again (a crash, a rollout, a child restart of --processes): it serves the last version that
    passed, answers the known defect NG, and says why. The same when the alias moved while no
    server ran, with --processes (every child serves the same version), and a first start
    with no record never serves a version tagged gate.status=refused."""
    name, alias, good = store.model_name, "restart-canary", store.version
    client.set_registered_model_alias(name, alias, good)
    blind = register_copy(store, tmp_path, "restart-blind", threshold_scale=1e6)
    cache = tmp_path / "cache"
    server, target = start_server(store.tracking_uri, tmp_path / "server-1.log", cache_dir=cache,
                                  alias=alias, env=POLL)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            defect, category = caught_defect(stub, good_and_defect, good)
            client.set_registered_model_alias(name, alias, blind)
            wait_for(lambda: info(stub, alias).last_error_version == blind, what="the gate's refusal")
        assert client.get_model_version(name, blind).tags[GATE_STATUS] == "refused"

        kill(server)
        server, target = start_server(store.tracking_uri, tmp_path / "server-2.log", cache_dir=cache,
                                      alias=alias, env=POLL)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            answer = stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)
            assert answer.model.version == good and answer.is_anomalous  # the known defect is NG
            now = info(stub, alias)
            assert now.ref.version == good and now.last_error_version == blind
            assert "refused" in now.last_error
            time.sleep(1.5)  # polls go by: still the version that passed
            again = stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)
            assert again.model.version == good
        server.stop()

        # The alias moves while no server runs; then two processes start on the same cache.
        blind2 = register_copy(store, tmp_path, "restart-blind-2", threshold_scale=1e6)
        client.set_registered_model_alias(name, alias, blind2)
        metrics = free_port()
        server, target = start_server(store.tracking_uri, tmp_path / "server-3.log", cache_dir=cache,
                                      alias=alias, port=free_port(),
                                      env={**POLL, "ANOMALY_PROCESSES": "2",
                                           "ANOMALY_METRICS_PORT": str(metrics)})

        def served_by_each_child() -> list[str]:
            found = []
            for port in (metrics, metrics + 1):
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                except httpx.HTTPError:
                    return []
                m = re.search(rf'anomaly_served_version{{alias="{alias}",name="{name}"}} (\S+)', text)
                if not m:
                    return []
                found.append(str(int(float(m.group(1)))))
            return found

        assert wait_for(served_by_each_child, timeout=120, what="both children serving") == [good, good]
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            now = wait_for(lambda: (i := info(stub, alias)).last_error_version == blind2 and i,
                           what="the refusal of the version named while down")
            assert "would pass as OK" in now.last_error and now.ref.version == good
        assert client.get_model_version(name, blind2).tags[GATE_STATUS] == "refused"
    finally:
        server.stop()
        client.set_registered_model_alias(name, alias, good)

    # A first start (no record of what served the alias, in the cache or the registry's
    # served.<alias> tag) with the alias on a refused version.
    client.set_registered_model_alias(name, alias, blind)
    client.delete_registered_model_tag(name, f"served.{alias}")
    port = free_port()
    fresh = ChildProcess(["serve", "--tracking-uri", store.tracking_uri, "--host", "127.0.0.1", "--port",
                          str(port), "--cache-dir", str(tmp_path / "fresh-cache"), "--alias", alias],
                         tmp_path / "server-4.log", POLL)
    fresh.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)

            def not_serving() -> pb.ModelInfo | None:
                try:
                    i = info(stub, alias)
                except grpc.RpcError:
                    return None
                return i if i.state == "NOT_SERVING" and "gate.status=refused" in i.last_error else None

            now = wait_for(not_serving, timeout=90, what="NOT_SERVING with the reason")
            assert now.last_error_version == blind
            with pytest.raises(grpc.RpcError) as refused:
                stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        fresh.stop()
        client.set_registered_model_alias(name, alias, good)


@pytest.mark.timeout(600)
def test_a_threshold_change_on_the_serving_version_is_gated(store, client, good_and_defect,
                                                           tmp_path: Path) -> None:
    """Fault 2: a `threshold.<category>` tag on the version that serves is judged against its
    reference set before it applies; a change that would pass a known defect, or a
    non-positive or absurd value, leaves the thresholds as they were (GetModel, tags, metric,
    ERROR log), across restarts too; a change that passes applies and survives a SIGKILL."""
    name, alias = store.model_name, "threshold-gate"
    parts = reference_set(store, client, tmp_path)
    version = register_copy(store, tmp_path, "threshold-gated", reference=parts)
    client.set_registered_model_alias(name, alias, version)
    cache, metrics = tmp_path / "cache", free_port()
    env = {**POLL, "ANOMALY_METRICS_PORT": str(metrics)}
    server, target = start_server(store.tracking_uri, tmp_path / "server-1.log", cache_dir=cache, alias=alias,
                                  env=env)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            defect, category = caught_defect(stub, good_and_defect, version)
            tag = f"threshold.{category}"
            stats = store.build.metadata.image_stats[category]
            calibrated = info(stub, alias).thresholds[category]
            escape = f"{stats.max * 1.5:.6g}"  # above every evaluation score: every known defect passes

            def score() -> pb.ScoreResponse:
                return stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)

            client.set_model_version_tag(name, version, tag, escape)
            now = wait_for(lambda: (i := info(stub, alias)).last_error and i, what="the gate's refusal")
            assert "would pass as OK" in now.last_error and now.last_error_version == version
            assert now.threshold_sources[category] == "model"
            assert now.thresholds[category] == pytest.approx(calibrated)
            answer = score()
            assert answer.is_anomalous and answer.threshold_source == "model"
            tags = client.get_model_version(name, version).tags
            assert tags[GATE_STATUS] == "refused" and tags[GATE_AGAINST] == version

            for value, why in (("1e9", "absurd"), ("-1", "not positive"), ("0", "not positive")):
                client.set_model_version_tag(name, version, tag, value)
                now = wait_for(lambda: why in (i := info(stub, alias)).last_error and i,  # noqa: B023
                               what=f"the refusal of {value}")
                assert now.threshold_sources[category] == "model" and score().is_anomalous

            accepted = f"{calibrated * 0.999:.9g}"
            client.set_model_version_tag(name, version, tag, accepted)
            now = wait_for(lambda: (i := info(stub, alias)).threshold_sources[category] == tag and i,
                           what="the accepted change")
            assert now.thresholds[category] == pytest.approx(float(accepted)) and not now.last_error
            assert client.get_model_version(name, version).tags[GATE_STATUS] == "passed"

        kill(server)  # the accepted thresholds are what serves after a restart
        server, target = start_server(store.tracking_uri, tmp_path / "server-2.log", cache_dir=cache,
                                      alias=alias, env=env)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            assert info(stub, alias).thresholds[category] == pytest.approx(float(accepted))
            client.set_model_version_tag(name, version, tag, escape)
            wait_for(lambda: "would pass as OK" in info(stub, alias).last_error, what="a second refusal")
        kill(server)  # a refused change does not serve after a restart either
        server, target = start_server(store.tracking_uri, tmp_path / "server-3.log", cache_dir=cache,
                                      alias=alias, env=env)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            now = info(stub, alias)
            assert now.thresholds[category] == pytest.approx(float(accepted))
            assert "would pass as OK" in now.last_error
            answer = stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)
            assert answer.is_anomalous and answer.threshold == pytest.approx(float(accepted))
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        assert re.search(rf'anomaly_promotion_gate_total{{alias="{alias}",name="{name}",status="refused"}} '
                         r'[1-9]', text), text
    finally:
        server.stop()
        client.delete_model_version_tag(name, version, tag)
    logs = (tmp_path / "server-1.log").read_text()
    assert re.search(rf"ERROR \S+ promotion gate: {name} threshold tags of version {version}.* refused", logs)


@pytest.mark.timeout(400)
def test_an_override_names_who_and_why_and_covers_one_judgement(store, client, good_and_defect,
                                                               tmp_path: Path) -> None:
    """Fault 2 (overrides): `gate.override=true` alone forces nothing; with who and why it forces
    one judgement, is logged at WARNING, counted, recorded in the description and bound to that
    judgement (`gate.override.for`), so it does not wave through a later threshold change."""
    name, alias, good = store.model_name, "override-canary", store.version
    client.set_registered_model_alias(name, alias, good)
    blind = register_copy(store, tmp_path, "override-blind", threshold_scale=1e6)
    metrics = free_port()
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  alias=alias, env={**POLL, "ANOMALY_METRICS_PORT": str(metrics)})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            image = good_and_defect[0][0].read_bytes()
            served = lambda: stub.Score(pb.ScoreRequest(encoded=image), timeout=30).model.version  # noqa: E731
            client.set_registered_model_alias(name, alias, blind)
            wait_for(lambda: info(stub, alias).last_error_version == blind, what="the refusal")
            client.set_model_version_tag(name, blind, GATE_OVERRIDE, "true")
            now = wait_for(lambda: (i := info(stub, alias)).last_error.count("not honoured") and i,
                           what="the bare override refused")
            assert GATE_OVERRIDE_BY in now.last_error and served() == good

            client.set_model_version_tag(name, blind, GATE_OVERRIDE_BY, "qa-lead")
            client.set_model_version_tag(name, blind, GATE_OVERRIDE_REASON, "scratch accepted on purpose")
            wait_for(lambda: served() == blind, what="the overridden swap")
            mv = client.get_model_version(name, blind)
            assert mv.tags[GATE_STATUS] == "overridden"
            assert re.fullmatch(r"[0-9a-f]{16}", mv.tags[GATE_OVERRIDE_FOR])
            assert "OVERRIDDEN" in mv.description and "qa-lead" in mv.description
            assert "scratch accepted on purpose" in mv.description

            # The override covered that judgement only: a threshold change is judged on its own.
            threshold = info(stub, alias).thresholds[""]
            client.set_model_version_tag(name, blind, "threshold.global", f"{threshold * 0.999:.9g}")
            now = wait_for(lambda: (i := info(stub, alias)).last_error and i, what="the change judged")
            assert "used for another judgement" in now.last_error
            assert now.threshold_sources[""] == "model" and served() == blind
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        assert f'anomaly_promotion_gate_overrides_total{{alias="{alias}",name="{name}"}} 1.0' in text
    finally:
        server.stop()
        client.set_registered_model_alias(name, alias, good)
    assert re.search(r"WARNING \S+ promotion gate: .*overridden by 'qa-lead'",
                     (tmp_path / "server.log").read_text())


def caught_in(stub, good_and_defect, version: str, category: str | None) -> tuple[bytes, str]:
    """A defective test image of `category` (None: any) that `version` answers NG in its
    category and, when `category` is "", without one."""
    for path in good_and_defect[1]:
        own = path.parent.parent.parent.name
        if category not in (None, "", own):
            continue
        asked = "" if category == "" else own
        request = pb.ScoreRequest(encoded=path.read_bytes(), category=asked, version=int(version))
        if stub.Score(request, timeout=30).is_anomalous:
            return path.read_bytes(), asked
    raise AssertionError(f"the session model catches no defect for category {category!r}")


@pytest.mark.timeout(400)
def test_two_watched_aliases_never_share_a_refused_threshold(store, client, good_and_defect,
                                                            tmp_path: Path) -> None:
    """A threshold change one watched alias refused does not reach it through a second alias
    moved to the same version and judged against another reference set."""
    name, main, canary = store.model_name, "shared-main", "shared-canary"
    parts = reference_set(store, client, tmp_path)
    first = register_copy(store, tmp_path, "shared-first", reference=parts)
    coffee = [p for p in parts if p.category == "coffee"]
    other = register_copy(store, tmp_path, "shared-other", reference=coffee)
    client.set_registered_model_alias(name, main, first)
    client.set_registered_model_alias(name, canary, other)
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  alias=main, env={**POLL, "ANOMALY_MODELS": f'["{name}@{canary}"]'})
    tag = "threshold.brick"
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            defect, category = caught_in(stub, good_and_defect, first, "brick")
            escape = f"{store.build.metadata.image_stats['brick'].max * 1.5:.6g}"
            client.set_model_version_tag(name, first, tag, escape)
            wait_for(lambda: "would pass as OK" in info(stub, main).last_error, what="main's refusal")
            client.set_registered_model_alias(name, canary, first)
            now = wait_for(lambda: (i := info(stub, canary)).last_error_version == first and i,
                           what="the canary's move refused")
            assert now.ref.version == other, now
            time.sleep(1.0)
            answer = stub.Score(pb.ScoreRequest(encoded=defect, category=category, alias=main), timeout=30)
            assert answer.is_anomalous and answer.threshold_source == "model"
            assert "would pass as OK" in info(stub, main).last_error
    finally:
        server.stop()
        client.delete_model_version_tag(name, first, tag)


@pytest.mark.timeout(400)
def test_a_global_threshold_change_is_judged_without_a_category(store, client, good_and_defect,
                                                                tmp_path: Path) -> None:
    """Known parts carry a category, so `threshold.global` is judged on requests without one:
    a change that lets pass a known defect the calibrated global threshold catches is refused."""
    name, alias = store.model_name, "global-gate"
    version = register_copy(store, tmp_path, "global-gated", reference=reference_set(store, client, tmp_path))
    client.set_registered_model_alias(name, alias, version)
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  alias=alias, env=POLL)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            defect, _ = caught_in(stub, good_and_defect, version, "")
            escape = f"{store.build.metadata.image_stats[''].max * 1.5:.6g}"
            client.set_model_version_tag(name, version, "threshold.global", escape)
            now = wait_for(lambda: (i := info(stub, alias)).last_error and i, what="the refusal")
            assert "without a category" in now.last_error and now.threshold_sources[""] == "model", now
            answer = stub.Score(pb.ScoreRequest(encoded=defect), timeout=30)
            assert answer.is_anomalous and answer.threshold_source == "model"
    finally:
        server.stop()
        client.delete_model_version_tag(name, version, "threshold.global")


@pytest.mark.timeout(500)
def test_an_empty_cache_takes_the_registry_record_and_a_bad_record_is_ignored(store, client, good_and_defect,
                                                                              tmp_path: Path) -> None:
    """A new pod (an empty cache) judges what the alias names against the version the
    registry's `served.<alias>` tag records; a local record naming a version the registry does
    not hold is ignored rather than stopping the line; without keeping overrides unrecorded."""
    from service.promotion.served import Served, ServedMemory

    name, alias, good = store.model_name, "fresh-canary", store.version
    client.set_registered_model_alias(name, alias, good)
    server, _ = start_server(store.tracking_uri, tmp_path / "server-1.log", cache_dir=tmp_path / "cache-1",
                             alias=alias, env=POLL)
    server.stop()
    assert client.get_registered_model(name).tags[f"served.{alias}"] == good
    blind = register_copy(store, tmp_path, "fresh-blind", threshold_scale=1e6)
    client.set_registered_model_alias(name, alias, blind)
    server, target = start_server(store.tracking_uri, tmp_path / "server-2.log",
                                  cache_dir=tmp_path / "cache-2", alias=alias, env=POLL)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            defect, category = caught_in(stub, good_and_defect, good, None)
            answer = stub.Score(pb.ScoreRequest(encoded=defect, category=category), timeout=30)
            assert answer.model.version == good and answer.is_anomalous
            now = info(stub, alias)
            assert now.last_error_version == blind and "would pass as OK" in now.last_error
    finally:
        server.stop()

    # A hand-edited local record naming a version that does not exist: ignored (ERROR), and the
    # alias is judged as at a first start, not left serving nothing.
    client.set_registered_model_alias(name, alias, good)
    client.delete_registered_model_tag(name, f"served.{alias}")
    cache = tmp_path / "cache-3"
    ServedMemory(cache, store.tracking_uri).put(Served(name, alias, "999", "no-such-run"))
    server, target = start_server(store.tracking_uri, tmp_path / "server-3.log", cache_dir=cache, alias=alias,
                                  env=POLL)
    try:
        with grpc.insecure_channel(target) as ch:
            assert info(pb_grpc.AnomalyDetectionStub(ch), alias).ref.version == good
    finally:
        server.stop()
        client.set_registered_model_alias(name, alias, good)
    assert "which the registry does not hold; ignored" in (tmp_path / "server-3.log").read_text()


@pytest.mark.timeout(300)
def test_an_override_the_server_cannot_record_is_never_honoured(store, client, good_and_defect,
                                                                tmp_path: Path) -> None:
    """With ANOMALY_GATE_WRITE_TAGS=false an override is refused, even with a `gate.override.for`
    forged to match the judgement."""
    from service.promotion.rules import judgement_id

    name, alias, good = store.model_name, "unrecorded-override", store.version
    client.set_registered_model_alias(name, alias, good)
    blind = register_copy(store, tmp_path, "unrecorded-blind", threshold_scale=1e6)
    forged = judgement_id(blind, {}, good)
    for tag, value in ((GATE_OVERRIDE, "true"), (GATE_OVERRIDE_BY, "someone"),
                       (GATE_OVERRIDE_REASON, "forged"), (GATE_OVERRIDE_FOR, forged)):
        client.set_model_version_tag(name, blind, tag, value)
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  alias=alias, env={**POLL, "ANOMALY_GATE_WRITE_TAGS": "false"})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            client.set_registered_model_alias(name, alias, blind)
            now = wait_for(lambda: (i := info(stub, alias)).last_error_version == blind and i,
                           what="a refusal")
            assert "must be recorded" in now.last_error and now.ref.version == good
    finally:
        server.stop()
        client.set_registered_model_alias(name, alias, good)
