"""HTTP gateway: a thin FastAPI translator in front of the gRPC server (its own process,
or the server's with `ANOMALY_HTTP_IN_PROCESS`: `service.protocol.inprocess`).

It holds no model logic: every call is forwarded over gRPC (or, in the server's own
process, to its handlers), and failures map to HTTP codes with RFC 9457 problem+json bodies
from one table (`service.protocol.rest.forwarding`). Request bodies are bounded while they stream
in, and their memory is budgeted (`service.protocol.rest.http_body`). Client text protobuf cannot carry
(a lone surrogate) answers 400 naming the field; a client that hangs up mid-upload is
logged at INFO, without a traceback. An unforeseen error answers 500 with a reference to
the log line, never the error's text. Routes:

- `POST /v1/score` — multipart (`image` file + form fields) or a raw image body
  (`image/*` / `application/octet-stream`, options as query parameters)
- `GET /v1/models`, `GET /v1/models/{name}?alias=&version=`
- `POST /v1/feedback` — an operator's verdict on a part scored earlier (JSON)
- `GET /healthz` (process up), `GET /readyz` (gRPC server reports SERVING)
- `GET /metrics` (Prometheus: requests by route and status, latency)
- the Open Inference Protocol (V2) under `/v2/…` (`service.protocol.rest.oip`)

This module is longer than most (about 450 lines): the `/v1` routes, their response schemas (checked
against the proto in tests/contract/test_layers.py) and the app's error handlers, one per kind of
failure, so that every HTTP answer of the API is shaped in this one file.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from anomaly.channel import grpc_channel
from anomaly.http_json import to_json
from anomaly.oip import inference_pb2_grpc as v2_grpc
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from anomaly.wire import TIMING_KEYS, identifier_problem
from service import tracing
from service.dataplane.budget import MemoryBudget
from service.protocol.grpc.options import gateway_options
from service.protocol.rest import http_body, review
from service.protocol.rest import oip as oip_rest
from service.protocol.rest.forwarding import GrpcBackend, Problem, error_response, forward, reserved_body
from service.settings import Settings

if TYPE_CHECKING:  # the in-process server's backends, only ever passed in: the gateway never loads them
    from service.protocol.inprocess import LocalBackends

log = logging.getLogger(__name__)
MAX_VERSION = 2**32 - 1  # the proto's uint32
# A client's own id for a request (as proxies and MES software send it): the part's
# request id when the query or form gives none, and echoed on every answer (on a score,
# the id the part was logged under, the server's own when the client sent none).
REQUEST_ID_HEADER = "x-request-id"

HTTP_REQUESTS = Counter("anomaly_http_requests_total", "Gateway requests", ["route", "status"])
HTTP_LATENCY = Histogram("anomaly_http_request_duration_seconds", "Gateway request latency", ["route"],
                         buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5.0))

# The response schemas (for the OpenAPI document and response validation). The JSON itself
# is `anomaly.http_json.to_json` of the server's proto answer, which the SDK reads back the
# same way; tests/contract/test_layers.py checks that these fields are the proto's.


class ModelRefOut(BaseModel):
    """The model version that answered."""

    name: str
    version: str
    alias: str = ""
    architecture: str = ""
    variant: str = ""


TimingsOut = create_model("TimingsOut", __doc__="Server-side timings in milliseconds.",
                          **{key: (float, 0.0) for key in TIMING_KEYS})


class ScoreOut(BaseModel):
    """Result of `POST /v1/score`."""

    request_id: str
    score: float
    normalized_score: float = Field(ge=0, le=1)
    is_anomalous: bool
    threshold: float
    category: str
    anomaly_map_png_base64: str | None = None
    model: ModelRefOut
    timings: TimingsOut  # type: ignore[valid-type]
    threshold_source: str = "model"
    overlay_png_base64: str | None = None


class TilingOut(BaseModel):
    """How a tiled model covers a large image."""

    image_height: int
    image_width: int
    stride: int


class ModelOut(BaseModel):
    """A model version as the server describes it."""

    ref: ModelRefOut
    input_height: int
    input_width: int
    categories: list[str]
    thresholds: dict[str, float]
    provider: str
    precision: str
    loaded_at: str
    source_uri: str
    state: str = "SERVING"
    last_error: str = ""
    last_error_version: str = ""
    max_image_bytes: int = 0
    threshold_sources: dict[str, str] = Field(default_factory=dict)
    tiling: TilingOut | None = None


class FeedbackIn(BaseModel):
    """Body of `POST /v1/feedback`: an operator's verdict on a part scored earlier."""

    request_id: str = Field(description="the request id of the scored part, as answered")
    verdict: str = Field(description='"OK" (good part) or "NG" (defective)')
    defect_type: str = Field("", description="e.g. scratch; empty for a good part")
    operator: str = Field("", description="who checked the part")
    comment: str = ""
    station: str = Field("", description="where it was checked")


class FeedbackOut(BaseModel):
    """Result of `POST /v1/feedback`."""

    request_id: str
    recorded_at: str


def _header_request_id(request: Request) -> str:
    """The part's id from `X-Request-ID`, read as UTF-8 (HTTP gives header bytes as Latin-1),
    or "" when there is none or it cannot be one (over 128 characters, not printable, not
    UTF-8): a proxy's own long trace id is then no reason to refuse the part; the server
    names it instead, and the answer's header says which."""
    raw = request.headers.get(REQUEST_ID_HEADER, "")
    try:
        value = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return ""
    return "" if identifier_problem("request_id", value) else value


def _flag(value: str | bool | None) -> bool:
    if isinstance(value, bool):
        return value
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _version(value: str | int | None) -> int:
    try:
        version = int(value or 0)
    except ValueError:
        raise Problem(400, "Invalid Argument", f"version must be an integer, got {value!r}",
                      "INVALID_ARGUMENT") from None
    if not 0 <= version <= MAX_VERSION:
        raise Problem(400, "Invalid Argument", f"version must be between 0 and {MAX_VERSION}, got {version}",
                      "INVALID_ARGUMENT")
    return version


def _texts(fields: dict[str, object]) -> None:
    """Check that the client's text `fields` can go into a protobuf string (UTF-8: no lone
    surrogate, as a JSON escape of U+D800 or some multipart charsets produce).

    Raises:
        Problem: 400 naming the first field that cannot.
    """
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Problem(400, "Invalid Argument", f"{name} is not valid UTF-8 text ({exc.reason} at "
                          f"position {exc.start})", "INVALID_ARGUMENT") from None


async def _read_image(request: Request, ctype: str, fields: dict[str, object]) -> bytes:
    """The image bytes of a score request (raw body or the multipart `image` part), bounded
    while they stream in; multipart text fields override `fields`."""
    limit = http_body.body_limit(request, request.app.state.settings.max_image_bytes)
    if ctype != "multipart/form-data":
        return await http_body.read_body(request, limit)
    form = await http_body.read_form(request, limit)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise Problem(400, "Invalid Argument", "multipart body needs a file field named 'image'",
                      "INVALID_ARGUMENT")
    data = await upload.read()
    await form.close()
    for key in fields:
        if key in form and isinstance(form[key], str) and form[key] != "":
            fields[key] = form[key]
    return data


router = APIRouter()


def _header(text: str) -> str:
    """`text` as a header value: its UTF-8 bytes (HTTP carries header values as Latin-1)."""
    return text.encode("utf-8").decode("latin-1")


def _overlay_answer(answer: pb.ScoreResponse) -> Response:
    """`render=overlay`: the overlay PNG as the body, the decision in `X-Anomaly-*` headers."""
    ref = answer.model
    return Response(answer.overlay_png, media_type="image/png", headers={
        "X-Anomaly-Decision": "NG" if answer.is_anomalous else "OK",
        "X-Anomaly-Score": repr(answer.score), "X-Anomaly-Normalized-Score": repr(answer.normalized_score),
        "X-Anomaly-Threshold": repr(answer.threshold), "X-Anomaly-Category": _header(answer.category),
        "X-Anomaly-Threshold-Source": _header(answer.threshold_source),
        "X-Anomaly-Model": _header(f"{ref.name}/{ref.version}"), "Cache-Control": "no-store"})


@router.post("/v1/score", response_model=ScoreOut, responses={
    200: {"content": {"image/png": {}}, "description": "the decision (JSON), or with `render=overlay` the "
          "image with its heat map (PNG) and the decision in X-Anomaly-* headers"},
    400: {"description": "bad image or fields (problem+json)"},
    404: {"description": "unknown model, alias or version"},
    429: {"description": "server overloaded"},
    503: {"description": "server not ready"},
})
async def score(
    request: Request,
    model: Annotated[str, Query(description="registered model name")] = "",
    alias: Annotated[str, Query(description="alias, e.g. champion")] = "",
    version: Annotated[str, Query(description="version number")] = "",
    category: Annotated[str, Query(description="product category")] = "",
    return_anomaly_map: Annotated[bool, Query(description="include the heat map")] = False,
    request_id: Annotated[str, Query(description="client part / serial id")] = "",
    station: Annotated[str, Query(description="inspection station / line (inspection log)")] = "",
    return_overlay: Annotated[bool, Query(description="include the image with its heat map "
                                                      "(overlay_png_base64)")] = False,
    render: Annotated[Literal["json", "overlay"], Query(
        description="json: the decision as JSON; overlay: the image with its heat map and the region "
                    "at the threshold outlined, as a PNG (the decision in X-Anomaly-* headers)")] = "json",
) -> dict | Response:
    """Score one image: multipart upload (`image` field) or raw image bytes as the body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, object] = {"model": model, "alias": alias, "version": version,
                                 "category": category, "return_anomaly_map": return_anomaly_map,
                                 "request_id": request_id or _header_request_id(request),
                                 "station": station, "return_overlay": return_overlay or render == "overlay"}
    if ctype != "multipart/form-data" and not (ctype.startswith("image/") or
                                               ctype == "application/octet-stream"):
        raise Problem(415, "Unsupported Media Type",
                      f"content type {ctype or '(none)'!r}: send multipart/form-data with an "
                      "'image' file, or the image bytes as image/* or application/octet-stream")
    settings = request.app.state.settings
    async with reserved_body(request, http_body.body_limit(request, settings.max_image_bytes)):
        data = await _read_image(request, ctype, fields)
        if len(data) > settings.max_image_bytes:
            raise Problem(413, "Payload Too Large", f"image is {len(data)} bytes; the limit is "
                          f"{settings.max_image_bytes}", "INVALID_ARGUMENT")
        _texts(fields)
        message = pb.ScoreRequest(
            encoded=data, model=str(fields["model"]), alias=str(fields["alias"]),
            version=_version(fields["version"]), category=str(fields["category"]),
            return_anomaly_map=_flag(fields["return_anomaly_map"]),  # type: ignore[arg-type]
            return_overlay=render == "overlay" or _flag(fields["return_overlay"]),  # type: ignore[arg-type]
            request_id=str(fields["request_id"]), station=str(fields["station"]),
        )
        del data
        answer = await forward(request, request.app.state.v1, "Score", message)
        request.state.request_id = answer.request_id  # type: ignore[attr-defined]
        if render == "overlay":
            return _overlay_answer(answer)  # type: ignore[arg-type]
        return to_json(answer)  # type: ignore[arg-type]


@router.get("/v1/models", response_model=list[ModelOut])
async def list_models(request: Request) -> list[dict]:
    """The model versions the server has loaded."""
    resp = await forward(request, request.app.state.v1, "ListModels", pb.ListModelsRequest())
    return to_json(resp)["models"]  # type: ignore[arg-type]


@router.get("/v1/models/{name}", response_model=ModelOut)
async def get_model(request: Request, name: str, alias: str = "", version: str = "") -> dict:
    """Describe one model version (resolving `alias` or `version`; default alias otherwise)."""
    _texts({"name": name, "alias": alias})
    msg = pb.GetModelRequest(model=name, alias=alias, version=_version(version))
    return to_json(await forward(request, request.app.state.v1, "GetModel", msg))  # type: ignore[arg-type]


@router.post("/v1/feedback", response_model=FeedbackOut, responses={
    400: {"description": "bad verdict or fields, or the server keeps no inspection log (problem+json)"},
})
async def feedback(request: Request, body: FeedbackIn) -> dict:
    """Record an operator's verdict on a part scored earlier (kept in the inspection log)."""
    fields = body.model_dump()
    _texts(fields)
    message = pb.FeedbackRequest(**fields)
    return to_json(await forward(request, request.app.state.v1, "Feedback", message))  # type: ignore[arg-type]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, str]:
    """Readiness: the gRPC server behind reports SERVING."""
    try:
        resp = await request.app.state.health.call("Check", health_pb2.HealthCheckRequest(service=""),
                                                   2.0, ())
    except Problem as exc:
        raise Problem(503, "Service Unavailable", f"gRPC server unreachable: {exc.grpc_code or exc.status}",
                      exc.grpc_code) from exc
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise Problem(503, "Service Unavailable", f"gRPC server is {status}", "UNAVAILABLE")
    return {"status": status}


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus exposition of the gateway's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None, local: LocalBackends | None = None) -> FastAPI:
    """Build the gateway app. It connects to `settings.grpc_target` on start-up, or, given
    `local` (the in-process server's backends, `service.protocol.inprocess`), calls that
    server's handlers in its own process: the same routes and answers, without the hop."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        app.state.settings = settings
        app.state.body_budget = MemoryBudget(settings.http_body_memory_mb * 1024 * 1024)
        if local is not None:
            app.state.v1, app.state.v2, app.state.health = local.v1, local.v2, local.health
            yield
            return
        # round_robin: with a `dns:///` target naming several server replicas (compose,
        # a headless Kubernetes Service), requests spread over all of them.
        # One connection per `grpc_connections` (each its own subchannel pool), calls in
        # turn over them: with `anomaly serve --processes N` on the other side, the kernel
        # gives each connection to one server process.
        own = [("grpc.use_local_subchannel_pool", 1)] if settings.grpc_connections > 1 else []
        channels = [grpc_channel(
            settings.grpc_target, aio=True,
            options=[*gateway_options(settings), ("grpc.lb_policy_name", "round_robin"), *own],
            tls=(settings.grpc_tls_ca_file, settings.grpc_client_cert_file, settings.grpc_client_key_file),
            interceptors=tracing.client_interceptors())
            for _ in range(settings.grpc_connections)]
        app.state.channel = channels[0]
        app.state.v1 = GrpcBackend([pb_grpc.AnomalyDetectionStub(c) for c in channels])
        app.state.v2 = GrpcBackend([v2_grpc.GRPCInferenceServiceStub(c) for c in channels])
        app.state.health = GrpcBackend([health_pb2_grpc.HealthStub(channels[0])])
        yield
        for channel in channels:
            await channel.close()

    app = FastAPI(title="Anomaly detection gateway", version="1.0",
                  description="HTTP front of the anomaly.v1 gRPC service", lifespan=lifespan)
    app.include_router(router)
    app.include_router(oip_rest.router)
    app.include_router(review.router)
    tracing.instrument_app(app)

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        response = await call_next(request)
        answered = getattr(request.state, "request_id", "")
        if answered:  # header values travel as bytes: the id's UTF-8, as a client sends it
            response.headers[REQUEST_ID_HEADER] = _header(answered)
        elif REQUEST_ID_HEADER in request.headers:  # echoed as it came
            response.headers[REQUEST_ID_HEADER] = request.headers[REQUEST_ID_HEADER]
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        HTTP_LATENCY.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return error_response(request, exc.status, exc.title, exc.detail, exc.grpc_code)

    @app.exception_handler(http_body.BodyTooLarge)
    async def _too_large(request: Request, exc: http_body.BodyTooLarge) -> JSONResponse:
        return error_response(request, 413, "Payload Too Large", str(exc), "INVALID_ARGUMENT")

    @app.exception_handler(http_body.BodyTimeout)
    async def _body_timeout(request: Request, exc: http_body.BodyTimeout) -> JSONResponse:
        response = error_response(request, 408, "Request Timeout", str(exc), "DEADLINE_EXCEEDED")
        response.headers["connection"] = "close"  # the rest of the body is not read
        return response

    @app.exception_handler(http_body.BadBody)
    async def _bad_body(request: Request, exc: http_body.BadBody) -> JSONResponse:
        return error_response(request, 400, "Invalid Argument", str(exc), "INVALID_ARGUMENT")

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # Not the gateway's fault and nothing to debug: no traceback. 499 (nginx's "client
        # closed request") is never sent; it labels the request in the metrics.
        client = request.client.host if request.client else "?"
        log.info("client %s disconnected before its request body arrived (%s %s); dropped", client,
                 request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), str(exc.detail))

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "Unprocessable Content", str(exc.errors()),
                                 "INVALID_ARGUMENT")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex
        log.error("internal error on %s %s (request_id=%s)", request.method, request.url.path, ref,
                  exc_info=exc)
        return error_response(request, 500, "Internal Server Error",
                                 f"internal error; the gateway log has the details under request_id={ref!r}",
                                 "INTERNAL")

    return app
