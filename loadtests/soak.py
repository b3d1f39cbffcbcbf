"""`anomaly soak`: drive a real server and gateway while injecting faults, and count what
a factory would care about.

Everything runs in a sandbox under a work folder, on loopback, and is stopped at the end:

- a registry of its own: `mlflow server` (SQLite) holding the model under test (a copy of
  `models:/<name>@<alias>` from the given store, registered twice so that alias moves
  between good versions can be followed, each with its reference set), broken versions
  (`loadtests.faults`: garbage ONNX, malformed `MLmodel`, a model whose every output is NaN)
  and a version that lets every defect pass (the promotion gate must refuse it);
- an inspection database of its own: a PostgreSQL cluster (`initdb`/`pg_ctl`);
- our gRPC server as a plant runs it (`--processes 2`: a supervisor and two children;
  inspection log on, the spools on a small disk of their own, following `champion`) and the
  HTTP gateway.

Load, until the time is up: gRPC clients score good images and known-defective reference
images (the test-split defects the model under test calls NG); an HTTP client sends good
images, hostile images (the bad-input catalogue), oversize bodies and odd identifiers.
Faults, in turn: `champion` moved to each broken version (must be refused) and then to the
other good version (must be followed); the registry killed and restarted; the inspection
database stopped and started; a server child or the supervisor SIGKILLed and restarted (no
child may outlive its supervisor); and the fail-safe faults of `loadtests.soak_faults`:
`champion` moved to the version the gate refuses and a threshold tag that would pass every
known defect, each followed by a SIGKILL; the spool's disk full; a damaged spool segment;
many idle health `Watch` streams. Health `Check` is probed throughout.

At the end it waits for the inspection database to catch up and reports: requests by
outcome; decisions acknowledged vs rows in the database; non-finite or known-defective
images answered OK; broken versions swapped in; answers from the refused version or with the
refused threshold; good moves followed; health checks unanswered; children left running by a
killed supervisor; crashed processes; peak RSS of server and gateway, and the gateway's
growth under a 1 GiB chunked body.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly.wire import IMAGE_SUFFIXES
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import (
    ChildProcess,
    free_port,
    peak_rss_mb,
    start_gateway,
    start_server,
    wait_http_ready,
)
from loadtests.soak_faults import (
    HealthProbe,
    IdleWatches,
    SpoolDisk,
    children,
    damage_spool,
    kill_tree,
    set_aside,
)

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
HOT_BEGIN, HOT_END = "<!-- hotfolder-soak:begin -->", "<!-- hotfolder-soak:end -->"
MODEL = "soak-model"
STATION = "soak"
PROCESSES = 2  # the server runs as a supervisor and its children, as a plant runs it


def send_chunked(host: str, port: int, total: int, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """POST `total` bytes as `Transfer-Encoding: chunked` to /v1/score, stopping as soon as
    the gateway answers or closes; returns (what it answered, bytes sent)."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    piece = f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n"
    sent, answer = 0, b""
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(piece)
            sent += chunk
        else:
            sock.sendall(b"0\r\n\r\n")
        sock.settimeout(30)
        while data := sock.recv(65536):
            answer += data
            if b"}" in answer:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return answer, sent


class MlflowServer:
    """`mlflow server` on a loopback port (SQLite backend, artifacts served from `home`),
    restartable on the same port (a registry outage and its end)."""

    def __init__(self, backend_uri: str, home: Path, port: int | None = None) -> None:
        self.backend_uri, self.home = backend_uri, Path(home)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: ChildProcess | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        """Start it and wait for `/health`."""
        # It runs uvicorn by name. MLflow 3's job runner (huey consumers with 12 workers, for its
        # GenAI jobs) is not needed by a model registry, and costs a core while it starts.
        env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                   "--artifacts-destination", str(self.home / "artifacts"), "--serve-artifacts",
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.child = ChildProcess([], self.home / f"mlflow-server-{self.starts}.log", env, group=True,
                                  command=command)
        proc = self.child.start()
        try:
            wait_http_ready(f"{self.url}/health", timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            self.child.stop()
            log = (self.home / f"mlflow-server-{self.starts}.log").read_text()[-3000:]
            raise RuntimeError(f"mlflow server did not start: {exc}\n{log}") from exc

    def kill(self) -> None:
        """SIGKILL the whole process group (the registry vanishes)."""
        if self.child is not None and self.child.proc is not None:
            self.child.signal(signal.SIGKILL)
            self.child.proc.wait(30)

    def stop(self) -> None:
        """Stop it gracefully."""
        if self.child is not None:
            self.child.stop(30)


@dataclass
class Tally:
    """Thread-safe counters and the acknowledged request ids."""

    outcomes: Counter = field(default_factory=Counter)
    acknowledged: set[str] = field(default_factory=set)
    nonfinite_ok: int = 0
    defects_answered_ok: int = 0
    defect_answers: int = 0
    refused_served: int = 0  # answers from the version the gate refused
    refused_threshold_served: int = 0  # answers decided with a threshold tag the gate refused
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, n: int = 1) -> None:
        """Count one outcome."""
        with self.lock:
            self.outcomes[key] += n


@dataclass
class SoakResult:
    """What the soak measured (see `render`)."""

    minutes: float
    outcomes: Counter
    acknowledged: int
    missing: int
    nonfinite_ok: int
    defects_answered_ok: int
    defect_answers: int
    known_defects: int
    broken_moves: int
    broken_swapped_in: int
    good_moves: int
    good_followed: int
    follow_s_max: float
    registry_outages: int
    db_outages: int
    server_kills: int
    crashed: list[str]
    server_peak_mb: float
    gateway_peak_mb: float
    gateway_chunked_growth_mb: float
    chunked_answer: str
    refused_moves: int = 0  # champion moved to a version the gate must refuse, a SIGKILL right after
    refused_served: int = 0
    threshold_escapes: int = 0  # threshold tags that would pass every known defect, a SIGKILL after
    refused_threshold_served: int = 0
    disk_full: int = 0
    disk_how: str = ""
    damaged_segments: int = 0
    damaged_set_aside: int = 0
    watch_windows: int = 0
    watch_streams: int = 0
    watch_refused: int = 0
    health_checks: int = 0
    health_failures: int = 0
    health_first_failure: str = ""
    supervisor_kills: int = 0
    orphans: int = 0

    def failures(self) -> list[str]:
        """The checks that did not hold (empty: the soak passed)."""
        checks = [
            (self.missing == 0,
             f"{self.missing} acknowledged decisions missing from the inspection database"),
            (self.nonfinite_ok == 0, f"{self.nonfinite_ok} non-finite scores answered"),
            (self.defects_answered_ok == 0, f"{self.defects_answered_ok} known-defective images answered OK"),
            (self.broken_swapped_in == 0, f"{self.broken_swapped_in} broken versions swapped in"),
            (self.refused_served == 0, f"{self.refused_served} answers from the version the gate refused"),
            (self.refused_threshold_served == 0,
             f"{self.refused_threshold_served} answers decided with a threshold tag the gate refused"),
            (self.health_failures == 0, f"{self.health_failures} health checks unanswered while the server "
                                        f"was up (first: {self.health_first_failure})"),
            (self.orphans == 0, f"{self.orphans} server processes left running by a killed supervisor"),
            (self.good_followed == self.good_moves,
             f"{self.good_moves - self.good_followed} good alias moves not followed"),
            (not self.crashed, f"crashed: {', '.join(self.crashed)}"),
            (self.gateway_chunked_growth_mb < 64,
             f"gateway grew {self.gateway_chunked_growth_mb:.0f} MB under a 1 GiB chunked body"),
            (self.acknowledged > 0, "no decision was acknowledged at all"),
        ]
        return [message for ok, message in checks if not ok]


def _images(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(good, defective) test images of an MVTec-layout folder, with their categories."""
    good, bad = [], []
    for path in sorted(root.glob("*/test/*/*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            (good if path.parent.name == "good" else bad).append((path, path.parents[2].name))
    if not good or not bad:
        raise ValueError(f"{root} has no MVTec-layout test images (<category>/test/<good|defect>/*.png)")
    return good, bad


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_requests(good: bytes, limit: int) -> list[tuple[str, dict, set[int]]]:
    """(kind, httpx keyword arguments for POST /v1/score, acceptable statuses)."""
    png = "image/png"
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    sixteen = Image.fromarray(np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64))
    refused = {400, 413}
    return [
        ("empty body", {"content": b"", "headers": {"content-type": png}}, refused),
        ("not an image", {"content": b"%PDF-1.4 " * 50, "headers": {"content-type": png}}, refused),
        ("truncated PNG", {"content": _encode(photo, "PNG")[:300], "headers": {"content-type": png}},
         refused),
        ("decompression bomb", {"content": _encode(Image.new("1", (10_000, 10_000)), "PNG"),
                                "headers": {"content-type": png}}, refused),
        ("32-bit float TIFF", {"content": _encode(Image.new("F", (32, 32), 0.5), "TIFF"),
                               "headers": {"content-type": "image/tiff"}}, refused),
        ("16-bit TIFF (scored)", {"content": _encode(sixteen, "TIFF"),
                                  "headers": {"content-type": "image/tiff"}}, {200}),
        ("over the byte limit", {"content": b"\x89PNG" + b"\0" * limit, "headers": {"content-type": png}},
         {413}),
        ("request id too long", {"content": good, "headers": {"content-type": png},
                                 "params": {"request_id": "x" * 200}}, {400}),
        ("control characters in station", {"content": good, "headers": {"content-type": png},
                                           "params": {"station": "line\r\nFAKE LOG LINE"}}, {400}),
        ("version out of range", {"content": good, "headers": {"content-type": png},
                                  "params": {"version": "-1"}}, {400}),
        ("multipart with two files",
         {"files": [("image", ("a.png", good, png)), ("image", ("b.png", good, png))]}, {400}),
    ]


class Soak:
    """One soak run; `run()` sets it up, drives it, tears it down and returns the result."""

    def __init__(self, tracking_uri: str, model: str, alias: str, images: Path, minutes: float,
                 work: Path, progress: Callable[[str], None] = print, workers: int = 2) -> None:
        self.tracking_uri, self.model, self.alias = tracking_uri, model, alias
        self.images, self.minutes, self.work = Path(images), minutes, Path(work)
        self.progress = progress
        self.workers = workers
        self.tally = Tally()
        self.stop = threading.Event()
        self.expected_down: set[str] = set()
        self.crashed: list[str] = []
        self.peaks = {"server": 0.0, "gateway": 0.0}
        self.counts = Counter()
        self.follow_s: list[float] = []
        self.up = threading.Event()  # the server is meant to answer (not being restarted)

    # -- set-up -----------------------------------------------------------------------
    def _source_folder(self) -> Path:
        """The model under test, downloaded, and its reference set (`self.reference`, or None
        when it has none: then the gate refuses every move, as it should)."""
        import mlflow.artifacts
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri, self.tracking_uri)
        mv = client.get_model_version_by_alias(self.model, self.alias)
        source = client.get_model_version_download_uri(self.model, mv.version)
        dest = self.work / "source"
        self.reference = None
        if mv.run_id and client.list_artifacts(mv.run_id, "reference"):
            self.reference = Path(client.download_artifacts(mv.run_id, "reference", str(self.work / "ref")))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                        tracking_uri=self.tracking_uri))

    def _register(self, client, folder: Path, kind: str) -> str:  # type: ignore[no-untyped-def]
        run = client.create_run(self.experiment, run_name=f"soak-{kind}")
        client.log_artifacts(run.info.run_id, str(folder), "model")
        if self.reference is not None:  # the promotion gate checks every move against it
            client.log_artifacts(run.info.run_id, str(self.reference), "reference")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model",
                                              run_id=run.info.run_id, tags={"soak.kind": kind})
        return str(version.version)

    def _versions(self, source: Path) -> dict[str, str]:
        """Register the good copies and the broken versions in the sandbox registry."""
        from mlflow import MlflowClient

        from loadtests.faults import MUTATIONS, tiny_onnx
        from service.repository.artifact import read_model_dir

        client = MlflowClient(self.registry.url, self.registry.url)
        self.experiment = client.create_experiment("soak")
        client.create_registered_model(MODEL)
        versions = {"good-a": self._register(client, source, "good"),
                    "good-b": self._register(client, source, "good")}
        for kind in ("garbage-onnx", "malformed-mlmodel"):
            folder = self.work / "broken" / kind
            shutil.copytree(source, folder)
            MUTATIONS[kind](folder)
            versions[kind] = self._register(client, folder, kind)
        _, metadata = read_model_dir(source)
        # A version that loads and validates but lets every defect pass: the gate must refuse it,
        # after a restart too.
        folder = self.work / "refused" / "blind"
        shutil.copytree(source, folder)
        stats = {k: v.model_copy(update={"threshold": v.threshold * 1e6})
                 for k, v in metadata.image_stats.items()}
        metadata.model_copy(update={"image_stats": stats, "variant": "blind"}).save(folder)
        versions["blind"] = self._register(client, folder, "blind")
        self.stats = metadata.image_stats
        folder = self.work / "broken" / "nan"
        tiny_onnx(folder / "model.onnx", metadata.input_size, "nan")
        (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
        metadata.model_copy(update={"architecture": "tiny", "variant": "nan"}).save(folder)
        versions["nan"] = self._register(client, folder, "nan")
        client.set_registered_model_alias(MODEL, "champion", versions["good-a"])
        self.client = client
        return versions

    def _server_env(self) -> dict[str, str]:
        return {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": self.pg.url,
                "ANOMALY_INSPECTION_SPOOL_DIR": str(self.spools[0]), "ANOMALY_POLL_INTERVAL_S": "1",
                "ANOMALY_MODEL_NAME": MODEL, "ANOMALY_LOG_LEVEL": "INFO",
                "ANOMALY_PROCESSES": str(PROCESSES), "ANOMALY_RUNTIME_DIR": str(self.work / "run")}

    def _start_server(self) -> None:
        log = self.work / f"server-{self.counts['server']}.log"
        self.server, self.target = start_server(self.registry.url, log, port=self.server_port,
                                                cache_dir=self.work / "cache", env=self._server_env(),
                                                timeout=180)
        self.counts["server"] += 1
        self._wait_children()
        self.up.set()

    def _wait_children(self, timeout: float = 120) -> None:
        """Until every child of the supervisor answers (each serves the model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(children(self.server.pid)) < PROCESSES:
            time.sleep(0.2)
        with AnomalyClient(self.target, connections=4 * PROCESSES, retries=8, timeout=30) as client:
            for _ in range(8 * PROCESSES):  # new connections reach every child
                client.get_model(model=MODEL, alias="champion")

    # -- load -------------------------------------------------------------------------
    def _grpc_worker(self, n: int) -> None:
        rng = random.Random(n)
        with AnomalyClient(self.target, retries=8, timeout=30, backoff_s=0.2, max_backoff_s=2.0,
                           connections=PROCESSES) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                defect = bool(self.known_defects) and i % 2 == 0
                path, category = rng.choice(self.known_defects if defect else self.good)
                rid = f"g{n}-{i}"
                try:
                    r = client.score(path, category=category, request_id=rid, station=STATION)
                except AnomalyError as exc:
                    self.tally.add(f"gRPC score: {exc.code}")
                    continue
                with self.tally.lock:
                    self.tally.acknowledged.add(rid)
                    self.tally.outcomes["gRPC score: OK"] += 1
                    self.tally.refused_served += r.model.version == self.versions["blind"]
                    self.tally.refused_threshold_served += r.threshold_source != "model"
                    if not (math.isfinite(r.score) and math.isfinite(r.normalized_score)):
                        self.tally.nonfinite_ok += 1
                    if defect:
                        self.tally.defect_answers += 1
                        self.tally.defects_answered_ok += not r.is_anomalous

    def _http_worker(self) -> None:
        import httpx

        good_bytes = self.good[0][0].read_bytes()
        hostile = hostile_requests(good_bytes, 8 * 1024 * 1024)
        host, port = self.base.removeprefix("http://").split(":")
        i = 0
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.is_set():
                i += 1
                if i % 3 == 0:
                    kind, kwargs, ok = hostile[(i // 3) % len(hostile)]
                elif i % 50 == 1:
                    kind, ok = "64 MiB chunked body", {413}
                    answer, _ = send_chunked(host, int(port), 64 << 20)
                    self.tally.add(f"HTTP {kind}: {answer[9:12].decode() or 'closed'}")
                    continue
                else:
                    rid = f"h-{i}"
                    kind, ok = "good image", {200}
                    kwargs = {"content": good_bytes, "headers": {"content-type": "image/png"},
                              "params": {"request_id": rid, "station": STATION}}
                try:
                    r = http.post("/v1/score", **kwargs)
                except httpx.HTTPError as exc:
                    self.tally.add(f"HTTP {kind}: {type(exc).__name__}")
                    continue
                self.tally.add(f"HTTP {kind}: {r.status_code}" + ("" if r.status_code in ok else " (other)"))
                if kind == "good image" and r.status_code == 200:
                    with self.tally.lock:
                        self.tally.acknowledged.add(kwargs["params"]["request_id"])

    def _monitor(self) -> None:
        while not self.stop.wait(1.0):
            self._check_processes()

    def _check_processes(self) -> None:
        for name in ("server", "gateway"):
            child = getattr(self, name, None)
            if child is None or child.proc is None:
                continue
            self.peaks[name] = max(self.peaks[name], peak_rss_mb(child.proc.pid, 0.0))
            if child.proc.poll() is not None and name not in self.expected_down:
                self.crashed.append(f"{name} (exit code {child.proc.returncode})")
                self.expected_down.add(name)

    # -- faults -----------------------------------------------------------------------
    def _serving(self) -> tuple[str, str, str]:
        with AnomalyClient(self.target, retries=8, timeout=30) as client:
            info = client.get_model(model=MODEL, alias="champion")
        return info.ref.version, info.last_error_version, info.last_error

    def _move_to_broken(self, kind: str) -> None:
        before = self._serving()[0]
        bad = self.versions[kind]
        self.client.set_registered_model_alias(MODEL, "champion", bad)
        self.counts["broken moves"] += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            version, error_version, error = self._serving()
            if version == bad:
                self.counts["broken swapped in"] += 1
                break
            if error_version == bad:
                self.progress(f"  champion → v{bad} ({kind}): refused, still serving v{version}: "
                              f"{error.splitlines()[0][:100]}")
                break
            time.sleep(0.5)
        else:
            self.progress(f"  champion → v{bad} ({kind}): no answer within 60 s")
        self._move_to_good(before)

    def _move_to_good(self, current: str) -> None:
        target = self.versions["good-b"] if current == self.versions["good-a"] else self.versions["good-a"]
        self.client.set_registered_model_alias(MODEL, "champion", target)
        self.counts["good moves"] += 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            if self._serving()[0] == target:
                self.counts["good followed"] += 1
                self.follow_s.append(time.monotonic() - t0)
                self.progress(f"  champion → v{target} (good): followed in {time.monotonic() - t0:.1f} s")
                return
            time.sleep(0.5)
        self.progress(f"  champion → v{target} (good): NOT followed within 90 s")

    def _outage(self, what: str, down: Callable[[], None], up: Callable[[], None], seconds: float) -> None:
        down()
        self.counts[f"{what} outages"] += 1
        self.progress(f"  {what} down for {seconds:.0f} s")
        self.stop.wait(seconds)
        up()

    def _server_kill(self, seconds: float) -> None:
        """SIGKILL one server child (its supervisor restarts it), or every other time the
        supervisor itself (its children must stop with it; then it is started again)."""
        if self.counts["server kills"] % 2 == 0:
            self._kill_child()
        else:
            self._kill_supervisor()

    def _kill_child(self) -> None:
        kids = children(self.server.pid)
        if not kids:
            return
        self.up.clear()
        for pid in kids:
            self.peaks["server"] = max(self.peaks["server"], peak_rss_mb(pid, 0.0))
        os.kill(kids[-1], signal.SIGKILL)
        self.counts["server kills"] += 1
        self.progress(f"  server child {kids[-1]} SIGKILLed; its supervisor restarts it")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (kids[-1] in (now := children(self.server.pid))
                                               or len(now) < PROCESSES):
            time.sleep(0.2)
        self._wait_children()
        self.up.set()

    def _kill_supervisor(self) -> None:
        self.up.clear()
        self.expected_down.add("server")
        for pid in children(self.server.pid):
            self.peaks["server"] = max(self.peaks["server"], peak_rss_mb(pid, 0.0))
        orphans = kill_tree(self.server.pid, wait_s=25.0)
        self.server.proc.wait(30)
        self.counts["server kills"] += 1
        self.counts["supervisor kills"] += 1
        self.counts["orphans"] += orphans
        self.progress(f"  supervisor SIGKILLed: {orphans} of its children left running; restarting")
        self._start_server()
        self.expected_down.discard("server")

    def _refused_promotion(self, seconds: float) -> None:
        """Champion moved to a version the gate must refuse; the server SIGKILLed right after
        (every other time before the refusal is even written); it must come back on the
        version that passed."""
        before = self._serving()[0]
        blind = self.versions["blind"]
        self.client.set_registered_model_alias(MODEL, "champion", blind)
        self.counts["refused moves"] += 1
        if self.counts["refused moves"] % 2:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._serving()[1] != blind:
                time.sleep(0.5)
        self._kill_supervisor()
        version, error_version, error = self._serving()
        self.progress(f"  champion → v{blind} (refused), SIGKILL, restart: serving v{version}"
                      + (f"; {error.splitlines()[0][:90]}" if error_version == blind else ""))
        self.client.set_registered_model_alias(MODEL, "champion", before)

    def _threshold_escape(self, seconds: float) -> None:
        """A threshold tag on the serving version that would pass every known defect; a SIGKILL
        once it is refused; then the tag is removed."""
        version = self._serving()[0]
        category = self.known_defects[0][1] if self.known_defects else self.good[0][1]
        tag, value = f"threshold.{category}", f"{self.stats[category].max * 1.5:.6g}"
        self.client.set_model_version_tag(MODEL, version, tag, value)
        self.counts["threshold escapes"] += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "would pass as OK" not in self._serving()[2]:
            time.sleep(0.5)
        refused = "would pass as OK" in self._serving()[2]
        self._server_kill(seconds)
        self.stop.wait(2.0)  # a child that has just started may still be judging the tag
        error = self._serving()[2]
        self.progress(f"  {tag}={value} on v{version}: {'refused' if refused else 'NOT refused'}; after the "
                      f"SIGKILL: {error.splitlines()[0][:90] if error else 'no error'}")
        self.client.delete_model_version_tag(MODEL, version, tag)

    def _disk_full(self, seconds: float) -> None:
        """The spool's disk full (or a file-size limit) for a while, under load."""
        self.disk.fill(children(self.server.pid))
        self.counts["disk full"] += 1
        self.progress(f"  spool disk full for {min(seconds, 10.0):.0f} s")
        self.stop.wait(min(seconds, 10.0))
        self.disk.free()

    def _damaged_spool(self, seconds: float) -> None:
        """The database down so records stay spooled, the supervisor SIGKILLed, a damaged
        record and a torn tail written into a segment, then everything started again."""
        self.pg.stop()
        self.counts["db outages"] += 1
        self.stop.wait(5.0)
        self._kill_supervisor_then(lambda: self.progress(f"  spool damaged: {damage_spool(self.spools)}"))
        self.counts["damaged segments"] += 1
        self.pg.start()

    def _kill_supervisor_then(self, between: Callable[[], None]) -> None:
        start = self._start_server
        self._start_server = lambda: (between(), start())  # type: ignore[method-assign]
        try:
            self._kill_supervisor()
        finally:
            self._start_server = start  # type: ignore[method-assign]

    def _idle_watches(self, seconds: float) -> None:
        """Many idle health Watch streams held open: scoring and health Check must go on."""
        n = 64
        watches = IdleWatches(self.target, n)
        self.counts["watch windows"] += 1
        self.progress(f"  {n} idle health Watch streams open for {min(seconds, 15.0):.0f} s")
        self.stop.wait(min(seconds, 15.0))
        watches.close()
        self.counts["watch refused"] += watches.refused

    def _db_outage(self, seconds: float) -> None:
        self._outage("db", self.pg.stop, self.pg.start, seconds)

    def _fault_loop(self, end: float, schedule: list[tuple[str, Callable[[float], None]]], pause: float,
                    outage_s: float) -> None:
        """Inject the faults of `schedule` in turn, one every `pause` seconds, until `end`."""
        i = 0
        while time.monotonic() + pause < end and not self.stop.is_set():
            self.stop.wait(pause)
            name, fault = schedule[i % len(schedule)]
            self.progress(f"[{(time.monotonic() - self.t0) / 60:5.1f} min] fault: {name}")
            fault(outage_s)
            i += 1

    def _faults(self, end: float) -> None:
        schedule: list[tuple[str, Callable[[float], None]]] = [
            ("alias moved to a version the gate refuses, SIGKILL", self._refused_promotion),
            ("threshold tag that passes known defects, SIGKILL", self._threshold_escape),
            ("spool disk full", self._disk_full),
            ("idle health Watch streams", self._idle_watches),
            ("damaged spool segment (database down, supervisor SIGKILL)", self._damaged_spool),
            ("alias moved to garbage ONNX", lambda s: self._move_to_broken("garbage-onnx")),
            ("inspection database down", self._db_outage),
            ("server SIGKILL", self._server_kill),
            ("alias moved to malformed MLmodel", lambda s: self._move_to_broken("malformed-mlmodel")),
            ("registry down", lambda s: self._outage("registry", self.registry.kill, self.registry.start, s)),
            ("alias moved to NaN model", lambda s: self._move_to_broken("nan")),
        ]
        total = max(1.0, end - time.monotonic())
        pause = min(45.0, max(2.0, total / (len(schedule) * 4)))
        self._fault_loop(end, schedule, pause, min(20.0, pause))
        self.stop.wait(max(0.0, end - time.monotonic()))

    # -- the run ----------------------------------------------------------------------
    def _start_sandbox(self) -> None:
        """The registry (with the good and broken versions), the database, the server."""
        from loadtests.pgcluster import PostgresCluster

        self.work.mkdir(parents=True, exist_ok=True)
        source = self._source_folder()
        self.disk = SpoolDisk(self.work / "spooldisk")
        self.disk_how = self.disk.mount()
        self.spools = [self.disk.folder / "spool",
                       *(self.disk.folder / f"spool-p{i}" for i in range(1, PROCESSES))]
        self.registry = MlflowServer(f"sqlite:///{self.work / 'registry.db'}", self.work)
        self.pg = PostgresCluster()
        self.server_port = free_port()
        self.progress("starting the registry, the inspection database and the server")
        self.registry.start()
        self.pg.init()
        self.pg.start()
        self.versions = self._versions(source)
        self._start_server()

    def run(self) -> SoakResult:
        """Set up, drive for `minutes`, tear down; returns the result."""
        self.good, defects = _images(self.images)
        threads: list[threading.Thread] = []
        try:
            self._start_sandbox()
            self.health = HealthProbe(self.target, self.up)
            self.health.start()
            self.gateway, self.base = start_gateway(self.target, self.work / "gateway.log")
            self.known_defects = self._reference(defects)
            before = peak_rss_mb(self.gateway.proc.pid, 0.0)
            host, port = self.base.removeprefix("http://").split(":")
            answer, _ = send_chunked(host, int(port), 1 << 30)
            chunked_growth = peak_rss_mb(self.gateway.proc.pid, 0.0) - before
            self.progress(f"1 GiB chunked body: gateway peak RSS +{chunked_growth:.1f} MB, answer "
                          f"{answer[:12].decode(errors='replace')!r}")
            self.t0 = time.monotonic()
            end = self.t0 + self.minutes * 60
            threads = [threading.Thread(target=self._grpc_worker, args=(n,), daemon=True)
                       for n in range(self.workers)]
            threads += [threading.Thread(target=self._http_worker, daemon=True),
                        threading.Thread(target=self._monitor, daemon=True)]
            for t in threads:
                t.start()
            self._faults(end)
        finally:
            self.stop.set()
            for t in threads:
                t.join(60)
            if getattr(self, "health", None) is not None:
                self.health.close()
        try:
            missing = self._missing()
            damaged = set_aside(self.spools)
        finally:
            self._teardown()
        t, c, h = self.tally, self.counts, self.health
        return SoakResult(
            self.minutes, t.outcomes, len(t.acknowledged), missing, t.nonfinite_ok, t.defects_answered_ok,
            t.defect_answers, len(self.known_defects), self.counts["broken moves"],
            self.counts["broken swapped in"], self.counts["good moves"], self.counts["good followed"],
            max(self.follow_s, default=0.0), self.counts["registry outages"], self.counts["db outages"],
            self.counts["server kills"], self.crashed, self.peaks["server"], self.peaks["gateway"],
            chunked_growth, answer[:12].decode(errors="replace"),
            refused_moves=c["refused moves"], refused_served=t.refused_served,
            threshold_escapes=c["threshold escapes"], refused_threshold_served=t.refused_threshold_served,
            disk_full=c["disk full"], disk_how=self.disk_how, damaged_segments=c["damaged segments"],
            damaged_set_aside=damaged, watch_windows=c["watch windows"], watch_streams=64,
            watch_refused=c["watch refused"], health_checks=h.checks, health_failures=h.failures,
            health_first_failure=h.first_failure, supervisor_kills=c["supervisor kills"],
            orphans=c["orphans"])

    def _reference(self, defects: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """The test defects the model under test calls NG: the known-defective parts."""
        known = []
        with AnomalyClient(self.target, timeout=60) as client:
            for path, category in defects[:60]:
                if client.score(path, category=category, request_id=f"ref-{len(known)}-{path.stem}",
                                station="reference").is_anomalous:
                    known.append((path, category))
        self.progress(f"{len(known)} of {min(len(defects), 60)} test defects are known-defective references")
        return known

    def _rows(self, wanted: set[str], station: str = STATION, timeout: float = 180) -> list[str]:
        """The request ids of `station`'s rows once the database holds every one of `wanted`
        (or `timeout` passed)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.pg.url)
        deadline = time.monotonic() + timeout
        rows: list[str] = []
        try:
            while time.monotonic() < deadline:
                try:
                    with engine.connect() as conn:
                        rows = [r[0] for r in conn.execute(text("SELECT request_id FROM inspections "
                                                                "WHERE station = :s"), {"s": station})]
                    if wanted <= set(rows):
                        break
                except Exception as exc:  # the database may still be starting
                    self.progress(f"  waiting for the inspection database: {exc}")
                time.sleep(1.0)
        finally:
            engine.dispose()
        return rows

    def _missing(self) -> int:
        """Acknowledged request ids not in the inspection database once it has caught up."""
        return len(self.tally.acknowledged - set(self._rows(self.tally.acknowledged)))

    def _teardown(self) -> None:
        self._check_processes()
        self.expected_down.update(("server", "gateway"))
        for name in ("gateway", "server"):
            child = getattr(self, name, None)
            if child is not None and child.proc is not None:
                self.peaks[name] = max(self.peaks[name], peak_rss_mb(child.proc.pid, 0.0))
                code = child.stop(30)
                if code not in (0, None, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it drained on
                    self.crashed.append(f"{name} (exit code {code} at shutdown)")
        self.registry.stop()
        self.pg.remove()
        if getattr(self, "disk", None) is not None:
            self.disk.unmount()


HOT_STATION = "hotfolder-soak"


@dataclass
class HotFolderResult:
    """What the hot-folder soak measured (see `render_hotfolder`)."""

    minutes: float
    good_dropped: int
    scored_once: int
    lost: list[str]
    duplicated: list[str]
    poison_dropped: dict[str, int]
    poison_filed: dict[str, int]
    poison_unclassified: list[str]
    db_missing: int
    db_repeated: int
    max_excess_wait_s: float
    outage_s: float
    server_kills: int
    db_outages: int
    crashed: list[str]

    def failures(self) -> list[str]:
        """The checks that did not hold (empty: the soak passed)."""
        checks = [(not self.lost, f"{len(self.lost)} good images lost: {self.lost[:5]}"),
                  (not self.duplicated, f"{len(self.duplicated)} images filed twice: {self.duplicated[:5]}"),
                  (not self.poison_unclassified,
                   f"poison files not in error/: {self.poison_unclassified[:5]}"),
                  (self.db_missing == 0, f"{self.db_missing} scored images without an inspection-log row"),
                  (not self.crashed, f"crashed: {', '.join(self.crashed)}"),
                  (self.good_dropped >= 1, "no image was dropped")]
        return [message for ok, message in checks if not ok]


class HotFolderSoak(Soak):
    """The MES edge under poison files and outages: a hot folder fed `count` images (good
    ones from two cameras, reused names, a file written over a minute, oversize, not an
    image, empty) while the server is SIGKILLed and the inspection database goes down."""

    def __init__(self, *args: object, count: int = 2000, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.count = count
        self.dropped: dict[str, tuple[str, float]] = {}  # good file name → (sha256, ready at)
        self.poison: dict[str, str] = {}  # file name → kind
        self.outages: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def _drop(self, name: str, data: bytes, kind: str = "good") -> None:
        tmp = self.inbox / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, self.inbox / name)
        with self.lock:
            if kind == "good":
                key = f"{name}#{len(self.dropped)}"
                self.dropped[key] = (hashlib.sha256(data).hexdigest(), time.time())
            else:
                self.poison[name] = kind

    def _dropper(self, end: float) -> None:
        sources = [p.read_bytes() for p, _ in self.good[:40]]
        interval = max(0.0, (end - time.monotonic()) * 0.8 / self.count)
        slow = threading.Thread(target=self._slow_writer, args=(sources[0],), daemon=True)
        for i in range(self.count):
            if self.stop.is_set():
                break
            # Unique content per part: bytes after PNG's IEND are ignored by decoders.
            data = sources[i % len(sources)] + b"SOAK%08d" % i
            if i % 97 == 13:  # two cameras, one name: the second part arrives after the first left
                name = f"dup-{i // 194:04d}.png"  # each name twice
                while (self.inbox / name).exists() and not self.stop.is_set():
                    time.sleep(0.05)
            else:
                name = f"cam{1 + i % 2}-{i:05d}.png"
            self._drop(name, data)
            if i == self.count // 10:
                slow.start()
            if i % 200 == 50:
                n = i // 200
                self._drop(f"oversize-{n}.png", b"\x89PNG\r\n\x1a\n" + os.urandom(9 << 20), "oversize")
                self._drop(f"not-an-image-{n}.png", b"%PDF-1.4 definitely not pixels " * 40, "not an image")
                self._drop(f"empty-{n}.png", b"", "zero bytes")
            self.stop.wait(interval)
        slow.join(120)

    def _slow_writer(self, data: bytes) -> None:
        """A camera that takes a minute to write one image."""
        path = self.inbox / "slow-camera.png"
        data = data + b"SOAK-SLOW"
        piece = len(data) // 60 + 1
        with path.open("wb") as f:
            for i in range(0, len(data), piece):
                f.write(data[i:i + piece])
                f.flush()
                if self.stop.wait(1.0):
                    break
        with self.lock:
            self.dropped["slow-camera.png#slow"] = (hashlib.sha256(data).hexdigest(), time.time())

    def _watch(self) -> None:
        from clients.hotfolder import HotFolder

        with AnomalyClient(self.target, retries=2, timeout=30, backoff_s=0.2, max_backoff_s=1.0) as client:
            folder = HotFolder(client, self.inbox, self.out, station=HOT_STATION, settle_s=0.5,
                               max_attempts=8, backoff_s=0.5, empty_grace_s=10.0)
            folder.run(poll_s=0.2, max_backoff_s=2.0, stop=self.stop.is_set)

    def _server_kill(self, seconds: float) -> None:
        t0 = time.time()
        super()._server_kill(seconds)
        self.outages.append((t0, time.time()))

    def run(self) -> HotFolderResult:  # type: ignore[override]
        """Set up, drop and watch for `minutes`, drain, tear down; returns the result."""
        self.good, _ = _images(self.images)
        self.inbox, self.out = self.work / "inbox", self.work / "out"
        threads: list[threading.Thread] = []
        try:
            self._start_sandbox()
            self.inbox.mkdir(parents=True, exist_ok=True)
            self.t0 = time.monotonic()
            end = self.t0 + self.minutes * 60
            dropper = threading.Thread(target=self._dropper, args=(end,), daemon=True)
            watcher = threading.Thread(target=self._watch, daemon=True)
            threads = [dropper, watcher, threading.Thread(target=self._monitor, daemon=True)]
            for t in threads:
                t.start()
            pause = min(60.0, max(5.0, self.minutes * 60 / 8))
            schedule = [("server SIGKILL", self._server_kill), ("inspection database down", self._db_outage)]
            self._fault_loop(end, schedule, pause, min(20.0, pause / 2))
            dropper.join(max(0.0, end - time.monotonic()) + 180)
            self._drain()
        finally:
            self.stop.set()
            for t in threads:
                t.join(60)
        try:
            return self._result()
        finally:
            self._teardown()

    def _drain(self, timeout: float = 180) -> None:
        """Wait until every good image and every poison file has left the inbox."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [p for p in self.inbox.iterdir() if p.is_file() and not p.name.startswith(".")]
            if not left:
                return
            time.sleep(0.5)
        self.progress(f"  {len(left)} files still in the inbox after {timeout:.0f}s: "
                      f"{[p.name for p in left[:5]]}")

    def _result(self) -> HotFolderResult:
        results: dict[str, list[dict]] = {}
        for outcome in ("OK", "NG", "error"):
            for j in (self.out / outcome).glob("*.json"):
                payload = json.loads(j.read_text())
                payload["_file"] = f"{outcome}/{j.name[:-5]}"
                results.setdefault(payload.get("sha256", ""), []).append(payload)
        good = {sha: (name.split("#")[0], ready) for name, (sha, ready) in self.dropped.items()}
        lost = [name for sha, (name, _) in good.items() if sha not in results]
        duplicated = [name for sha, (name, _) in good.items() if len(results.get(sha, [])) > 1]
        scored_once = sum(1 for sha in good if len(results.get(sha, [])) == 1
                          and results[sha][0]["outcome"] in ("OK", "NG"))
        errors = {p["image"]: p for ps in results.values() for p in ps if p["outcome"] == "error"}
        unclassified = [name for name in self.poison if name not in errors or not errors[name].get("message")]
        kinds = Counter(self.poison.values())
        filed = Counter(kind for name, kind in self.poison.items() if name in errors)
        excess = 0.0
        for sha, (_, ready) in good.items():
            for payload in results.get(sha, []):
                done = datetime.fromisoformat(payload["at"]).timestamp()  # when it was filed
                overlap = sum(max(0.0, min(done, b) - max(ready, a)) for a, b in self.outages)
                excess = max(excess, done - ready - overlap)
        rids = {p["request_id"] for sha in good for p in results.get(sha, []) if p["outcome"] != "error"}
        rows = self._rows(rids, station=HOT_STATION)
        return HotFolderResult(
            self.minutes, len(good), scored_once, lost, duplicated, dict(kinds), dict(filed), unclassified,
            len(rids - set(rows)), len(rows) - len(set(rows)), excess,
            sum(b - a for a, b in self.outages), self.counts["server kills"], self.counts["db outages"],
            self.crashed)


def render_hotfolder(r: HotFolderResult, command: str, machine: str) -> str:
    """The Markdown report of the hot-folder soak."""
    failures = r.failures()
    poison = ", ".join(f"{kind} {r.poison_filed.get(kind, 0)} of {n}"
                       for kind, n in sorted(r.poison_dropped.items()))
    lines = [f"Command: `{command}`  ", f"{machine}  ",
             f"Result: **{'PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}**", "",
             "| check | result |", "|---|---|",
             "| good images dropped (two cameras, reused names, one written over a minute) | "
             f"{r.good_dropped} |",
             f"| good images scored exactly once | **{r.scored_once}** of {r.good_dropped} |",
             f"| good images lost / filed twice | **{len(r.lost)}** / **{len(r.duplicated)}** |",
             f"| poison files in error/ with a reason | {poison}; "
             f"unclassified **{len(r.poison_unclassified)}** |",
             f"| scored images without an inspection-log row | **{r.db_missing}** |",
             "| repeated inspection-log rows (an answer lost to a SIGKILL, retried with the same "
             f"request id) | {r.db_repeated} |",
             f"| server SIGKILLs / inspection-database outages | {r.server_kills} / {r.db_outages} "
             f"({r.outage_s:.0f} s of server down in all) |",
             f"| longest wait of a good image beyond the outages | **{r.max_excess_wait_s:.1f} s** |",
             f"| crashed processes | **{len(r.crashed)}** {', '.join(r.crashed)} |"]
    return "\n".join(lines) + "\n"


def render(r: SoakResult, command: str, machine: str) -> str:
    """The Markdown report: checks, then requests by outcome."""
    failures = r.failures()
    lines = [f"Command: `{command}`  ", f"{machine}  ",
             f"Result: **{'PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}**", "",
             "| check | result |", "|---|---|",
             f"| decisions acknowledged (gRPC and HTTP) | {r.acknowledged} |",
             f"| acknowledged decisions missing from the inspection database | **{r.missing}** |",
             f"| non-finite scores answered | **{r.nonfinite_ok}** |",
             f"| known-defective reference images answered OK | **{r.defects_answered_ok}** of "
             f"{r.defect_answers} answers ({r.known_defects} reference images) |",
             f"| alias moves to broken versions (garbage ONNX, malformed MLmodel, NaN model) swapped in | "
             f"**{r.broken_swapped_in}** of {r.broken_moves} |",
             f"| good alias moves followed | **{r.good_followed}** of {r.good_moves} "
             f"(slowest {r.follow_s_max:.1f} s) |",
             f"| registry outages / inspection-database outages / server SIGKILLs ridden out | "
             f"{r.registry_outages} / {r.db_outages} / {r.server_kills} |",
             f"| alias moves to a version the gate refuses, each followed by a supervisor SIGKILL: answers "
             f"from that version | **{r.refused_served}** ({r.refused_moves} moves) |",
             f"| threshold tags that would pass every known defect, each followed by a SIGKILL: answers "
             f"decided with them | **{r.refused_threshold_served}** ({r.threshold_escapes} tags) |",
             f"| spool disk full ({r.disk_how}) | {r.disk_full} windows; acknowledged decisions lost: see "
             "the missing row |",
             f"| damaged spool segments (a damaged record and a torn tail, written while the server was "
             f"down) | {r.damaged_segments}; records set aside: {r.damaged_set_aside} |",
             f"| idle health Watch streams ({r.watch_streams} at once) | {r.watch_windows} windows; streams "
             f"refused at their cap: {r.watch_refused} |",
             f"| health Check unanswered while the server was up | **{r.health_failures}** of "
             f"{r.health_checks} |",
             f"| supervisor SIGKILLs: children left running 25 s later | **{r.orphans}** of "
             f"{r.supervisor_kills} kills |",
             f"| crashed processes | **{len(r.crashed)}** {', '.join(r.crashed)} |",
             f"| peak RSS: server / gateway | {r.server_peak_mb:.0f} MB / {r.gateway_peak_mb:.0f} MB |",
             f"| gateway peak RSS growth under a 1 GiB chunked body | "
             f"**{r.gateway_chunked_growth_mb:.1f} MB** (answer `{r.chunked_answer.strip()}`) |",
             "", "| requests | count |", "|---|---:|"]
    lines += [f"| {key} | {n} |" for key, n in sorted(r.outcomes.items())]
    return "\n".join(lines) + "\n"


def run_soak(tracking_uri: str, model: str, alias: str, images: Path, minutes: float, work: Path,
             progress: Callable[[str], None] = print, workers: int = 2) -> SoakResult:
    """Run one soak (see the module docstring) and return its result."""
    return Soak(tracking_uri, model, alias, images, minutes, work, progress, workers).run()


def run_hotfolder_soak(tracking_uri: str, model: str, alias: str, images: Path, minutes: float, work: Path,
                       count: int = 2000, progress: Callable[[str], None] = print) -> HotFolderResult:
    """Run one hot-folder soak (`HotFolderSoak`) and return its result."""
    return HotFolderSoak(tracking_uri, model, alias, images, minutes, work, progress, count=count).run()


def result_json(r: SoakResult) -> str:
    """The result as JSON (for machines)."""
    body = {k: v for k, v in vars(r).items() if k != "outcomes"}
    body["outcomes"] = dict(r.outcomes)
    body["failures"] = r.failures()
    return json.dumps(body, indent=1)
