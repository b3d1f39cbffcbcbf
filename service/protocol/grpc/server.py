"""The gRPC server: a thin translator between `anomaly.v1` messages and the data plane,
beside the Open Inference Protocol (V2) service on the same port (`service.protocol.grpc.oip`).

Also serves the standard `grpc.health.v1` health service (NOT_SERVING until the default
model is warm) and server reflection (`ANOMALY_REFLECTION=false` turns it off). `stop`
drains in-flight requests for `grace_s` seconds (`service.main` runs the process and calls
it on SIGTERM/SIGINT).

Bounds (`service.protocol.grpc.admission`): at most `max_concurrent_rpcs` unary anomaly.v1 and V2 calls
run at once, `max_streams` ScoreStreams and `max_watch_streams` health Watch and reflection
streams are open at once (beyond, RESOURCE_EXHAUSTED at once; health Check and V2
liveness/readiness are never capped, so probes keep answering under load; calls without a
valid key are refused before they take a slot; no refusal waits for the request message, and
a call whose message does not arrive within `request_read_timeout_s` ends with
DEADLINE_EXCEEDED and frees its slot), messages are at most `max_image_bytes`
(+64 KiB), and a ScoreStream reads its next image only while the images it has in flight
total less than `max_image_bytes`. An unexpected error answers
INTERNAL with the request id, never the error's text (which goes to the log).

With `ANOMALY_HTTP_IN_PROCESS=true` the same process also answers the HTTP API (the
gateway's routes, calling these servicers' handlers directly: `service.protocol.inprocess`,
`service.main`). A handler raises `ServiceError`; `answering` makes it the call's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from anomaly.oip import inference_pb2_grpc as v2_grpc
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from anomaly.wire import TIMING_KEYS
from service import metrics, tracing
from service.dataplane.data_plane import DataPlane, LoadedModel, RawPixels, ScoreInput, ScoreOutput, Verdict
from service.dataplane.review import ReviewFilter
from service.errors import InvalidInput, ServiceError, answering, internal_error
from service.protocol.grpc import oip
from service.protocol.grpc.admission import Admission, grpc_backstop
from service.protocol.grpc.oip import InferenceServicer
from service.protocol.grpc.options import grpc_options
from service.protocol.grpc.review import instant, period_days, promotion, quality_report, review_item
from service.protocol.grpc.security import (
    ApiKeyInterceptor,
    caller,
    describe_keys,
    exposure_warning,
    load_api_keys,
    server_credentials,
)
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AnomalyDetection"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"  # health service name that is SERVING while the process answers
STREAM_WINDOW = 16
_BITS = {pb.PIXEL_TYPE_UNSPECIFIED: 8, pb.PIXEL_TYPE_UINT8: 8, pb.PIXEL_TYPE_UINT16: 16}


def to_score_input(req: pb.ScoreRequest, time_remaining: float | None = None) -> ScoreInput:
    """Proto request → data-plane input (with the call's deadline, if any)."""
    kind = req.WhichOneof("image")
    raw = None
    if kind == "raw":
        r = req.raw
        raw = RawPixels(r.data, r.width, r.height, r.channels, _BITS.get(r.dtype, 0))
    return ScoreInput(
        encoded=req.encoded if kind == "encoded" else None, raw=raw,
        model=req.model, alias=req.alias, version=req.version, category=req.category,
        return_anomaly_map=req.return_anomaly_map, return_overlay=req.return_overlay,
        request_id=req.request_id, station=req.station,
        deadline=time.monotonic() + time_remaining if time_remaining is not None else None,
    )


def model_ref(loaded: LoadedModel, alias: str = "") -> pb.ModelRef:
    """Loaded model → `ModelRef`."""
    return pb.ModelRef(name=loaded.name, version=loaded.version, alias=alias,
                       architecture=loaded.metadata.architecture, variant=loaded.metadata.variant)


def model_info(loaded: LoadedModel, alias: str = "", error: tuple[str, str] | None = None,
               max_image_bytes: int = 0) -> pb.ModelInfo:
    """Loaded model → `ModelInfo` (with the alias's last failed move, if any, and the
    server's image size limit)."""
    md = loaded.metadata
    thresholds = loaded.model.thresholds()
    return pb.ModelInfo(
        max_image_bytes=max_image_bytes,
        state="SERVING", last_error=error[1] if error else "", last_error_version=error[0] if error else "",
        ref=model_ref(loaded, alias or ",".join(sorted(loaded.aliases))),
        input_height=md.input_height, input_width=md.input_width,
        categories=md.categories, thresholds={c: t for c, (t, _) in thresholds.items()},
        threshold_sources={c: source for c, (_, source) in thresholds.items()},
        provider=loaded.model.provider, precision=md.precision,
        loaded_at=loaded.loaded_at.isoformat(), source_uri=loaded.source_uri,
        tiling=pb.Tiling(image_height=md.tiling.image_height, image_width=md.tiling.image_width,
                         stride=md.tiling.stride) if md.tiling else None,
    )


def to_score_response(out: ScoreOutput) -> pb.ScoreResponse:
    """Data-plane output → proto response."""
    d = out.decision
    return pb.ScoreResponse(
        request_id=out.request_id, score=d.score, normalized_score=d.normalized_score,
        is_anomalous=d.is_anomalous, threshold=d.threshold, category=d.category,
        threshold_source=d.threshold_source, overlay_png=d.overlay_png,
        anomaly_map_png=d.anomaly_map_png, model=model_ref(out.model, out.alias),
        timings=pb.Timings(**{k: out.timings.get(k, 0.0) for k in TIMING_KEYS}),
    )


class AnomalyServicer(pb_grpc.AnomalyDetectionServicer):
    """Implements `anomaly.v1.AnomalyDetection` on top of a `DataPlane`.

    Args:
        plane: the data plane.
        who: names the sender of a call (its API key's name; `security.caller`).
    """

    def __init__(self, plane: DataPlane,
                 who: Callable[[grpc.aio.ServicerContext], str] = lambda context: "anonymous") -> None:
        self.plane = plane
        self.who = who

    async def _score(self, request: pb.ScoreRequest,
                     context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        model = request.model or self.plane.settings.model_name
        if model not in {m.name for m in self.plane.list_models()}:
            model = "other"  # bounded label values: clients cannot mint metric series
        try:
            out = await self.plane.score(to_score_input(request, context.time_remaining()))
        except ServiceError as exc:
            metrics.REQUESTS.labels(model, exc.code.name).inc()
            raise
        except Exception as exc:
            metrics.REQUESTS.labels(model, "INTERNAL").inc()
            raise internal_error(exc, request.request_id) from exc
        metrics.REQUESTS.labels(model, "OK").inc()
        return to_score_response(out)

    @answering
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:  # noqa: N802, D102
        return await self._score(request, context)

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        """Pipelined: up to `STREAM_WINDOW` images in flight, answers in request order, each
        sent as soon as it and those before it are done (a client may wait for every answer
        before sending the next image, or keep sending).

        A request that fails ends the stream with its status (message names its request id).
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        order: asyncio.Queue[tuple[pb.ScoreRequest, asyncio.Task] | None] = asyncio.Queue()
        held = [0]  # bytes of the images in flight
        drained = asyncio.Event()
        byte_limit = self.plane.settings.max_image_bytes

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    while held[0] >= byte_limit:  # big images: wait before reading the next one
                        drained.clear()
                        await drained.wait()
                    held[0] += request.ByteSize()
                    order.put_nowait((request, asyncio.create_task(self._score(request, context))))
            finally:
                order.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await order.get()) is not None:
                request, task = item
                try:
                    response = await task
                except ServiceError as exc:
                    await context.abort(exc.code, f"request_id={request.request_id!r}: {exc.message}")
                held[0] -= request.ByteSize()
                drained.set()
                window.release()
                yield response
            await reader  # re-raises what ended the request stream, if it failed
        finally:
            reader.cancel()
            while not order.empty():
                item = order.get_nowait()
                if item is not None:
                    item[1].cancel()

    @answering
    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802, D102
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        limit = self.plane.settings.max_image_bytes
        return pb.ListModelsResponse(models=[model_info(m, max_image_bytes=limit)
                                             for m in self.plane.list_models()])

    @answering
    async def GetModel(self, request: pb.GetModelRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Describe a version; a watched alias that serves nothing is described as
        NOT_SERVING with the reason (`last_error`), not as an error."""
        spec = self.plane.spec(request.model, request.alias, request.version)
        repo = self.plane.repository
        error = repo.errors.get((spec.name, spec.alias)) if spec.alias else None
        watched = spec.alias and repo.watched(spec.name, spec.alias)
        if watched and repo.current(spec.name, spec.alias) is None:
            version, message = error or ("", "not loaded yet")
            return pb.ModelInfo(ref=pb.ModelRef(name=spec.name, alias=spec.alias), state="NOT_SERVING",
                                last_error=message, last_error_version=version,
                                max_image_bytes=self.plane.settings.max_image_bytes)
        loaded = await self.plane.get(spec, time.monotonic() + (context.time_remaining() or 30.0))
        return model_info(loaded, spec.alias, error, self.plane.settings.max_image_bytes)

    @answering
    async def Feedback(self, request: pb.FeedbackRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        """Record an operator's verdict on a past request id (durable before the answer), with
        who sent it."""
        verdict = Verdict(request.request_id, request.verdict.strip().upper(), request.defect_type,
                          request.operator, request.comment, request.station, sender=self.who(context))
        at = await self.plane.feedback(verdict)
        return pb.FeedbackResponse(request_id=request.request_id, recorded_at=at.isoformat())


    @answering
    async def ListReviews(self, request: pb.ListReviewsRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.ListReviewsResponse:
        """The review queue (`service.inspection.review`)."""
        wanted = ReviewFilter(request.station, request.category, request.model_version,
                              instant(request.since, "since"), instant(request.until, "until"),
                              request.limit, request.include_reviewed)
        rows = await self.plane.review.queue(wanted)
        return pb.ListReviewsResponse(items=[review_item(row, kept) for row, kept in rows])

    @answering
    async def GetEvidence(self, request: pb.GetEvidenceRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.Evidence:
        """One part for review, with its evidence drawn (`service.dataplane.review`)."""
        if request.drawings not in ("", "overlay", "layers"):
            raise InvalidInput(f"drawings must be '', 'overlay' or 'layers', got {request.drawings[:40]!r}")
        part = await self.plane.review.part(request.record_id, request.drawings)
        return pb.Evidence(item=review_item(part.row, part.kept), image=part.image,
                           image_type=part.image_type, heat_png=part.heat_png, overlay_png=part.overlay_png)


    @answering
    async def GetQuality(self, request: pb.GetQualityRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.QualityReport:
        """The quality view: per day, version and category, and the threshold proposals."""
        days = period_days(request.days, 14)
        return quality_report(await self.plane.review.quality(days, request.station))

    @answering
    async def GetPromotion(self, request: pb.GetPromotionRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.Promotion:
        """The promotion view (`service.dataplane.promotion`)."""
        return promotion(await self.plane.promotion.view(period_days(request.days, 7)))


class GrpcServer:
    """The assembled server: data plane, servicer, health, reflection.

    Use `await start()` then `await wait()`; `await stop()` drains and shuts down.
    """

    def __init__(self, settings: Settings, plane: DataPlane | None = None) -> None:
        self.settings = settings
        self.plane = plane or DataPlane(settings)
        self.health = health.aio.HealthServicer()
        keys = load_api_keys(settings)
        self.keys = bool(keys)
        self.keyring = ApiKeyInterceptor(keys) if keys else None
        self.admission = Admission(settings)
        # The key and role check first: a call it refuses never takes an admission slot.
        interceptors = [self.keyring, self.admission] if self.keyring else [self.admission]
        # gRPC's own cap (it counts every call from its headers, before any interceptor): a
        # backstop well above the sum of ours, so ours refuse first and health checks still
        # answer while half-open calls (each ended after the read timeout) stay below it.
        # SO_REUSEPORT only for the children of `processes`: a lone server must fail loudly
        # on a port already in use rather than share it with whatever holds it.
        reuse = [("grpc.so_reuseport", 1 if settings.process_index >= 0 else 0)]
        # Tracing's interceptor (none when off) outermost: the caller's trace covers refusals too.
        # In-process HTTP calls the servicers without it: their trace is the HTTP request's.
        self.server = grpc.aio.server(options=[*grpc_options(settings), *reuse],
                                      interceptors=[*tracing.server_interceptors(), *interceptors],
                                      maximum_concurrent_rpcs=grpc_backstop(settings))
        if keys:
            log.info(describe_keys(keys))
        self.interceptors = interceptors
        self.servicer = AnomalyServicer(self.plane, partial(caller, self.keyring))
        self.v2_servicer = InferenceServicer(self.plane)
        pb_grpc.add_AnomalyDetectionServicer_to_server(self.servicer, self.server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(self.v2_servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, oip.SERVICE_NAME, HEALTH_SERVICE,
                 reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING), load the watched models, then
        report SERVING. If the default model cannot be loaded yet, the server stays
        NOT_SERVING while the watcher retries, and turns SERVING when it succeeds.

        Returns:
            The bound port.
        """
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        warning = exposure_warning(self.settings.grpc_host, self.keys)
        if warning:
            log.warning(warning)
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
            log.info("TLS on%s", " with client certificates required (mTLS)"
                     if self.settings.tls_client_ca_file else "")
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC server to {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        # Liveness (a Kubernetes gRPC liveness probe): the process answers, whether or not a
        # model serves yet; readiness is the "" / anomaly.v1 status.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(self.settings.metrics_port, addr=self.settings.grpc_host)
        log.info("gRPC server listening on %s:%d", self.settings.grpc_host, self.port)
        loop = asyncio.get_running_loop()

        def on_ready_change(ready: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if ready else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            loop.create_task(self._set_health(status))
            log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")

        self.plane.on_ready_change = on_ready_change
        if await self.plane.start():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            current = self.plane.repository.current(self.settings.model_name, self.settings.model_alias)
            log.info("serving %s@%s = version %s", self.settings.model_name,
                     self.settings.model_alias, current.version if current else "?")
        else:
            log.error("default model %s@%s is not loaded yet (see errors above); NOT_SERVING "
                      "until the watcher loads it", self.settings.model_name, self.settings.model_alias)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, drain in-flight calls for `grace` seconds, stop."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.settings.grace_s if grace is None else grace
        await self.server.stop(grace)
        await self.plane.close(grace)

    async def wait(self) -> None:
        """Block until the server terminates."""
        await self.server.wait_for_termination()
