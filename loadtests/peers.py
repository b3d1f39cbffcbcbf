"""Peer servers for the side-by-side benchmark, started on loopback for the same model.

- `mlflow`: stock `mlflow models serve -m models:/<name>/<version> --env-manager local`,
  the registered version through MLflow's pyfunc ONNX flavor. Its interface is JSON
  tensors: each request is the preprocessed `(1, 3, H, W)` float32 image as
  `{"inputs": {"image": [...]}}` (what a client of that server has to send); it answers
  with the whole anomaly map and score as JSON.
- `kserve`: a KServe `ModelServer` (`loadtests/kserve_model.py`) with the same engine,
  over V1 REST (PNG bytes as base64 in JSON) and V2 gRPC (`ModelInfer`, the PNG bytes as a
  `BYTES` tensor in `raw_input_contents`, as our server's V2 path gets them). KServe pins
  protobuf 6 and this project protobuf 7, so it runs from its own environment
  (`make peers-venv` makes `.venv-peers`; or set `ANOMALY_KSERVE_PYTHON`).
- `mlserver`: MLServer 1.7 with its MLflow runtime (`mlserver-mlflow`) serving the
  registered version itself (`models:/<name>/<version>` from the same store), adaptive
  batching on (up to 8 requests, 2 ms, as our batching server) and one inference worker
  process per core. Its interface is V2 tensors, so clients send the preprocessed
  `(1, 3, H, W)` float32 image: as JSON over REST, as `raw_input_contents` over gRPC.
  It runs from `.venv-mlserver` (`make mlserver-venv`; or set `ANOMALY_MLSERVER`), since
  it pins its own MLflow, FastAPI and protobuf; `uvloop<0.22` there, as MLServer 1.7.1's
  worker processes fail to start with uvloop 0.22's stricter `get_event_loop`.

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

from anomaly.channel import grpc_channel
from anomaly.oip import inference_pb2_grpc as v2_grpc
from loadtests.launch import ChildProcess, free_port, wait_http_ready
from loadtests.targets import ClientTarget, Target, v2_target
from service.settings import usable_cores

PEERS = ("mlflow", "kserve", "mlserver")
ROOT = Path(__file__).resolve().parents[1]
MLFLOW = "mlflow models serve"
KSERVE = "KServe ModelServer"  # V1 REST, base64 PNG
KSERVE_V2 = "KServe V2 gRPC"
MLSERVER_REST = "MLServer V2 REST"
MLSERVER_GRPC = "MLServer V2 gRPC"
MLSERVER = "MLServer"  # the name its skip reason is reported under
SKIPPED: dict[str, str] = {}  # peer → why it did not run (filled by `started`)


def kserve_python() -> Path | None:
    """The interpreter of an environment with KServe, if there is one."""
    env = os.environ.get("ANOMALY_KSERVE_PYTHON")
    candidate = Path(env) if env else ROOT / ".venv-peers" / "bin" / "python"
    return candidate if candidate.is_file() else None


def mlserver_bin() -> Path | None:
    """The `mlserver` command of an environment with MLServer, if there is one."""
    env = os.environ.get("ANOMALY_MLSERVER")
    candidate = Path(env) if env else ROOT / ".venv-mlserver" / "bin" / "mlserver"
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


def _wait_grpc(target: str, child: ChildProcess, timeout: float = 60) -> None:
    """Wait until a gRPC port accepts a channel (the REST side answering says nothing of it)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            child.stop()
            raise RuntimeError(f"gRPC port {target} not ready after {timeout:.0f} s") from None


def start_kserve(python: Path, model_dir: Path, work: Path, workers: int) -> tuple[ChildProcess, str, str]:
    """`loadtests/kserve_model.py` under `python`; returns (process, base URL, gRPC target)."""
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    child = _launch([str(python), str(ROOT / "loadtests" / "kserve_model.py"), "--model_dir", str(model_dir),
                     "--model_name", "anomaly", "--http_port", str(port), "--grpc_port", str(grpc_port),
                     "--workers", str(workers)],
                    work / "kserve.log", {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")])},
                    f"{base}/v1/models/anomaly")
    _wait_grpc(f"127.0.0.1:{grpc_port}", child)
    return child, base, f"127.0.0.1:{grpc_port}"


def start_mlserver(mlserver: Path, tracking_uri: str, name: str, version: str, work: Path,
                   workers: int, max_batch: int = 8) -> tuple[ChildProcess, str, str]:
    """MLServer with the MLflow runtime on `models:/name/version`; returns (process, base
    URL, gRPC target). Its settings are written under `work/mlserver`."""
    folder = work / "mlserver"
    (folder / "anomaly").mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_port": free_port(),
        "parallel_workers": workers, "debug": False}))
    (folder / "anomaly" / "model-settings.json").write_text(json.dumps({
        "name": "anomaly", "implementation": "mlserver_mlflow.MLflowRuntime",
        "max_batch_size": max_batch, "max_batch_time": 0.002,
        "parameters": {"uri": f"models:/{name}/{version}"}}))
    base = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{mlserver.parent}:{os.environ['PATH']}"}
    child = _launch([str(mlserver), "start", str(folder)], work / "mlserver.log", env,
                    f"{base}/v2/models/anomaly/ready")
    _wait_grpc(f"127.0.0.1:{grpc_port}", child)
    return child, base, f"127.0.0.1:{grpc_port}"


def _v2_tensor_request(x: np.ndarray) -> object:
    """A V2 gRPC `ModelInferRequest` with one preprocessed image as FP32 raw contents."""
    from anomaly.oip import inference_pb2 as v2

    request = v2.ModelInferRequest(model_name="anomaly", raw_input_contents=[x[None].tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=[1, *x.shape])
    return request


def _served_by(target: Target, proc: ChildProcess) -> Target:
    """`target` with the peer's process (its workers are its descendants) for CPU accounting."""
    target.server_pids = (proc.pid,)
    return target


def _json_post(http: httpx.AsyncClient, name: str, url: str, bodies: list[bytes]) -> ClientTarget:
    """A REST peer: `POST url` with JSON body number `i` (cycling), a non-2xx answer a failure."""

    async def call(i: int) -> object:
        r = await http.post(url, content=bodies[i % len(bodies)],
                            headers={"content-type": "application/json"})
        r.raise_for_status()
        return r

    return ClientTarget(name, call)


def _kserve_v1(http: httpx.AsyncClient, base: str, images: list[bytes], name: str) -> ClientTarget:
    """KServe's V1 REST `:predict` with each image as base64 in JSON."""
    bodies = [json.dumps({"instances": [{"b64": base64.b64encode(b).decode()}]}).encode() for b in images]
    return _json_post(http, name, f"{base}/v1/models/anomaly:predict", bodies)


@contextlib.asynccontextmanager
async def started(peers: tuple[str, ...], tracking_uri: str, name: str, version: str,
                  inputs: list[np.ndarray], images: list[bytes], work: Path,
                  concurrency: int, model_dir: Path | None = None,
                  more_images: dict[str, list[bytes]] | None = None) -> AsyncIterator[list[Target]]:
    """Start the asked-for peers; yield their benchmark targets; stop them all. KServe
    serves the downloaded model folder `model_dir` (the one holding `MLmodel`).
    `more_images` ({tag: encoded images}): further image sets for the peers that decode
    images themselves (KServe), as targets named `<peer> [<tag>]`; the tensor peers (MLflow,
    MLServer) receive preprocessed tensors, the same whatever the image size."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    SKIPPED.clear()
    workers = usable_cores()  # as many worker processes as our server has worker threads
    procs: list[ChildProcess] = []
    targets: list[Target] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http, contextlib.AsyncExitStack() as stack:
        try:
            if "mlflow" in peers:
                try:
                    proc, base = start_mlflow(tracking_uri, name, version, work, workers)
                    procs.append(proc)
                    bodies = [json.dumps({"inputs": {"image": x[None].tolist()}}).encode()
                              for x in inputs[:8]]
                    targets.append(_served_by(_json_post(http, MLFLOW, f"{base}/invocations", bodies), proc))
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
                        proc, base, target = start_kserve(python, model_dir, work, workers)
                        procs.append(proc)
                        channel = await stack.enter_async_context(grpc_channel(target, aio=True))
                        for tag, imgs in {"": images, **(more_images or {})}.items():
                            suffix = f" [{tag}]" if tag else ""
                            v1 = _kserve_v1(http, base, imgs, KSERVE + suffix)
                            v2 = v2_target(KSERVE_V2 + suffix, channel, imgs, "anomaly")
                            targets += [_served_by(v1, proc), _served_by(v2, proc)]
                    except Exception as exc:
                        SKIPPED[KSERVE] = f"did not start: {exc}"
            if "mlserver" in peers:
                mlserver = mlserver_bin()
                if mlserver is None:
                    SKIPPED[MLSERVER] = ("no environment with MLServer (make mlserver-venv, or set "
                                         "ANOMALY_MLSERVER)")
                else:
                    try:
                        proc, base, target = start_mlserver(mlserver, tracking_uri, name, version, work,
                                                            workers)
                        procs.append(proc)
                        json_bodies = [json.dumps({"inputs": [{
                            "name": "image", "shape": [1, *x.shape], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}).encode() for x in inputs[:8]]
                        rest = _json_post(http, MLSERVER_REST, f"{base}/v2/models/anomaly/infer", json_bodies)
                        targets.append(_served_by(rest, proc))
                        channel = await stack.enter_async_context(grpc_channel(target, aio=True))
                        stub = v2_grpc.GRPCInferenceServiceStub(channel)
                        requests = [_v2_tensor_request(x) for x in inputs[:8]]

                        async def mlserver_grpc_call(i: int, stub=stub) -> object:  # noqa: ANN001
                            return await stub.ModelInfer(requests[i % len(requests)], timeout=60)

                        targets.append(_served_by(ClientTarget(MLSERVER_GRPC, mlserver_grpc_call), proc))
                    except Exception as exc:
                        SKIPPED[MLSERVER] = f"did not start: {exc}"
            yield targets
        finally:
            for p in procs:
                p.stop()


def status_lines() -> list[str]:
    """One line per peer that did not run, with the reason."""
    return [f"- {peer}: not measured ({why})" for peer, why in SKIPPED.items()]
