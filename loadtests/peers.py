"""Peer servers for the side-by-side benchmark, started on loopback for the same model.

- `mlflow`: stock `mlflow models serve -m models:/<name>/<version> --env-manager local`,
  the registered version through MLflow's pyfunc ONNX flavor. Its interface is JSON
  tensors: each request is the preprocessed `(1, 3, H, W)` float32 image as
  `{"inputs": {"image": [...]}}` (what a client of that server has to send); it answers
  with the whole anomaly map and score as JSON.
- `kserve`: a KServe `ModelServer` (`loadtests/kserve_model.py`) with the same engine,
  PNG bytes as base64 in the V1 protocol. KServe pins protobuf 6 and this project
  protobuf 7, so it runs from its own environment (`make peers-venv` makes
  `.venv-peers`; or set `ANOMALY_KSERVE_PYTHON`).

A peer that cannot start is skipped with its reason (`SKIPPED`), never silently.
Every process started here is stopped when the context exits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np

from loadtests.launch import ChildProcess, free_port, wait_http_ready
from loadtests.targets import ClientTarget, Target
from service.settings import usable_cores

PEERS = ("mlflow", "kserve")
ROOT = Path(__file__).resolve().parents[1]
MLFLOW = "mlflow models serve"
KSERVE = "KServe ModelServer"
SKIPPED: dict[str, str] = {}  # peer → why it did not run (filled by `started`)


def kserve_python() -> Path | None:
    """The interpreter of an environment with KServe, if there is one."""
    env = os.environ.get("ANOMALY_KSERVE_PYTHON")
    candidate = Path(env) if env else ROOT / ".venv-peers" / "bin" / "python"
    return candidate if candidate.is_file() else None


def _launch(cmd: list[str], log: Path, env: dict[str, str], ready_url: str,
            timeout: float = 180) -> ChildProcess:
    """Start a process (its own group: these servers fork workers) and wait until
    `ready_url` answers 200, stopping it if it never does."""
    child = ChildProcess([], log, env, command=cmd, group=True)
    proc = child.start()
    try:
        wait_http_ready(ready_url, timeout, proc)
    except Exception as exc:
        child.stop()
        raise RuntimeError(f"{exc} (log: {log})") from exc
    return child


def start_mlflow(tracking_uri: str, name: str, version: str, work: Path,
                 workers: int) -> tuple[ChildProcess, str]:
    """`mlflow models serve` on `models:/name/version`; returns (process, base URL)."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # it runs `uvicorn` by name
    base = f"http://127.0.0.1:{port}"
    return _launch([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                   work / "mlflow-serve.log",
                   {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                   f"{base}/ping"), base


def start_kserve(python: Path, model_dir: Path, work: Path, workers: int) -> tuple[ChildProcess, str]:
    """`loadtests/kserve_model.py` under `python`; returns (process, base URL)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    return _launch([str(python), str(ROOT / "loadtests" / "kserve_model.py"), "--model_dir", str(model_dir),
                    "--model_name", "anomaly", "--http_port", str(port), "--grpc_port", str(free_port()),
                    "--workers", str(workers)],
                   work / "kserve.log", {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")])},
                   f"{base}/v1/models/anomaly"), base


@contextlib.asynccontextmanager
async def started(peers: tuple[str, ...], tracking_uri: str, name: str, version: str,
                  inputs: list[np.ndarray], images: list[bytes], work: Path,
                  concurrency: int, model_dir: Path | None = None) -> AsyncIterator[list[Target]]:
    """Start the asked-for peers; yield their benchmark targets; stop them all. KServe
    serves the downloaded model folder `model_dir` (the one holding `MLmodel`)."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    SKIPPED.clear()
    workers = usable_cores()  # as many worker processes as our server has worker threads
    procs: list[ChildProcess] = []
    targets: list[Target] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        try:
            if "mlflow" in peers:
                try:
                    proc, base = start_mlflow(tracking_uri, name, version, work, workers)
                    procs.append(proc)
                    bodies = [json.dumps({"inputs": {"image": x[None].tolist()}}).encode()
                              for x in inputs[:8]]

                    async def mlflow_call(i: int, base: str = base) -> object:
                        r = await http.post(f"{base}/invocations", content=bodies[i % len(bodies)],
                                            headers={"content-type": "application/json"})
                        r.raise_for_status()
                        return r

                    targets.append(ClientTarget(MLFLOW, mlflow_call))
                except Exception as exc:  # reported in the benchmark, not hidden
                    SKIPPED[MLFLOW] = f"did not start: {exc}"
            if "kserve" in peers:
                python = kserve_python()
                if python is None:
                    SKIPPED[KSERVE] = ("no environment with KServe (make peers-venv, or set "
                                       "ANOMALY_KSERVE_PYTHON)")
                elif model_dir is None:
                    SKIPPED[KSERVE] = "no downloaded model folder to serve"
                else:
                    try:
                        proc, base = start_kserve(python, model_dir, work, workers)
                        procs.append(proc)
                        bodies_b64 = [json.dumps({"instances": [{"b64": base64.b64encode(b).decode()}]})
                                      .encode() for b in images]

                        async def kserve_call(i: int, base: str = base) -> object:
                            r = await http.post(f"{base}/v1/models/anomaly:predict",
                                                content=bodies_b64[i % len(bodies_b64)],
                                                headers={"content-type": "application/json"})
                            r.raise_for_status()
                            return r

                        targets.append(ClientTarget(KSERVE, kserve_call))
                    except Exception as exc:
                        SKIPPED[KSERVE] = f"did not start: {exc}"
            yield targets
        finally:
            for p in procs:
                p.stop()


def status_lines() -> list[str]:
    """One line per peer that did not run, with the reason."""
    return [f"- {peer}: not measured ({why})" for peer, why in SKIPPED.items()]
