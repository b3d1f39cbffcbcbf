"""The main job, end to end on the embedded default.

sample data → for each architecture: train a unified model → export ONNX → (the first
one: serve it at once and score a good and a defective part, the *first look*, printing the
time to that first served score) → build its FP16, PTQ-INT8 and QAT-INT8 variants →
evaluate each through the serving engine →
register each in MLflow (SQLite + local artifacts) with alias `<arch>-<variant>` →
measure each version's peak memory in a real server process → move `champion` by a
documented rule → start the gRPC server and the HTTP gateway (real processes, loopback)
→ score good and defective images over both → print the comparison table and the MLflow
UI command.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from anomaly.wire import DEFAULT_MODEL_NAME
from edge_anomaly_client import ScoreResult
from registry.architectures import DEFAULT_EPOCHS, DEFAULT_QAT_EPOCHS, ModelConfig, extra_for
from registry.data.mvtec import Sample, load_test_split
from registry.data.sample import SampleSpec, make_sample_dataset
from registry.mlflow_registry import embedded_tracking_uri, use_store
from registry.pipeline import BuildResult, build_architecture
from registry.train import TrainConfig
from registry.variants.qat import QATConfig
from studies.footprint import serving_peak_rss

log = logging.getLogger(__name__)
MAX_WIDTH = 120  # columns: every table the demo prints fits
# Set by `make demo` to the time it was typed (seconds since the epoch), so that the time to the
# first served score includes creating the environment. Not an ANOMALY_* name: the servers the
# demo starts inherit its environment and refuse variables they do not know.
STARTED_VARIABLE = "EDGE_ANOMALY_DEMO_STARTED"


CHAMPION_RULE = ("champion = the fastest build (p50 ms/image at batch 1, the eligible builds timed "
                 "side by side in interleaved rounds) whose image AUROC is within 1 point of the best "
                 "build's (all architectures and variants) and that reproduces its recorded scores on "
                 "this host (the check every server runs before serving it)")



@dataclass
class DemoConfig:
    """Knobs of the demo (defaults fit the 15-minute budget on 2 cores)."""

    home: Path = Path(".demo")
    architectures: tuple[str, ...] = ("stfpm", "rd", "us")
    variants: tuple[str, ...] = ("fp16", "ptq-int8", "qat-int8")  # besides fp32
    qat_epochs: int = 0  # 0 = QAT_EPOCHS per architecture
    measure_rss: bool = True  # start one server per version to read its peak memory
    epochs: int = 0  # 0 = the per-architecture defaults (DEFAULT_EPOCHS)
    input_size: int = 256
    seed: int = 0
    n_show: int = 2  # images per (category, good/defective) scored over the wire
    first_look: bool = True  # serve the first registered build at once and score two parts


def reproduces_here(build: BuildResult) -> bool:
    """Whether a build's reproduction record (written when it was registered) holds on this
    host, with the server's default tolerance (`service.repository.reproduction`); a build without one
    (not registered) counts as reproducing."""
    from service.repository.reproduction import check
    from service.runtime.engine import OnnxModel
    from service.settings import Settings

    fields = Settings.model_fields
    result = check(OnnxModel(build.onnx_path, build.metadata), build.onnx_path.parent / "reproduction",
                   fields["reproduction_tolerance"].default, fields["reproduction_max_flipped"].default)
    if not result.allows:
        log.error("%s is not eligible for champion: %s", build.label, result.detail)
    return result.allows


def choose_champion(results: list[BuildResult], data: Path | None = None,
                    timings: dict[str, float] | None = None) -> BuildResult:
    """Apply `CHAMPION_RULE`: among the builds within 1 point of the best image AUROC, the
    one with the lowest batch-1 p50 when they are timed side by side on `data`'s test
    images (`registry.evaluate.interleaved_p50_ms`); the p50s land in `timings` (by label).
    Without `data`, the p50s each build's evaluation measured (one after another)."""
    results = [r for r in results if reproduces_here(r)]
    if not results:
        raise RuntimeError("no build reproduces its recorded scores on this host: no champion")
    best = max(r.report.image_auroc for r in results)
    eligible = [r for r in results if r.report.image_auroc >= best - 0.01]
    p50 = {r.label: r.report.latency_ms_p50 for r in eligible}
    if data is not None and len(eligible) > 1:
        import numpy as np

        from registry.evaluate import interleaved_p50_ms
        from service.runtime.engine import OnnxModel

        models = {r.label: OnnxModel(r.onnx_path, r.metadata) for r in eligible}
        encoded = [s.path.read_bytes() for s in load_test_split(data)[:8]]
        inputs = {label: np.stack([m.prepare_encoded(b) for b in encoded])
                  for label, m in models.items()}
        p50 = interleaved_p50_ms(models, inputs)
    if timings is not None:
        timings.update(p50)
    return min(eligible, key=lambda r: p50[r.label])


def _print_build(console: Console, r: BuildResult) -> None:
    version = r.registered.version if r.registered else "-"
    console.print(f"  {r.label}: image AUROC {r.report.image_auroc:.3f}, pixel AUROC "
                  f"{r.report.pixel_auroc:.3f}, {r.report.latency_ms_p50:.1f} ms/image, "
                  f"{r.model_mb:.1f} MB, built in {r.seconds:.0f}s → version {version}")


def _measure_rss(tracking_uri: str, results: list[BuildResult], data: Path, home: Path) -> dict[str, float]:
    samples = load_test_split(data)
    cat = samples[0].category
    images = [s.path for s in samples if s.category == cat][:4]
    out = {}
    for r in results:
        if r.registered:
            out[r.label] = serving_peak_rss(tracking_uri, r.registered.name, r.label, images, cat, home)
    return out


def comparison_tables(results: list[BuildResult], champion: BuildResult | None,
                      rss: dict[str, float], data_name: str = "the sample data") -> tuple[Table, Table]:
    """The demo's comparison, one row per (architecture, variant): what each version
    detects, and what it costs to run (two tables, so that each fits 120 columns)."""
    from service.runtime.hardware import this_host

    host = this_host()
    where = f"{host.cpu}, {host.isa_class}, ONNX Runtime {host.ort}"
    accuracy = Table(title=f"Detection: unified models and their variants on {data_name} "
                           "(evaluated through the serving engine)", caption=f"measured on {where}")
    cost = Table(title="Cost on this machine's CPU", caption=f"measured on {where}")
    for col in ("arch", "variant", "calibration", "version", "image AUROC", "pixel AUROC", "AUPRO"):
        accuracy.add_column(col, justify="right")
    for col in ("arch", "variant", "version", "ms/img b=1 p50", "img/s b=8", "model MB", "server RSS MB",
                "build s"):
        cost.add_column(col, justify="right")
    for r in results:
        arch = r.architecture + (" (champion)" if r is champion else "")
        version = r.registered.version if r.registered else "-"
        report = r.report
        accuracy.add_row(arch, r.variant, r.metadata.calibration or "-", version, f"{report.image_auroc:.3f}",
                         f"{report.pixel_auroc:.3f}", f"{report.aupro:.3f}")
        cost.add_row(arch, r.variant, version, f"{r.report.latency_ms_p50:.1f}",
                     f"{r.report.images_per_s_b8:.1f}", f"{r.model_mb:.2f}",
                     f"{rss[r.label]:.0f}" if r.label in rss else "-", f"{r.seconds:.0f}")
    return accuracy, cost


def per_category_table(champion: BuildResult) -> Table:
    """The champion's detection per category, with the threshold each uses."""
    table = Table(title=f"Per category ({champion.label})")
    for col in ("category", "image AUROC", "pixel AUROC", "threshold"):
        table.add_column(col, justify="right")
    for cat, m in champion.report.per_category.items():
        table.add_row(cat, f"{m['image_auroc']:.3f}", f"{m['pixel_auroc']:.3f}",
                      f"{champion.metadata.image_stats[cat].threshold:.4g}")
    return table


def wire_table() -> Table:
    """The table of images scored over both transports (rows added by the caller)."""
    table = Table(title="Scored over the wire (gRPC and HTTP gateway)")
    for col in ("image", "truth", "gRPC score", "norm", "gRPC", "HTTP score", "HTTP", "version", "ms (gRPC)"):
        table.add_column(col)
    return table


def add_wire_row(table: Table, s: Sample, g: ScoreResult, http_score: float, http_anomalous: bool,
                 grpc_ms: float) -> None:
    """One row of `wire_table`: a sample, its result over gRPC and its score and decision over HTTP."""
    table.add_row(f"{s.category}/{s.defect}/{s.path.name}", "NG" if s.label else "OK", f"{g.score:.4g}",
                  f"{g.normalized_score:.2f}", decision_cell(g.is_anomalous), f"{http_score:.4g}",
                  decision_cell(http_anomalous), g.model.version, f"{grpc_ms:.1f}")


def decision_cell(anomalous: bool) -> str:
    """NG in red, OK in green."""
    return "[red]NG[/]" if anomalous else "[green]OK[/]"


def _score_over_wire(grpc_target: str, http_base: str, cfg: DemoConfig, data: Path,
                     console: Console) -> list[float]:
    from edge_anomaly_client.sdk import AnomalyClient

    samples = load_test_split(data)
    picked = []
    for cat in sorted({s.category for s in samples}):
        for label in (0, 1):
            picked += [s for s in samples if s.category == cat and s.label == label][: cfg.n_show]
    table = wire_table()
    latencies = []
    with AnomalyClient(grpc_target) as client, httpx.Client(base_url=http_base, timeout=30) as http:
        for s in picked:
            rid = f"{s.category}-{s.defect}-{s.path.stem}"
            t0 = time.perf_counter()
            g = client.score(s.path, category=s.category, request_id=rid)
            latencies.append((time.perf_counter() - t0) * 1e3)
            r = http.post("/v1/score", params={"category": s.category, "request_id": rid},
                          files={"image": (s.path.name, s.path.read_bytes(), "image/png")})
            r.raise_for_status()
            h = r.json()
            add_wire_row(table, s, g, h["score"], h["is_anomalous"], latencies[-1])
    console.print(table)
    return latencies


def _first_look(tracking_uri: str, build: BuildResult, data: Path, home: Path, console: Console,
                started: float, demo_started: float) -> None:
    """Serve the first registered build (its alias, `<arch>-fp32`) over gRPC and HTTP, score
    one good and one defective part of the first category, and print how long that took from
    the start (`started`, wall clock: `make demo`'s own start when it says so)."""
    from edge_anomaly_client import AnomalyClient
    from loadtests.launch import start_gateway, start_server

    samples = load_test_split(data)
    category = sorted({s.category for s in samples})[0]
    parts = [next(s for s in samples if s.category == category and s.label == label) for label in (0, 1)]
    console.rule(f"first look: {build.label} served as soon as it is registered")
    first_scored = 0.0
    server, target = start_server(tracking_uri, home / "logs" / "first-look-server.log",
                                  cache_dir=home / "cache", alias=build.label)
    try:
        gateway, base = start_gateway(target, home / "logs" / "first-look-gateway.log")
        try:
            table = wire_table()
            with AnomalyClient(target) as grpc_client, AnomalyClient(base) as http_client:
                for s in parts:
                    rid = f"first-look-{s.category}-{s.defect}-{s.path.stem}"
                    t0 = time.perf_counter()
                    g = grpc_client.score(s.path, category=s.category, request_id=rid)
                    ms = (time.perf_counter() - t0) * 1e3
                    first_scored = first_scored or time.time()
                    h = http_client.score(s.path, category=s.category, request_id=rid)
                    add_wire_row(table, s, g, h.score, h.is_anomalous, ms)
        finally:
            gateway.stop()
    finally:
        server.stop()
    console.print(table)
    since = "`make demo`" if started != demo_started else "the demo"
    console.print(f"[bold]time to first served score: {first_scored - started:.0f} s[/] after {since} "
                  f"started ({first_scored - demo_started:.0f} s in the demo itself); the other "
                  "architectures and variants follow, then the champion rule")


def demo_console() -> Console:
    """At most `MAX_WIDTH` columns wide (a terminal's width when narrower; `MAX_WIDTH` when
    the output goes to a file or a pipe)."""
    console = Console()
    console.width = min(console.width, MAX_WIDTH) if sys.stdout.isatty() else MAX_WIDTH
    return console


def run_demo(cfg: DemoConfig | None = None, console: Console | None = None) -> list[BuildResult]:
    """Run the whole demo; returns the build results (one per architecture/variant)."""
    from loadtests.launch import start_gateway, start_server

    cfg = cfg or DemoConfig()
    console = console or demo_console()
    home = cfg.home.resolve()
    data = home / "data"
    t_start = time.perf_counter()
    demo_started = time.time()
    try:
        started = min(float(os.environ.get(STARTED_VARIABLE, demo_started)), demo_started)
    except ValueError:
        started = demo_started
    if not (data / "brick" / "train" / "good").is_dir():
        console.rule("1. sample data")
        make_sample_dataset(data, spec=SampleSpec(seed=cfg.seed),
                            progress=lambda c: console.print(f"  wrote category [bold]{c}[/]"))
    import mlflow

    tracking_uri = embedded_tracking_uri(home)
    artifact_root = use_store(tracking_uri) or home / "mlartifacts"
    console.rule("2. train → export → evaluate → register")
    console.print(f"MLflow store: {tracking_uri}")
    results: list[BuildResult] = []
    looked = not cfg.first_look

    def on_build(build: BuildResult) -> None:
        nonlocal looked
        _print_build(console, build)
        if not looked and build.registered is not None:
            looked = True
            try:
                _first_look(tracking_uri, build, data, home, console, started, demo_started)
            except Exception as exc:  # the full study does not depend on it
                console.print(f"[yellow]first look failed ({exc}); see {home / 'logs'}[/]")

    for arch in cfg.architectures:
        epochs = cfg.epochs or DEFAULT_EPOCHS.get(arch, 30)
        console.print(f"[bold]{arch}[/]: training {epochs} epochs, then {', '.join(cfg.variants)} …")
        results += build_architecture(
            data, home / "build", architecture=arch, variants=("fp32", *cfg.variants),
            model_config=ModelConfig(input_size=(cfg.input_size, cfg.input_size),
                                     extra=extra_for(arch)),
            train_config=TrainConfig(epochs=epochs, seed=cfg.seed),
            qat_config=QATConfig(epochs=cfg.qat_epochs or DEFAULT_QAT_EPOCHS.get(arch, 3), seed=cfg.seed),
            artifact_root=artifact_root, on_build=on_build)
    client = mlflow.MlflowClient()
    rss: dict[str, float] = {}
    if cfg.measure_rss:
        console.print("peak memory of a server process serving each version …")
        rss = _measure_rss(tracking_uri, results, data, home)
        for r in results:
            if r.registered and r.label in rss:
                client.set_model_version_tag(r.registered.name, r.registered.version, "peak_rss_mb",
                                             f"{rss[r.label]:.0f}")
    console.print("timing the accurate builds side by side for the champion rule …")
    timings: dict[str, float] = {}
    champion = choose_champion(results, data, timings)
    assert champion.registered is not None
    client.set_registered_model_alias(DEFAULT_MODEL_NAME, "champion", champion.registered.version)
    side = ", ".join(f"{label} {ms:.1f}" for label, ms in sorted(timings.items(), key=lambda kv: kv[1]))
    console.print(f"{CHAMPION_RULE}\nside-by-side p50 ms/image: {side}\n→ champion = {champion.label} "
                  f"(version {champion.registered.version})")

    console.rule("3. serve (gRPC + HTTP gateway) and score")
    server, target = start_server(tracking_uri, home / "logs" / "server.log", cache_dir=home / "cache")
    try:
        gateway, base = start_gateway(target, home / "logs" / "gateway.log")
        try:
            console.print(f"gRPC server on {target}, gateway on {base}")
            wire_ms = _score_over_wire(target, base, cfg, data, console)
        finally:
            gateway.stop()
    finally:
        server.stop()

    console.rule("4. comparison")
    for table in comparison_tables(results, champion, rss):
        console.print(table)
    console.print(f"champion served over gRPC: p50 round trip {statistics.median(wire_ms):.1f} ms/image")
    console.print(per_category_table(champion))
    console.print(f"demo finished in {time.perf_counter() - t_start:.0f}s")
    ui = (f".venv/bin/mlflow ui --backend-store-uri {tracking_uri} "
          f"--default-artifact-root {(home / 'mlartifacts').as_uri()} --host 127.0.0.1 --port 5000")
    console.print("Open the MLflow UI on this store:")
    console.print(f"  {ui}", soft_wrap=True)
    console.print("Serve it yourself:")
    console.print(f"  .venv/bin/anomaly serve --tracking-uri {tracking_uri}   # gRPC :50051", soft_wrap=True)
    console.print("  .venv/bin/anomaly gateway   # HTTP :8000 in front of it", soft_wrap=True)
    return results
