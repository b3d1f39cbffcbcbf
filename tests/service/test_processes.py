"""Several server processes on one port (`anomaly serve --processes N`, SO_REUSEPORT): each
connection lands on one of them, a client with several connections spreads its calls, a
killed child is restarted while the others keep answering, and SIGTERM stops them all; the
children die with a SIGKILLed supervisor, and a second supervisor refuses a port still held.
Real processes, real gRPC, each child's own Prometheus metrics."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import wait_for

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import ChildProcess, free_port, start_server, wait_grpc_serving
from service.processes import PortHeld, runtime_dir
from service.settings import Settings


def _ok_requests(port: int) -> float:
    """Successful Score calls one child has answered (its own metrics port)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1.0
    return sum(float(v) for v in re.findall(r'anomaly_requests_total\{[^}]*code="OK"[^}]*\} (\S+)', text))


def _loaded(port: int) -> bool:
    try:
        return "anomaly_model_info{" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(300)
def test_two_processes_share_the_port_and_survive_a_crash(store, good_and_defect, tmp_path) -> None:
    metrics, port = free_port(), free_port()  # children: metrics and metrics + 1
    supervisor, target = start_server(store.tracking_uri, tmp_path / "server.log", port=port,
                                      cache_dir=tmp_path / "cache",
                                      env={"ANOMALY_PROCESSES": "2", "ANOMALY_METRICS_PORT": str(metrics)})
    try:
        wait_for(lambda: _loaded(metrics) and _loaded(metrics + 1), timeout=120, what="both children loaded")
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        image = good_and_defect[0][0].read_bytes()

        before = [_ok_requests(metrics + i) for i in range(2)]
        with AnomalyClient(target) as client:  # one connection: one process answers every call
            for _ in range(10):
                client.score(image)
        after = [_ok_requests(metrics + i) for i in range(2)]
        assert sorted(a - b for a, b in zip(after, before, strict=True)) == [0, 10]

        with AnomalyClient(target, connections=16) as client:  # 16 connections: both answer
            for _ in range(32):
                client.score(image)
        spread = [_ok_requests(metrics + i) - after[i] for i in range(2)]
        assert sum(spread) == 32 and min(spread) > 0, spread

        victim = children[1]
        victim.send_signal(signal.SIGKILL)
        with AnomalyClient(target, connections=4, retries=5) as client:  # the other keeps answering
            for _ in range(8):
                assert client.score(image).model.version == store.version
        def restarted() -> bool:
            return len([c for c in psutil.Process(supervisor.pid).children() if c.pid != victim.pid]) == 2

        wait_for(restarted, timeout=30, what="the killed child restarted")
        wait_for(lambda: _loaded(metrics) and _loaded(metrics + 1), timeout=120, what="child reloaded")
        assert "exited with code -9; restarting it" in (tmp_path / "server.log").read_text()
    finally:
        code = supervisor.stop(timeout=60)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                              for c in children):
        time.sleep(0.2)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def _alive(proc: psutil.Process) -> bool:
    """Still running (a zombie waiting for init to reap it counts as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_group(child: ChildProcess) -> None:
    """SIGKILL a started `ChildProcess(group=True)` and everything left in its process group."""
    if child.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.stop(timeout=10)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(420)
def test_children_die_with_a_killed_supervisor_and_a_held_port_is_refused(store, tmp_path) -> None:
    """SIGKILL the supervisor: its children stop within seconds (no orphan keeps serving the
    port with the old configuration or holding its spool), and a new supervisor starts and
    serves; a second supervisor started while the first lives refuses, naming the port and pids."""
    port, metrics = free_port(), free_port()
    env = {"ANOMALY_PROCESSES": "2", "ANOMALY_METRICS_PORT": str(metrics), "ANOMALY_GRACE_S": "2",
           "ANOMALY_RUNTIME_DIR": str(tmp_path / "run"), "ANOMALY_INSPECTION_LOG": "true",
           "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{tmp_path / 'inspections.db'}",
           "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")}
    args = ["serve", "--tracking-uri", store.tracking_uri, "--host", "127.0.0.1", "--port", str(port),
            "--cache-dir", str(tmp_path / "cache")]
    first, third = (ChildProcess(args, tmp_path / f"{name}.log", env, group=True)
                    for name in ("first", "third"))
    second = ChildProcess(args, tmp_path / "second.log", {**env, "ANOMALY_METRICS_PORT": str(free_port())},
                          group=True)  # its own metrics ports: nothing but the gRPC port and spools clash
    target, children = f"127.0.0.1:{port}", []
    try:
        wait_grpc_serving(target, 120, first.start())
        wait_for(lambda: _loaded(metrics) and _loaded(metrics + 1), timeout=120, what="both children loaded")
        children = psutil.Process(first.pid).children()
        assert len(children) == 2

        try:
            code = second.start().wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("a second supervisor on a port the first holds did not refuse within 60 s: "
                        + (tmp_path / "second.log").read_text()[-2000:])
        text = (tmp_path / "second.log").read_text()
        assert code != 0, text
        assert f"port {port}" in text and str(first.pid) in text, text
        assert _alive(children[0]) and _alive(children[1])  # the refusal touched nothing of the first

        first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.proc.wait(10)  # type: ignore[union-attr]
        wait_for(lambda: not any(_alive(c) for c in children), timeout=15,
                 what="the children of a SIGKILLed supervisor to exit")
        assert _refused(port)

        wait_grpc_serving(target, 60, third.start())  # the port, the lock and both spools are free
        wait_for(lambda: _loaded(metrics) and _loaded(metrics + 1), timeout=90, what="new children loaded")
        assert "in use" not in (tmp_path / "third.log").read_text()
        assert third.stop(timeout=60) == 0, (tmp_path / "third.log").read_text()[-3000:]
    finally:
        for child in (first, second, third):
            _kill_group(child)
        for proc in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.mark.timeout(120)
def test_a_supervisor_refuses_a_port_another_process_listens_on(tmp_path) -> None:
    """A port held by anything else (a lone `anomaly serve`, which binds without SO_REUSEPORT,
    or any other listener) is a clear error before any child starts, not children failing forever."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        child = ChildProcess(["serve", "--processes", "2", "--host", "127.0.0.1", "--port", str(port),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], tmp_path / "serve.log",
                             {"ANOMALY_RUNTIME_DIR": str(tmp_path / "run")}, group=True)
        try:
            try:
                code = child.start().wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail("the supervisor did not refuse a port in use: "
                            + (tmp_path / "serve.log").read_text()[-2000:])
            text = (tmp_path / "serve.log").read_text()
            assert code != 0 and f"port {port}" in text and "in use" in text, text
        finally:
            _kill_group(child)


@pytest.mark.timeout(120)
def test_a_supervisor_refuses_a_spool_another_process_holds(tmp_path) -> None:
    """A child's inspection spool still locked (e.g. by an orphan of an older release) is a
    clear error before any child starts, not children failing "spool in use" forever."""
    spool = tmp_path / "spool-p1"  # server process 1's spool
    spool.mkdir()
    child = ChildProcess(["serve", "--processes", "2", "--host", "127.0.0.1", "--port", str(free_port()),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], tmp_path / "serve.log",
                         {"ANOMALY_RUNTIME_DIR": str(tmp_path / "run"), "ANOMALY_INSPECTION_LOG": "true",
                          "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")}, group=True)
    with (spool / "LOCK").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            try:
                code = child.start().wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail("the supervisor did not refuse a spool in use: "
                            + (tmp_path / "serve.log").read_text()[-2000:])
            text = (tmp_path / "serve.log").read_text()
            assert code != 0 and f"inspection spool {spool}" in text and "in use" in text, text
        finally:
            _kill_group(child)


def test_a_runtime_folder_others_may_write_is_refused(tmp_path) -> None:
    """The port's lock lives in a folder only this user may write (else another could hold it)."""
    folder = tmp_path / "run"
    assert runtime_dir(Settings(runtime_dir=folder)) == folder
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)
    with pytest.raises(PortHeld, match="not this user's own"):
        runtime_dir(Settings(runtime_dir=folder))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.timeout(60)
def test_the_parent_death_signal_stops_a_child_of_a_killed_parent(tmp_path) -> None:
    """`die_with_parent`: a child started with it gets SIGTERM when its parent is SIGKILLed."""
    script = ("import os, subprocess, sys, time\n"
              "from service.processes import die_with_parent\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "preexec_fn=die_with_parent(os.getpid()))\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2], start_new_session=True)
    grandchild = None
    try:
        grandchild = psutil.Process(int(parent.stdout.readline()))  # type: ignore[union-attr]
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not _alive(grandchild), timeout=10, what="the child of a killed parent to exit")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
        if grandchild is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                grandchild.kill()


@pytest.mark.timeout(240)
def test_a_server_child_stops_when_its_supervisor_pipe_closes(store, tmp_path) -> None:
    """The portable half: a child of `--processes` (stdin a pipe from its supervisor) drains
    and exits when that pipe reaches EOF, with no signal at all."""
    port = free_port()
    env = {**os.environ, "ANOMALY_PROCESS_INDEX": "0", "ANOMALY_GRACE_S": "1"}
    log = (tmp_path / "child.log").open("wb")
    args = ["serve", "--tracking-uri", store.tracking_uri, "--host", "127.0.0.1", "--port", str(port),
            "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdin=subprocess.PIPE, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", 120, proc)
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("the child kept serving after its supervisor pipe closed")
        assert code == 0, (tmp_path / "child.log").read_text()[-2000:]
        assert _refused(port)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def test_a_launched_child_stops_when_its_launcher_is_killed(tmp_path) -> None:
    """`loadtests.launch.ChildProcess` (the demo's and the tests' servers): a SIGKILLed launcher
    leaves no child behind (the parent-death signal), where before its server kept its port."""
    pid_file = tmp_path / "child.pid"
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import pathlib, sys, time\n"
         "from loadtests.launch import ChildProcess\n"
         "child = ChildProcess([], pathlib.Path(sys.argv[1]) / 'child.log',\n"
         "                     command=[sys.executable, '-c', 'import time; time.sleep(120)'])\n"
         "pathlib.Path(sys.argv[1], 'child.pid').write_text(str(child.start().pid))\n"
         "time.sleep(120)\n", str(tmp_path)],
        cwd=Path(__file__).parents[2], start_new_session=True)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30)
        child = psutil.Process(int(pid_file.read_text()))
        assert child.is_running()
        launcher.kill()
        launcher.wait(timeout=10)
        child.wait(timeout=10)  # raises psutil.TimeoutExpired if it outlives the launcher
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
