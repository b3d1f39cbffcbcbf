"""Several server processes on one port (`ANOMALY_PROCESSES`, `anomaly serve --processes N`).

One process spends about 1–2 ms of Python per request, much of it under the GIL, which
caps it near a thousand requests per second whatever the core count; ONNX Runtime alone
scales with the cores. So a host can run N copies of the server, each binding the same
gRPC port (and in-process HTTP port) with `SO_REUSEPORT`: the kernel hands each new
connection to one of them. Clients spread their calls by opening several connections
(`AnomalyClient(..., connections=K)`; the gateway's `grpc_connections`).

Each child is a whole server: its own models (loaded, validated and watched on its own),
`workers` and `solo_threads` = its share of the cores, metrics on `metrics_port + index`,
its own inspection spool. This supervisor starts them, forwards SIGTERM/SIGINT (each drains
its in-flight calls), and restarts a child that dies, waiting longer after each quick death
(up to a minute), so that one crash never takes the port down with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from service.settings import Settings, usable_cores

log = logging.getLogger(__name__)
QUICK_DEATH_S = 10.0  # a child that dies sooner than this after starting backs off longer
MAX_BACKOFF_S = 60.0


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | dict):
        return json.dumps([_env_value(v) for v in value] if isinstance(value, list) else value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_env(settings: Settings, index: int) -> dict[str, str]:
    """The environment of child `index`: every setting as `ANOMALY_*` (so the child resolves
    exactly these), with its share of the cores, its metrics port and its index."""
    share = max(1, usable_cores() // settings.processes)
    runs = share if settings.max_batch_size == 1 else settings.batch_workers  # calls at once per model
    env = {f"ANOMALY_{name.upper()}": _env_value(getattr(settings, name))
           for name in type(settings).model_fields if getattr(settings, name) is not None}
    env.update(ANOMALY_PROCESSES="1", ANOMALY_PROCESS_INDEX=str(index), ANOMALY_WORKERS=str(share),
               ANOMALY_SOLO_THREADS=str(share), ANOMALY_INTRA_OP_THREADS=str(max(1, share // runs)))
    if settings.metrics_port:
        env["ANOMALY_METRICS_PORT"] = str(settings.metrics_port + index)
    return env


class Supervisor:
    """Runs `settings.processes` server children and keeps them running until stopped."""

    def __init__(self, settings: Settings) -> None:
        if settings.grpc_port == 0:
            raise ValueError("--processes needs a fixed port (the children must share it); got port 0")
        self.settings = settings
        self.children: dict[int, tuple[subprocess.Popen, float]] = {}
        self.backoff: dict[int, float] = {}
        self.stopping = threading.Event()

    def _start(self, index: int) -> None:
        cmd = [sys.executable, "-m", "cli.main", "serve"]
        proc = subprocess.Popen(cmd, env={**os.environ, **child_env(self.settings, index)},
                                stdin=subprocess.DEVNULL)
        self.children[index] = (proc, time.monotonic())
        log.info("server process %d started (pid %d)", index, proc.pid)

    def stop(self, *_: object) -> None:
        """Ask every child to drain and stop (SIGTERM)."""
        self.stopping.set()
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start the children, restart any that dies, and return once all have stopped
        after `stop` (0, or the first non-zero exit code of that shutdown)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for i in range(self.settings.processes):
            self._start(i)
        log.info("%d server processes sharing port %d", self.settings.processes, self.settings.grpc_port)
        restart_at: dict[int, float] = {}
        while not self.stopping.is_set():
            now = time.monotonic()
            for index, (proc, started) in list(self.children.items()):
                if proc.poll() is None or index in restart_at:
                    continue
                quick = now - started < QUICK_DEATH_S
                delay = min(MAX_BACKOFF_S, 2 * self.backoff.get(index, 0.5)) if quick else 1.0
                self.backoff[index] = delay
                restart_at[index] = now + delay
                log.error("server process %d (pid %d) exited with code %s; restarting it in %.0f s",
                          index, proc.pid, proc.returncode, delay)
            for index, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[index]
                    self._start(index)
            self.stopping.wait(0.2)
        deadline = time.monotonic() + self.settings.grace_s + 20
        code = 0
        for proc, _ in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = code or (proc.returncode if proc.returncode not in (None, -signal.SIGTERM) else 0)
        log.info("all server processes stopped")
        return code
