r"""Locust load test: a gRPC user and an HTTP user scoring real sample images.

Both draw from one pool of real images (good and defective test images of an
MVTec-AD-layout folder, the demo's `.demo/data` by default). Every gRPC call is reported to
Locust's `request` event with its real latency, response size and error, so Locust's stats
and failure table are the server's truth; HTTP goes through Locust's own `HttpUser`.

Headless, bounded, loopback (what docs/operations.md and the tests run)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s \\
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051 \\
        --images .demo/data --csv runs/locust --html runs/locust.html

Options (also `LOCUST_<NAME>` environment variables, as Locust parses them):
`--grpc-target`, `--images`, `--model`, `--alias`, `--category-from-path`, `--max-images`.
Pick the user class with Locust's usual class arguments (`GrpcUser`, `HttpScoreUser`);
both run by default.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, between, events, task

from anomaly.channel import grpc_channel
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from anomaly.wire import IMAGE_SUFFIXES

grpc_gevent.init_gevent()  # gRPC's C core must cooperate with Locust's gevent loop


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # noqa: ANN001
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="gRPC server host:port")
    parser.add_argument("--images", default=".demo/data",
                        help="folder of images (an MVTec-AD layout: test/ images are used)")
    parser.add_argument("--model", default="", help="registered model name (server default if empty)")
    parser.add_argument("--alias", default="", help="alias to score with (server default if empty)")
    parser.add_argument("--max-images", type=int, default=256, help="images kept in memory")
    parser.add_argument("--category-from-path", action="store_true", default=False,
                        help="send each image's category (its top folder) for per-category thresholds")


def load_pool(root: str | Path, max_images: int = 256) -> list[tuple[str, bytes]]:
    """Real images under `root` as (category, bytes): test images (good and defective) of an
    MVTec-AD layout when there are any, else every image file; never ground-truth masks.

    Raises:
        FileNotFoundError: no image under `root`.
    """
    root = Path(root)
    files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
             and "ground_truth" not in p.parts]
    test = [p for p in files if "test" in p.relative_to(root).parts]
    files = test or files
    if not files:
        raise FileNotFoundError(f"no images under {root.resolve()}")
    random.Random(0).shuffle(files)
    return [(p.relative_to(root).parts[0], p.read_bytes()) for p in files[:max_images]]


_POOL: list[tuple[str, bytes]] = []


@events.init.add_listener
def _load(environment, **_: object) -> None:  # noqa: ANN001
    opts = environment.parsed_options
    if opts is not None and not _POOL:
        _POOL.extend(load_pool(opts.images, opts.max_images))


def _pick(opts) -> tuple[str, bytes]:  # noqa: ANN001
    category, data = random.choice(_POOL)
    return (category if opts.category_from_path else ""), data


class GrpcUser(User):
    """Scores images over gRPC; each call is one Locust request named `Score`."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:  # noqa: D102
        opts = self.environment.parsed_options
        self.channel = grpc_channel(opts.grpc_target, aio=False)
        self.stub = pb_grpc.AnomalyDetectionStub(self.channel)

    def on_stop(self) -> None:  # noqa: D102
        self.channel.close()

    @task
    def score(self) -> None:
        """One `Score` call, reported to Locust with its status."""
        opts = self.environment.parsed_options
        category, data = _pick(opts)
        req = pb.ScoreRequest(encoded=data, model=opts.model, alias=opts.alias, category=category)
        start = time.perf_counter()
        exc: Exception | None = None
        size = 0
        try:
            size = self.stub.Score(req, timeout=30).ByteSize()
        except grpc.RpcError as err:
            exc = err
        self.environment.events.request.fire(
            request_type="grpc", name="Score", response_time=(time.perf_counter() - start) * 1e3,
            response_length=size, exception=exc, context={})


class HttpScoreUser(HttpUser):
    """Scores images through the HTTP gateway (`POST /v1/score` with the raw image body)."""

    wait_time = between(0.0, 0.01)

    @task
    def score(self) -> None:
        """One `POST /v1/score`; anything but 200 is a failure, with the problem's detail."""
        opts = self.environment.parsed_options
        category, data = _pick(opts)
        params = {k: v for k, v in (("model", opts.model), ("alias", opts.alias),
                                    ("category", category)) if v}
        with self.client.post("/v1/score", data=data, params=params, name="/v1/score",
                              headers={"content-type": "application/octet-stream"},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
