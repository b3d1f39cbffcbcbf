"""Evidence for review (issue 40, point 1): a real server keeps the image and map of the
decisions a person should see, bounded by size and age (oldest first, counted), never
delaying or failing a decision: not when the store is full, not when its disk refuses a
write, not across a SIGKILL and restart (the store takes stock of what it left)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import metric_sum, mlflow_server_process, wait_for
from PIL import Image

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_server
from service.inspection.evidence import EvidenceStore, Kept, request_key
from service.inspection.log import Decided

MB = 1 << 20


def _noise_png(seed: int, size: int = 200) -> bytes:
    """A PNG that does not compress (about 120 KB): a few of them fill a 1 MB store."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _files(root: Path, request_id: str) -> list[Path]:
    return sorted(root.rglob(f"{request_key(request_id)}-*"))


def test_a_full_store_drops_the_oldest_and_decisions_are_unaffected(store, grpc_target: str,
                                                                     tmp_path: Path) -> None:
    evidence, metrics = tmp_path / "evidence", free_port()
    env = {"ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(evidence), "ANOMALY_EVIDENCE_MAX_MB": "1",
           "ANOMALY_EVIDENCE_OK_FRACTION": "1", "ANOMALY_METRICS_PORT": str(metrics),
           "ANOMALY_EVIDENCE_MIN_FREE_MB": "0",  # this test's bounds are its own, whatever the disk holds
           "ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{tmp_path / 'log.db'}"}
    url = f"http://127.0.0.1:{metrics}/metrics"
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    images = [_noise_png(i) for i in range(20)]
    try:
        with AnomalyClient(target) as client, AnomalyClient(grpc_target) as plain:
            answers = [client.score(image, request_id=f"part-{i}", station="line-1")
                       for i, image in enumerate(images)]
            expected = [plain.score(image).score for image in images]  # a server keeping none
        assert [a.score for a in answers] == pytest.approx(expected, rel=1e-6)  # decisions unaffected
        wait_for(lambda: metric_sum(url, 'anomaly_evidence_total{outcome="kept"}', 0) == 20, 30,
                 "every decision's evidence written")
        held = metric_sum(url, "anomaly_evidence_bytes")
        on_disk = sum(p.stat().st_size for p in evidence.rglob("*") if p.is_file())
        assert held == on_disk <= 1 * MB
        evicted = metric_sum(url, 'anomaly_evidence_total{outcome="evicted_size"}', 0)
        assert evicted >= 10 and metric_sum(url, "anomaly_evidence_items") == 20 - evicted
        assert not _files(evidence, "part-0")  # the oldest went first
        newest = _files(evidence, "part-19")
        assert [p.name.split(".", 1)[1] for p in newest] == ["json", "map.png", "png"]
        record = json.loads(next(p for p in newest if p.suffix == ".json").read_text())
        assert record["request_id"] == "part-19" and record["station"] == "line-1"
        assert record["reason"] in ("ng", "ok_sample") and record["score"] == pytest.approx(answers[19].score)
        assert record["decision"] == ("NG" if answers[19].is_anomalous else "OK")
        # the inspection log's row names its evidence: the row's record id is in the file names
        with sqlite3.connect(tmp_path / "log.db") as db:
            row = wait_for(lambda: db.execute("SELECT record_id FROM inspections WHERE request_id = ?",
                                              ("part-19",)).fetchone(), 30, "the row shipped",
                           retry_on=(sqlite3.OperationalError,))
        assert all(p.name.startswith(f"{request_key('part-19')}-{row[0]}.") for p in newest)
        assert next(p for p in newest if p.name.endswith(".png") and ".map" not in p.name).read_bytes() \
            == images[19]  # the image as it was sent
        # A disk that refuses the write (here: today's folder is a file): the evidence is
        # dropped and counted, the decision answered as before.
        day = next(p for p in evidence.iterdir() if p.is_dir())
        for path in day.iterdir():
            path.unlink()
        day.rmdir()
        day.write_text("not a folder")
        with AnomalyClient(target) as client:
            refused = client.score(images[0], request_id="part-refused")
        assert refused.score == pytest.approx(expected[0], rel=1e-6)
        wait_for(lambda: metric_sum(url, 'anomaly_evidence_total{outcome="dropped_write_error"}', 0) == 1, 30,
                 "the refused write counted")
        day.unlink()
        # SIGKILL, restart: the store takes stock of what the first run left
        with AnomalyClient(target) as client:
            client.score(images[1], request_id="part-before-kill")
        wait_for(lambda: _files(evidence, "part-before-kill"), 30, "evidence before the kill")
        child.signal(signal.SIGKILL)
        child.proc.wait(30)
        stale = day / f"{'a' * 16}-{'b' * 32}.png.tmp"  # one of the store's own, cut short
        stale.write_bytes(b"a write cut short")
        left = sum(p.stat().st_size for p in evidence.rglob("*") if p.is_file() and p.suffix != ".tmp")
        child2, _ = start_server(store.tracking_uri, tmp_path / "server2.log", cache_dir=store.home / "cache",
                                 env=env)
        try:
            assert metric_sum(url, "anomaly_evidence_bytes") == left
            assert not stale.exists()
        finally:
            assert child2.stop() == 0
    finally:
        child.stop()


def _decided(i: int, anomalous: bool = True) -> Decided:
    return Decided(f"r-{i}", "s", "", "m", "1", 1.0, 0.6, 0.5, anomalous, 3.0, record_id=f"{i:032x}")


def test_age_bound_sampling_and_a_full_queue(tmp_path: Path) -> None:
    """The store alone: items past the age bound go (on start and while it runs), OK
    decisions are sampled, and a full queue drops rather than waits."""
    root = tmp_path / "evidence"
    store = EvidenceStore(root, max_bytes=10 * MB, max_age_s=3600, ok_fraction=0.0, queue_bytes=MB)
    store.start()
    try:
        assert store.reason_for(_decided(0)) == "ng" and store.reason_for(_decided(1, False)) is None
        image = b"\x89PNG fake bytes" * 10
        for i in range(3):
            assert store.offer(Kept(_decided(i), "ng", lambda: (image, ".png"), len(image),
                                    np.zeros((8, 8), np.float32), (0.0, 1.0)))
        wait_for(lambda: len(store.items) == 3, 10, "three items written")
        assert store.find("r-1")[0]["reason"] == "ng" and store.find("nobody") == []
        assert not store.offer(Kept(_decided(9), "ng", lambda: (image, ".png"), 2 * MB, None, (0.0, 1.0)))
    finally:
        store.close()
    old = time.time() - 7200  # two hours ago: past a one-hour bound
    for path in next(root.iterdir()).iterdir():
        if path.name.startswith(request_key("r-0")):
            os.utime(path, (old, old))
    again = EvidenceStore(root, max_bytes=10 * MB, max_age_s=3600, ok_fraction=1.0, queue_bytes=MB)
    again.start()
    try:
        assert not again.find("r-0") and again.find("r-2") and len(again.items) == 2
        assert again.reason_for(_decided(5, False)) == "ok_sample"
    finally:
        again.close()


def test_the_store_keeps_its_disk_free_touches_only_its_own_files_and_reads_every_process(
        tmp_path: Path) -> None:
    """A free-space floor the disk cannot meet: the oldest evidence goes, then new evidence is
    dropped (counted), so the inspection spool beside it keeps room; files that are not the
    store's own survive a start and every eviction; evidence of every process is read back."""
    from service import metrics
    from service.inspection.evidence import kept_on_disk, read_evidence

    root = tmp_path / "evidence"
    foreign = [root / "2020-01-01" / "camera1.jpg", root / "2026-12-01" / "shift-notes.tmp",
               root / "misc" / "other.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not the store's")
        os.utime(path, (0, 0))  # 1970: far past any age bound
    image = b"\x89PNG fake bytes" * 10

    def dropped(outcome: str) -> float:
        return metrics.EVIDENCE.labels(outcome)._value.get()

    store = EvidenceStore(root / "p0", max_bytes=10 * MB, max_age_s=3600, ok_fraction=0.0, queue_bytes=MB)
    store.start()
    try:
        for i in range(3):
            amap = np.zeros((8, 8), np.float32)
            store.offer(Kept(_decided(i), "ng", lambda: (image, ".png"), len(image), amap, (0.0, 1.0)))
        wait_for(lambda: len(store.items) == 3, 10, "three items written")
    finally:
        store.close()
    other = EvidenceStore(root / "p1", max_bytes=10 * MB, max_age_s=3600, ok_fraction=0.0, queue_bytes=MB)
    other.start()
    try:
        other.offer(Kept(_decided(7), "ng", lambda: (image, ".png"), len(image), None, (0.0, 1.0)))
        wait_for(lambda: len(other.items) == 1, 10, "the other process's item written")
    finally:
        other.close()
    ids = {_decided(i).record_id for i in range(3)} | {_decided(7).record_id}
    assert kept_on_disk(root) == ids  # both processes' folders, as the review desk reads them
    found = read_evidence(root, _decided(7).record_id)
    assert found is not None and found.image == image and found.map8 is None
    assert read_evidence(root, "../" + "0" * 29) is None and read_evidence(root, "*") is None
    # a floor no disk meets: every old item goes, the new one is dropped
    evicted, before = dropped("evicted_disk_low"), dropped("dropped_disk_low")
    full = EvidenceStore(root / "p0", max_bytes=10 * MB, max_age_s=3600, ok_fraction=0.0, queue_bytes=MB,
                         min_free_bytes=1 << 62)
    full.start()
    try:
        full.offer(Kept(_decided(9), "ng", lambda: (image, ".png"), len(image), None, (0.0, 1.0)))
        wait_for(lambda: dropped("dropped_disk_low") == before + 1, 10, "the new evidence dropped")
        assert dropped("evicted_disk_low") == evicted + 3 and not full.items
    finally:
        full.close()
    assert all(path.read_bytes() == b"not the store's" for path in foreign)  # never the store's to delete


def test_a_shadow_disagreement_on_a_kept_decision_joins_its_evidence(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An NG answer kept with its map, then passed by the challenger: one item, its map still
    there, its record naming the challenger's decision (a second copy used to replace the
    first's record and lose the map)."""
    from service.inspection.evidence import read_evidence

    root = tmp_path / "evidence"
    store = EvidenceStore(root, max_bytes=10 * MB, max_age_s=3600, ok_fraction=0.0, queue_bytes=MB)
    store.start()
    try:
        image, served = _noise_png(3, 64), _decided(1)
        amap = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        assert store.offer(Kept(served, "ng", lambda: (image, ".png"), len(image), amap, (0.0, 1.0)))
        challenger = {"model_version": "9", "anomalous": False}
        assert store.offer(Kept(served, "shadow_disagreement", lambda: (image, ".png"), len(image), None,
                                (0.0, 1.0), other=challenger))
        joined = lambda: store.find("r-1") and store.find("r-1")[0].get("also")  # noqa: E731
        wait_for(joined, 10, "the disagreement joined")
        assert len(store.items) == 1 and len(_files(root, "r-1")) == 3  # image, map, record
        found = read_evidence(root, served.record_id)
        assert found is not None and found.map8 is not None and found.image == image
        assert found.record["reason"] == "ng" and found.record["also"] == ["shadow_disagreement"]
        assert found.record["challenger"] == challenger
        assert store.bytes == sum(p.stat().st_size for p in _files(root, "r-1"))
        # a record edited by hand: odd `also` values are dropped, a record that is no object is
        # left as it is (logged, counted), and the bytes are counted again from the files
        record = next(p for p in _files(root, "r-1") if p.suffix == ".json")
        record.write_text(json.dumps({**found.record, "also": "ok_sample", "note": "x" * 5000}))
        again = Kept(served, "shadow_disagreement", lambda: (image, ".png"), len(image), None, (0.0, 1.0))
        assert store.offer(again)
        on_disk = lambda: sum(p.stat().st_size for p in _files(root, "r-1"))  # noqa: E731
        rejoined = lambda: json.loads(record.read_text())["also"] == ["shadow_disagreement"]  # noqa: E731
        wait_for(lambda: rejoined() and store.bytes == on_disk(), 10, "joined again, counted from its files")
        record.write_text("[1, 2]")
        assert store.offer(again)
        wait_for(lambda: not store._queue.qsize() and store._pending == 0, 10, "the offer handled")
        time.sleep(0.2)
        assert record.read_text() == "[1, 2]" and store._thread is not None and store._thread.is_alive()
        assert not [r for r in caplog.records if r.exc_info]  # a warning, not a traceback
    finally:
        store.close()


def test_evidence_in_an_s3_bucket_outlives_the_local_bounds(store, tmp_path: Path) -> None:
    """`ANOMALY_EVIDENCE_REMOTE_URI=s3://…` against a real S3 endpoint on loopback (moto's
    server): every item is copied to the bucket; the local store (1 MB) evicts the oldest, and
    the review station still draws those from the bucket. With the bucket gone, decisions are
    answered as before, failed copies are counted, and a part evicted locally is shown without
    its images rather than failing."""
    boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")
    s3_port, metrics = free_port(), free_port()
    bucket = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    bucket.start()
    keys = {"AWS_ACCESS_KEY_ID": "line-1", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    s3 = boto3.client("s3", endpoint_url=keys["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="evidence")
    evidence, db = tmp_path / "evidence", tmp_path / "log.db"
    env = {"ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(evidence), "ANOMALY_EVIDENCE_MAX_MB": "1",
           "ANOMALY_EVIDENCE_OK_FRACTION": "1", "ANOMALY_METRICS_PORT": str(metrics),
           "ANOMALY_EVIDENCE_MIN_FREE_MB": "0", "ANOMALY_EVIDENCE_REMOTE_URI": "s3://evidence/plant-7",
           "ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{db}", **keys}
    url = f"http://127.0.0.1:{metrics}/metrics"
    copied = 'anomaly_evidence_remote_total{outcome="copied"}'
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    images = [_noise_png(i) for i in range(14)]
    try:
        answers = []
        with AnomalyClient(target) as client:
            for i, image in enumerate(images):  # a line's pace: each copied before the next part
                answers.append(client.score(image, request_id=f"part-{i}", station="line-1"))
                wait_for(lambda: metric_sum(url, copied, 0) == i + 1, 30,  # noqa: B023
                         f"part-{i} copied to the bucket", retry_on=(AssertionError,))
        assert metric_sum(url, 'anomaly_evidence_total{outcome="evicted_size"}', 0) >= 4
        assert not _files(evidence, "part-0")  # gone locally …
        names = [o["Key"] for o in s3.list_objects_v2(Bucket="evidence", Prefix="plant-7/")["Contents"]]
        assert sum(n.endswith(".json") for n in names) == 14  # … every item in the bucket
        assert all(n.split("/")[1][:4].isdigit() for n in names)  # plant-7/<UTC day>/<item files>
        with sqlite3.connect(db) as conn:
            query = "SELECT record_id FROM inspections WHERE request_id = ?"
            record_id = wait_for(lambda: conn.execute(query, ("part-0",)).fetchone(), 30, "the row shipped",
                                 retry_on=(sqlite3.OperationalError,))[0]
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.AnomalyDetectionStub(channel)
            part = stub.GetEvidence(pb.GetEvidenceRequest(record_id=record_id), timeout=60)
            assert part.item.has_evidence and part.image == images[0]  # the image as sent, from the bucket
            assert part.overlay_png.startswith(b"\x89PNG") and part.heat_png.startswith(b"\x89PNG")
            assert part.item.decision == ("NG" if answers[0].is_anomalous else "OK")
            bucket.stop()  # the bucket gone: decisions as before, copies fail (counted), parts still shown
            with AnomalyClient(target) as client:
                again = client.score(images[0], request_id="part-after-outage")
            assert again.score == pytest.approx(answers[0].score, rel=1e-6)
            wait_for(lambda: metric_sum(url, 'anomaly_evidence_remote_total{outcome="failed"}', 0) == 1, 60,
                     "the failed copy counted")
            undrawn = stub.GetEvidence(pb.GetEvidenceRequest(record_id=record_id), timeout=60)
            assert not undrawn.item.has_evidence and not undrawn.image
            assert undrawn.item.request_id == "part-0"
        assert "not copied after 3 tries" in (tmp_path / "server.log").read_text()
    finally:
        assert child.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]
        bucket.stop()


@pytest.mark.parametrize("uri", ["mlflow-artifacts:/evidence", "nosuchscheme://bucket/x", "s3://evidence/line#7",
                                 "file:///srv/evidence/../etc"])
def test_a_bucket_uri_that_cannot_be_used_stops_the_server_at_start(store, tmp_path: Path, uri: str) -> None:
    """`mlflow-artifacts:` needs an http(s) tracking server (here: SQLite); an unknown scheme
    has no repository; `#` or `?` would be cut off by the store (`line#7` wrote under `line/`,
    and pruned it); `..`: all refused at start, naming the variable, not at the first copy."""
    import subprocess
    import sys

    env = {**os.environ, "ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(tmp_path / "evidence"),
           "ANOMALY_EVIDENCE_REMOTE_URI": uri, "ANOMALY_CACHE_DIR": str(tmp_path / "cache")}
    started = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--tracking-uri", store.tracking_uri,
                              "--port", str(free_port())], cwd=Path(__file__).resolve().parents[2], env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert "ANOMALY_EVIDENCE_REMOTE_URI" in started.stderr and "Traceback" not in started.stderr, \
        started.stderr[-2000:]


def test_evidence_in_the_mlflow_artifact_store(store, tmp_path: Path) -> None:
    """`ANOMALY_EVIDENCE_REMOTE_URI=mlflow-artifacts:/…`: a real `mlflow server --serve-artifacts`
    receives each item through its artifact proxy (no bucket keys on the edge box), and a part
    gone from the local folder is drawn from there."""
    evidence, db, metrics = tmp_path / "evidence", tmp_path / "log.db", free_port()
    env = {"ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(evidence),
           "ANOMALY_EVIDENCE_OK_FRACTION": "1", "ANOMALY_EVIDENCE_MIN_FREE_MB": "0",
           "ANOMALY_METRICS_PORT": str(metrics),
           "ANOMALY_EVIDENCE_REMOTE_URI": "mlflow-artifacts:/evidence/line-2",
           "ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{db}"}
    url = f"http://127.0.0.1:{metrics}/metrics"
    images = [_noise_png(i, 96) for i in range(3)]
    with mlflow_server_process(store.tracking_uri, store.home) as (mlflow_url, _):
        child, target = start_server(mlflow_url, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                     env=env)
        try:
            with AnomalyClient(target) as client:
                for i, image in enumerate(images):
                    client.score(image, request_id=f"line-2-part-{i}", station="line-2")
            wait_for(lambda: metric_sum(url, 'anomaly_evidence_remote_total{outcome="copied"}', 0) == 3, 60,
                     "every item copied through the MLflow server", retry_on=(AssertionError,))
            served = sorted((store.home / "artifacts" / "evidence" / "line-2").rglob("*.json"))
            assert len(served) == 3 and all(p.parent.name[:4].isdigit() for p in served)
            for path in _files(evidence, "line-2-part-0"):  # gone from the edge box
                path.unlink()
            with sqlite3.connect(db) as conn:
                query = "SELECT record_id FROM inspections WHERE request_id = ?"
                record_id = wait_for(lambda: conn.execute(query, ("line-2-part-0",)).fetchone(), 30,
                                     "the row shipped", retry_on=(sqlite3.OperationalError,))[0]
            with grpc.insecure_channel(target) as channel:
                part = pb_grpc.AnomalyDetectionStub(channel).GetEvidence(
                    pb.GetEvidenceRequest(record_id=record_id), timeout=60)
            assert part.item.has_evidence and part.image == images[0]
            assert part.overlay_png.startswith(b"\x89PNG")
        finally:
            assert child.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]


def test_a_hung_bucket_and_a_hostile_one_never_stall_the_server(store, tmp_path: Path) -> None:
    """A bucket that accepts and never answers: eight parts opened at once (their evidence gone
    locally) each answer within the fetch deadline without images, the inspection log keeps
    shipping, and SIGTERM stops the server. Then a `file://` bucket whose record was replaced
    by something else: the part is shown without its images, not an INTERNAL error."""
    from conftest import SilentEndpoint

    silent = SilentEndpoint()
    evidence, db = tmp_path / "evidence", tmp_path / "log.db"
    env = {"ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(evidence),
           "ANOMALY_EVIDENCE_OK_FRACTION": "1", "ANOMALY_EVIDENCE_MIN_FREE_MB": "0",
           "ANOMALY_EVIDENCE_REMOTE_URI": "s3://evidence/hung",
           "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{silent.port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{db}"}
    images = [_noise_png(i, 64) for i in range(4)]
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    try:
        with AnomalyClient(target) as client:
            for i, image in enumerate(images[:2]):
                client.score(image, request_id=f"hung-{i}", station="line-3")
        wait_for(lambda: _files(evidence, "hung-0"), 30, "the local evidence")
        with sqlite3.connect(db) as conn:
            query = "SELECT record_id FROM inspections WHERE request_id = 'hung-0'"
            record_id = wait_for(lambda: conn.execute(query).fetchone(), 30, "the row shipped",
                                 retry_on=(sqlite3.OperationalError,))[0]
        for path in _files(evidence, "hung-0"):
            path.unlink()

        async def open_parts() -> list:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.AnomalyDetectionStub(channel)
                return await asyncio.gather(*(stub.GetEvidence(pb.GetEvidenceRequest(record_id=record_id),
                                                               timeout=30) for _ in range(8)))

        started = time.monotonic()
        parts = asyncio.run(open_parts())
        assert time.monotonic() - started < 15
        assert all(not p.item.has_evidence and p.item.request_id == "hung-0" for p in parts)
        with AnomalyClient(target) as client:  # the line and the log go on
            for i, image in enumerate(images[2:], 2):
                client.score(image, request_id=f"hung-{i}", station="line-3")
        with sqlite3.connect(db) as conn:
            count = "SELECT COUNT(*) FROM inspections"
            wait_for(lambda: conn.execute(count).fetchone()[0] == 4, 15, "every row shipped",
                     retry_on=(sqlite3.OperationalError,))
        started = time.monotonic()
        assert child.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]  # SIGTERM
        assert time.monotonic() - started < 30
        log = (tmp_path / "server.log").read_text()
        assert "not read from the bucket" in log
    finally:
        child.stop()
        silent.close()

    bucket = tmp_path / "bucket"
    metrics = free_port()
    env = {**env, "ANOMALY_EVIDENCE_REMOTE_URI": bucket.as_uri(), "ANOMALY_MAX_IMAGE_PIXELS": "1000000",
           "ANOMALY_EVIDENCE_DIR": str(tmp_path / "ev2"), "ANOMALY_METRICS_PORT": str(metrics)}
    copied = 'anomaly_evidence_remote_total{outcome="copied"}'
    child, target = start_server(store.tracking_uri, tmp_path / "server2.log", cache_dir=store.home / "cache",
                                 env=env)
    try:
        with AnomalyClient(target) as client:
            client.score(images[0], request_id="hostile-0", station="line-3")
        wait_for(lambda: metric_sum(f"http://127.0.0.1:{metrics}/metrics", copied, 0) == 1, 30, "the copy",
                 retry_on=(AssertionError,))
        with sqlite3.connect(db) as conn:
            query = "SELECT record_id FROM inspections WHERE request_id = 'hostile-0'"
            record_id = wait_for(lambda: conn.execute(query).fetchone(), 30, "the row shipped",
                                 retry_on=(sqlite3.OperationalError,))[0]
        for path in _files(tmp_path / "ev2", "hostile-0"):
            path.unlink()
        record = next(bucket.rglob(f"*-{record_id}.json"))
        stem, kept = record.name[:-len(".json")], json.loads(record.read_text())
        (record.parent / stem).write_bytes(b"no suffix")  # a file named as the item, with no suffix
        big = io.BytesIO()  # a map larger than any image may be (ANOMALY_MAX_IMAGE_PIXELS below)
        Image.new("L", (1200, 1000)).save(big, format="PNG")
        (record.parent / f"{stem}.map.png").write_bytes(big.getvalue())
        image = next(n for n in kept["files"] if not n.endswith((".json", ".map.png")))
        hostile = ["[1, 2]", '{"files": null}', '{"files": [5]}', '{"files": ["../../etc/passwd"]}',
                   json.dumps({**kept, "files": [stem, f"{stem}.json"]}),
                   json.dumps({**kept, "files": [image, f"{stem}.map.png", f"{stem}.json"]}),
                   json.dumps({**kept, "threshold": "x", "files": [image, f"{stem}.json"]})]
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.AnomalyDetectionStub(channel)
            for text in hostile:
                record.write_text(text)
                part = stub.GetEvidence(pb.GetEvidenceRequest(record_id=record_id), timeout=30)
                assert not part.item.has_evidence and not part.image, text
            record.write_text(json.dumps({**kept, "files": [image, f"{stem}.json"]}))  # as kept, no map
            assert stub.GetEvidence(pb.GetEvidenceRequest(record_id=record_id), timeout=30).image == images[0]
    finally:
        assert child.stop() == 0, (tmp_path / "server2.log").read_text()[-3000:]
