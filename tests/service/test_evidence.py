"""Evidence for review (issue 40, point 1): a real server keeps the image and map of the
decisions a person should see, bounded by size and age (oldest first, counted), never
delaying or failing a decision: not when the store is full, not when its disk refuses a
write, not across a SIGKILL and restart (the store takes stock of what it left)."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import metric_sum, wait_for
from PIL import Image

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


def test_a_shadow_disagreement_on_a_kept_decision_joins_its_evidence(tmp_path: Path) -> None:
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
    finally:
        store.close()
