"""Build the `edge-anomaly-client` wheel: the SDK and the wire contract it speaks, nothing else.

Usage: python clients/dist/build.py [--out dist]

Stages `clients/edge_anomaly_client`, `protos/anomaly` (its `v1` contract, `wire`, `channel` and
`http_json`; not the Open Inference Protocol stubs or the server's file helpers) and
`clients/dist/pyproject.toml` (with the project's version) into `build/client-dist`, then builds
the wheel there with pip. Prints the wheel's path.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ["__init__.py", "py.typed", "wire.py", "channel.py", "http_json.py", "v1"]


def project_version() -> str:
    """The root project's version (`[project] version` in pyproject.toml)."""
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise SystemExit("no version in pyproject.toml")
    return match.group(1)


def stage(where: Path) -> Path:
    """Copy what the distribution holds into `where` (emptied first)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "clients" / "edge_anomaly_client", where / "edge_anomaly_client", ignore=ignore)
    (where / "anomaly").mkdir()
    for name in CONTRACT:
        source = ROOT / "protos" / "anomaly" / name
        if source.is_dir():
            shutil.copytree(source, where / "anomaly" / name, ignore=ignore)
        else:
            shutil.copy2(source, where / "anomaly" / name)
    text = (ROOT / "clients" / "dist" / "pyproject.toml").read_text().replace("@VERSION@", project_version())
    (where / "pyproject.toml").write_text(text)
    return where


def build(out: Path) -> Path:
    """Stage and build the wheel into `out`; returns its path."""
    staged = stage(ROOT / "build" / "client-dist")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("edge_anomaly_client-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(staged)], check=True)
    (wheel,) = out.glob("edge_anomaly_client-*.whl")
    return wheel


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheel goes")
    print(build(parser.parse_args().out.resolve()))
