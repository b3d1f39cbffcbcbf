"""Bounded request bodies for the HTTP gateway: nothing is buffered past the limit.

The limit is enforced while the body streams in, whether it declares a `Content-Length`
(refused before reading when it is too big) or comes `Transfer-Encoding: chunked` (counted
chunk by chunk, refused at the first byte over). Multipart bodies go through Starlette's
parser on the same counted stream, allowed one file part and a few small text fields, so
the bound holds before anything is kept in memory or spooled to disk. A refused body
answers 413 and the connection is closed without reading the rest.

Memory, the arithmetic: a body of `n` bytes is held about three times at once (the bytes
read, the protobuf request, its serialised copy for gRPC). Each request reserves `3 × n`
(`n` = its Content-Length, or the whole limit when chunked) from a budget of
`http_body_memory_mb` before reading; what does not fit waits `decode_wait_s`, then gets
429. So bodies never hold more than that budget, whatever clients send.

Time: a body must arrive in whole within `http_body_timeout_s` of the first read. One that
does not (a client that sends headers with a large Content-Length and then stalls, or
trickles) raises `BodyTimeout`: the gateway answers 408 and closes the connection, and its
reservation is given back, so stalled uploads cannot hold the budget.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import metrics

log = logging.getLogger(__name__)
COPIES = 3  # bytes read + protobuf message + its serialised form
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small fields
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 4096


class BodyTooLarge(Exception):
    """The body is over the limit (HTTP 413)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        what = f"declares {declared} bytes" if declared is not None else "is over the limit"
        super().__init__(f"request body {what}; the limit is {limit} bytes (ANOMALY_MAX_IMAGE_BYTES)")


class BadBody(Exception):
    """The body is malformed (HTTP 400)."""


class BodyTimeout(Exception):
    """The body did not arrive in time (HTTP 408)."""


def body_limit(request: Request, image_limit: int) -> int:
    """The most bytes a score request's body may have: the image limit, plus room for the
    multipart framing when it is multipart."""
    ctype = request.headers.get("content-type", "").lower()
    return image_limit + (FORM_OVERHEAD if ctype.startswith("multipart/") else 0)


def declared_length(request: Request, limit: int) -> int | None:
    """The body's Content-Length, or None when chunked.

    Raises:
        BodyTooLarge: it declares more than `limit`.
        BadBody: the header is not a number.
    """
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        declared = int(value)
    except ValueError:
        raise BadBody(f"Content-Length {value!r} is not a number") from None
    if declared > limit:
        raise BodyTooLarge(limit, declared)
    return declared


async def counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; raises `BodyTooLarge` at the first byte past `limit`,
    `BodyTimeout` when the whole body is not in within the app's `http_body_timeout_s`
    (counted and logged at WARNING)."""
    timeout = request.app.state.settings.http_body_timeout_s
    loop = asyncio.get_running_loop()
    started = loop.time()
    total = 0
    stream = request.stream()
    try:
        while True:
            try:
                chunk = await next_by(stream, started + timeout)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                declared = request.headers.get("content-length")
                metrics.HTTP_BODY_TIMEOUTS.inc()
                log.warning("request body of %s %s from %s did not arrive within %g s "
                            "(ANOMALY_HTTP_BODY_TIMEOUT_S): %d of %s bytes; dropped, its memory freed",
                            request.method, request.url.path,
                            request.client.host if request.client else "?", timeout, total,
                            declared if declared is not None else "(chunked)")
                raise BodyTimeout(f"request body did not arrive within {timeout:g} s "
                                  f"({total} bytes received); send it faster or raise "
                                  "ANOMALY_HTTP_BODY_TIMEOUT_S") from None
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(limit)
            yield chunk
    finally:
        await stream.aclose()


async def next_by(stream: AsyncIterator[bytes], deadline: float) -> bytes:
    """The stream's next item if it comes by the loop time `deadline`; raises
    `asyncio.TimeoutError` (the builtin `TimeoutError` from 3.11) when it does not."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):  # novermin
            return await anext(stream)
    # Python 3.10 (JetPack 6): no asyncio.timeout_at; wait_for runs the read as a task of its own.
    return await asyncio.wait_for(anext(stream), deadline - asyncio.get_running_loop().time())


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes.

    Raises:
        BodyTooLarge: over the limit (stops reading there).
        BodyTimeout: not in within `http_body_timeout_s`.
    """
    body = bytearray()
    async for chunk in counted(request, limit):
        body += chunk
    return bytes(body)


async def read_form(request: Request, limit: int) -> FormData:
    """A multipart body, counted as it streams: one file part, at most `MAX_FORM_FIELDS`
    text fields of at most `MAX_FIELD_BYTES` each.

    Raises:
        BodyTooLarge: over the limit.
        BadBody: malformed multipart, or more parts than allowed.
        BodyTimeout: not in within `http_body_timeout_s`.
        ClientDisconnect: the client hung up before the end.
    """
    parser = MultiPartParser(request.headers, counted(request, limit), max_files=1,
                             max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise BadBody(f"malformed multipart body: {exc.message}") from exc
    except (BodyTooLarge, BodyTimeout, ClientDisconnect):
        raise
    except Exception as exc:  # python-multipart's own parse errors
        raise BadBody(f"malformed multipart body: {exc}") from exc
