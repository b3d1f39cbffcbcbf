"""The server process: the gRPC server, and with `ANOMALY_HTTP_IN_PROCESS` the HTTP API on
the same data plane (`service.protocol.inprocess`), until SIGTERM/SIGINT; then a graceful drain.

`anomaly serve` runs `serve`; with `--processes N` it runs N of these under
`service.processes.Supervisor` instead. Such a child (`process_index` ≥ 0) watches its stdin, a
pipe from the supervisor: EOF means the supervisor is gone (even SIGKILLed), so it drains and
stops like on SIGTERM, and exits hard if that has not finished `HARD_EXIT_AFTER_S` past the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import threading
import time

from service.protocol.grpc.server import GrpcServer
from service.protocol.inprocess import local_backends, serve_http
from service.protocol.rest.gateway import create_app
from service.settings import Settings

log = logging.getLogger(__name__)
HARD_EXIT_AFTER_S = 10.0  # past grace_s: a child whose supervisor is gone exits even if draining hangs


def watch_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, grace_s: float) -> bool:
    """If stdin is a pipe (from `service.processes`), watch it in a daemon thread: at EOF set
    `stop`, then `os._exit(1)` if the process is still alive `grace_s + HARD_EXIT_AFTER_S`
    later. Returns whether it watches (not for a terminal, /dev/null or a closed stdin)."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return False
    except OSError:
        return False

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError as exc:
            log.warning("cannot watch the supervisor's pipe (%s); relying on its signals", exc)
            return
        log.warning("the supervisor is gone (its pipe closed): stopping")
        with contextlib.suppress(RuntimeError):  # the loop already closed: the process is exiting
            loop.call_soon_threadsafe(stop.set)
        time.sleep(grace_s + HARD_EXIT_AFTER_S)
        log.error("still running %.0f s after the supervisor went: exiting now", grace_s + HARD_EXIT_AFTER_S)
        os._exit(1)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
    return True


async def serve(settings: Settings) -> None:
    """Run the gRPC server until SIGTERM/SIGINT (or, for a child of `--processes`, until its
    supervisor is gone), then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.process_index >= 0:
        watch_supervisor(loop, stop, settings.grace_s)
    server = GrpcServer(settings)
    http = None
    try:
        await server.start()
        if settings.http_in_process:
            s = settings
            tls = {"ssl_certfile": str(s.https_cert_file), "ssl_keyfile": str(s.https_key_file)} \
                if s.https_cert_file else None
            http = await serve_http(create_app(s, local=local_backends(server)), s.http_host, s.http_port,
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
