"""gRPC channels to an `anomaly.v1` server, plaintext or TLS, built the same way by every
caller: the SDK, the HTTP gateway, the load tests and the studies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

MAX_MESSAGE = 64 * 1024 * 1024  # the largest message a client sends or accepts (bytes)
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]

TlsFiles = tuple[Path | str | None, Path | str | None, Path | str | None]


def channel_credentials(ca_file: Path | str | None, cert_file: Path | str | None = None,
                        key_file: Path | str | None = None) -> grpc.ChannelCredentials:
    """Client-side gRPC TLS credentials: trust `ca_file` (None = system roots), optionally
    with a client certificate and key for mutual TLS."""
    def read(p: Path | str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def grpc_channel(target: str, *, aio: bool, options: list[tuple[str, Any]] | None = None,
                 tls: TlsFiles = (None, None, None),
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: list[Any] | None = None) -> grpc.Channel:
    """A sync or `grpc.aio` channel to `target`: plaintext, or TLS when any of
    `tls` = (CA file, client certificate, client key) is given (see `channel_credentials`)
    or `credentials` are. `options` defaults to `MESSAGE_OPTIONS`. `interceptors`: aio
    channels only (a sync channel is wrapped with `grpc.intercept_channel` by its caller)."""
    api = grpc.aio if aio else grpc
    options = MESSAGE_OPTIONS if options is None else options
    extra = {"interceptors": interceptors} if aio and interceptors else {}
    if credentials is None and any(tls):
        credentials = channel_credentials(*tls)
    if credentials is None:
        return api.insecure_channel(target, options=options, **extra)
    return api.secure_channel(target, credentials, options=options, **extra)
