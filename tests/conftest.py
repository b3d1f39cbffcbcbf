"""Session fixtures: a small sample dataset, a tiny unified STFPM trained here, a real
MLflow store (SQLite in a temp dir), and the real gRPC server and HTTP gateway as child
processes on loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import loadtests  # noqa: F401  (first: it turns gRPC's fork handlers off before grpc is imported)
from registry.data.sample import SampleSpec, make_sample_dataset

TEST_CATEGORIES = ("brick", "coffee")
# The browser tests' Chromium (Debian's package; `.ci/run` installs it) and what a headless one
# needs on a machine with no display and no internet (root, no sandbox; no background calls to
# Google's hosts).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Session fixtures that train a model (tiny, but tens of seconds each, and the variants minutes).
TRAINING_FIXTURES = frozenset({"store", "other_architectures", "variant_builds"})
# Modules that build environments or images, or run for minutes by design: not in the fast loop.
HEAVY_MODULES = frozenset({"test_images", "test_py310", "test_stack", "test_bench", "test_soak",
                           "test_locust", "test_mlflow_ui", "test_client_dist", "test_kube_play",
                           "test_oip_clients", "test_mlflow_postgres", "test_int8_study"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stack: the compose stack with podman (`make stack-test`, "
                                       "tests/deploy/test_stack.py); left out of a run that selects no "
                                       "marker")
    config.addinivalue_line("markers", "trains: uses a session fixture that trains a model (set by "
                                       "conftest; `make test-fast` leaves these out)")
    config.addinivalue_line("markers", "heavy: builds an environment or image, or runs for minutes by "
                                       "design (set by conftest; `make test-fast` leaves these out)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks what trains (`trains`) and what is heavy (`heavy`), for `make test-fast`. `make
    test` leaves the stack test out (about 12 min more); `-m stack` (`make stack-test`), any
    other marker expression, or naming tests/deploy/test_stack.py selects it."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trains)
        if item.module is not None and item.module.__name__.rpartition(".")[2] in HEAVY_MODULES:
            item.add_marker(pytest.mark.heavy)
    if config.getoption("markexpr") or any("test_stack" in arg for arg in config.args):
        return
    kept = [item for item in items if item.get_closest_marker("stack") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
TEST_INPUT = 128


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    spec = SampleSpec(image_size=160, n_train=16, n_test_good=4, n_test_per_defect=2, seed=0)
    return make_sample_dataset(root, categories=TEST_CATEGORIES, spec=spec)


@dataclass
class Store:
    tracking_uri: str
    home: Path
    model_name: str
    version: str
    build: object  # registry.pipeline.BuildResult


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (and child processes' environment) at `uri` for a block."""
    import mlflow

    old, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(previous)


POSTGRES = os.environ.get("ANOMALY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@contextlib.contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL (dropped afterwards); yields its URL.

    PostgreSQL is part of the development and CI machines, so it being unreachable fails.
    """
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=5, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def mlflow_server_process(backend_uri: str, home: Path) -> Iterator[tuple[str, object]]:
    """A real `mlflow server` (backend store `backend_uri`, artifacts served from `home`) on a
    loopback port; yields (URL, its `ChildProcess`). Stopped (process group) on exit."""
    from loadtests.soak import MlflowServer

    server = MlflowServer(backend_uri, home)
    try:
        server.start()
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from exc
    try:
        yield server.url, server.child
    finally:
        server.stop()


def _build(sample_root: Path, home: Path, uri: str, architecture: str, epochs: int,
           aliases: tuple[str, ...] = ()):
    """Train, export, evaluate and register one tiny model into the store at `uri`."""
    from registry.architectures import ModelConfig
    from registry.pipeline import build_variant_fp32
    from registry.train import TrainConfig

    with tracking_uri(uri):
        build = build_variant_fp32(
            sample_root, home / "build" / architecture, architecture=architecture,
            model_config=ModelConfig(input_size=(TEST_INPUT, TEST_INPUT),
                                     extra={"teacher_epochs": 8}),
            train_config=TrainConfig(epochs=epochs, lr=3e-3, batch_size=8, seed=0),
            aliases=aliases, artifact_root=home / "artifacts", show_progress=False,
        )
    assert build.registered is not None
    return build


@pytest.fixture(scope="session")
def store(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Train a tiny STFPM and register it as `anomaly-detector` with alias champion."""
    home = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    build = _build(sample_root, home, uri, "stfpm", 12, aliases=("champion",))
    return Store(uri, home, build.registered.name, build.registered.version, build)


@pytest.fixture(scope="session")
def other_architectures(store: Store, sample_root: Path) -> dict[str, object]:
    """Tiny RD and Uninformed Students registered into the same store (`<arch>-fp32`)."""
    return {arch: _build(sample_root, store.home, store.tracking_uri, arch, epochs)
            for arch, epochs in (("rd", 12), ("us", 10))}


@pytest.fixture(scope="session")
def variant_builds(store: Store, other_architectures: dict[str, object],
                   sample_root: Path) -> dict[str, list]:
    """FP16, PTQ-INT8 and QAT-INT8 (one fine-tuning epoch) of every architecture, registered
    into the same store: `{arch: [fp16, ptq-int8, qat-int8]}`."""
    from registry.pipeline import build_variants
    from registry.variants.qat import QATConfig

    with tracking_uri(store.tracking_uri):
        fp32 = {"stfpm": store.build, **other_architectures}
        return {arch: build_variants(b, sample_root, store.home / "build" / arch,
                                     qat_config=QATConfig(epochs=1), artifact_root=store.home / "artifacts",
                                     show_progress=False)
                for arch, b in fp32.items()}


@pytest.fixture(scope="session")
def grpc_target(store: Store, tmp_path_factory: pytest.TempPathFactory):
    from loadtests.launch import start_server

    logs = tmp_path_factory.mktemp("logs")
    child, target = start_server(store.tracking_uri, logs / "server.log",
                                 cache_dir=store.home / "cache")
    yield target
    code = child.stop()
    assert code == 0, (logs / "server.log").read_text()


@pytest.fixture(scope="session")
def http_base(grpc_target: str, tmp_path_factory: pytest.TempPathFactory):
    from loadtests.launch import start_gateway

    logs = tmp_path_factory.mktemp("gwlogs")
    child, base = start_gateway(grpc_target, logs / "gateway.log")
    yield base
    child.stop()


@pytest.fixture(scope="session")
def serve_image() -> str:
    """The serve image, built with podman (`make image-serve`) once per session; skips where
    podman cannot be installed (tests/podman_support.py)."""
    from podman_support import build_serve_image

    return build_serve_image()


@pytest.fixture
def store_copy(store: Store, tmp_path: Path) -> Path:
    """The session store copied for the serve image's user; containers mount it at `store.home`."""
    from podman_support import copy_store_for_app

    return copy_store_for_app(store.home, tmp_path / "store")


@pytest.fixture(scope="session")
def good_and_defect(sample_root: Path) -> tuple[list[Path], list[Path]]:
    from registry.data.mvtec import load_test_split

    samples = load_test_split(sample_root)
    return ([s.path for s in samples if s.label == 0], [s.path for s in samples if s.label == 1])


def register_mutated(store: Store, client, mutate, tmp_path: Path) -> str:
    """Register a new version of `store`'s model whose artifact folder is a copy of the good
    one changed by `mutate(folder)` (e.g. a garbage ONNX file, a malformed `MLmodel`);
    returns its version number. The kind of bad upload a registry can hold."""
    import shutil
    import uuid

    import mlflow

    with tracking_uri(store.tracking_uri):  # models:/ URIs resolve through the global registry
        work = tmp_path / f"mutated-{uuid.uuid4().hex[:8]}"
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{store.model_name}/{store.version}", dst_path=str(work / "src")))
        folder = work / "model"
        shutil.copytree(local, folder)
        mutate(folder)
        experiment = client.get_experiment_by_name("anomaly-detection").experiment_id
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(folder), "model")
    return str(client.create_model_version(store.model_name, f"runs:/{run.info.run_id}/model",
                                           run_id=run.info.run_id).version)


def register_tiny(store: Store, fault: str, tmp_path: Path, aliases: tuple[str, ...] = (),
                  model_name: str = "") -> str:
    """Register a tiny model (`loadtests.faults.tiny_onnx`, misbehaving as `fault` says) as a
    new version of `store`'s model (or of `model_name`), with the test categories; returns its
    version."""
    import uuid

    from loadtests.faults import tiny_onnx
    from registry.mlflow_registry import log_and_register
    from service.runtime.metadata import ModelMetadata, ScoreStats

    stats = ScoreStats(threshold=0.5, min=0.0, max=1.0)
    metadata = ModelMetadata(architecture="tiny", variant=fault.replace("_", "-"), input_height=TEST_INPUT,
                             input_width=TEST_INPUT, categories=list(TEST_CATEGORIES),
                             image_stats={"": stats, **{c: stats for c in TEST_CATEGORIES}})
    folder = tmp_path / f"tiny-{fault}-{uuid.uuid4().hex[:6]}"
    path = tiny_onnx(folder / "model.onnx", (TEST_INPUT, TEST_INPUT), fault)
    with tracking_uri(store.tracking_uri):
        return log_and_register(path, metadata, params={"fault": fault}, metrics={},
                                model_name=model_name or store.model_name, aliases=aliases,
                                artifact_root=store.home / "artifacts").version


def register_copy(store: Store, tmp_path: Path, variant: str, threshold_scale: float = 1.0,
                  model_name: str = "", reference: tuple | list = (), metrics: dict | None = None,
                  metadata: dict | None = None, aliases: tuple[str, ...] = ()) -> str:
    """The session's trained model registered again as variant `variant` of `store`'s model
    (or of `model_name`), with its thresholds multiplied by `threshold_scale` (a huge scale:
    every defect passes), its metadata updated with `metadata` (e.g. a tiling) and with
    `reference` (`KnownPart`s) as its reference set (none by default); returns its version."""
    import shutil
    import uuid

    from registry.mlflow_registry import log_and_register

    folder = tmp_path / f"{variant}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    onnx = folder / "model.onnx"
    shutil.copyfile(store.build.onnx_path, onnx)
    md = store.build.metadata
    stats = {k: v.model_copy(update={"threshold": v.threshold * threshold_scale})
             for k, v in md.image_stats.items()}
    with tracking_uri(store.tracking_uri):
        update = {"image_stats": stats, "variant": variant, **(metadata or {})}
        return log_and_register(onnx, md.model_copy(update=update), params={}, metrics=metrics or {},
                                model_name=model_name or store.model_name, aliases=aliases,
                                artifact_root=store.home / "artifacts", reference=reference).version


def wait_alias_error(stub, alias: str, version: str, request=None, serving: str = "", timeout: float = 30):
    """Poll `GetModel(alias)` until the server reports that moving `alias` to `version`
    failed (`last_error_version`), asserting meanwhile, when `request` is given, that each
    Score is still answered by `serving`; returns the last `ModelInfo`."""
    import time

    from anomaly.v1 import anomaly_pb2 as pb

    deadline = time.monotonic() + timeout
    info = stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)
    while info.last_error_version != version and time.monotonic() < deadline:
        if request is not None:
            assert stub.Score(request, timeout=30).model.version == serving
        time.sleep(0.2)
        info = stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)
    return info


def wait_for(check, timeout: float = 30.0, what: str = "condition",  # type: ignore[no-untyped-def]
             retry_on: tuple[type[BaseException], ...] = ()):
    """Poll `check()` every 0.2 s until it returns something true, and return that; an
    exception of `retry_on` counts as not yet (the last one is named if time runs out)."""
    import time

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except retry_on as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def metric_sum(url: str, name: str, default: float | None = None) -> float:
    """The sum of the samples of `name` (a metric, or a metric with its labels, as
    `anomaly_inspection_rows_total{outcome="shipped"}`) on the Prometheus endpoint `url`; `default`
    when it has none yet (None: it must have some)."""
    import httpx

    values = [float(line.split()[-1]) for line in httpx.get(url, timeout=10).text.splitlines()
              if line.startswith((name + " ", name + "{"))]
    assert values or default is not None, f"{name} not in {url}"
    return sum(values) if values else default


def reference_set(store: Store, client, tmp_path: Path) -> list:
    """The session model's reference set (its known parts), to log with another version:
    `register_copy(..., reference=reference_set(store, client, tmp_path))`."""
    import uuid

    from registry.mlflow_registry import KnownPart
    from service.promotion.rules import read_manifest

    run_id = client.get_model_version(store.model_name, store.version).run_id
    dest = tmp_path / f"reference-{uuid.uuid4().hex[:6]}"
    local = Path(client.download_artifacts(run_id, "reference", str(dest)))
    return [KnownPart(local / i["file"], i["category"], i["expect"]) for i in read_manifest(local)]


class SilentEndpoint:
    """A TCP endpoint on loopback (a registry, a bucket) that accepts connections and never
    answers; counts them. `close()` ends it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        for conn in self.accepted:
            conn.close()
        self.sock.close()
