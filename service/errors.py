"""Errors of the data plane, each carrying the gRPC status code it maps to.

The engine raises these; the gRPC servicer turns them into a status + message, and the
HTTP gateway maps that status to an HTTP code with a problem+json body.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger("service.protocol.grpc.server")  # where unforeseen failures have always been logged


class ServiceError(Exception):
    """Base class: a request that cannot be served, with a client-facing message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request itself is wrong: bad image, bad field values."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    """Unknown model name, alias or version, or an unknown category."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """The server's bounded queue is full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(ServiceError):
    """No model is loaded yet, or the registry cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(ServiceError):
    """A model version exists but could not be downloaded, loaded or validated."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NonFiniteOutput(ServiceError):
    """The model produced a NaN or infinite score or map: no decision is made from it."""

    code = grpc.StatusCode.INTERNAL


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it reached the model (or its model loaded)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Refused(ServiceError):
    """The request is valid but the server's state forbids it (e.g. unloading a watched alias)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(ServiceError):
    """A failure the server did not foresee; the client gets only a reference to the log."""


def internal_error(exc: BaseException, request_id: str = "") -> InternalError:
    """Log an unforeseen failure with a reference; the client gets the reference only."""
    ref = request_id or uuid.uuid4().hex
    log.error("internal error (request_id=%s)", ref, exc_info=exc)
    return InternalError(f"internal error; the server log has the details under request_id={ref!r}")


def answering(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An RPC method whose `ServiceError`s answer their status and message, and whose
    unforeseen failures answer INTERNAL with a reference to the log (never their text)."""

    @functools.wraps(method)
    async def rpc(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error = internal_error(exc, getattr(request, "id", "") or getattr(request, "request_id", ""))
            await context.abort(error.code, error.message)

    return rpc


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an error's text (its type's name when it has none), cut at `limit`:
    what a note, a page or a one-line log message shows of a third-party error."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit is not None else line
