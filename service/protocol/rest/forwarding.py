"""What the gateway's routes share: the way into the server behind them, and the error answers.

A route builds the request message and calls `forward(request, backend, "Method", message)`
with the caller's credentials. The backend is one of two, and each maps a failure to a
`Problem` once, from the one table `GRPC_TO_HTTP` (`problem`):

- `GrpcBackend`: the server over a gRPC connection (the gateway as its own process); a call
  that ends with a status becomes the `Problem` of that status.
- `service.protocol.inprocess.PlaneBackend`: the server's own message handlers in its own
  process (`ANOMALY_HTTP_IN_PROCESS`); a `ServiceError` becomes the `Problem` of its status.

`anomaly.v1` routes answer errors as RFC 9457 problem+json; the Open Inference Protocol
routes (`/v2/…`) as that protocol's `{"error": "…"}`.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

from service.dataplane.budget import MemoryBudget
from service.protocol.rest import http_body

PROBLEM = "application/problem+json"
V2_PREFIX = "/v2"
# Seconds a client should wait before retrying (RFC 9110 Retry-After): an overloaded server
# (429) frees up within a request's time; one not ready (503) is loading or swapping a model.
RETRY_AFTER_S = {429: 1, 503: 5}

# gRPC status → HTTP status (as grpc-gateway maps them).
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class Problem(Exception):
    """An error answered as problem+json."""

    def __init__(self, status: int, title: str, detail: str, grpc_code: str = "") -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.grpc_code = status, title, detail, grpc_code


def problem(code: grpc.StatusCode, detail: str) -> Problem:
    """The HTTP answer to a call that ended with the gRPC status `code` (`GRPC_TO_HTTP`)."""
    return Problem(GRPC_TO_HTTP.get(code, 500), code.name.replace("_", " ").title(), detail or code.name,
                   code.name)


Metadata = Sequence[tuple[str, str]]


class Backend(Protocol):
    """The server behind the routes, one service of it: `await call("Score", message, …)`
    answers the method's response message or raises `Problem`."""

    async def call(self, method: str, message: object, timeout: float | None,
                   metadata: Metadata) -> object:
        """Call `method` with `message` within `timeout` seconds, carrying `metadata`."""
        ...


class GrpcBackend:
    """One service of the server over gRPC connections, used in turn (`stubs`: generated
    `…Stub`s of that service, one per connection)."""

    def __init__(self, stubs: Sequence[object]) -> None:
        self._stubs = list(stubs)
        self._turn = 0

    async def call(self, method: str, message: object, timeout: float | None,
                   metadata: Metadata) -> object:
        """Make the call on the next connection; a status other than OK raises its `Problem`."""
        self._turn = (self._turn + 1) % len(self._stubs)
        try:
            return await getattr(self._stubs[self._turn], method)(message, timeout=timeout,
                                                                  metadata=tuple(metadata) or None)
        except grpc.aio.AioRpcError as exc:
            raise problem(exc.code(), exc.details() or "") from exc


def basic_sign_in(request: Request) -> tuple[str, str] | None:
    """A browser's HTTP Basic sign-in (the review station): (user name, password), or None."""
    auth = request.headers.get("authorization", "")
    if auth[:6].lower() != "basic ":
        return None
    try:
        user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


BASIC_SIGN_IN_PATHS = ("/review",)  # the browser pages; nowhere else is a cached sign-in a key


def credentials(request: Request) -> list[tuple[str, str]]:
    """The caller's key headers, passed on as they came (the gateway holds no key of its own).

    On the review station's pages a browser's HTTP Basic sign-in passes its password as the key;
    on every other route Basic is no key (a browser sends a cached sign-in to any page of the
    host, so another site could otherwise make calls with it). A value gRPC metadata cannot
    carry (not printable ASCII) is no key either: the call is then refused as unauthenticated,
    the same through the gateway as in-process.
    """
    found = [(k, v) for k, v in (("x-api-key", request.headers.get("x-api-key")),
                                 ("authorization", request.headers.get("authorization"))) if v]
    signed_in = basic_sign_in(request) if request.url.path.startswith(BASIC_SIGN_IN_PATHS) else None
    if signed_in and signed_in[1]:  # the server reads no key from `authorization: Basic`
        found.append(("x-api-key", signed_in[1]))
    return [(k, v) for k, v in found if v.isascii() and v.isprintable()]


async def forward(request: Request, backend: Backend, method: str, message: object) -> object:
    """Make one unary call with the caller's credentials, within `ANOMALY_REQUEST_TIMEOUT_S`."""
    return await backend.call(method, message, request.app.state.settings.request_timeout_s,
                              credentials(request))


def error_response(request: Request, status: int, title: str, detail: str,
                   grpc_code: str = "") -> JSONResponse:
    """An error answer in the shape of the route's protocol: problem+json, or the Open
    Inference Protocol's `{"error": …}` under `/v2`."""
    retry = RETRY_AFTER_S.get(status)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    if request.url.path == V2_PREFIX or request.url.path.startswith(V2_PREFIX + "/"):
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "instance": str(request.url.path)}
    if grpc_code:
        body["grpc_status"] = grpc_code
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


@asynccontextmanager
async def reserved_body(request: Request, limit: int) -> AsyncIterator[None]:
    """Hold the memory of a body of at most `limit` bytes (and its copies) from the
    gateway's budget while it is read and forwarded; 429 when it does not free up in time."""
    settings = request.app.state.settings
    budget: MemoryBudget = request.app.state.body_budget
    declared = http_body.declared_length(request, limit)
    async with budget.reserve(http_body.COPIES * (limit if declared is None else declared),
                              settings.decode_wait_s) as ok:
        if not ok:
            raise Problem(429, "Resource Exhausted",
                          f"gateway busy: {budget.in_use >> 20} of {budget.capacity >> 20} MB of request "
                          "memory in use (ANOMALY_HTTP_BODY_MEMORY_MB); retry later", "RESOURCE_EXHAUSTED")
        yield
