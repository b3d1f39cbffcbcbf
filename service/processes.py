"""Several server processes on one port (`ANOMALY_PROCESSES`, `anomaly serve --processes N`).

One process spends about 1–2 ms of Python per request, much of it under the GIL, which
caps it near a thousand requests per second whatever the core count; ONNX Runtime alone
scales with the cores. So a host can run N copies of the server, each binding the same
gRPC port (and in-process HTTP port) with `SO_REUSEPORT`: the kernel hands each new
connection to one of them. Clients spread their calls by opening several connections
(`AnomalyClient(..., connections=K)`; the gateway's `grpc_connections`).

Each child is a whole server: its own models (loaded, validated and watched on its own),
`workers` and `solo_threads` = its share of the cores, metrics on `metrics_port + index`,
its own inspection spool. This supervisor starts them, forwards SIGTERM/SIGINT (each drains
its in-flight calls), and restarts a child that dies, waiting longer after each quick death
(up to a minute), so that one crash never takes the port down with it.

The children never outlive it. On Linux each gets SIGTERM when the supervisor dies, however
it dies (`PR_SET_PDEATHSIG`, `die_with_parent`), and everywhere each watches its stdin, a pipe
from the supervisor: EOF means the supervisor is gone, so it drains and stops, and exits hard
if draining hangs (`service.main`). Otherwise a SIGKILLed supervisor would leave them serving
the port with the old configuration (revoked API keys, old models) and holding their spools.

One supervisor per port. `SO_REUSEPORT` lets any process of the same user bind the port too,
so before starting anything the supervisor takes an exclusive `flock` on `serve-<port>.lock`
in its runtime folder (`ANOMALY_RUNTIME_DIR`) and hands that open file to every child: the
lock is held while the supervisor or any of its children lives, even after a SIGKILL. A second
supervisor on the port, or one started while a killed one's children still drain, refuses with
the pids written in the lock file (`PortHeld`). It also refuses a port that anything else
listens on (a lone `anomaly serve` binds without `SO_REUSEPORT`) and a spool still locked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pydantic import SecretStr

from service.settings import Settings, usable_cores

log = logging.getLogger(__name__)
QUICK_DEATH_S = 10.0  # a child that dies sooner than this after starting backs off longer
MAX_BACKOFF_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PortHeld(RuntimeError):
    """The port (or a child's inspection spool) is held by other processes: refuse to start."""


@cache
def _prctl() -> Callable[..., int] | None:
    """The C library's `prctl`, looked up once in the parent (never between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn` that has the child get SIGTERM (a graceful drain) when its parent dies.

    `parent`: the pid of the process calling `Popen`. Linux ties the signal to the thread that
    forked, not the process: start children from a thread that lives as long as the
    supervisor. A parent that died before the signal was set up is caught by comparing pids;
    off Linux this does nothing and the stdin pipe alone stops the child."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(1)

    return preexec


def runtime_dir(settings: Settings) -> Path:
    """The supervisor's runtime folder (`runtime_dir`, else `$XDG_RUNTIME_DIR/edge-anomaly`, else
    `<tmp>/edge-anomaly-<uid>`), created private to this user.

    Raises:
        PortHeld: it belongs to another user or others may write in it (they could hold the lock).
    """
    if settings.runtime_dir is not None:
        folder = Path(settings.runtime_dir)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "edge-anomaly"
    else:
        folder = Path(tempfile.gettempdir()) / f"edge-anomaly-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PortHeld(f"runtime folder {folder} is not this user's own (owner uid {st.st_uid}, mode "
                       f"{st.st_mode & 0o777:o}); set ANOMALY_RUNTIME_DIR to a private folder")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holders(text: str) -> str:
    """The pids a lock file names, for the refusal message."""
    try:
        data = json.loads(text)
        pids = [("supervisor", int(data["supervisor"]))]
        pids += [(f"server process {i}", int(pid)) for i, pid in sorted(data["children"].items())]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "pids unknown"
    return ", ".join(f"{what} pid {pid}{'' if _alive(pid) else ' (gone)'}" for what, pid in pids)


def port_in_use(host: str, port: int) -> OSError | None:
    """The error binding `host:port` gives now, if something listens there (None if free).

    Bound like a lone server (`SO_REUSEADDR`, no `SO_REUSEPORT`), so any listener, one that
    shares with `SO_REUSEPORT` included, makes it fail; other errors (a host that does not
    resolve here) are left to the children to report."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return exc
    return None


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | dict):
        return json.dumps([_env_value(v) for v in value] if isinstance(value, list) else value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_env(settings: Settings, index: int) -> dict[str, str]:
    """The environment of child `index`: every setting as `ANOMALY_*` (so the child resolves
    exactly these), with its share of the cores, its metrics port and its index."""
    share = max(1, usable_cores() // settings.processes)
    runs = share if settings.max_batch_size == 1 else settings.batch_workers  # calls at once per model
    env = {f"ANOMALY_{name.upper()}": _env_value(getattr(settings, name))
           for name in type(settings).model_fields if getattr(settings, name) is not None}
    env.update(ANOMALY_PROCESSES="1", ANOMALY_PROCESS_INDEX=str(index), ANOMALY_WORKERS=str(share),
               ANOMALY_SOLO_THREADS=str(share), ANOMALY_INTRA_OP_THREADS=str(max(1, share // runs)))
    if settings.metrics_port:
        env["ANOMALY_METRICS_PORT"] = str(settings.metrics_port + index)
    return env


class Supervisor:
    """Runs `settings.processes` server children and keeps them running until stopped."""

    def __init__(self, settings: Settings) -> None:
        if settings.grpc_port == 0:
            raise ValueError("--processes needs a fixed port (the children must share it); got port 0")
        self.settings = settings
        self.children: dict[int, tuple[subprocess.Popen, float]] = {}
        self.backoff: dict[int, float] = {}
        self.stopping = threading.Event()
        self.lock_fd = -1

    def claim(self) -> None:
        """Take the port's lock, then check that nothing listens on the port and that no
        child's spool is locked; keeps the lock (`lock_fd`) for the children to inherit.

        Raises:
            PortHeld: another supervisor or its children, or another process, hold either.
        """
        s = self.settings
        path = runtime_dir(s) / f"serve-{s.grpc_port}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holders = _holders(os.pread(fd, 65536, 0).decode(errors="replace"))
            os.close(fd)
            raise PortHeld(f"port {s.grpc_port} is held by another `anomaly serve --processes` ({holders}; "
                           f"lock {path}): stop it first (the server processes of a killed supervisor "
                           f"stop by themselves within ANOMALY_GRACE_S)") from exc
        self.lock_fd = fd
        ports = [("gRPC", s.grpc_host, s.grpc_port)]
        if s.http_in_process:
            ports.append(("HTTP", s.http_host, s.http_port))
        for what, host, port in ports:
            if (error := port_in_use(host, port)) is not None:
                self.release()
                raise PortHeld(f"{what} port {port} on {host} is in use by another process "
                               f"({error.strerror}): stop whatever listens there (e.g. a lone "
                               "`anomaly serve`) first")
        if s.inspection_log:
            for index in range(s.processes):
                folder = s.model_copy(update={"process_index": index}).spool_dir()
                try:
                    with (folder / "LOCK").open("rb") as f:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self.release()
                    raise PortHeld(f"inspection spool {folder} (server process {index} on port "
                                   f"{s.grpc_port}) is in use by another process: stop it first, or give "
                                   "each server its own ANOMALY_INSPECTION_SPOOL_DIR") from exc
        self._record()

    def release(self) -> None:
        """Let go of the port's lock (children still running keep it held)."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def _record(self) -> None:
        """Write who holds the lock into it, for a refused supervisor's message."""
        children = {str(i): proc.pid for i, (proc, _) in self.children.items()}
        data = json.dumps({"port": self.settings.grpc_port, "supervisor": os.getpid(),
                           "children": children}).encode()
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, data, 0)

    def _start(self, index: int) -> None:
        """Start child `index`: stdin a pipe only this supervisor writes to (EOF = it is gone),
        SIGTERM when it dies (Linux), the port's lock inherited."""
        old = self.children.get(index)
        if old is not None and old[0].stdin is not None:
            old[0].stdin.close()
        cmd = [sys.executable, "-m", "cli.main", "serve"]
        proc = subprocess.Popen(cmd, env={**os.environ, **child_env(self.settings, index)},
                                stdin=subprocess.PIPE, pass_fds=(self.lock_fd,),
                                preexec_fn=die_with_parent(os.getpid()))  # safe: no other threads here
        self.children[index] = (proc, time.monotonic())
        self._record()
        log.info("server process %d started (pid %d)", index, proc.pid)

    def stop(self, *_: object) -> None:
        """Ask every child to drain and stop (SIGTERM)."""
        self.stopping.set()
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Claim the port, start the children, restart any that dies, and return once all have
        stopped after `stop` (0, or the first non-zero exit code of that shutdown). Call it
        from the thread that lives as long as the supervisor (the parent-death signal).

        Raises:
            PortHeld: see `claim`; nothing was started.
        """
        self.claim()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for i in range(self.settings.processes):
            self._start(i)
        log.info("%d server processes sharing port %d", self.settings.processes, self.settings.grpc_port)
        restart_at: dict[int, float] = {}
        while not self.stopping.is_set():
            now = time.monotonic()
            for index, (proc, started) in list(self.children.items()):
                if proc.poll() is None or index in restart_at:
                    continue
                quick = now - started < QUICK_DEATH_S
                delay = min(MAX_BACKOFF_S, 2 * self.backoff.get(index, 0.5)) if quick else 1.0
                self.backoff[index] = delay
                restart_at[index] = now + delay
                log.error("server process %d (pid %d) exited with code %s; restarting it in %.0f s",
                          index, proc.pid, proc.returncode, delay)
            for index, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[index]
                    self._start(index)
            self.stopping.wait(0.2)
        deadline = time.monotonic() + self.settings.grace_s + 20
        code = 0
        for proc, _ in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = code or (proc.returncode if proc.returncode not in (None, -signal.SIGTERM) else 0)
            if proc.stdin is not None:
                proc.stdin.close()
        self.release()
        log.info("all server processes stopped")
        return code
