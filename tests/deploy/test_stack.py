"""The one-machine stack of docker-compose.yml, brought up with podman and driven from outside.

PostgreSQL (deploy/podman/postgres where postgres:16 cannot be pulled), MLflow on it, the
trainer registering a model as `champion`, two server replicas, the gateway, the Locust master
and workers (headless, bounded) and the sample images they send: every service as the file
defines it, on the host's network (tests/compose_podman.py says what that changes). Then, from
outside the containers only (gRPC, HTTP, MLflow's REST API, PostgreSQL's port, podman):

1. score over gRPC on each replica and over HTTP through the gateway: the same score;
2. Locust's headless run ends with requests and no failures;
3. the trainer adds an FP16 version; `champion` is moved to it through MLflow's REST API and
   both replicas follow;
4. a server container restarted serves that version again;
5. PostgreSQL stopped (MLflow's store and the inspection log with it): decisions are answered
   and spooled, and the servers go on serving past a registry poll; PostgreSQL back, every one
   of them is in the inspection database exactly once and the spools are empty; the one-shot
   that makes that database, run again on the existing volume, ends with status 0;
6. the stack stops clean: every container ends on its stop signal with status 0 within its grace
   period; then nothing of the run is left.

Slow (about 4 min with the images built, 12 min more to build them on a fresh machine; figures
in docs/deploy.md), so it runs with `make stack-test`, not in `make test`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from compose_podman import ROOT, ComposeStack, sweep
from conftest import metric_sum, wait_for
from podman_support import make, podman

from edge_anomaly_client.sdk import AnomalyClient

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(3600)]

EPOCHS = 3  # the file trains 40; enough here that the model is real, in a test's time
LOCUST_RUN_S = 20
OUTAGE_DECISIONS = 12
MODEL = "anomaly-detector"
POLL_S = 10  # the file's ANOMALY_POLL_INTERVAL_S (checked below)
PASSWORD = (ROOT / "docker" / "postgres_password.txt").read_text().strip()


def bounded(service: str, argv: list[str]) -> list[str]:
    """The test's bounds on the file's commands: fewer epochs; Locust headless for a fixed time."""
    if service == "trainer":
        return [re.sub(r"--epochs \d+", f"--epochs {EPOCHS}", a) for a in argv]
    if service == "locust-master":
        return [*argv, "--headless", "--users", "4", "--spawn-rate", "4", "--run-time", f"{LOCUST_RUN_S}s",
                "--expect-workers", "2", "--expect-workers-max-wait", "120", "--stop-timeout", "5"]
    return argv


@pytest.fixture(scope="module")
def images() -> None:
    """The project's images and the PostgreSQL stand-in (cached layers: seconds once built)."""
    tools = make("image-tools", timeout=600)
    if tools.returncode != 0:
        pytest.skip(f"podman cannot be installed here: {tools.stdout[-500:]}")
    print(f"left by earlier runs, removed: {sweep() or 'nothing'}")
    for target in ("images", "image-postgres"):
        started = time.monotonic()
        built = make(target, timeout=3000)
        assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
        print(f"make {target}: {time.monotonic() - started:.0f} s")


class Steps:
    """Each step's wall time, printed at the end (docs/deploy.md quotes them)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.times.append((what, now - self.last))
        print(f"[stack] {what}: {now - self.last:.0f} s", flush=True)
        self.last = now


def test_compose_stack(images: None, good_and_defect: tuple[list[Path], list[Path]]) -> None:
    good, defect = good_and_defect
    stack = ComposeStack(f"stack-{uuid.uuid4().hex[:8]}", adjust=bounded)
    assert stack.compose["services"]["server"]["environment"]["ANOMALY_POLL_INTERVAL_S"] == str(POLL_S)
    steps = Steps()
    servers = [f"127.0.0.1:{r.ports[50051]}" for r in stack.replicas["server"]]
    metrics = [f"http://127.0.0.1:{r.ports[9100]}/metrics" for r in stack.replicas["server"]]
    gateway = f"http://127.0.0.1:{stack.replicas['gateway'][0].ports[8000]}"
    mlflow = f"http://127.0.0.1:{stack.replicas['mlflow'][0].ports[5000]}"
    postgres = stack.replicas["postgres"][0]
    inspections_url = f"postgresql://mlflow:{PASSWORD}@127.0.0.1:{postgres.ports[5432]}/inspections"
    try:
        # ---- up, in the file's dependency order, each service once its conditions hold
        for service in stack.start_order():
            stack.start(service)
            steps.done(f"start {service}")
        for replica in stack.replicas["server"]:
            stack.wait_healthy(replica)
        wait_for(lambda: httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200, 120, "gateway ready",
                 retry_on=(Exception,))
        steps.done("servers healthy, gateway ready")

        # ---- 1. score over gRPC on each replica and over HTTP through the gateway
        answers = []
        for target in [*servers, gateway]:
            with AnomalyClient(target, alias="champion") as client:
                for image in (good[0], defect[0]):
                    result = client.score(image.read_bytes(), request_id=f"up-{uuid.uuid4().hex[:8]}")
                    assert math.isfinite(result.score) and result.model.version == "1", result
                    answers.append((target, str(image), result.score))
        for name in (str(good[0]), str(defect[0])):
            scores = [s for _, n, s in answers if n == name]
            assert max(scores) - min(scores) < 1e-3 * max(1.0, abs(scores[0])), answers
        steps.done("scored over gRPC (2 replicas) and HTTP")

        # ---- 2. Locust's headless run
        master = stack.replicas["locust-master"][0].name
        status = podman("wait", master, timeout=LOCUST_RUN_S + 240).stdout.strip()
        log = stack.logs(master)
        assert status == "0", log[-3000:]
        # The request statistics' total line: "Aggregated   <reqs>   <fails>(<%>) | …"
        totals = re.findall(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(.*$", log, flags=re.MULTILINE)
        assert totals, log[-3000:]
        requests, failures = (int(x) for x in totals[-1])
        assert requests > 0 and failures == 0, totals
        print(f"[stack] locust: {requests} requests, {failures} failures")
        steps.done("locust headless run")

        # ---- 3. a new version from the trainer image; champion moved by MLflow's REST API
        stack.run_once("trainer", [
            "sh", "-c", f"anomaly sample-data /tmp/data && anomaly variants --from models:/{MODEL}@champion "
                        f"--variants fp16 --data /tmp/data --work-dir /tmp/runs --tracking-uri {mlflow}"],
            suffix="fp16")
        versions = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/search",
                             params={"filter": f"name='{MODEL}'"}, timeout=30).json()["model_versions"]
        new = max(int(v["version"]) for v in versions)
        assert new >= 2, versions
        moved = httpx.post(f"{mlflow}/api/2.0/mlflow/registered-models/alias",
                           json={"name": MODEL, "alias": "champion", "version": str(new)}, timeout=30)
        assert moved.status_code == 200, moved.text
        for target in servers:
            with AnomalyClient(target) as client:
                wait_for(lambda c=client: c.get_model(alias="champion").ref.version == str(new), 120,
                         f"{target} serving version {new}", retry_on=(Exception,))
        with AnomalyClient(gateway, alias="champion") as client:
            assert client.score(good[0].read_bytes()).model.version == str(new)
        steps.done(f"champion moved to version {new} by REST, both replicas follow")

        # ---- 4. a server container restarted serves the same version
        first = stack.replicas["server"][0]
        podman("restart", "--time", str(stack.grace("server")), first.name, timeout=120)
        stack.wait_healthy(first)
        with AnomalyClient(servers[0], alias="champion") as client:
            assert client.get_model(alias="champion").ref.version == str(new)
            assert client.score(good[0].read_bytes()).model.version == str(new)
        steps.done("server restarted, same version")

        # ---- 5. PostgreSQL down: decisions answered and spooled; back: shipped, each once
        podman("stop", "--time", "30", postgres.name, timeout=120)
        down_at = time.monotonic()
        ids = [f"outage-{uuid.uuid4().hex[:10]}" for _ in range(OUTAGE_DECISIONS)]
        targets = [*servers, gateway]
        for i, request_id in enumerate(ids):
            with AnomalyClient(targets[i % len(targets)], alias="champion") as client:
                result = client.score((defect if i % 2 else good)[i % 4].read_bytes(), request_id=request_id)
                assert math.isfinite(result.score) and result.request_id == request_id
        wait_for(lambda: sum(metric_sum(url, "anomaly_inspection_spool_bytes") for url in metrics) > 0, 30,
                 "decisions in the spools", retry_on=(Exception,))
        spooled = sum(metric_sum(url, "anomaly_inspection_spool_bytes") for url in metrics)
        # Down for longer than a registry poll (MLflow has lost its store too): the servers keep
        # serving the version they have, and say SERVING.
        time.sleep(max(0.0, POLL_S + 5 - (time.monotonic() - down_at)))
        for target in servers:
            with AnomalyClient(target, alias="champion") as client:
                assert client.score(good[1].read_bytes()).model.version == str(new)
                assert client.get_model(alias="champion").state == "SERVING"
        steps.done(f"postgres down: {OUTAGE_DECISIONS} decisions answered, {spooled:.0f} spool bytes; "
                   "still serving after a registry poll")
        podman("start", postgres.name, timeout=120)
        stack.wait_healthy(postgres)

        def shipped() -> bool:
            if sum(metric_sum(url, "anomaly_inspection_spool_bytes") for url in metrics) > 0:
                return False
            with psycopg.connect(inspections_url, connect_timeout=5) as db:
                rows = db.execute("SELECT request_id, count(*) FROM inspections WHERE request_id = ANY(%s) "
                                  "GROUP BY request_id", (ids,)).fetchall()
            counts = dict(rows)
            assert all(n == 1 for n in counts.values()), f"shipped twice: {counts}"
            return set(counts) == set(ids)
        wait_for(shipped, 180, "every spooled decision in PostgreSQL", retry_on=(Exception,))
        assert httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                         timeout=30).status_code == 200  # MLflow has its store back too
        # The next `up` on this (now existing) volume: inspections-db finds its database and ends 0.
        stack.run_once("inspections-db", None, suffix="again", timeout=120)
        steps.done("postgres back: every decision shipped once, spools empty; inspections-db idempotent")

        # ---- 6. clean shutdown
        states = stack.stop()
        for name, state in states.items():
            assert not state.get("OOMKilled") and state.get("ExitCode") == 0, \
                f"{name} ended {state.get('ExitCode')}:\n{stack.logs(name)[-2000:]}"
        steps.done(f"stack stopped: {len(states)} containers, all status 0")
    except BaseException:
        for name in stack.containers():  # what each service said, before it is removed
            print(f"---- {name} ({stack.state(name).get('Status')})\n{stack.logs(name)[-2500:]}")
        raise
    finally:
        stack.remove()
    assert stack.containers() == [] and stack.volumes() == []
    print("[stack] total: " + ", ".join(f"{what} {seconds:.0f} s" for what, seconds in steps.times))
