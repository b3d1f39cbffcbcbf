"""Several server processes on one port (`anomaly serve --processes N`, SO_REUSEPORT): each
connection lands on one of them, a client with several connections spreads its calls, a
killed child is restarted while the others keep answering, and SIGTERM stops them all.
Real processes, real gRPC, each child's own Prometheus metrics."""

from __future__ import annotations

import re
import signal
import time

import httpx
import psutil
import pytest
from conftest import wait_for

from clients.sdk import AnomalyClient
from loadtests.launch import free_port, start_server


def _ok_requests(port: int) -> float:
    """Successful Score calls one child has answered (its own metrics port)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1.0
    return sum(float(v) for v in re.findall(r'anomaly_requests_total\{[^}]*code="OK"[^}]*\} (\S+)', text))


def _loaded(port: int) -> bool:
    try:
        return "anomaly_model_loaded{" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
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
