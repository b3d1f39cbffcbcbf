"""Podman for the tests that build and run this project's images (test_images, test_kube_play):
the settings (deploy/podman/containers.conf), `make` and `podman` run in process groups killed
whole on timeout, the serve image built once per session (the `serve_image` fixture in
conftest.py), and the session's model store copied for the image's user (`store_copy`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.launch import run_group

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "edge-anomaly:serve"
APP_UID = 10001  # the image's user (docker/Dockerfile), as the Kubernetes manifests run it
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                       str(ROOT / "deploy" / "podman" / "containers.conf"))}


def make(target: str, timeout: float) -> subprocess.CompletedProcess:
    # In its own process group, killed whole if the test stops: a build must not outlive it.
    return run_group(["make", "--no-print-directory", target], timeout, cwd=ROOT, env=ENV,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = run_group(["podman", *args], timeout, env=ENV, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args[:3])}: {result.stderr}{result.stdout}"
    return result


def build_serve_image() -> str:
    """`make image-tools` then `make image-serve` (cached layers: seconds); skips where the tools
    cannot be installed here."""
    # `make image-tools`, run directly to tell "cannot be installed here" (exit 3: skip) from a failure.
    tools = run_group([sys.executable, str(ROOT / "deploy" / "podman" / "images.py"), "tools"], 600,
                      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if tools.returncode == 3:
        pytest.skip(f"cannot build images here: {tools.stdout.strip()}")
    assert tools.returncode == 0, tools.stdout + tools.stderr
    started = time.monotonic()
    built = make("image-serve", timeout=1200)
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    print(f"make image-serve: {time.monotonic() - started:.0f} s")
    return IMAGE


def copy_store_for_app(home: Path, copy: Path) -> Path:
    """The store at `home` copied to `copy`, owned by the image's user (it writes its tags and
    downloads); containers see it at `home`, where the store's artifact URIs point."""
    shutil.copytree(home, copy)
    for folder, _, files in os.walk(copy):
        os.chown(folder, APP_UID, APP_UID)
        for name in files:
            os.chown(os.path.join(folder, name), APP_UID, APP_UID)
    return copy
