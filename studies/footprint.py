"""Memory footprint of a real server process serving one model version.

Starts `anomaly serve` (a child process, loopback) pinned to one `name@alias`, scores a
few images over gRPC and reads the process's peak resident set size (`VmHWM`) from
`/proc`: what an edge box must budget for that variant, runtime and Python included.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def serving_peak_rss(tracking_uri: str, model_name: str, alias: str, images: list[Path],
                     category: str, work: Path) -> float:
    """Start a server for `model_name@alias`, score `images`, return its peak RSS in MB."""
    from edge_anomaly_client.sdk import AnomalyClient
    from loadtests.launch import peak_rss_mb, start_server

    child, target = start_server(tracking_uri, work / "logs" / f"rss-{alias}.log",
                                 cache_dir=work / "cache", model=model_name, alias=alias,
                                 env={"ANOMALY_MODELS": "[]"})
    try:
        with AnomalyClient(target) as client:
            for path in images:
                client.score(path, category=category)
        assert child.proc is not None
        return peak_rss_mb(child.proc.pid)
    finally:
        child.stop()
