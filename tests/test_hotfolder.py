"""The MES hot-folder client against real servers: a half-written file waits, a restart of
the client loses nothing and moves nothing twice, and 240 images with the gRPC server
stopped and restarted midway end up scored exactly once in the results and in the
server's inspection log."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from clients.cli import app
from clients.hotfolder import HotFolder, Summary
from clients.sdk import AnomalyClient
from service.launch import free_port, start_server


def _fill(inbox: Path, sources: list[Path], n: int) -> list[str]:
    inbox.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        src = sources[i % len(sources)]
        name = f"part-{i:04d}{src.suffix}"
        shutil.copyfile(src, inbox / name)
        names.append(name)
    return names


def _results(out: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for outcome in ("OK", "NG", "error"):
        for j in (out / outcome).glob("*.json"):
            image = j.name[: -len(".json")]
            assert (out / outcome / image).is_file(), j
            assert image not in found, f"{image} has two results"
            found[image] = json.loads(j.read_text())
            assert found[image]["outcome"] == outcome
    return found


def test_partial_file_waits_and_restart_is_idempotent(grpc_target: str, good_and_defect,
                                                       tmp_path: Path) -> None:
    inbox, out = tmp_path / "in", tmp_path / "out"
    good = good_and_defect[0][0].read_bytes()
    inbox.mkdir()
    with AnomalyClient(grpc_target) as client:
        folder = HotFolder(client, inbox, out, settle_s=0.3)
        # A file still being written is not touched.
        (inbox / "slow.png").write_bytes(good[: len(good) // 2])
        summary = Summary()
        folder.run_once(summary)
        time.sleep(0.1)
        (inbox / "slow.png").write_bytes(good)  # the writer finishes
        folder.run_once(summary)
        assert summary.done == 0 and (inbox / "slow.png").exists()
        time.sleep(0.4)
        folder.run_once(summary)
        assert summary.done == 1 and not (inbox / "slow.png").exists()

        # Crash after writing the JSON, before moving: the restarted client moves, never rescoring.
        shutil.copyfile(good_and_defect[1][0], inbox / "a.png")
        stale = {"outcome": "NG", "request_id": "from-before", "image": "a.png"}
        HotFolder._write_json(HotFolder.result_path(inbox / "a.png"), stale)
        # Crash between moving the image and its JSON: the JSON follows its image.
        shutil.copyfile(good_and_defect[0][1], out / "OK" / "b.png")
        (inbox / "b.png.json").write_text(json.dumps({"outcome": "OK", "request_id": "b", "image": "b.png"}))
        restarted = HotFolder(client, inbox, out, settle_s=0)
        summary = restarted.run(until_empty=True, seconds=20)
    assert summary.ng == 1 and summary.pending == 0
    results = _results(out)
    assert results["a.png"]["request_id"] == "from-before"  # moved as recorded, not scored again
    assert results["b.png"]["request_id"] == "b" and "slow.png" in results
    assert not list(inbox.iterdir())


def test_cli_scores_a_folder(grpc_target: str, good_and_defect, tmp_path: Path) -> None:
    names = _fill(tmp_path / "in", [*good_and_defect[0], *good_and_defect[1]], 12)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = CliRunner().invoke(app, ["hotfolder", str(tmp_path / "in"), "--target", grpc_target,
                                 "--until-empty", "--seconds", "60", "--settle", "0"])
    assert r.exit_code == 0, r.output
    results = _results(tmp_path / "in")
    assert set(results) == {*names, "broken.png"}
    assert results["broken.png"]["outcome"] == "error" and results["broken.png"]["code"] == "INVALID_ARGUMENT"
    assert "OK" in r.output and "NG" in r.output


def test_server_restart_midway_every_image_exactly_once(store, good_and_defect, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'inspections.db'}"
    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": db}
    port = free_port()
    server, target = start_server(store.tracking_uri, tmp_path / "s1.log", port=port,
                                  cache_dir=tmp_path / "cache", env=env)
    names = _fill(tmp_path / "in", [*good_and_defect[0], *good_and_defect[1]], 240)
    done: list[str] = []
    finished: list[Summary] = []
    with AnomalyClient(target, retries=0, timeout=10) as client:
        folder = HotFolder(client, tmp_path / "in", tmp_path / "out", settle_s=0)
        worker = threading.Thread(target=lambda: finished.append(folder.run(
            seconds=150, until_empty=True, poll_s=0.2, max_backoff_s=1.0,
            on_done=lambda p, o: done.append(p.name))))
        worker.start()
        try:
            while len(done) < 80 and worker.is_alive():
                time.sleep(0.02)
            assert server.stop() == 0  # SIGTERM midway: in-flight drain, the log is flushed
            time.sleep(0.5)  # let the client finish filing the answers it got before the stop
            stopped_at = len(done)
            time.sleep(1.5)  # the client meets a dead server and keeps the images
            assert len(done) == stopped_at and stopped_at < 240
            server, _ = start_server(store.tracking_uri, tmp_path / "s2.log", port=port,
                                     cache_dir=tmp_path / "cache", env=env)
            worker.join(170)
        finally:
            server.stop()
    (summary,) = finished
    assert summary.pending == 0 and summary.retries >= 1 and summary.error == 0
    results = _results(tmp_path / "out")
    assert set(results) == set(names) and sorted(done) == sorted(names)
    engine = create_engine(db)
    with engine.connect() as conn:
        logged = [r[0] for r in conn.execute(text("SELECT request_id FROM inspections"))]
    engine.dispose()
    assert sorted(logged) == sorted(r["request_id"] for r in results.values())  # each exactly once
    assert len(set(logged)) == 240


def test_an_oversize_file_first_never_stops_the_line(grpc_target: str, good_and_defect,
                                                     tmp_path: Path) -> None:
    """The reproduced case: a 40 MB file that sorts (and arrived) first, then three good
    images. The good ones are scored within seconds; the big one goes to error/ with why."""
    import os

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    huge = inbox / "000-huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40_000_000))
    os.utime(huge, (time.time() - 60, time.time() - 60))
    names = _fill(inbox, [*good_and_defect[0], *good_and_defect[1]], 3)
    t0 = time.monotonic()
    with AnomalyClient(grpc_target) as client:
        summary = HotFolder(client, inbox, out, settle_s=0).run(seconds=30, until_empty=True, poll_s=0.2)
    elapsed = time.monotonic() - t0
    results = _results(out)
    assert set(names) <= set(results) and elapsed < 10, (elapsed, summary, sorted(results))
    assert all(results[n]["outcome"] in ("OK", "NG") for n in names)
    assert results[huge.name]["outcome"] == "error"
    assert "40000008 bytes" in results[huge.name]["message"], results[huge.name]
