"""Python SDK: `AnomalyClient` (sync) and `AsyncAnomalyClient` (asyncio), over gRPC or HTTP.

Shaped like httpx: `_BaseClient` builds calls, parses answers and decides retries (no I/O);
the two clients mirror each other method for method and differ only in `await`. The target
picks the transport: `host:port` (or `dns:///…`) speaks gRPC to the server, an
`http(s)://` URL speaks HTTP to the gateway, whose JSON is read back into the same proto
message (`anomaly.http_json`), so a result is mapped in one place whichever transport
carried it. Results are typed dataclasses; every failure is an `AnomalyError` carrying the
gRPC status name (the gateway's problem+json carries it too). Both are context managers::

    with AnomalyClient("127.0.0.1:50051") as client:
        result = client.score("part.png", category="brick", request_id="SN-001")
        print(result.is_anomalous, result.model.version)

Retries: `UNAVAILABLE` (server down or restarting), `CANCELLED` (a call caught by a server
shutting down) and `RESOURCE_EXHAUSTED` (queue full) are retried with exponential backoff
and jitter, within the call's deadline (`timeout`, which covers all attempts); a message
over a size limit is `RESOURCE_EXHAUSTED` too but permanent, never retried. Every error
says how to treat it (`AnomalyError.kind`: permanent, server down or transient; the one
classification in `anomaly.wire` that the hot folder uses too). Before sending an image
over 1 MiB the client learns the server's limit (`GetModel`'s `max_image_bytes`, once) and
refuses a bigger one itself. Each `score` carries a request id (generated when not given)
that stays the same across its retries, so the server's log and a caller's records can
de-duplicate. With OpenTelemetry set up in the calling program, each call is a client span
whose W3C trace context travels with it (`edge_anomaly_client.tracecontext`): the gateway's and the
server's spans join the caller's trace.

`score_stream` (gRPC only) scores a sequence of images over one `ScoreStream`, e.g. a line
camera's frames as a generator, and yields the results in input order as they arrive. A
stream is not retried: an error ends it with an `AnomalyError` whose message names the
request id, and the caller resumes with a new stream from that image.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from anomaly.channel import MESSAGE_OPTIONS, grpc_channel
from anomaly.http_json import from_json
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from anomaly.wire import (
    DEFAULT_MODEL_NAME,
    DEFAULT_TARGET,
    PERMANENT_KIND,
    TIMING_KEYS,
    classify,
    identifier_problem,
    too_large,
)
from anomaly.wire import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # re-exported: files treated as images
from edge_anomaly_client import tracecontext

ImageInput = bytes | str | Path
StreamItem = ImageInput | tuple[ImageInput, str]  # an image, or (image, request id)
RETRYABLE = frozenset({"UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"})
CHECK_SIZE_ABOVE = 1 << 20  # images over this are checked against the server's limit first
_RESPONSES = {"Score": pb.ScoreResponse, "ListModels": pb.ListModelsResponse, "GetModel": pb.ModelInfo,
              "Feedback": pb.FeedbackResponse}
_HTTP_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
               415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
               504: "DEADLINE_EXCEEDED"}


class AnomalyError(Exception):
    """The service refused or could not answer a call.

    Attributes:
        code: gRPC status name (`INVALID_ARGUMENT`, `NOT_FOUND`, `UNAVAILABLE`, …).
        message: the server's explanation.
        http_status: the HTTP status, over the gateway.
        attempts: how many attempts were made.
    """

    def __init__(self, code: str, message: str, http_status: int | None = None, attempts: int = 1) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.http_status, self.attempts = code, message, http_status, attempts

    @property
    def retryable(self) -> bool:
        """Whether the SDK retries it within the call's deadline."""
        return self.code in RETRYABLE and not too_large(self.code, self.message)

    @property
    def kind(self) -> str:
        """`permanent`, `server down` or `transient` (`anomaly.wire.classify`)."""
        return classify(self.code, self.message)

    @property
    def permanent(self) -> bool:
        """Whether sending the same request again can never succeed."""
        return self.kind == PERMANENT_KIND


@dataclass(frozen=True)
class ModelRef:
    """The model version that answered."""

    name: str
    version: str
    alias: str = ""
    architecture: str = ""
    variant: str = ""


@dataclass(frozen=True)
class ScoreResult:
    """One image's result."""

    request_id: str
    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    category: str
    model: ModelRef
    anomaly_map_png: bytes = b""
    timings: dict[str, float] = field(default_factory=dict)
    threshold_source: str = "model"  # or the version tag that overrides it, e.g. threshold.bottle
    overlay_png: bytes = b""  # with return_overlay: the image with its heat map (PNG)


@dataclass(frozen=True)
class ModelInfo:
    """A model version as the server describes it."""

    ref: ModelRef
    input_height: int
    input_width: int
    categories: list[str]
    thresholds: dict[str, float]
    provider: str
    precision: str
    loaded_at: str
    source_uri: str
    state: str = "SERVING"  # NOT_SERVING: a watched alias with no version loaded (see last_error)
    last_error: str = ""  # the alias's last failed move (the version above keeps serving)
    last_error_version: str = ""
    max_image_bytes: int = 0  # the largest image the server accepts (0 = not said)
    threshold_sources: dict[str, str] = field(default_factory=dict)  # "model" or the overriding tag
    tiling: tuple[int, int, int] | None = None  # (working height, width, stride) of a tiled model


@dataclass(frozen=True)
class FeedbackResult:
    """The server's acknowledgement of an operator's verdict."""

    request_id: str
    recorded_at: str  # RFC 3339, UTC: when it was made durable


@dataclass(frozen=True)
class _Call:
    """One logical call, in both transports' terms."""

    rpc: str  # gRPC method name
    message: Any  # its request message
    http_method: str
    http_path: str
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    json_body: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:  # noqa: D102
        return {"content-type": "application/octet-stream"} if self.body is not None else None

    @property
    def http_request(self) -> dict[str, Any]:
        """The keyword arguments of `httpx.Client.request` (besides the timeout)."""
        return {"method": self.http_method, "url": self.http_path, "params": self.params,
                "content": self.body, "json": self.json_body, "headers": self.headers}


class _BaseClient:
    """Everything that does no I/O: options, calls, parsing, the retry policy."""

    def __init__(self, target: str = DEFAULT_TARGET, *, model: str = "", alias: str = "",
                 timeout: float = 30.0, retries: int = 3, backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0, api_key: str = "", tls_ca_file: str | Path | None = None,
                 client_cert_file: str | Path | None = None,
                 client_key_file: str | Path | None = None, connections: int = 1) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self.target = target
        self.connections = connections
        self._api_key = api_key  # sent as `x-api-key`; never part of repr or errors
        self._tls = (tls_ca_file, client_cert_file, client_key_file)
        self.http = target.startswith(("http://", "https://"))
        self.model = model
        self.alias = alias
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._max_image_bytes: int | None = None  # learned from the server (0 = it said none)

    def _needs_limit(self, call: _Call) -> bool:
        """Whether the server's size limit must be learned before sending this call."""
        return self._max_image_bytes is None and len(call.body or b"") > CHECK_SIZE_ABOVE

    def _check_size(self, call: _Call) -> None:
        """Refuse, without sending, an image over the server's limit (permanent)."""
        size, limit = len(call.body or b""), self._max_image_bytes
        if limit and size > limit:
            raise AnomalyError("INVALID_ARGUMENT", f"image is {size} bytes; the server accepts at most "
                                                   f"{limit} (checked before sending)")

    @staticmethod
    def _image_bytes(image: ImageInput) -> bytes:
        if isinstance(image, bytes | bytearray | memoryview):
            return bytes(image)
        return Path(image).read_bytes()

    def _score_call(self, image: ImageInput, *, model: str, alias: str, version: int, category: str,
                    return_anomaly_map: bool, request_id: str, station: str,
                    return_overlay: bool = False) -> _Call:
        for name, value in (("request_id", request_id), ("station", station)):
            problem = identifier_problem(name, value)
            if problem:  # what the server would answer, without the round trip
                raise AnomalyError("INVALID_ARGUMENT", problem)
        data = self._image_bytes(image)
        request_id = request_id or uuid.uuid4().hex  # the same for every retry of this call
        fields = {"model": model or self.model, "alias": "" if version else (alias or self.alias),
                  "version": version, "category": category, "request_id": request_id, "station": station}
        message = pb.ScoreRequest(encoded=data, return_anomaly_map=return_anomaly_map,
                                  return_overlay=return_overlay, **fields)
        params = {k: str(v) for k, v in fields.items() if v}
        if return_anomaly_map:
            params["return_anomaly_map"] = "true"
        if return_overlay:
            params["return_overlay"] = "true"
        return _Call("Score", message, "POST", "/v1/score", params, data)

    def _require_grpc(self) -> None:
        """Streaming is gRPC only: raises `AnomalyError` (UNIMPLEMENTED) for an HTTP target."""
        if self.http:
            raise AnomalyError("UNIMPLEMENTED", "score_stream needs a gRPC target (host:port): the "
                                                "HTTP gateway has no streaming endpoint")

    def _stream_message(self, item: StreamItem, **fields: Any) -> pb.ScoreRequest:
        """One `ScoreStream` request."""
        image, request_id = item if isinstance(item, tuple) else (item, "")
        return self._score_call(image, request_id=request_id, **fields).message

    def _list_call(self) -> _Call:
        return _Call("ListModels", pb.ListModelsRequest(), "GET", "/v1/models")

    def _get_call(self, model: str, alias: str, version: int) -> _Call:
        name = model or self.model or DEFAULT_MODEL_NAME  # HTTP paths need a name
        params = {k: str(v) for k, v in (("alias", alias), ("version", version)) if v}
        return _Call("GetModel", pb.GetModelRequest(model=model or self.model, alias=alias, version=version),
                     "GET", f"/v1/models/{name}", params)

    @staticmethod
    def _feedback_call(request_id: str, verdict: str, defect_type: str, operator: str, comment: str,
                       station: str) -> _Call:
        fields = {"request_id": request_id, "verdict": verdict, "defect_type": defect_type,
                  "operator": operator, "comment": comment, "station": station}
        return _Call("Feedback", pb.FeedbackRequest(**fields), "POST", "/v1/feedback", json_body=fields)

    def _grpc_channels(self, aio: bool) -> list[grpc.Channel]:
        """`connections` channels; more than one each get their own subchannel pool, hence
        their own TCP connection: calls then spread over the server processes that share
        the port (`anomaly serve --processes N`: the kernel hands each connection to one)."""
        own = [("grpc.use_local_subchannel_pool", 1)] if self.connections > 1 else []
        return [grpc_channel(self.target, aio=aio, options=[*MESSAGE_OPTIONS, *own], tls=self._tls)
                for _ in range(self.connections)]

    def _next_stub(self) -> pb_grpc.AnomalyDetectionStub:
        """The stub of the next connection, round robin."""
        self._turn = (self._turn + 1) % len(self._stubs)
        return self._stubs[self._turn]

    @property
    def _metadata(self) -> list[tuple[str, str]] | None:
        return [("x-api-key", self._api_key)] if self._api_key else None

    def _call_metadata(self) -> list[tuple[str, str]] | None:
        """The metadata of one gRPC attempt: the key, and the trace context when tracing."""
        trace = tracecontext.headers()
        return [*(self._metadata or []), *trace.items()] if trace else self._metadata

    @staticmethod
    def _http_call(call: _Call) -> dict[str, Any]:
        """`call.http_request` with the trace context's headers when tracing."""
        request, trace = call.http_request, tracecontext.headers()
        if trace:
            request["headers"] = {**(request["headers"] or {}), **trace}
        return request

    @staticmethod
    def _span_attributes(call: _Call) -> dict[str, Any]:
        rid = getattr(call.message, "request_id", "")
        return {"rpc.method": call.rpc, **({"anomaly.request_id": rid} if rid else {})}

    def _http_options(self) -> dict[str, Any]:
        verify: ssl.SSLContext | bool = True
        ca, cert, key = self._tls
        if ca or cert:
            verify = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert:
                verify.load_cert_chain(str(cert), str(key) if key else None)
        return {"base_url": self.target, "timeout": self.timeout, "verify": verify,
                "headers": {"x-api-key": self._api_key} if self._api_key else None}

    # -- parsing: every answer is a proto message here (`_send` reads the gateway's JSON
    # back into one), mapped to the SDK's types once -----------------------------------
    @staticmethod
    def _ref(r: pb.ModelRef) -> ModelRef:
        return ModelRef(r.name, r.version, r.alias, r.architecture, r.variant)

    def _score_result(self, r: pb.ScoreResponse) -> ScoreResult:
        return ScoreResult(r.request_id, r.score, r.normalized_score, r.is_anomalous, r.threshold,
                           r.category, self._ref(r.model), r.anomaly_map_png,
                           {k: getattr(r.timings, k) for k in TIMING_KEYS}, r.threshold_source or "model",
                           r.overlay_png)

    def _model_info(self, m: pb.ModelInfo) -> ModelInfo:
        return ModelInfo(self._ref(m.ref), m.input_height, m.input_width, list(m.categories),
                         dict(m.thresholds), m.provider, m.precision, m.loaded_at, m.source_uri,
                         m.state or "SERVING", m.last_error, m.last_error_version, m.max_image_bytes,
                         dict(m.threshold_sources),
                         (m.tiling.image_height, m.tiling.image_width, m.tiling.stride)
                         if m.HasField("tiling") else None)

    def _parse(self, rpc: str, raw: Any) -> Any:
        if rpc == "Score":
            return self._score_result(raw)
        if rpc == "Feedback":
            return FeedbackResult(raw.request_id, raw.recorded_at)
        if rpc == "ListModels":
            return [self._model_info(m) for m in raw.models]
        return self._model_info(raw)

    @staticmethod
    def _from_http(call: _Call, body: Any) -> Any:
        """The gateway's JSON answer → the proto message the gRPC call would have returned."""
        if call.rpc == "ListModels":  # the gateway answers with the bare list
            body = {"models": body}
        try:
            return from_json(body, _RESPONSES[call.rpc])
        except (json_format.ParseError, TypeError, AttributeError) as exc:
            raise AnomalyError("INTERNAL", f"the gateway's answer to {call.http_method} {call.http_path} "
                                           f"does not fit {_RESPONSES[call.rpc].__name__}: {exc}") from exc

    # -- errors and retries ---------------------------------------------------------------
    @staticmethod
    def _error(exc: Exception) -> AnomalyError:
        """Any transport failure → `AnomalyError` (unknown exceptions are re-raised)."""
        if isinstance(exc, AnomalyError):
            return exc
        if isinstance(exc, grpc.RpcError):
            return AnomalyError(exc.code().name, exc.details() or "")  # type: ignore[attr-defined]
        if isinstance(exc, httpx.TimeoutException):
            return AnomalyError("DEADLINE_EXCEEDED", f"no answer in time: {exc!r}")
        if isinstance(exc, httpx.TransportError):
            return AnomalyError("UNAVAILABLE", f"cannot reach the gateway: {exc!r}")
        raise exc

    @staticmethod
    def _http_error(r: httpx.Response) -> AnomalyError:
        try:
            body = r.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        code = body.get("grpc_status") or _HTTP_CODES.get(r.status_code, "UNKNOWN")
        return AnomalyError(code, str(body.get("detail") or r.text[:500]), r.status_code)

    def _next_delay(self, err: AnomalyError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up now."""
        if not err.retryable or attempt >= self.retries:
            return None
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return delay if time.monotonic() + delay < deadline else None

    def _retry_delay(self, exc: Exception, attempt: int, deadline: float) -> float:
        """How long to wait before retrying after `exc`; raises the `AnomalyError` instead
        when the call should not (or can no longer) be retried."""
        err = self._error(exc)
        delay = self._next_delay(err, attempt, deadline)
        if delay is None:
            err.attempts = attempt + 1
            raise err from exc
        return delay

    @staticmethod
    def _remaining(deadline: float) -> float:
        return max(0.001, deadline - time.monotonic())


class AnomalyClient(_BaseClient):
    """Blocking client. Raises `AnomalyError` with the server's status and message."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self.http:
            self._http = httpx.Client(**self._http_options())
        else:
            self._channels = self._grpc_channels(aio=False)
            self._stubs = [pb_grpc.AnomalyDetectionStub(c) for c in self._channels]
            self._turn = 0

    def _send(self, call: _Call, timeout: float) -> Any:
        if not self.http:
            stub = self._next_stub()
            return getattr(stub, call.rpc)(call.message, timeout=timeout, metadata=self._call_metadata())
        r = self._http.request(**self._http_call(call), timeout=timeout)
        if r.status_code >= 400:
            raise self._http_error(r)
        return self._from_http(call, r.json())

    def _invoke(self, call: _Call, timeout: float | None) -> Any:
        with tracecontext.span(call.rpc, self._span_attributes(call)):
            deadline = time.monotonic() + (timeout or self.timeout)
            attempt = 0
            while True:
                try:
                    return self._parse(call.rpc, self._send(call, self._remaining(deadline)))
                except Exception as exc:  # noqa: BLE001 - converted or re-raised by _retry_delay
                    delay = self._retry_delay(exc, attempt, deadline)
                time.sleep(delay)
                attempt += 1

    def score(self, image: ImageInput, *, model: str = "", alias: str = "", version: int = 0,
              category: str = "", return_anomaly_map: bool = False, request_id: str = "",
              station: str = "", timeout: float | None = None, return_overlay: bool = False) -> ScoreResult:
        """Score one image (bytes or a file path); `return_overlay`: also the image with its heat
        map (`ScoreResult.overlay_png`)."""
        call = self._score_call(image, model=model, alias=alias, version=version, category=category,
                                return_anomaly_map=return_anomaly_map, request_id=request_id, station=station,
                                return_overlay=return_overlay)
        if self._needs_limit(call):
            try:
                self._max_image_bytes = self.get_model(timeout=min(self.timeout, 10.0)).max_image_bytes
            except AnomalyError:  # not learned now (server down?): the server will judge
                pass
        self._check_size(call)
        return self._invoke(call, timeout)

    def score_stream(self, images: Iterable[StreamItem], *, model: str = "", alias: str = "",
                     version: int = 0, category: str = "", return_anomaly_map: bool = False,
                     station: str = "", timeout: float | None = None) -> Iterator[ScoreResult]:
        """Score `images` (bytes, paths, or `(image, request_id)` pairs) over one gRPC stream;
        yields results in input order. `timeout` bounds the whole stream (None: no bound).

        Raises:
            AnomalyError: the first failure, which ends the stream (not retried).
        """
        fields = {"model": model, "alias": alias, "version": version, "category": category,
                  "return_anomaly_map": return_anomaly_map, "station": station}
        self._require_grpc()
        requests = (self._stream_message(item, **fields) for item in images)
        try:
            for response in self._next_stub().ScoreStream(requests, timeout=timeout, metadata=self._metadata):
                yield self._score_result(response)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The model versions loaded on the server."""
        return self._invoke(self._list_call(), timeout)

    def get_model(self, *, model: str = "", alias: str = "", version: int = 0,
                  timeout: float | None = None) -> ModelInfo:
        """Describe one model version."""
        return self._invoke(self._get_call(model, alias, version), timeout)

    def feedback(self, request_id: str, verdict: str, *, defect_type: str = "", operator: str = "",
                 comment: str = "", station: str = "", timeout: float | None = None) -> FeedbackResult:
        """Record an operator's verdict ("OK" or "NG") on a part scored earlier."""
        call = self._feedback_call(request_id, verdict, defect_type, operator, comment, station)
        return self._invoke(call, timeout)

    def close(self) -> None:
        """Close the connection(s)."""
        if self.http:
            self._http.close()
        else:
            for channel in self._channels:
                channel.close()

    def __enter__(self) -> AnomalyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAnomalyClient(_BaseClient):
    """asyncio client with the same methods as `AnomalyClient`."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self.http:
            self._http = httpx.AsyncClient(**self._http_options())
        else:
            self._channels = self._grpc_channels(aio=True)
            self._stubs = [pb_grpc.AnomalyDetectionStub(c) for c in self._channels]
            self._turn = 0

    async def _send(self, call: _Call, timeout: float) -> Any:
        if not self.http:
            return await getattr(self._next_stub(), call.rpc)(call.message, timeout=timeout,
                                                              metadata=self._call_metadata())
        r = await self._http.request(**self._http_call(call), timeout=timeout)
        if r.status_code >= 400:
            raise self._http_error(r)
        return self._from_http(call, r.json())

    async def _invoke(self, call: _Call, timeout: float | None) -> Any:
        with tracecontext.span(call.rpc, self._span_attributes(call)):
            deadline = time.monotonic() + (timeout or self.timeout)
            attempt = 0
            while True:
                try:
                    return self._parse(call.rpc, await self._send(call, self._remaining(deadline)))
                except Exception as exc:  # noqa: BLE001 - converted or re-raised by _retry_delay
                    delay = self._retry_delay(exc, attempt, deadline)
                await asyncio.sleep(delay)
                attempt += 1

    async def score(self, image: ImageInput, *, model: str = "", alias: str = "", version: int = 0,
                    category: str = "", return_anomaly_map: bool = False, request_id: str = "",
                    station: str = "", timeout: float | None = None,
                    return_overlay: bool = False) -> ScoreResult:
        """Score one image (bytes or a file path); `return_overlay`: also the image with its heat
        map (`ScoreResult.overlay_png`)."""
        call = self._score_call(image, model=model, alias=alias, version=version, category=category,
                                return_anomaly_map=return_anomaly_map, request_id=request_id, station=station,
                                return_overlay=return_overlay)
        if self._needs_limit(call):
            try:
                info = await self.get_model(timeout=min(self.timeout, 10.0))
                self._max_image_bytes = info.max_image_bytes
            except AnomalyError:  # not learned now (server down?): the server will judge
                pass
        self._check_size(call)
        return await self._invoke(call, timeout)

    async def score_stream(self, images: Iterable[StreamItem] | AsyncIterable[StreamItem], *,
                           model: str = "", alias: str = "", version: int = 0, category: str = "",
                           return_anomaly_map: bool = False, station: str = "",
                           timeout: float | None = None) -> AsyncIterator[ScoreResult]:
        """As `AnomalyClient.score_stream`; `images` may also be an async iterable."""
        fields = {"model": model, "alias": alias, "version": version, "category": category,
                  "return_anomaly_map": return_anomaly_map, "station": station}
        self._require_grpc()

        async def requests() -> AsyncIterator[pb.ScoreRequest]:
            if isinstance(images, AsyncIterable):
                async for item in images:
                    yield self._stream_message(item, **fields)
            else:
                for item in images:
                    yield self._stream_message(item, **fields)

        call = self._next_stub().ScoreStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield self._score_result(response)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            call.cancel()  # no-op when the stream ended; stops it when the caller breaks off

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The model versions loaded on the server."""
        return await self._invoke(self._list_call(), timeout)

    async def get_model(self, *, model: str = "", alias: str = "", version: int = 0,
                        timeout: float | None = None) -> ModelInfo:
        """Describe one model version."""
        return await self._invoke(self._get_call(model, alias, version), timeout)

    async def feedback(self, request_id: str, verdict: str, *, defect_type: str = "", operator: str = "",
                       comment: str = "", station: str = "", timeout: float | None = None) -> FeedbackResult:
        """Record an operator's verdict ("OK" or "NG") on a part scored earlier."""
        call = self._feedback_call(request_id, verdict, defect_type, operator, comment, station)
        return await self._invoke(call, timeout)

    async def close(self) -> None:
        """Close the connection(s)."""
        if self.http:
            await self._http.aclose()
        else:
            for channel in self._channels:
                await channel.close()

    async def __aenter__(self) -> AsyncAnomalyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
