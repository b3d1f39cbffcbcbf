"""The MES hot-folder client against real servers: a half-written file waits, a restart of
the client loses nothing and moves nothing twice, and 240 images with the gRPC server
stopped and restarted midway end up scored exactly once in the results and in the
server's inspection log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cli.main import app
from clients.hotfolder import HotFolder, Summary
from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_server


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
        digest = hashlib.sha256((inbox / "a.png").read_bytes()).hexdigest()
        recorded = {"outcome": "NG", "request_id": "from-before", "image": "a.png", "sha256": digest,
                    "dest": "NG/a.png"}
        HotFolder._write_json(HotFolder.result_path(inbox / "a.png"), recorded)
        # A camera reused a name after a crash: the JSON is for other content, so it is scored.
        shutil.copyfile(good_and_defect[0][2], inbox / "c.png")
        other = {"outcome": "NG", "request_id": "old-c", "image": "c.png", "sha256": "0" * 64,
                 "dest": "NG/c.png"}
        (inbox / "c.png.json").write_text(json.dumps(other))
        # A JSON that would send its image outside the outcome folders is not followed.
        shutil.copyfile(good_and_defect[1][1], inbox / "e.png")
        escape = {"outcome": "NG", "request_id": "e", "image": "e.png", "dest": "../../escaped.png",
                  "sha256": hashlib.sha256((inbox / "e.png").read_bytes()).hexdigest()}
        HotFolder._write_json(HotFolder.result_path(inbox / "e.png"), escape)
        # A power cut left an empty JSON: detected, the image scored, not fatal.
        shutil.copyfile(good_and_defect[0][3], inbox / "d.png")
        (inbox / "d.png.json").write_text("")
        # Crash between moving the image and its JSON: the JSON follows its image to where it says.
        shutil.copyfile(good_and_defect[0][1], out / "OK" / "b-1234.png")
        (inbox / "b.png.json").write_text(json.dumps({"outcome": "OK", "request_id": "b", "image": "b.png",
                                                      "dest": "OK/b-1234.png"}))
        # ... and a part with that name filed earlier keeps its own JSON (never overwritten).
        shutil.copyfile(good_and_defect[0][1], out / "OK" / "b.png")
        (out / "OK" / "b.png.json").write_text(json.dumps({"outcome": "OK", "request_id": "b-older"}))
        restarted = HotFolder(client, inbox, out, settle_s=0)
        summary = restarted.run(until_empty=True, seconds=20)
    assert summary.pending == 0 and summary.done == 4
    results = _results(out)
    assert results["a.png"]["request_id"] == "from-before"  # moved as recorded, not scored again
    assert results["c.png"]["request_id"] != "old-c" and results["c.png"]["sha256"] != "0" * 64
    assert results["d.png"]["sha256"] and "slow.png" in results
    assert results["b-1234.png"]["request_id"] == "b" and results["b.png"]["request_id"] == "b-older"
    assert results["e.png"]["request_id"] == "e" and (out / "NG" / "e.png").is_file()
    assert not (tmp_path / "escaped.png").exists() and not (out.parent.parent / "escaped.png").exists()
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


def test_one_failing_image_backs_off_alone_and_is_filed_after_its_budget(store, tmp_path: Path) -> None:
    """A model that answers INTERNAL (non-finite) for a black image: that image retries with
    its own backoff while the gray ones behind it are scored, then goes to error/ with the
    reason once its attempt budget is spent."""
    from conftest import register_tiny
    from PIL import Image

    register_tiny(store, "nan_on_black", tmp_path, aliases=("hotfolder-nan",))
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias="hotfolder-nan")
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    Image.new("RGB", (64, 64)).save(inbox / "000-black.png")
    os.utime(inbox / "000-black.png", (time.time() - 60, time.time() - 60))
    for i in range(5):
        Image.new("RGB", (64, 64), (80 + i, 80, 80)).save(inbox / f"gray-{i}.png")
    done: list[tuple[float, str]] = []
    try:
        with AnomalyClient(target) as client:
            folder = HotFolder(client, inbox, out, settle_s=0, max_attempts=3, backoff_s=0.3)
            summary = folder.run(seconds=30, until_empty=True, poll_s=0.1,
                                 on_done=lambda p, o: done.append((time.monotonic(), p.name)))
    finally:
        child.stop()
    results = _results(out)
    assert summary.error == 1 and summary.done == 6 and summary.retries == 2
    order = [name for _, name in sorted(done)]
    assert order[-1] == "000-black.png" and len(order) == 6  # the gray ones did not wait for it
    black = results["000-black.png"]
    assert black["outcome"] == "error" and black["code"] == "INTERNAL" and black["kind"] == "transient"
    assert "gave up after 3 attempts" in black["message"] and "non-finite" in black["message"]


def test_a_growing_file_is_never_sent_half_written(grpc_target: str, good_and_defect, tmp_path: Path) -> None:
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    data = good_and_defect[0][0].read_bytes()
    target = inbox / "slow-camera.png"

    def write_slowly() -> None:  # pauses longer than the settle time: only the end marker tells
        with target.open("wb") as f:
            for i in range(0, len(data), len(data) // 6 + 1):
                f.write(data[i:i + len(data) // 6 + 1])
                f.flush()
                time.sleep(0.8)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    while not target.exists():
        time.sleep(0.01)
    with AnomalyClient(grpc_target) as client:
        summary = HotFolder(client, inbox, out, settle_s=0.3).run(seconds=20, until_empty=True, poll_s=0.1)
    writer.join()
    results = _results(out)
    assert summary.done == 1 and summary.error == 0, summary
    assert results["slow-camera.png"]["sha256"] == hashlib.sha256(data).hexdigest()
