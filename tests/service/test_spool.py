"""An inspection log that loses nothing (issue 16, point 4): the durable spool, database
outages ridden out (a real PostgreSQL cluster stopped and started), rows the database
rejects set aside, SIGKILL under load, a bounded spool, CSV cells that cannot run."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fresh_postgres_database
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text

from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import free_port, start_server
from loadtests.pgcluster import postgres_cluster
from service.errors import NotReady
from service.inspection.export import export_csv
from service.inspection.log import Decided, InspectionLog
from service.inspection.spool import Spool, SpoolFull


def _decided(i: int, station: str = "line-1") -> Decided:
    return Decided(f"r{i}", station, "brick", "m", "1", float(i), 0.5, 10.0, i % 2 == 0, 1.0)


def _request_ids(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT request_id FROM inspections ORDER BY id"))]
    except Exception:  # not there yet
        return []
    finally:
        engine.dispose()


def _wait_rows(url: str, wanted: set[str], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = _request_ids(url)
        if wanted <= set(ids):
            return ids
        time.sleep(0.3)
    return _request_ids(url)


def test_spool_appends_replays_recovers_and_bounds(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=10_000, segment_bytes=600)
    spool.open()
    spool.append([b'{"n": %d}' % i for i in range(10)])
    spool.append([b'{"n": %d}' % i for i in range(10, 40)])
    assert len(list((tmp_path / "s").glob("*.seg"))) > 1  # rolled over
    records, pos = spool.read(None, 25)
    assert [json.loads(r)["n"] for r in records] == list(range(25))
    spool.commit(pos)
    with pytest.raises(RuntimeError, match="in use by another process"):
        Spool(tmp_path / "s", 10_000).open()
    spool.close()
    last = sorted((tmp_path / "s").glob("*.seg"))[-1]
    with last.open("ab") as f:  # a write torn by a crash
        f.write(b"0badc0de {\"n\": 99")
    again = Spool(tmp_path / "s", max_bytes=10_000, segment_bytes=600)
    again.open()
    records, pos = again.read(None, 100)
    assert [json.loads(r)["n"] for r in records] == list(range(25, 40))  # replayed, torn tail cut
    again.commit(pos)
    assert again.pending_bytes == 0 and len(list((tmp_path / "s").glob("*.seg"))) == 1
    with pytest.raises(SpoolFull):
        again.append([b"x" * 11_000])
    again.close()


FAILED_WRITE = r"""
import asyncio, json, resource, signal, sys
from pathlib import Path
from service.errors import NotReady
from service.inspection.log import Decided, InspectionLog

folder, url = Path(sys.argv[1]), sys.argv[2]


def decided(i):
    return Decided(f"r{i}", "line-" + "x" * (i % 7), "brick", "m", "1", float(i), 0.5, 10.0, i % 2 == 0, 1.0)


async def main():
    log = InspectionLog(url, folder)
    await log.start()
    acked, refused = [], []
    for i in range(10):
        await log.record(decided(i))
        acked.append(f"r{i}")
    while log.spool.pending_bytes:  # shipped: the shipper is idle while the limit is on
        await asyncio.sleep(0.05)
    size = sorted(folder.glob("*.seg"))[-1].stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
    try:
        await log.record(decided(10))  # 100 of its bytes fit, the rest does not
        acked.append("r10")
    except NotReady as exc:
        refused.append(exc.message)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for i in range(11, 67):
        await log.record(decided(i))
        acked.append(f"r{i}")
    for _ in range(400):
        if not log.spool.pending_bytes:
            break
        await asyncio.sleep(0.05)
    await log.close(timeout=10)
    print(json.dumps({"acked": acked, "refused": refused}))


asyncio.run(main())
"""

TRUNCATE_FAILS = r"""
import errno, json, os, resource, signal, sys
from pathlib import Path
from service.inspection.spool import Spool

spool = Spool(Path(sys.argv[1]), 1 << 20)
spool.open()
for i in range(5):
    spool.append([b'{"n": %d}' % i])
size = sorted(Path(sys.argv[1]).glob("*.seg"))[-1].stat().st_size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5, resource.RLIM_INFINITY))
broken = True
real_ftruncate = os.ftruncate


def ftruncate(fd, length):  # the disk refuses the truncate that would undo the failed write
    if broken:
        raise OSError(errno.EIO, "injected: truncate refused")
    return real_ftruncate(fd, length)


os.ftruncate = ftruncate
outcomes = {}
for n in (5, 6, 7):
    if n == 6:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if n == 7:
        broken = False
    try:
        spool.append([b'{"n": %d}' % n])
        outcomes[n] = "acknowledged"
    except OSError as exc:
        outcomes[n] = f"refused: {exc}"
spool.close()
print(json.dumps(outcomes))
"""


def _child(script: str, *args: str) -> dict:
    """Run `script` in a fresh Python (its own resource limits); its last line of output, as JSON."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_failed_spool_write_loses_no_later_acknowledged_decision(tmp_path: Path) -> None:
    """Issue 35, fault 3: a write refused by the disk (EFBIG from a file-size limit, in a
    child process) refuses that decision and leaves the segment at its last good end, so
    every decision acknowledged after it reaches the database."""
    url = f"sqlite:///{tmp_path / 'i.db'}"
    result = _child(FAILED_WRITE, str(tmp_path / "spool"), url)
    assert len(result["refused"]) == 1 and "spool write failed" in result["refused"][0], result
    rows = _request_ids(url)
    missing = [r for r in result["acked"] if r not in rows]
    assert not missing, f"{len(missing)} of {len(result['acked'])} acknowledged decisions lost: {missing}"
    assert "r10" not in rows and len(rows) == len(set(rows)) == 66  # the refused one is not recorded
    assert not (tmp_path / "spool" / "damaged-records.jsonl").exists()  # the spool was never damaged


def test_a_spool_that_cannot_undo_a_failed_write_refuses_until_it_can(tmp_path: Path) -> None:
    """Issue 35, fault 3: when the truncate back to the last good end fails too, appends are
    refused (never acknowledged on top of the failed write's bytes) until it succeeds."""
    outcomes = _child(TRUNCATE_FAILS, str(tmp_path / "spool"))
    assert outcomes["5"].startswith("refused") and outcomes["6"].startswith("refused"), outcomes
    assert outcomes["7"] == "acknowledged", outcomes
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.open()
    records, _ = spool.read(None, 100)
    spool.close()
    assert [json.loads(r)["n"] for r in records] == [0, 1, 2, 3, 4, 7]


def _numbers(records: list[bytes]) -> list[int]:
    return [json.loads(r)["n"] for r in records]


def _damage(path: Path, index: int, newline: bool = False) -> tuple[int, bytes]:
    """Flip one byte of the `index`-th line of a segment (its newline when `newline`); returns
    the line's offset and its damaged bytes."""
    data = bytearray(path.read_bytes())
    lines = data.splitlines(keepends=True)
    offset = sum(len(line) for line in lines[:index])
    at = offset + len(lines[index]) - (1 if newline else 3)
    data[at] = ord("#")
    path.write_bytes(bytes(data))
    return offset, bytes(data[offset:offset + len(lines[index])])


def test_a_damaged_record_is_set_aside_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 35, fault 4: a damaged record (one flipped byte; a flipped newline, which joins
    two lines) costs that record alone, in an older segment and in the last one, at start-up
    recovery and when read: it is set aside with its bytes, counted and logged; the records
    after it are shipped; only a torn tail (an incomplete last line) is cut off."""
    folder = tmp_path / "s"
    spool = Spool(folder, max_bytes=100_000, segment_bytes=300)
    spool.open()
    for i in range(40):
        spool.append([b'{"n": %d}' % i])
    spool.close()
    segments = sorted(folder.glob("*.seg"))
    assert len(segments) >= 3
    damaged = {}  # record number -> (segment, offset, bytes)
    for path, newline in ((segments[0], False), (segments[1], True), (segments[-1], False)):
        index = len(path.read_bytes().splitlines()) // 2
        n = json.loads(path.read_bytes().splitlines()[index][9:])["n"]
        damaged[n] = (int(path.stem), *_damage(path, index, newline))
    with segments[-1].open("ab") as f:  # and a write torn by a crash
        f.write(b"0badc0de {\"n\": 99")
    counted = REGISTRY.get_sample_value("anomaly_inspection_rows_total", {"outcome": "damaged"}) or 0
    caplog.set_level(logging.ERROR, logger="service.inspection.spool")
    for _ in range(2):  # read twice (a restart before the checkpoint): set aside once
        again = Spool(folder, max_bytes=100_000, segment_bytes=300)
        again.open()
        records, pos = again.read(None, 100)
        again.close()
        assert _numbers(records) == [i for i in range(40) if i not in damaged]
    again.open()
    again.append([b'{"n": 40}'])
    records, pos = again.read(pos, 100)
    assert _numbers(records) == [40]
    again.commit(pos)
    assert again.pending_bytes == 0
    again.close()
    aside = [json.loads(line) for line in (folder / "damaged-records.jsonl").read_text().splitlines()]
    assert [(d["segment"], d["offset"], base64.b64decode(d["bytes"])) for d in aside] == sorted(
        damaged.values())
    assert all(d["reason"] for d in aside)
    after = REGISTRY.get_sample_value("anomaly_inspection_rows_total", {"outcome": "damaged"})
    assert after == counted + 3
    assert sum("damaged record" in r.getMessage() for r in caplog.records) == 3


def test_the_checkpoint_is_validated_at_open(tmp_path: Path) -> None:
    """Issue 35, fault 4: a checkpoint past the end of its segment, inside a record, or naming
    a segment that is not there, replays every segment (duplicates are harmless: rows have
    a unique record_id) instead of skipping records or counting negative pending bytes."""
    folder = tmp_path / "s"

    def reopen_with(checkpoint: dict) -> tuple[list[int], int]:
        (folder / "checkpoint.json").write_text(json.dumps(checkpoint))
        spool = Spool(folder, max_bytes=100_000, segment_bytes=300)
        spool.open()
        try:
            records, _ = spool.read(None, 100)
            return _numbers(records), spool.pending_bytes
        finally:
            spool.close()

    spool = Spool(folder, max_bytes=100_000, segment_bytes=300)
    spool.open()
    for i in range(30):
        spool.append([b'{"n": %d}' % i])
    records, pos = spool.read(None, 5)
    spool.commit(pos)
    spool.close()
    first, second = sorted(int(p.stem) for p in folder.glob("*.seg"))[:2]
    size = (folder / f"{first:012d}.seg").stat().st_size
    total = sum(p.stat().st_size for p in folder.glob("*.seg"))
    assert reopen_with({"segment": first, "offset": pos.offset}) == (list(range(5, 30)), total - pos.offset)
    assert reopen_with({"segment": first, "offset": size + 1000}) == (list(range(30)), total)
    assert reopen_with({"segment": first, "offset": pos.offset + 3}) == (list(range(30)), total)
    assert reopen_with({"segment": 999, "offset": 0}) == (list(range(30)), total)
    assert reopen_with({"segment": second, "offset": 10**9})[0] == list(range(30))
    assert sorted(int(p.stem) for p in folder.glob("*.seg"))[0] == first  # nothing deleted


def test_full_spool_refuses_instead_of_answering_unrecorded(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there

    async def main() -> tuple[int, str]:
        log = InspectionLog(url, tmp_path / "spool", max_spool_bytes=20_000)
        await log.start()
        accepted = 0
        try:
            for i in range(1000):
                await log.record(_decided(i))
                accepted += 1
        except NotReady as exc:
            message = exc.message
        await log.close(timeout=1)
        return accepted, message

    accepted, message = asyncio.run(main())
    assert 20 < accepted < 1000 and "spool is full" in message
    reopened = Spool(tmp_path / "spool", 20_000)
    reopened.open()
    assert len(reopened.read(None, 5000)[0]) == accepted  # every accepted decision is still there
    reopened.close()


def test_sqlite_inspection_database_commits_synchronous_full(tmp_path: Path) -> None:
    """Issue 35, fault 5: the spool is checkpointed (and segments deleted) right after the
    database commit, so a SQLite commit must be on disk when it returns (synchronous=FULL;
    NORMAL in WAL mode can lose the last commits to a power cut)."""

    async def main() -> tuple[int, str]:
        log = InspectionLog(f"sqlite:///{tmp_path / 'i.db'}", tmp_path / "spool")
        await log.start()
        try:
            assert log.engine is not None
            with log.engine.connect() as conn:
                return (conn.exec_driver_sql("PRAGMA synchronous").scalar(),
                        conn.exec_driver_sql("PRAGMA journal_mode").scalar())
        finally:
            await log.close()

    assert asyncio.run(main()) == (2, "wal")  # 2: FULL


def test_database_outage_is_ridden_out(store, good_and_defect, tmp_path: Path) -> None:
    """The inspection database (a real PostgreSQL cluster) stops mid-run and comes back:
    every acknowledged decision reaches it, and scoring never failed meanwhile."""
    image = good_and_defect[0][0].read_bytes()
    with postgres_cluster() as pg:
        env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": pg.url,
               "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")}
        child, target = start_server(store.tracking_uri, tmp_path / "server.log",
                                     cache_dir=tmp_path / "cache", env=env)
        try:
            with AnomalyClient(target) as client:
                sent = [client.score(image, request_id=f"up-{i}").request_id for i in range(10)]
                assert set(sent) <= set(_wait_rows(pg.url, set(sent)))
                pg.stop()
                sent += [client.score(image, request_id=f"down-{i}").request_id for i in range(30)]
                time.sleep(2.0)
                pg.start()
                sent += [client.score(image, request_id=f"back-{i}").request_id for i in range(10)]
            rows = _wait_rows(pg.url, set(sent))
        finally:
            assert child.stop() == 0
    assert set(sent) <= set(rows) and len(rows) == len(set(rows)) == 50
    log = (tmp_path / "server.log").read_text()
    assert "database unavailable" in log and "reachable again" in log


def test_rejected_rows_are_set_aside_and_never_block(store, good_and_defect, tmp_path: Path) -> None:
    image = good_and_defect[0][0].read_bytes()
    with fresh_postgres_database("deadletter") as url:
        spool = tmp_path / "spool"
        env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": url,
               "ANOMALY_INSPECTION_SPOOL_DIR": str(spool)}
        child, target = start_server(store.tracking_uri, tmp_path / "server.log",
                                     cache_dir=tmp_path / "cache", env=env)
        try:
            with AnomalyClient(target) as client:
                client.score(image, request_id="first", station="s1")
                assert _wait_rows(url, {"first"}) == ["first"]
                engine = create_engine(url)
                with engine.begin() as conn:  # the plant's DBA tightens a column under a running server
                    conn.execute(text("ALTER TABLE inspections ALTER COLUMN station TYPE varchar(8)"))
                engine.dispose()
                for i in range(12):
                    station = "line-with-long-name" if i in (3, 7) else "s1"
                    client.score(image, request_id=f"after-{i}", station=station)
            wanted = {"first"} | {f"after-{i}" for i in range(12) if i not in (3, 7)}
            rows = _wait_rows(url, wanted)
        finally:
            assert child.stop() == 0
        assert set(rows) == wanted
    dead = [json.loads(line) for line in (spool / "dead-letter.jsonl").read_text().splitlines()]
    assert [d["row"]["request_id"] for d in dead] == ["after-3", "after-7"]
    assert all("too long" in d["reason"] for d in dead), dead


def test_sigkill_under_load_loses_no_acknowledged_decision(store, good_and_defect, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'inspections.db'}"
    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": url}
    image = good_and_defect[0][0].read_bytes()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env=env)
    acknowledged: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with AnomalyClient(target, retries=0, timeout=10) as client:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    acknowledged.append(client.score(image, request_id=f"w{worker}-{i}").request_id)
                except AnomalyError as exc:
                    failures.append(exc.code)
                    return

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    child.signal(signal.SIGKILL)  # no drain, no flush
    child.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) > 20 and failures  # the kill cut requests in flight
    restarted, _ = start_server(store.tracking_uri, tmp_path / "server2.log", cache_dir=tmp_path / "cache",
                                port=int(target.rsplit(":", 1)[1]), env=env)
    try:
        rows = _wait_rows(url, set(acknowledged))
    finally:
        assert restarted.stop() == 0
    missing = set(acknowledged) - set(rows)
    assert not missing, f"{len(missing)} acknowledged decisions have no row: {sorted(missing)[:5]}"
    assert len(rows) == len(set(rows))  # nothing inserted twice


def test_csv_export_neutralises_formulas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'i.db'}"

    async def main() -> None:
        log = InspectionLog(url, tmp_path / "spool")
        await log.start()
        await log.record(_decided(1, station="=HYPERLINK(\"http://x\",\"click\")"))
        await log.record(_decided(2, station="@SUM(A1)"))
        await log.record(_decided(3, station="-2+3"))
        await log.close()

    asyncio.run(main())
    assert export_csv(url, tmp_path / "out.csv") == 3
    with (tmp_path / "out.csv").open() as f:
        stations = [row["station"] for row in csv.DictReader(f)]
    assert stations == ["'=HYPERLINK(\"http://x\",\"click\")", "'@SUM(A1)", "'-2+3"]


def test_a_second_server_on_the_same_spool_refuses_to_start(store, good_and_defect, tmp_path: Path) -> None:
    """Two processes appending to one spool would corrupt it: the second one says so and
    exits 1; the first keeps serving and recording."""
    from loadtests.launch import ChildProcess

    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{tmp_path / 'i.db'}",
           "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")}
    first, target = start_server(store.tracking_uri, tmp_path / "first.log", cache_dir=tmp_path / "cache",
                                 env=env)
    try:
        second = ChildProcess(["serve", "--tracking-uri", store.tracking_uri, "--port", str(free_port()),
                               "--cache-dir", str(tmp_path / "cache")], tmp_path / "second.log", env)
        second.start()
        assert second.proc.wait(120) == 1
        assert "in use by another process" in (tmp_path / "second.log").read_text()
        with AnomalyClient(target) as client:
            rid = client.score(good_and_defect[0][0].read_bytes(), request_id="after-refusal").request_id
        assert rid in _wait_rows(f"sqlite:///{tmp_path / 'i.db'}", {rid}, timeout=30)
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("tail", ["damaged newline", "missing newline", "damaged newline, then a torn write"])
def test_a_valid_last_record_whose_newline_is_damaged_is_kept(tmp_path: Path, tail: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A final line whose frame checks out (its newline changed or missing, perhaps followed
    by a torn write) is a complete, acknowledged record: start-up recovery restores its
    newline durably and cuts only what follows it, instead of cutting the record."""
    folder = tmp_path / "s"
    spool = Spool(folder, max_bytes=100_000)
    spool.open()
    for i in range(10):
        spool.append([b'{"n": %d}' % i])
    spool.close()
    (segment,) = folder.glob("*.seg")
    data = bytearray(segment.read_bytes())
    if tail == "missing newline":
        del data[-1]
    else:
        data[-1] = ord("#")
        if tail.endswith("torn write"):
            data += b"0badc0de {\"n\": 1"
    segment.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="service.inspection.spool")
    again = Spool(folder, max_bytes=100_000)
    again.open()
    records, pos = again.read(None, 100)
    assert _numbers(records) == list(range(10))
    assert segment.read_bytes().endswith(b'{"n": 9}\n')  # the newline is back, the torn write gone
    if "torn" not in tail:  # nothing was cut
        assert not any("cutting" in r.getMessage() for r in caplog.records)
    again.append([b'{"n": 10}'])
    records, pos = again.read(pos, 100)
    assert _numbers(records) == [10]
    again.commit(pos)
    assert again.pending_bytes == 0
    again.close()
    assert not (folder / "damaged-records.jsonl").exists()
    assert _numbers([line[9:] for line in segment.read_bytes().splitlines()]) == list(range(11))


def test_a_finished_segment_whose_last_newline_is_damaged_loses_nothing(tmp_path: Path) -> None:
    """The last record of an older segment whose newline was changed checks out: it is
    shipped, not set aside as an incomplete record."""
    folder = tmp_path / "s"
    spool = Spool(folder, max_bytes=100_000, segment_bytes=300)
    spool.open()
    for i in range(30):
        spool.append([b'{"n": %d}' % i])
    spool.close()
    first = sorted(folder.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[-1] = ord("#")
    first.write_bytes(bytes(data))
    again = Spool(folder, max_bytes=100_000, segment_bytes=300)
    again.open()
    records, _ = again.read(None, 100)
    again.close()
    assert _numbers(records) == list(range(30))
    assert not (folder / "damaged-records.jsonl").exists()
