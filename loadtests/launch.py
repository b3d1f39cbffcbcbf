"""Start the gRPC server and the gateway as child processes and wait until they are ready.

Used by the demo and the end-to-end tests: the real processes, on loopback ports, stopped
with SIGTERM (graceful shutdown) when the context exits.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anomaly.channel import grpc_channel
from service.processes import die_with_parent


def peak_rss_mb(pid: int, default: float = float("nan")) -> float:
    """Peak resident set size (`VmHWM`) of a live process in MB, from Linux's `/proc`;
    `default` when it cannot be read (the process is gone, or not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return default


def run_group(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` in a new process group that is killed whole (SIGKILL) when the
    command times out or the caller is interrupted (a test's timeout, Ctrl-C, SIGTERM
    turned into an exception), so no grandchild (`make` → a build → podman) outlives it."""
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_grpc_serving(target: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
                      credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll `grpc.health.v1` until the server reports SERVING.

    Raises:
        TimeoutError: not SERVING within `timeout`.
        RuntimeError: the process died first.
    """
    deadline = time.monotonic() + timeout
    with grpc_channel(target, aio=False, credentials=credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"gRPC server exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"gRPC server at {target} not SERVING after {timeout:.0f}s")


def wait_http_ready(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                    verify: str | bool | ssl.SSLContext = True) -> None:
    """Poll `GET url` until it answers 200.

    Raises:
        TimeoutError / RuntimeError: as `wait_grpc_serving`.
    """
    deadline = time.monotonic() + timeout
    if isinstance(verify, str):  # a CA file
        verify = ssl.create_default_context(cafile=verify)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def wait_metric(url: str, needle: str, timeout: float = 60.0) -> None:
    """Poll a Prometheus endpoint until its text contains `needle` (e.g. a child of
    `serve --processes` reporting its model loaded).

    Raises:
        TimeoutError: not within `timeout`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if needle in httpx.get(url, timeout=1.0).text:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not report {needle!r} within {timeout:.0f}s")


class ChildProcess:
    """An `anomaly …` child (`python -m cli.main …`) (or any `command`), logging to a file, stopped with
    SIGTERM.

    With `group`, the child leads its own process group and the signals go to the whole
    group: for servers that fork workers (`mlflow server`, `mlflow models serve`, KServe).
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, *,
                 command: list[str] | None = None, group: bool = False) -> None:
        self.args = command if command is not None else [sys.executable, "-m", "cli.main", *args]
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.group = group
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        """Spawn the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        # SIGTERM to the child when this process dies, however it dies (a killed `anomaly demo`
        # left its measuring server running on its port). Linux ties that signal to the thread
        # that forks, so only a child started from the main thread gets it: one started from a
        # short-lived thread would be stopped as soon as that thread ends.
        on_main_thread = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, stdin=subprocess.DEVNULL, start_new_session=self.group,
                                     preexec_fn=die_with_parent(os.getpid()) if on_main_thread else None)
        return self.proc

    @property
    def pid(self) -> int:
        """The child's process id (once started)."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send `sig` to the child (its whole group, with `group`)."""
        assert self.proc is not None
        try:
            if self.group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait (graceful drain), then SIGKILL if needed; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_server(tracking_uri: str, log_path: Path, *, port: int | None = None,
                 cache_dir: Path | None = None, model: str = "", alias: str = "",
                 timeout: float = 120.0, env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> tuple[ChildProcess, str]:
    """Start the gRPC server and wait for SERVING; returns (process, target).

    `env` adds `ANOMALY_*` settings (e.g. a short poll interval) for this server;
    `credentials` are needed to probe a server that serves TLS.
    """
    port = port or free_port()
    args = ["serve", "--tracking-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port)]
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    if model:
        args += ["--model", model]
    if alias:
        args += ["--alias", alias]
    child = ChildProcess(args, log_path, env)
    proc = child.start()
    target = f"127.0.0.1:{port}"
    try:
        wait_grpc_serving(target, timeout, proc, credentials)
    except Exception:
        child.stop()
        raise
    return child, target


def start_gateway(grpc_target: str, log_path: Path, *, port: int | None = None,
                  timeout: float = 60.0, env: dict[str, str] | None = None,
                  verify: str | bool = True) -> tuple[ChildProcess, str]:
    """Start the HTTP gateway and wait until `/readyz` is 200; returns (process, base URL).

    With `ANOMALY_HTTPS_CERT_FILE` in `env` the URL is https (`verify`: the CA to trust).
    """
    port = port or free_port()
    child = ChildProcess(["gateway", "--grpc-target", grpc_target, "--host", "127.0.0.1",
                          "--port", str(port)], log_path, env)
    proc = child.start()
    base = f"{'https' if (env or {}).get('ANOMALY_HTTPS_CERT_FILE') else 'http'}://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{base}/readyz", timeout, proc, verify)
    except Exception:
        child.stop()
        raise
    return child, base
