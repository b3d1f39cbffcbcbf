"""Errors of the data plane, each carrying the gRPC status code it maps to.

The engine raises these; the gRPC servicer turns them into a status + message, and the
HTTP gateway maps that status to an HTTP code with a problem+json body.
"""

from __future__ import annotations

import grpc


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
