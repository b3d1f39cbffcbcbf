"""The promotion view's slow parts (issue 40): shadow agreement counted by the database (the
same numbers `anomaly shadow-report` gives, at any size), and a registry that accepts and never
answers: the view answers within its deadline with a note, and reloads do not pile reads on
it. The view through real servers and the browser is in test_review.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import SilentEndpoint
from sqlalchemy import insert

from service.dataplane.promotion import DEADLINE_S, PromotionDesk
from service.inspection.quality import shadow_agreement, shadow_report
from service.inspection.schema import Inspection, engine_for, upgrade
from service.repository.model_repository import ModelRepository
from service.settings import Settings


def _pairs(url: str, n: int, seed: int = 0) -> None:
    """`n` served decisions, each with a challenger's, over two versions and three categories."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for i in range(n):
        served_id, decision = uuid.uuid4().hex, rng.choice(["OK", "NG"])
        common = {"station": "s", "category": rng.choice(["brick", "coffee", ""]), "model_name": "m",
                  "score": 1.0, "normalized_score": 0.5, "threshold": 1.0, "threshold_source": "model",
                  "latency_ms": 1.0, "created_at": now - timedelta(seconds=i)}
        rows.append({**common, "record_id": served_id, "request_id": f"r-{i}", "role": "serve",
                     "model_version": rng.choice(["1", "2"]), "decision": decision, "served_record_id": None})
        challenger = decision if rng.random() < 0.8 else ("NG" if decision == "OK" else "OK")
        rows.append({**common, "record_id": uuid.uuid4().hex, "request_id": f"r-{i}", "role": "shadow",
                     "model_version": "3", "decision": challenger, "served_record_id": served_id})
    engine = engine_for(url)
    with engine.begin() as conn:
        conn.execute(insert(Inspection), rows)
    engine.dispose()


def test_shadow_agreement_in_the_database_matches_the_report(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    upgrade(url)
    _pairs(url, 3000)
    since = datetime.now(UTC) - timedelta(days=1)
    report = {(r.served_version, r.shadow_version, r.category): r for r in shadow_report(url, since)}
    engine = engine_for(url)
    try:
        counted = shadow_agreement(engine, since, examples=5)
    finally:
        engine.dispose()
    assert len(counted) == len(report) == 6  # two served versions × three categories
    for row in counted:
        expected = report[(row.served_version, row.shadow_version, row.category)]
        assert (row.pairs, row.agree) == (expected.pairs, expected.agree)
        assert (row.ok_to_ng, row.ng_to_ok) == (len(expected.ok_to_ng), len(expected.ng_to_ok))
        for ids, every, count in ((row.ok_to_ng_ids, expected.ok_to_ng, row.ok_to_ng),
                                  (row.ng_to_ok_ids, expected.ng_to_ok, row.ng_to_ok)):
            assert len(ids) == min(5, count) and set(ids) <= set(every)
    assert sum(r.pairs for r in counted) == 3000


def test_a_silent_registry_leaves_a_note_within_the_deadline_and_reloads_share_one_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # the registry call outlives the view
    silent = SilentEndpoint()
    settings = Settings(tracking_uri=f"http://127.0.0.1:{silent.port}", cache_dir=tmp_path / "cache",
                        shadow_alias="challenger", inspection_log=True,
                        inspection_db_url=f"sqlite:///{tmp_path / 'log.db'}")
    upgrade(settings.inspection_db())
    _pairs(settings.inspection_db(), 50)
    desk = PromotionDesk(settings, ModelRepository(settings))

    async def reloads() -> list:
        return await asyncio.gather(*(desk.view(7) for _ in range(20)))

    try:
        started = time.monotonic()
        views = asyncio.run(reloads())
        took = time.monotonic() - started
        assert took < DEADLINE_S + 3, f"20 views took {took:.1f} s"
        for view in views:
            assert any("registry did not answer within" in n for n in view.notes), view.notes
            assert [a.alias for a in view.aliases] == ["champion", "challenger"]
            assert sum(r.pairs for r in view.shadow) == 50  # the database part still answered
        time.sleep(0.5)
        assert len(silent.accepted) == 1  # one read in flight for all twenty views
    finally:
        desk.close()
        silent.close()  # the hung read now fails: let it end (and log) while this test's log is open
        running = desk._registry._running
        if running is not None:
            with contextlib.suppress(Exception):
                running[1].result(timeout=30)


def test_reads_for_many_keys_never_queue() -> None:
    """`days` 1…50 asked at once (a hostile client, or two viewers on different periods): one
    read runs, the others are told at once it is under way, and the answers are kept for a few
    keys, so a viewer on 7 days is answered as soon as its read has run."""
    from service.dataplane.reads import KEPT, OneRead

    runs: list[int] = []

    def read(days: int) -> int:
        runs.append(days)
        time.sleep(0.3)
        return days * 10

    async def scenario() -> None:
        one: OneRead[int] = OneRead("test-read", fresh_s=60)
        answers = await asyncio.gather(*(one.get(d, lambda d=d: read(d), 5) for d in range(1, 51)),
                                       return_exceptions=True)
        assert answers[0] == 10 and all(isinstance(a, asyncio.TimeoutError) for a in answers[1:])
        assert runs == [1]
        assert await one.get(7, lambda: read(7), 5) == 70 and await one.get(1, lambda: read(1), 5) == 10
        for d in range(100, 100 + KEPT):
            await one.get(d, lambda d=d: read(d), 5)
        assert runs == [1, 7, *range(100, 100 + KEPT)]
        assert await one.get(100, lambda: read(100), 5) == 1000 and len(runs) == 2 + KEPT  # kept
        await one.get(7, lambda: read(7), 5)  # one of the oldest: read again
        assert runs[-1] == 7

    asyncio.run(scenario())
