"""The server process: the gRPC server, and with `ANOMALY_HTTP_IN_PROCESS` the HTTP API on
the same data plane (`service.inprocess`), until SIGTERM/SIGINT; then a graceful drain.

`anomaly serve` runs `serve`; with `--processes N` it runs N of these under
`service.processes.Supervisor` instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from service.gateway import create_app
from service.grpc_server import GrpcServer
from service.inprocess import serve_http
from service.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    """Run the gRPC server until SIGTERM/SIGINT, then shut down gracefully."""
    server = GrpcServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = None
    try:
        await server.start()
        if settings.http_in_process:
            s = settings
            tls = {"ssl_certfile": str(s.https_cert_file), "ssl_keyfile": str(s.https_key_file)} \
                if s.https_cert_file else None
            http = await serve_http(create_app(s, local=server), s.http_host, s.http_port,
                                    log_level=s.log_level, grace_s=s.grace_s, tls=tls,
                                    reuse_port=s.process_index >= 0)
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    log.info("shutting down: draining in-flight requests for %.1fs", settings.grace_s)
    if http is not None:
        await http.stop()
    await server.stop()
