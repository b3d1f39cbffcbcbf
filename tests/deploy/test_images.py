"""The serve image, built from the repository and run: `make image-serve` builds
docker/Dockerfile's `serve` target with podman (on a Debian base made here from Debian's mirror
where the public Python image cannot be pulled), and the container, on loopback ports of the
host's network, serves the session's real model from its SQLite MLflow store, and a second
container of the same image runs the HTTP gateway in front of it. From the host: gRPC and HTTP
scores (the server's own HTTP and the gateway's) equal to the model's own, the image's
HEALTHCHECK passes in both roles, the process is not root, the image holds neither torch nor a
compiler, and SIGTERM stops the server cleanly.

Skips, saying why, only where podman, runc, catatonit or debootstrap are missing and cannot be
installed (`make image-tools`: apt-get as root). About 3.5 minutes on a 2-core CI machine with
nothing cached (apt-get, debootstrap, build); a rebuild with cached layers takes seconds.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from podman_support import APP_UID, podman

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, wait_grpc_serving, wait_http_ready

pytestmark = pytest.mark.timeout(1200)


def test_serve_image_scores_from_the_host(serve_image: str, store, store_copy: Path,
                                          good_and_defect) -> None:
    from service.runtime.engine import OnnxModel
    from service.runtime.imaging import decode_image

    grpc_port, http_port = free_port(), free_port()
    name = f"edge-anomaly-test-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network=host", "--timeout", "600",
           "--volume", f"{store_copy}:{store.home}",
           "--env", f"MLFLOW_TRACKING_URI={store.tracking_uri}",
           "--env", "ANOMALY_GRPC_HOST=127.0.0.1", "--env", "ANOMALY_HTTP_HOST=127.0.0.1",
           "--env", f"ANOMALY_GRPC_PORT={grpc_port}", "--env", "ANOMALY_INTRA_OP_THREADS=1",
           serve_image, "serve", "--http", "--http-port", str(http_port))
    target = f"127.0.0.1:{grpc_port}"
    try:
        try:
            wait_grpc_serving(target, timeout=240)
            wait_http_ready(f"http://127.0.0.1:{http_port}/v1/models", timeout=60)
        except (TimeoutError, RuntimeError) as exc:
            logs = podman("logs", "--tail", "40", name, check=False)
            raise AssertionError(f"{exc}\n{logs.stdout}{logs.stderr}") from exc

        # Scores from the host, over gRPC and HTTP, are the model's own.
        model = OnnxModel(store.build.onnx_path, store.build.metadata, intra_op_threads=1)
        good, defect = good_and_defect[0][0], good_and_defect[1][0]
        with AnomalyClient(target) as client:
            for path in (good, defect):
                result = client.score(path)
                expected = model.score_image(decode_image(path.read_bytes()), "").score
                assert result.score == pytest.approx(expected, rel=1e-4, abs=1e-5)
                assert (result.model.name, result.model.version) == (store.model_name, store.version)
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/score", content=defect.read_bytes(),
                           headers={"content-type": "image/png"}, timeout=30)
        assert reply.status_code == 200, reply.text
        expected = model.score_image(decode_image(defect.read_bytes()), "").score
        assert reply.json()["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)

        # The image's own HEALTHCHECK (gRPC health: SERVING) passes; so does the liveness service.
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, f"HEALTHCHECK: {health.stdout}{health.stderr}"
        liveness = podman("exec", name, "python", "/opt/healthcheck.py", "liveness")
        assert liveness.stdout.strip() == "gRPC server: SERVING"

        # The same image as the HTTP gateway in front of it: scores, and its HEALTHCHECK asks /healthz.
        gateway_port = free_port()
        podman("run", "--detach", "--name", f"{name}-gw", "--network=host", "--timeout", "600",
               "--env", "ANOMALY_HTTP_HOST=127.0.0.1", serve_image, "gateway", "--port", str(gateway_port),
               "--grpc-target", target)
        wait_http_ready(f"http://127.0.0.1:{gateway_port}/readyz", timeout=60)
        reply = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/score", content=good.read_bytes(),
                           headers={"content-type": "image/png"}, timeout=30)
        assert reply.status_code == 200, reply.text
        expected = model.score_image(decode_image(good.read_bytes()), "").score
        assert reply.json()["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        health = podman("healthcheck", "run", f"{name}-gw", check=False)
        assert health.returncode == 0, f"gateway HEALTHCHECK: {health.stdout}{health.stderr}"
        said = podman("exec", f"{name}-gw", "python", "/opt/healthcheck.py").stdout.strip()
        assert said == "gateway: SERVING"
        podman("stop", "--time", "10", f"{name}-gw", timeout=30)

        # Not root: the image's user, and the serving process runs as it.
        assert podman("exec", name, "id", "-u").stdout.strip() == str(APP_UID)
        status = podman("exec", name, "cat", "/proc/1/status").stdout
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(APP_UID)}, uid_line
        # Small: no torch, no compiler.
        podman("exec", name, "python", "-c",
               "import importlib.util as u; assert u.find_spec('torch') is None")
        compilers = podman("exec", name, "sh", "-c", "command -v cc gcc g++ clang", check=False)
        assert compilers.stdout.strip() == "", compilers.stdout

        # SIGTERM (podman stop) drains and exits 0.
        podman("stop", "--time", "30", name, timeout=60)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        # One call per container: given several names, Debian's podman 4.3 removes none of
        # them when one does not exist (the gateway, if the test failed before starting it).
        for container in (name, f"{name}-gw"):
            podman("rm", "--force", "--ignore", "--time", "5", container, check=False)
