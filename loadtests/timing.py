"""Timing loops and their summary: what one path did in one phase (`Phase`), the
interleaved rounds over every path (`measure`), bare-ONNX-Runtime timing loops
(`time_batch1`, `time_batches`) and the per-path result over all rounds (`summarize`).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from loadtests.targets import Target

LATENCY, SATURATION = "batch-1 latency", "saturation"
BARE = "bare ORT"  # the path every ratio is taken against


@dataclass
class Phase:
    """What one path did in one phase of one round."""

    latencies_s: list[float]
    wall_s: float
    images: int
    client_cpu_s: float = float("nan")
    server_cpu_s: float = float("nan")  # CPU the serving processes used (saturation)

    @property
    def images_per_s(self) -> float:  # noqa: D102
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Result:
    """One path in one mode, over all rounds."""

    name: str
    mode: str  # LATENCY | SATURATION
    images_per_s: float  # median over rounds
    p50_ms: float  # over all rounds' latencies
    p99_ms: float
    n: int
    client_cores: float = float("nan")  # CPU the load generator itself used (served paths)
    ratio: float = float("nan")  # median over rounds of images/s ÷ bare ORT's in that round
    ratio_range: tuple[float, float] = (float("nan"), float("nan"))
    per_round: list[float] = field(default_factory=list)
    detail: str = ""
    server_ms_per_image: float = float("nan")  # server processes' CPU per image (saturation)


def time_batches(model: Any, inputs: list[np.ndarray], batch: int, threads: int,
                 seconds: float) -> Phase:
    """`model.infer` on one batch of `inputs` from `threads` caller threads for `seconds`
    (each thread makes at least one call)."""
    lats: list[float] = []
    count = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    x = np.stack([inputs[k % len(inputs)] for k in range(batch)])

    def work() -> None:
        while True:
            s = time.perf_counter()
            model.infer(x)
            with lock:
                lats.append(time.perf_counter() - s)
                count[0] += batch
            if time.perf_counter() >= stop:
                break

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return Phase(lats, time.perf_counter() - t0, count[0])


def time_batch1(model: Any, inputs: list[np.ndarray], seconds: float, max_calls: int) -> Phase:
    """Batch-1 `model.infer` calls, one after another, cycling through `inputs`, for `seconds`
    or `max_calls` (at least one call)."""
    lats: list[float] = []
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while not lats or (time.perf_counter() < t_end and len(lats) < max_calls):
        s = time.perf_counter()
        model.infer(inputs[len(lats) % len(inputs)][None])
        lats.append(time.perf_counter() - s)
    return Phase(lats, time.perf_counter() - t0, len(lats))


def summarize(phases: dict[tuple[str, str], list[Phase]], details: dict[str, str] | None = None,
              ) -> list[Result]:
    """Per (path, mode): median images/s, pooled p50/p99, median per-round ratio to bare ORT."""
    out = []
    for (name, mode), runs in phases.items():
        lat = sorted(x for p in runs for x in p.latencies_s)
        if not lat:
            continue
        bare = phases.get((BARE, mode), [])
        ratios = [p.images_per_s / b.images_per_s for p, b in zip(runs, bare, strict=False)
                  if b.images_per_s > 0]
        cpu = [p.client_cpu_s / p.wall_s for p in runs if p.client_cpu_s == p.client_cpu_s]
        server = [1e3 * p.server_cpu_s / p.images for p in runs
                  if p.server_cpu_s == p.server_cpu_s and p.images]
        out.append(Result(
            name, mode, statistics.median(p.images_per_s for p in runs), 1e3 * statistics.median(lat),
            1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], len(lat),
            statistics.median(cpu) if cpu else float("nan"),
            statistics.median(ratios) if ratios else float("nan"),
            (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan")),
            [p.images_per_s for p in runs], (details or {}).get(name, ""),
            server_ms_per_image=statistics.median(server) if server else float("nan")))
    return out


def process_cpu_s(pids: tuple[int, ...]) -> float:
    """User + system CPU seconds of processes `pids` and all their descendants so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in (root, *root.children(recursive=True)):
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
    return total


async def measure(targets: list[Target], *, rounds: int, seconds: float, concurrency: int,
                  max_requests: int, progress: Callable[[str], None] = lambda _: None,
                  ) -> dict[tuple[str, str], list[Phase]]:
    """`rounds` rounds; in each, every target's batch-1 latency then saturation, in turn."""
    phases: dict[tuple[str, str], list[Phase]] = {}
    for r in range(rounds):
        for t in targets:
            progress(f"round {r + 1}/{rounds}: {t.name}")
            phases.setdefault((t.name, LATENCY), []).append(await t.latency(seconds, max_requests))
            before = process_cpu_s(t.server_pids) if t.server_pids else 0.0
            phase = await t.saturate(seconds, concurrency, max_requests)
            if t.server_pids:  # the server processes' CPU over the phase (descendants included)
                phase.server_cpu_s = process_cpu_s(t.server_pids) - before
            phases.setdefault((t.name, SATURATION), []).append(phase)
    return phases
